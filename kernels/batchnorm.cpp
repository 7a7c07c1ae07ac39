// The operators of the C ABI: argument checks, the split of a tensor into
// regions, OpenMP threading, and the per-channel arithmetic between the
// passes (merging moments, scale/shift, backward coefficients).
//
// Reproducibility. Every reduction is split into regions ("chunks") fixed by
// the tensor's shape; each chunk's moments or sums come from one microkernel
// call, the chunks are merged in order into at most kMaxSlices slices, and
// the slices in order into the channel's result. Threads only decide who
// computes which chunk, never the order of the arithmetic, so every output is
// bitwise the same for any thread count and any run (for one instruction set).
#include <immintrin.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <thread>
#include <type_traits>

#include "bnorm/bnorm.h"
#include "kernel_table.hpp"

namespace bnorm {
namespace {

// ---------------------------------------------------------------------------
// Errors: a status for the caller, a message for bnorm_last_error_message().

thread_local char g_message[256];

bnorm_status fail(bnorm_status status, const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::vsnprintf(g_message, sizeof g_message, format, args);
  va_end(args);
  return status;
}

bnorm_status succeed() {
  g_message[0] = '\0';
  return BNORM_SUCCESS;
}

// ---------------------------------------------------------------------------
// The split of a tensor into chunks, from its shape alone.

// NCHW chunks hold at most this many values of one channel (16 KiB, a third
// of a 48 KiB L1d: the moments kernel's second pass then reads L1).
constexpr int64_t kChunkValues = 4096;
// NHWC chunks are this many whole rows. The moments kernel reduces a chunk
// four vectors of channels at a time, both passes over the group's rows
// (256 x 128-256 bytes, in L1/L2) whatever C is, or, for rows of eight
// vectors and more, the rows in memory order with the sums in L1
// (moments_nhwc); every chunk costs scalar work per
// channel (its float sums to double, a merge), so chunks are as long as the
// accuracy bound allows: one float accumulator lane sums at most 256 values
// (docs/numerics.md).
constexpr int64_t kChunkRows = 256;
// Slices: NHWC tensors are cut into at most kMaxSlices slices of rows (all
// channels), NCHW channels into at most kMaxSlices / C slices each: enough
// for 64 threads in both cases, and scratch of at most kMaxSlices x C partial
// moments. Fewer slices mean longer ones; every chunk of a slice but the
// first is reduced in a single pass around the previous chunk's mean when it
// is close, the first around a provisional mean (see moments_nchw and
// nhwc_item_moments).
constexpr int64_t kMaxSlices = 64;
// Below this many bytes per thread (of traffic: inputs and outputs), another
// thread costs more than it saves: kBytesPerThread for the operations with a
// reduction, kStreamBytesPerThread for the elementwise passes alone
// (inference, backward apply), which do less per byte. On Zen 4 (session 7)
// two threads took 20-37% less time than one on 1x512x7x7 and the threshold
// was 64 KiB. On Zen 5, once one thread ran outside OpenMP and the barriers
// spun (session 16: run_threads, spin_barrier), one thread against two
// (bnorm-run --threads=1 and a build that always takes two, best of 3 x
// 2000 calls; time of two / time of one):
//   tensor S  shape            training     inference    backward
//   200 KB   1x256x14x14      1.60 / 1.08  2.53 / 1.40  1.84 / 0.94  (NHWC / NCHW)
//   256 KB   256x256          1.12 / 1.06  1.48 / 1.51  1.08 / 1.10
//   400 KB   1x128x28x28      0.87 / 0.71  1.33 / 1.21  0.63 / 0.66
//   400 KB   1x2048x7x7       1.18 / 0.67  2.10 / 1.02  1.12 / 0.64
//   800 KB   1x64x56x56       0.94 / 0.56  0.76 / 0.55  0.76 / 0.57
// Training moves 2S, backward 3S, inference 2S: two threads from 768 KiB
// of traffic with a reduction and from 1 MiB without one, with AVX-512.
// Narrower vectors take longer per byte in cache, and a second thread costs
// the same, so threads_for scales these by the vector width (AVX2: half).
// On Zen 3 with AVX2 (session 20), one process alternating one and two
// threads every millisecond (median of 61 rounds each; time of two / time
// of one, NCHW / NHWC, the range over one to four sweeps, whose spread is
// the machine's: see performance-notes.md on its two states):
//   tensor S  shape         training             inference            backward
//   100 KB   1x512x7x7     0.79-0.86/1.03-1.47  0.87-1.27/0.89-1.83  0.72-0.91/0.68-1.16
//   100 KB   8x64x7x7      0.76-1.28/0.71-1.20  0.79-1.15/0.76-1.18  0.70-1.20/0.76-1.69
//   200 KB   1x256x14x14   0.76-0.88/0.61-0.75  0.85-1.24/0.69-1.10  0.66-0.90/0.67-0.85
//   256 KB   256x256       0.67-0.82/0.65-0.80  0.79-0.88/0.68-0.81  0.65     /0.64-0.66
//   400 KB   1x128x28x28   0.72     /0.72       0.69-1.05/0.70-1.02  0.56     /0.55
//   400 KB   1x2048x7x7    0.59     /0.95       0.58-0.80/0.76-1.19  0.86     /0.59
// With AVX2 two threads take training from 192 KiB tensors, backward from
// 128 KiB and inference from 256 KiB: 100 KB tensors, where the two
// machine states disagree, stay on one. SSE2's quarter is not measured.
constexpr int64_t kBytesPerThread = 384 * 1024;
constexpr int64_t kStreamBytesPerThread = 512 * 1024;

struct plan {
  int64_t c, spatial;
  bool nhwc;          // (N, C) input (spatial == 1) is NHWC whatever the layout says
  int64_t count;      // values per channel: n * spatial
  int64_t rows;       // NHWC: n * spatial rows of c; NCHW: n rows of spatial per channel
  int64_t stride;     // floats between rows: c (NHWC) or c * spatial (NCHW)
  int64_t row_chunk;  // whole rows per chunk (NCHW: 0 when rows are cut into pieces;
                      // NHWC: some chunks have a row more, see nhwc_chunk)
  int64_t pieces;     // NCHW: chunks per row when rows are cut
  int64_t chunks;     // chunks per channel (NCHW) or per column block (NHWC)
  int64_t slices;
};

plan make_plan(const bnorm_shape& s) {
  plan p{};
  p.c = s.c;
  p.spatial = s.spatial;
  p.nhwc = s.layout == BNORM_NHWC || s.spatial == 1;
  p.count = s.n * s.spatial;
  if (p.count == 0) {
    // No values (valid for inference and backward): no chunks, and no
    // products such as c * spatial, which need not fit when n == 0.
    p.slices = 1;
    return p;
  }
  if (p.nhwc) {
    p.rows = p.count;
    p.stride = s.c;
    // Chunks of equal length (to a row, see nhwc_chunk), and an even number
    // of them when there are several: tensors of fewer chunks than
    // kMaxSlices have a chunk per slice, and two threads then get equal
    // shares (8x512x7x7: 196 + 196 rows, not 256 + 136; 8x256x14x14: 4 + 4
    // chunks of 196 rows, not 3 + 4 of 224 or 256).
    p.chunks = (p.rows + kChunkRows - 1) / kChunkRows;
    if (p.chunks > 1) p.chunks += p.chunks % 2;
    p.row_chunk = p.rows / p.chunks;  // the first rows % chunks chunks have a row more
  } else {
    p.rows = s.n;
    p.stride = s.c * s.spatial;
    if (s.spatial <= kChunkValues) {
      // At most kChunkRows images: planes narrower than the reductions'
      // accumulators put one value per image in a lane (docs/numerics.md).
      p.row_chunk = std::min(kChunkRows, kChunkValues / std::max<int64_t>(s.spatial, 1));
      p.chunks = (s.n + p.row_chunk - 1) / p.row_chunk;
    } else {
      p.pieces = (s.spatial + kChunkValues - 1) / kChunkValues;
      p.chunks = s.n * p.pieces;
    }
  }
  // At least one slice, even an empty one: no division by zero when a
  // tensor has no values (valid for inference and backward).
  const int64_t most = p.nhwc ? kMaxSlices : (kMaxSlices + s.c - 1) / s.c;
  p.slices = std::max<int64_t>(1, std::min(p.chunks, most));
  return p;
}

// NHWC rows whose channels do not fill whole vectors (C = 3, 20, 100 with
// 8 floats a vector) leave each row a tail of C % W channels that the
// kernels take a lane at a time; at C = 3 every value went that way (NHWC
// forward training of 32x3x224x224 took 7.7 times as long as NCHW). Read g
// rows at a time as one row of L = g * C channels, L the least common
// multiple of C and the vector width (and of 8, so that every part starts
// on a byte of the ReLU mask), the same memory is a tensor of whole
// vectors: channel j of it is channel j % C. The operations run on that
// tensor, the rows left over (fewer than g) run as they are, and the
// per-channel results fold back: moments merged in order (Chan), sums
// added in order; per-channel inputs are repeated g times. Each folded
// channel's lanes still sum at most kChunkRows values (docs/numerics.md).
// Not for L beyond kFoldFloats: C is then large, and its tail a small part
// of each row. The operators run their folded phases one after the other
// (as the split-phase API); walking the elementwise pass backwards after the
// reduction, as the fused paths do in cache, measured the same (bnorm_ab,
// NHWC 32x92x28x28, 32x20x56x56, 8x3x224x224: within 3%, session 21).
constexpr int64_t kFoldFloats = 1024;

// NCHW planes of at most kSpreadPlane values, shorter than a vector or
// about one, cost the NCHW kernels a row of their own each (NCHW training
// of 16x512x2x2 took 108 us, the same bytes as NHWC 16x2048 22 us). Such a
// tensor is also N rows of C * spatial columns, S = spatial consecutive
// columns to a channel: it runs as that NHWC tensor ("spread"), each
// channel's S columns merged (merge_columns) and their sums added in order,
// per-channel inputs repeated S times in place. The wide tensor has S times
// the per-channel (per-column) work, so it takes at least as many images as
// values a plane: with fewer, spatial 4-8 with C = 4096 took up to twice as
// long as the NCHW kernels (training of 2-4 images). Time against the NCHW
// kernels (op harness, median of 5; training / inference / backward):
// 64x256x2 0.13 / 0.12 / 0.30, 16x512x4 0.23 / 0.22 / 0.77, 8x256x8
// 0.56 / 0.31 / 0.53, 32x256x8 0.55 / 0.57 / 1.00, 2048x16x4 0.19 / 0.26
// / 0.14, 8x4096x8 0.73 / 0.63 / 0.80, 3x4096x3 0.58 / 0.53 / 0.86,
// 128x64x7 0.53 / 0.49 / 0.54. Planes of 9 values measured even, of 16 and
// 25 slower. Each wide column's lanes sum at most kChunkRows values, as
// every NHWC tensor's (docs/numerics.md).
constexpr int64_t kSpreadPlane = 8;

struct folding {
  int64_t g;         // rows per row of `whole`; 1: not folded
  int64_t spread;    // columns per channel in `whole` (kSpreadPlane); 1: not spread
  int64_t channels;  // channels of `whole`: g * c or spread * c
  plan whole;        // the tensor, or its first rows g at a time, or its NHWC view
  plan rest;         // the rows left over (count 0: none)
  int64_t at;        // index of the rest's first value, a multiple of 8

  // Whether `whole` has other channels than the tensor.
  bool changed() const { return g > 1 || spread > 1; }
  // Per-channel results the folded phases hold: the whole's, then the rest's.
  int64_t results() const { return g > 1 ? channels + channels / g : channels; }
};

folding fold(const bnorm_shape& s, int64_t width) {
  const plan p = make_plan(s);
  folding f{1, 1, s.c, p, make_plan({0, s.c, 1, BNORM_NHWC}), 0};
  if (!p.nhwc && s.c > 0 && s.spatial > 1 && s.spatial <= kSpreadPlane && s.n >= s.spatial)
    return {1,      s.spatial, s.c * s.spatial, make_plan({s.n, s.c * s.spatial, 1, BNORM_NHWC}),
            f.rest, 0};
  if (!p.nhwc || p.count == 0 || s.c % width == 0 || s.c > kFoldFloats) return f;
  const int64_t l = std::lcm(s.c, std::max<int64_t>(width, 8)), g = l / s.c;
  if (l > kFoldFloats || p.rows < g) return f;
  return {g,
          1,
          l,
          make_plan({p.rows / g, l, 1, BNORM_NHWC}),
          make_plan({p.rows % g, s.c, 1, BNORM_NHWC}),
          p.rows / g * l};
}

// a[j * S + i] = a[j] for j < c, i < S; from the end, in place. S is a
// constant so that the inner loop unrolls (with S a variable the NCHW
// inference of 2x4096x2x1 spent 80% of its time here).
template <int S>
void spread_in_place(float* a, int64_t c) {
  for (int64_t j = c - 1; j >= 0; --j) {
    const float v = a[j];
    for (int i = 0; i < S; ++i) a[j * S + i] = v;
  }
}

// spread_in_place<S> by S, for the spreads fold() makes.
using spreader = void (*)(float*, int64_t);
constexpr spreader kSpreaders[kSpreadPlane + 1] = {nullptr,
                                                   nullptr,
                                                   spread_in_place<2>,
                                                   spread_in_place<3>,
                                                   spread_in_place<4>,
                                                   spread_in_place<5>,
                                                   spread_in_place<6>,
                                                   spread_in_place<7>,
                                                   spread_in_place<8>};
static_assert(kSpreadPlane == 8, "a spreader for each plane size");

// The first c values of each array, repeated to fill f.channels: as a whole
// (folded), or each value f.spread times (spread).
void repeat_channels(const folding& f, int64_t c, std::initializer_list<float*> arrays) {
  for (float* a : arrays) {
    for (int64_t j = c; j < f.channels && f.g > 1; ++j) a[j] = a[j - c];
    if (f.spread > 1) kSpreaders[f.spread](a, c);
  }
}

// Chunk k of an NCHW channel: its region and its offset from the channel's
// first value.
int64_t nchw_chunk(const plan& p, int64_t k, region* r) {
  if (p.row_chunk > 0) {
    const int64_t row = k * p.row_chunk;
    *r = {std::min(p.row_chunk, p.rows - row), p.spatial, p.stride};
    return row * p.stride;
  }
  const int64_t row = k / p.pieces, col = (k % p.pieces) * kChunkValues;
  *r = {1, std::min(kChunkValues, p.spatial - col), p.stride};
  return row * p.stride + col;
}

// Asks for n floats from p to be brought into L2 (see block_pass). The
// instruction is a volatile asm statement: GCC 12 takes a function whose
// only effect is __builtin_prefetch for one without effects and deletes
// calls to it. Until session 9 the NHWC reductions asked for the next chunk
// (up to 256 KiB) while reducing one, and no such request was ever compiled;
// made real, they cost 10-31% (NHWC forward training 32x64x112x112 +30%,
// 65536x256 +10%; backward 128x128x28x28 +25%), and they are gone.
void prefetch_floats(const float* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(float)); b += 64)
    asm volatile("prefetcht1 %0" : : "m"(bytes[b]));
}

// Chunk k of an NHWC tensor: whole rows.
int64_t nhwc_chunk(const plan& p, int64_t k, region* r) {
  const int64_t longer = p.rows - p.row_chunk * p.chunks;  // chunks of row_chunk + 1 rows
  const int64_t row = k * p.row_chunk + std::min(k, longer);
  *r = {p.row_chunk + (k < longer ? 1 : 0), p.c, p.stride};
  return row * p.stride;
}

int64_t slice_begin(const plan& p, int64_t slice) { return slice * p.chunks / p.slices; }

// NHWC work is cut into items: one slice's chunks, restricted to the columns
// [c0, c1). Normally an item is a whole slice. When a tensor has too few
// slices for the threads (few rows: 7x7 and 14x14 images at batch 1, (N, C)
// input with small N), every slice is also cut into nt column blocks of
// whole 64-channel groups, so that no thread idles. The kernels' vector groups then start at the same
// multiples of 64 channels as without blocks, and every channel is reduced
// in its own lane, so a channel's arithmetic, and its result bits, do not
// depend on the blocks (nor on the thread count).
constexpr int64_t kColumnGroup = 64;

struct nhwc_item {
  int64_t slice, c0, c1;
};

struct item_range {
  int64_t begin, end;
};

// Thread t's even, contiguous share of n items.
item_range share_of(int64_t n, int t, int threads) {
  return {n * t / threads, n * (t + 1) / threads};
}

// The channels that thread t of `threads` reduces in one slice, merges and
// finishes.
item_range channels_of(const plan& p, int t, int threads) { return share_of(p.c, t, threads); }

struct nhwc_work {
  const plan& p;
  int64_t blocks;  // column blocks per slice

  nhwc_work(const plan& p_, int nt) : p(p_), blocks(1) {
    const int64_t groups = (p.c + kColumnGroup - 1) / kColumnGroup;
    // Only when some thread would have no slice: column blocks measured
    // slower than uneven shares of slices (NHWC forward training, 12x49x1024,
    // 3 slices between 2 threads: 4.0 copies as slices, 4.7 as 2x3 blocks;
    // the threads then read half-rows of the same pages).
    if (p.slices < nt) blocks = std::min<int64_t>(groups, nt);
  }
  int64_t items() const { return p.slices * blocks; }
  // Channels in the narrowest column block.
  int64_t narrowest() const {
    int64_t least = p.c;
    for (int64_t b = 0; b < blocks; ++b) least = std::min(least, item(b).c1 - item(b).c0);
    return least;
  }
  nhwc_item item(int64_t i) const {
    const int64_t b = i % blocks, groups = (p.c + kColumnGroup - 1) / kColumnGroup;
    return {i / blocks, std::min(p.c, b * groups / blocks * kColumnGroup),
            std::min(p.c, (b + 1) * groups / blocks * kColumnGroup)};
  }
  // The items thread t of nt reduces (and later normalizes): contiguous, in
  // (slice, block) order, so that each thread streams its own rows.
  item_range share(int t, int nt) const { return share_of(items(), t, nt); }
};

// The cache sizes the machine reports: Linux's sysfs first (what lscpu
// shows), then glibc's sysconf. sysfs wins because glibc derives the sizes
// from CPUID leaves that some hypervisors fill oddly (on this project's KVM
// machines sysconf says 320 MiB for a 32 MiB L3). level 0: the largest.
int64_t sysfs_cache_bytes(int level) {
  int64_t best = 0;
  for (int index = 0; index < 8; ++index) {
    char path[80];
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
    std::FILE* f = std::fopen(path, "r");
    if (!f) break;
    int this_level = 0;
    bool ok = std::fscanf(f, "%d", &this_level) == 1;
    std::fclose(f);
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", index);
    if ((f = std::fopen(path, "r"))) {  // not the L1 instruction cache
      char type[16] = "";
      ok = ok && std::fscanf(f, "%15s", type) == 1 && std::strcmp(type, "Instruction") != 0;
      std::fclose(f);
    }
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
    f = std::fopen(path, "r");
    if (!f) break;
    long long value = 0;
    char unit = 0;
    if (ok && (level == 0 || level == this_level) && std::fscanf(f, "%lld%c", &value, &unit) >= 1) {
      const int64_t bytes = value * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
      best = std::max(best, bytes);
    }
    std::fclose(f);
  }
  return best;
}

// A hypervisor may report its host's whole L3 instead of what the guest's
// CPUs can count on: glibc's sysconf (from CPUID) said 508 MiB on this
// project's AMD EPYC Zen 5 machine (2 CPUs of a 32 MiB core complex), and on
// its Intel Xeon machine (family 6 model 207, 2 CPUs) sysfs and CPUID both say
// 260 MiB, the L3 of the whole socket, shared with the host's other cores
// and guests. No x86 part sold in volume has more than 16 MiB of L3 per core
// (AMD's 96 MiB 3D V-Cache over 6 cores; Intel 2-5 MiB), so a larger figure
// per online CPU is taken as the host's, and the cache as 16 MiB per CPU. A
// few server parts with one or two cores per 32-96 MiB complex have more, and
// lose that cache here; BNORM_CACHE_BYTES sets the size outright.
constexpr int64_t kMaxCachePerCpu = int64_t{16} << 20;

int64_t online_cpus() { return std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN)); }

// The L3 as reported (sysfs, else sysconf's L3, else its L2, else 1 MiB).
int64_t reported_cache_bytes() {
  const int64_t sysfs = sysfs_cache_bytes(0);
  if (sysfs > 0) return sysfs;
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return l3 > 0 ? l3 : l2 > 0 ? l2 : 1 << 20;
}

// BNORM_CACHE_BYTES when it is a positive number of bytes, else 0.
int64_t cache_bytes_from_env() {
  const char* env = std::getenv("BNORM_CACHE_BYTES");
  if (!env) return 0;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  return end != env && *end == '\0' && v > 0 ? static_cast<int64_t>(v) : 0;
}

// The reported L3 is the host's (see kMaxCachePerCpu).
bool hosts_cache() { return reported_cache_bytes() > kMaxCachePerCpu * online_cpus(); }

// The last-level cache, or BNORM_CACHE_BYTES: the tests set it small to take
// the paths of tensors larger than the cache (streaming stores, fused NCHW
// blocks) with small tensors, and a user can correct a size that the machine
// gets wrong.
int64_t cache_bytes() {
  static const int64_t bytes = [] {
    if (const int64_t env = cache_bytes_from_env()) return env;
    return std::min(reported_cache_bytes(), kMaxCachePerCpu * online_cpus());
  }();
  return bytes;
}

// One core's cache of `level` (1: the data cache): sysfs, else sysconf's
// `name`, else `fallback` bytes.
int64_t core_cache_bytes(int level, int name, int64_t fallback) {
  const int64_t sysfs = sysfs_cache_bytes(level);
  if (sysfs > 0) return sysfs;
  const long bytes = sysconf(name);
  return bytes > 0 ? static_cast<int64_t>(bytes) : fallback;
}

int64_t l2_bytes() {
  static const int64_t bytes = core_cache_bytes(2, _SC_LEVEL2_CACHE_SIZE, 256 * 1024);
  return bytes;
}

// The ways of one core's L2 (glibc's sysconf, from CPUID), 8 when unknown.
int64_t l2_ways() {
  static const int64_t ways = [] {
    const long w = sysconf(_SC_LEVEL2_CACHE_ASSOC);
    return w > 0 ? static_cast<int64_t>(w) : int64_t{8};
  }();
  return ways;
}

int64_t l1_bytes() {
  static const int64_t bytes = core_cache_bytes(1, _SC_LEVEL1_DCACHE_SIZE, 32 * 1024);
  return bytes;
}

// Floats in a 4 KiB page.
constexpr int64_t kPageFloats = 1024;

// Non-temporal stores pay off only when the data cannot stay in cache:
// then they skip the read-for-ownership of every output line and leave the
// cache to the inputs. In cache, ordinary stores are faster. Where the L3 is
// the host's (hosts_cache), the cache that stores can count on is the cores'
// own L2s: on the Intel Xeon machine (2 MiB L2 per core) a copy with
// ordinary stores ran at 50 GB/s against 67 GB/s with streaming ones at
// 4 MiB, 26 against 62 at 64 MiB. Forward inference with streaming stores
// from 4 MiB of data read and written on, against streaming from 260 MiB
// (bnorm_ab both orders twice, session 30): NHWC 1x256x56x56 -21..-24%,
// 8x64x56x56 -13..-23%, 32x128x28x28 -14..-20%, 8x256x14x14 (3.2 MB) even;
// NCHW 32x64x112x112 -41% (one round). With the L2s and the L3 as one 4 MiB
// cache for the blocks and reductions too, the backward and training took
// up to 1.3x longer: the L3 still serves their second reads.
int64_t stream_bytes() {
  static const int64_t bytes = [] {
    if (const int64_t env = cache_bytes_from_env()) return env;
    return hosts_cache() ? l2_bytes() * online_cpus() : cache_bytes();
  }();
  return bytes;
}

bool stream_for(int64_t bytes) { return bytes > stream_bytes(); }

// `arrays` tensors of p's size do not fit in the cache together.
bool exceeds_cache(const plan& p, int arrays) {
  return arrays * p.count * p.c * static_cast<int64_t>(sizeof(float)) > cache_bytes();
}

// The NHWC reductions' `far`: the tensor alone does not fit in the cache,
// so the reduction reads it from memory. Until session 29 the test was the
// forward's for streaming stores (the tensor and an output of its size), and
// tensors of a half to all of the cache, which a reduction reads from the
// L3 when they were written or read just before, took the paths for memory
// (one row at a time, two chunks in step). In the cache's paths, on Zen 5
// (bnorm_ab both orders twice): forward training 8x256x56x56 -7..-14%,
// with ReLU -7..-11%, 128x256x14x14 -1..-3%; 32x64x56x56, 8x64x112x112,
// 32x1024x14x14 and 4096x1024 even.
bool far(const plan& p) { return exceeds_cache(p, 1); }
// The NHWC backward sums': x, dy and dx do not fit in the cache together
// (backward_reduce_rows then places its sums away from the rows' 4 KiB
// aliases). With far(p) instead, tensors of a third to a half of the cache
// kept their sums on the stack: NHWC backward 32x128x28x28 -13% and
// 128x512x7x7 -9% placed (op harness, five rounds; with ReLU even).
bool backward_far(const plan& p) { return exceeds_cache(p, 3); }

// Called from inside an active parallel region that may not nest another,
// one thread: a region there would be a team of one, and its cost (below,
// run_threads) for nothing.
int threads_for(int64_t bytes, int64_t per_thread) {
  if (omp_get_active_level() >= omp_get_max_active_levels()) return 1;
  const int64_t useful = bytes / (per_thread * kernels().width / 16);  // see kBytesPerThread
  const int max_threads = omp_get_max_threads();
  return useful < 1 ? 1 : (useful < max_threads ? static_cast<int>(useful) : max_threads);
}

// The threads' barrier: one counter of arrivals and a generation that the
// last arrival moves on, waited for by spinning, then by yielding the core
// (more threads than cores). libgomp's `omp barrier` has its last thread
// wake the others with a futex system call whether anyone sleeps or not,
// and under this machine's KVM that call takes 1 us: a parallel region of
// two threads took 1.9 us, 2.9 with an `omp barrier`, 1.5-1.9 with this
// one (best of 20000, session 16). The reductions' regions hold two.
class spin_barrier {
 public:
  void wait(int threads) {
    const unsigned generation = generation_.load(std::memory_order_relaxed);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation;) {
      if (spins < kSpins) {
        ++spins;
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kSpins = 4096;
  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  // Each on a line of its own: the waiters read generation_ while the
  // others arrive.
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<unsigned> generation_{0};
};

// Thread t of `threads` running one parallel body, and their barrier.
struct team {
  int t, threads;
  spin_barrier* sync;
  void barrier() const {
    if (threads > 1) sync->wait(threads);
  }
};

// The elementwise kernels' streaming stores are weakly ordered and left
// unfenced (kernel_table.hpp): each thread fences them once, when its body
// is done, before the caller or the region's end can read y or dx. Until
// session 26 every kernel call fenced its own, and an sfence waits for the
// thread's stores to reach memory: NCHW training blocks call the normalize
// once per image's part of a block (3 KiB at 32x512x28x28), and fenced
// there they took 13-22% longer (bnorm_ab, both orders twice).
void fence_streaming_stores() { _mm_sfence(); }

// Runs body(team) on up to nt threads. One thread runs it here, outside
// OpenMP: libgomp ends even a team of one (`parallel if (false)`) with a
// barrier whose futex call (above) made the four regions and barriers of
// NHWC forward training of 1x16x1x1 take 3.9 us on one thread, 0.5 us
// without them (session 16).
template <class Body>
void run_threads(int nt, Body&& body) {
  spin_barrier sync;
  if (nt <= 1) {
    body(team{0, 1, &sync});
    fence_streaming_stores();
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    body(team{omp_get_thread_num(), omp_get_num_threads(), &sync});
    fence_streaming_stores();
  }
}

// Runs f(i) for i in [0, n) on up to nt threads, each thread an even,
// contiguous share (as `omp parallel for schedule(static)`); f(i, t) where
// f also takes the thread's index t (for per-thread scratch).
template <class F>
void parallel_for(int nt, int64_t n, F f) {
  run_threads(nt, [&](const team& tm) {
    const item_range r = share_of(n, tm.t, tm.threads);
    for (int64_t i = r.begin; i < r.end; ++i) {
      if constexpr (std::is_invocable_v<F&, int64_t, int>)
        f(i, tm.t);
      else
        f(i);
    }
  });
}

// ---------------------------------------------------------------------------
// Moments: merging and their use.

// Chan, Golub & LeVeque's pairwise update: the moments of the union.
void merge(partial& a, const moments& b, double nb) {
  if (a.n == 0) {
    a = {b, nb};
    return;
  }
  const double n = a.n + nb;
  const double delta = b.mean - a.m.mean;
  a.m.mean += delta * (nb / n);
  a.m.m2 += b.m2 + delta * delta * (a.n * nb / n);
  a.n = n;
}

// The moments of the union of k sets of the same count (a[i].n): the mean
// of their means, and m2 the sum of theirs and of each count times its
// mean's squared deviation from that mean. One division where k - 1
// merge() calls take 2(k - 1): the spread NCHW training of 8x4096x8x1 took
// 194-207 us with merge(), 139-171 with this.
partial merge_columns(const partial* a, int64_t k) {
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += a[i].m.mean;
  const double mean = sum / static_cast<double>(k);
  double m2 = 0, squares = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double d = a[i].m.mean - mean;
    m2 += a[i].m.m2;
    squares += d * d;
  }
  return {{mean, m2 + squares * a[0].n}, a[0].n * static_cast<double>(k)};
}

// merge() for c channels that hold the same counts, as NHWC chunks and the
// slices of any tensor do: the weights once for all (the same expressions,
// so the same bits). b(j): the moments of channel j.
template <class B>
void merge_same_count_of(partial* a, B b, int64_t c, double nb) {
  const double na = a[0].n;
  if (na == 0) {
    for (int64_t j = 0; j < c; ++j) a[j] = {b(j), nb};
    return;
  }
  const double n = na + nb, wb = nb / n, wm = na * nb / n;
  for (int64_t j = 0; j < c; ++j) {
    const moments& m = b(j);
    const double delta = m.mean - a[j].m.mean;
    a[j].m.mean += delta * wb;
    a[j].m.m2 += m.m2 + delta * delta * wm;
    a[j].n = n;
  }
}

void merge_same_count(partial* a, const moments* b, int64_t c, double nb) {
  merge_same_count_of(a, [b](int64_t j) -> const moments& { return b[j]; }, c, nb);
}

// y = (x - mean) * scale + shift with scale = gamma / sqrt(var + eps) and
// shift = beta. Dividing by the rounded sqrt (not multiplying by a rounded
// reciprocal, which misses 1 for about 15% of floats) makes scale exactly 1
// when gamma == sqrtf(var + eps), so the identity gamma = sqrt(var + eps),
// beta = mean gives y = fl(fl(x - mean) + mean): x exactly when x - mean is
// exact (x within a factor 2 of mean), else within one ulp of max(|x|, |mean|).
// For the channels [c0, c1); the kernel takes a vector of channels at a time.
void scale_shift(const kernel_table& k, const float* gamma, const float* beta, const float* var,
                 float eps, int64_t c0, int64_t c1, float* scale, float* shift) {
  k.scale(gamma ? gamma + c0 : nullptr, var + c0, eps, c1 - c0, scale + c0);
  for (int64_t c = c0; c < c1; ++c) shift[c] = beta ? beta[c] : 0.f;
}

// Chunk ch of an NCHW channel into acc, reduced around *shift (NaN: none),
// which becomes the chunk's mean.
void nchw_chunk_moments(const kernel_table& k, const plan& p, const float* channel, int64_t ch,
                        partial& acc, float* shift) {
  region r;
  const int64_t at = nchw_chunk(p, ch, &r);
  const moments m = k.moments_nchw(channel + at, r, *shift);
  merge(acc, m, static_cast<double>(r.rows * r.cols));
  *shift = static_cast<float>(m.mean);
}

// NCHW: the moments of slice `slice` of channel c. Each chunk after the
// first is reduced around the previous chunk's mean, in a single pass when
// that is close to its own (moments_nchw); the shift depends only on the
// slice's chunks, so results stay independent of the thread count.
partial nchw_slice_moments(const kernel_table& k, const plan& p, const float* channel,
                           int64_t slice) {
  partial acc{{0, 0}, 0};
  float shift = std::numeric_limits<float>::quiet_NaN();  // none for the first chunk
  for (int64_t ch = slice_begin(p, slice); ch < slice_begin(p, slice + 1); ++ch)
    nchw_chunk_moments(k, p, channel, ch, acc, &shift);
  return acc;
}

// Chunk ch of an NHWC tensor, columns [c0, c1) of item it: its region and
// the offset of its first value.
int64_t nhwc_part(const plan& p, const nhwc_item& it, int64_t ch, region* r) {
  const int64_t at = nhwc_chunk(p, ch, r);
  r->cols = it.c1 - it.c0;
  return at + it.c0;
}

// NHWC: the walk through the chunks of item `it` (a slice's columns [c0,
// c1)), their moments merged into acc[c0, c1) (nhwc_item_moments). chunk: c
// moments, shift: c floats of scratch. Each chunk
// after the first of the slice is reduced around the previous chunk's means
// (a single pass when they are close, see moments_nhwc). The first chunk of
// a slice is reduced around `pilot` (if not null): the one-pass means of the
// tensor's first chunk (nhwc_pilot). A tensor of few chunks has one chunk per slice
// (at most kMaxSlices slices), and every chunk took two passes: bnorm_moments
// 32x256x14x14 (25 chunks) ran at a third of a read's speed in cache. The
// shifts depend only on the shape's chunks, so results stay independent of
// the thread count.
class moments_walk {
 public:
  moments_walk(const plan& p, const nhwc_item& it, partial* acc, moments* chunk, float* shift,
               const float* pilot)
      : p_(p),
        it_(it),
        acc_(acc),
        chunk_(chunk),
        shift_(shift),
        first_shift_(pilot ? pilot + it.c0 : nullptr),
        ch_(slice_begin(p, it.slice)) {}
  bool done() const { return ch_ == slice_begin(p_, it_.slice + 1); }
  // The next chunk's region (r), its offset in the tensor and its shift.
  int64_t next(region* r, const float** shift) const {
    *shift = first() ? first_shift_ : shift_ + it_.c0;
    return nhwc_part(p_, it_, ch_, r);
  }
  // Where the next chunk's moments go, columns [c0, c1).
  moments* out() const { return chunk_ + it_.c0; }
  // Takes the moments of the next chunk, of r.rows rows, from out().
  void take(const region& r) {
    if (first()) {  // acc takes the chunk's moments as they are (a merge into nothing)
      for (int64_t j = it_.c0; j < it_.c1; ++j) acc_[j] = {chunk_[j], static_cast<double>(r.rows)};
    } else {
      merge_same_count(acc_ + it_.c0, chunk_ + it_.c0, r.cols, static_cast<double>(r.rows));
    }
    ++ch_;
    if (!done())  // the shift of the next chunk
      for (int64_t j = it_.c0; j < it_.c1; ++j) shift_[j] = static_cast<float>(chunk_[j].mean);
  }

 private:
  bool first() const { return ch_ == slice_begin(p_, it_.slice); }

  const plan& p_;
  nhwc_item it_;
  partial* acc_;
  moments* chunk_;
  float* shift_;
  const float* first_shift_;
  int64_t ch_;
};

void nhwc_item_moments(const kernel_table& k, const plan& p, const float* x, moments_walk& w) {
  const bool beyond_cache = far(p);
  while (!w.done()) {
    region r;
    const float* shift;
    const int64_t at = w.next(&r, &shift);
    k.moments_nhwc(x + at, r, shift, beyond_cache, w.out());
    w.take(r);
  }
}

// Two items at once, their chunks in step (kernel_table::moments_nhwc_pair),
// then the rest of the longer one: each item's results as alone.
void nhwc_item_moments(const kernel_table& k, const plan& p, const float* x, moments_walk& a,
                       moments_walk& b) {
  const bool beyond_cache = far(p);
  while (!a.done() && !b.done()) {
    region ra, rb;
    const float *shift_a, *shift_b;
    const int64_t at_a = a.next(&ra, &shift_a), at_b = b.next(&rb, &shift_b);
    k.moments_nhwc_pair(x + at_a, ra, shift_a, a.out(), x + at_b, rb, shift_b, b.out(),
                        beyond_cache);
    a.take(ra);
    b.take(rb);
  }
  nhwc_item_moments(k, p, x, a);
  nhwc_item_moments(k, p, x, b);
}

// ---------------------------------------------------------------------------
// Elementwise passes, shared by training, inference and backward: `item`
// numbers NCHW runs (kRunValues values in memory order); NHWC passes take
// chunks of nhwc_work items.

// NCHW passes take runs of this many consecutive values (64 KiB) in memory
// order, whatever the channels and rows they cross: one stream per thread.
constexpr int64_t kRunValues = 16384;

int64_t elementwise_items(const plan& p) { return (p.rows * p.stride + kRunValues - 1) / kRunValues; }

// The NCHW run of `count` values from index `at`.
flat_run run_at(const plan& p, int64_t at, int64_t count) {
  return {at / p.spatial, at % p.spatial, count, p.spatial, p.c};
}

// Scratch floats per channel (of the folded tensor, fold()) of the
// elementwise passes: scale, shift and a copy of the mean for the
// normalize; a, b, c and a copy of the mean for the backward apply. The copy gives the NHWC kernels
// vectors of the mean at the same offsets as the other arrays' (coefficient_scratch), whatever the
// caller's array.
constexpr int64_t kNormalizeScratch = 3;
constexpr int64_t kApplyScratch = 4;

struct normalize_args {
  const float* x;
  float* y;
  const float* mean;
  const float* scale;
  const float* shift;
  bool relu;
  uint8_t* mask;  // nullptr: no mask to write
  bool stream;    // non-temporal stores
};

// NCHW: run `item` of kRunValues values.
void normalize_run(const kernel_table& k, const plan& p, const normalize_args& a, int64_t at,
                   int64_t count) {
  k.normalize_nchw(a.x + at, a.y + at, run_at(p, at, count), a.mean, a.scale, a.shift,
                   {a.relu, a.mask, at}, a.stream);
}

void normalize_item(const kernel_table& k, const plan& p, const normalize_args& a, int64_t item) {
  const int64_t at = item * kRunValues;
  normalize_run(k, p, a, at, std::min(kRunValues, p.rows * p.stride - at));
}

struct apply_args {
  const float* x;  // nullptr: dx = a * dy
  const float* dy;
  float* dx;
  const float* mean;
  const float* a;
  const float* b;
  const float* c;
  const uint8_t* mask;
  bool stream;
};

void apply_run(const kernel_table& k, const plan& p, const apply_args& a, int64_t at,
               int64_t count) {
  k.backward_apply_nchw(a.x ? a.x + at : nullptr, a.dy + at, a.dx + at, run_at(p, at, count),
                        a.mean, a.a, a.b, a.c, {a.mask, at}, a.stream);
}

void apply_item(const kernel_table& k, const plan& p, const apply_args& a, int64_t item) {
  const int64_t at = item * kRunValues;
  apply_run(k, p, a, at, std::min(kRunValues, p.rows * p.stride - at));
}

// NHWC rows in cache whose per-channel arrays (the coefficients, the
// inputs and the output) do not fit in L1 together go in column blocks of
// whole 4 KiB pages of a row (kPageFloats channels) that do, one block down
// all the region's rows, then the next: each vector of coefficients is
// loaded from L1, not L2. C = 2048 on this project's machine (32 KiB L1d):
// the normalize's five arrays are 40 KiB a row, the backward apply's seven
// 56 KiB. bnorm_ab: 8x2048x7x7 inference -36%, backward -14%, with ReLU
// -23%; 32x2048x7x7, whose 26 MB are not all in the L3, within -6..+2%.
// Streaming stores keep whole rows (128x2048x7x7 inference +13% in
// blocks), as do rows that fit (C = 1024 in blocks of 512: +15..+28%).
// Returns the block's channels, or 0 to keep whole rows.
int64_t l1_columns(int64_t c, int arrays) {
  const int64_t per_channel = arrays * static_cast<int64_t>(sizeof(float));
  if (c * per_channel <= l1_bytes()) return 0;
  return std::max<int64_t>(1, l1_bytes() / per_channel / kPageFloats) * kPageFloats;
}

// Calls part(at, region, c0) for region r (from index at, first column
// channel c0) whole, or, when it is whole rows, for its column blocks of
// `block` channels (0: none).
template <class Part>
void in_column_blocks(int64_t at, region r, int64_t c0, int64_t block, Part part) {
  if (block == 0 || r.cols != r.stride || r.cols <= block) return part(at, r, c0);
  for (int64_t j = 0; j < r.cols; j += block)
    part(at + j, region{r.rows, std::min(block, r.cols - j), r.stride}, c0 + j);
}

// NHWC: the region r from index at, whose first column is channel c0.
void normalize_part(const kernel_table& k, const normalize_args& a, int64_t at, region r,
                    int64_t c0) {
  const int64_t block = a.stream ? 0 : l1_columns(r.stride, 2 + kNormalizeScratch);
  in_column_blocks(at, r, c0, block, [&](int64_t at, region r, int64_t c0) {
    k.normalize_nhwc(a.x + at, a.y + at, r, a.mean + c0, a.scale + c0, a.shift + c0,
                     {a.relu, a.mask, at}, a.stream);
  });
}

void apply_part(const kernel_table& k, const apply_args& a, int64_t at, region r, int64_t c0) {
  const int64_t block = a.stream ? 0 : l1_columns(r.stride, 3 + kApplyScratch);
  in_column_blocks(at, r, c0, block, [&](int64_t at, region r, int64_t c0) {
    k.backward_apply_nhwc(a.x ? a.x + at : nullptr, a.dy + at, a.dx + at, r, a.mean + c0,
                          a.a + c0, a.b + c0, a.c + c0, {a.mask, at}, a.stream);
  });
}

// ---------------------------------------------------------------------------
// Backward sums: sum(dy) and sum(dy * (x - mean)) per channel, in double,
// chunks added in order (the same fixed order as the moments).

// Chunk ch of NCHW channel c into acc.
void nchw_chunk_sums(const kernel_table& k, const plan& p, const float* x, const float* dy,
                     int64_t c, float mean, const uint8_t* mask, int64_t ch, sums& acc) {
  region r;
  const int64_t at = c * p.spatial + nchw_chunk(p, ch, &r);
  double s0 = 0, s1 = 0;
  k.backward_reduce_nchw(x + at, dy + at, r, mean, {mask, at}, &s0, &s1);
  acc.dy += s0;
  acc.dy_xmu += s1;
}

sums nchw_slice_sums(const kernel_table& k, const plan& p, const float* x, const float* dy,
                     int64_t c, float mean, const uint8_t* mask, int64_t slice) {
  sums acc{0, 0};
  for (int64_t ch = slice_begin(p, slice); ch < slice_begin(p, slice + 1); ++ch)
    nchw_chunk_sums(k, p, x, dy, c, mean, mask, ch, acc);
  return acc;
}

// NCHW channels of few values (one chunk of at most kGroupValues each, e.g.
// 7x7 at small batches) are reduced `width` channels at a time, in the
// groups [g * width, (g + 1) * width): one kernel call, one set of
// horizontal sums and double arithmetic per group instead of per channel.
bool grouped(const plan& p) { return !p.nhwc && p.chunks == 1 && p.count <= kGroupValues; }
int64_t groups(const kernel_table& k, const plan& p) { return (p.c + k.width - 1) / k.width; }

// Calls done(c, moments of channel c) for the NCHW channels [c0, c1), all
// their slices merged in order; c0 is a multiple of the width if grouped.
template <class Done>
void nchw_moments(const kernel_table& k, const plan& p, const float* x, int64_t c0, int64_t c1,
                  Done done) {
  if (grouped(p)) {
    region r;
    nchw_chunk(p, 0, &r);
    moments m[kMaxWidth];
    for (int64_t g = c0; g < c1; g += k.width) {
      const int64_t n = std::min(k.width, c1 - g);
      k.moments_nchw_group(x + g * p.spatial, r, n, p.spatial, m);
      for (int64_t j = 0; j < n; ++j) done(g + j, partial{m[j], static_cast<double>(p.count)});
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    partial acc{{0, 0}, 0};
    for (int64_t s = 0; s < p.slices; ++s) {
      const partial part = nchw_slice_moments(k, p, x + c * p.spatial, s);
      merge(acc, part.m, part.n);
    }
    done(c, acc);
  }
}

// The same for the backward sums. ahead: grouped channels ask for the
// group after c1 (see prefetches_ahead) before reducing theirs: a group
// reads its part of every image from x and dy, 64 streams at batch 32,
// and bnorm_backward_reduce of 32x2048x7x7 (38 MB with dx) took 2.5-3
// times a read of x and dy; with the requests -8..-14% (also 40x2048x7x7;
// the whole backward, whose apply leaves part of x and dy in the L3, +0%).
// The moments (x alone) took 1.6 times a read of x there; not changed.
template <class Done>
void nchw_sums(const kernel_table& k, const plan& p, const float* x, const float* dy,
               const float* mean, const uint8_t* mask, int64_t c0, int64_t c1, bool ahead,
               Done done) {
  if (grouped(p)) {
    region r;
    nchw_chunk(p, 0, &r);
    if (ahead && c1 < p.c) {
      const int64_t at = c1 * p.spatial, n = std::min(k.width, p.c - c1) * p.spatial;
      for (int64_t i = 0; i < r.rows; ++i) {
        prefetch_floats(x + at + i * r.stride, n);
        prefetch_floats(dy + at + i * r.stride, n);
      }
    }
    double s0[kMaxWidth], s1[kMaxWidth];
    for (int64_t g = c0; g < c1; g += k.width) {
      const int64_t n = std::min(k.width, c1 - g), at = g * p.spatial;
      k.backward_reduce_nchw_group(x + at, dy + at, r, n, p.spatial, mean + g, {mask, at}, s0, s1);
      for (int64_t j = 0; j < n; ++j) done(g + j, sums{s0[j], s1[j]});
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    sums acc{0, 0};
    for (int64_t s = 0; s < p.slices; ++s) {
      const sums part = nchw_slice_sums(k, p, x, dy, c, mean[c], mask, s);
      acc.dy += part.dy;
      acc.dy_xmu += part.dy_xmu;
    }
    done(c, acc);
  }
}

// The sums of item it into acc[c0, c1). chunk: 2c doubles of scratch.
void nhwc_item_sums(const kernel_table& k, const plan& p, const float* x, const float* dy,
                    const float* mean, const uint8_t* mask, const nhwc_item& it, sums* acc,
                    double* chunk) {
  const int64_t first = slice_begin(p, it.slice);
  for (int64_t ch = first; ch < slice_begin(p, it.slice + 1); ++ch) {
    region r;
    const int64_t at = nhwc_part(p, it, ch, &r);
    k.backward_reduce_nhwc(x + at, dy + at, r, mean + it.c0, {mask, at}, backward_far(p),
                           chunk + it.c0, chunk + p.c + it.c0);
    // The first chunk's sums as they are (0 + s would turn -0 into +0:
    // the same sums either way, one pass less over acc for few rows).
    if (ch == first) {
      for (int64_t j = it.c0; j < it.c1; ++j) acc[j] = {chunk[j], chunk[p.c + j]};
      continue;
    }
    for (int64_t j = it.c0; j < it.c1; ++j) {
      acc[j].dy += chunk[j];
      acc[j].dy_xmu += chunk[p.c + j];
    }
  }
}

// The backward's coefficients (backward_coefficient in kernel_table.hpp)
// into a, b and c, indexed by channel.
struct backward_coefficients {
  const kernel_table& k;
  const float* gamma;
  const double* invstd;  // per channel, from kernel_table::invstd
  double count;          // M
  bool global;
  float* a;
  float* b;
  float* c;

  bool constant() const { return global || count == 0; }
  double inv() const { return constant() ? 0.0 : 1.0 / count; }

  // xhat: sum(dy) and sum(dy * xhat) of channel ch.
  void operator()(int64_t ch, const sums& xhat) const {
    backward_coefficient(xhat, gamma ? gamma[ch] : 1.f, invstd[ch], constant(), inv(), a + ch,
                         b + ch, c + ch);
  }

  // From s[ch] = sum(dy) and sum(dy * (x - mean)) for the channels [c0, c1):
  // the coefficients, and dgamma = sum(dy * xhat), dbeta = sum(dy) where
  // those are not null.
  void finish(int64_t c0, int64_t c1, const sums* s, float* dgamma, float* dbeta) const {
    k.backward_coefficients(s + c0, gamma ? gamma + c0 : nullptr, invstd + c0, constant(), inv(),
                            c1 - c0, dgamma ? dgamma + c0 : nullptr, dbeta ? dbeta + c0 : nullptr,
                            a + c0, b + c0, c + c0);
  }
};

// ---------------------------------------------------------------------------
// The reduction phases, each one parallel region. They allocate their
// scratch first (slices x c partial results, part[s * c + channel], and
// per-thread NHWC work space) and return false, having written nothing,
// if that fails.

// Scratch arrays start on a cache line: the NHWC kernels load a vector of
// per-channel coefficients (scale, shift; a, b, c) for every vector of data,
// and a vector split over two lines costs two loads. With new[]'s 16-byte
// alignment, NHWC inference of 32x256x14x14 in cache took 36% longer
// (session 7).
constexpr std::align_val_t kScratchAlign{64};

// Each calling thread keeps the scratch blocks of its last calls, up to
// kCachedBlocks of them and kCachedBytes in all, and the next call takes
// them again instead of asking malloc. A call's blocks together can exceed
// glibc's trim threshold (128 KiB) while each stays below its mmap threshold
// (NHWC with C >= 1024 and a few slices: slices x C partial moments, and
// per-thread work space): every free then gave the top of the heap back to
// the system and the next call took it again, two brk system calls and a
// page fault per 4 KiB each call. bnorm_moments of NHWC 8x2048x7x7 (3.2 MB)
// on one thread took 116 us in a plain program, against 47 us for 5x2048x7x7
// with one slice; strace counted 2 brk per call. (Session 17. A program that
// had freed a large block before, such as the benchmark with its peers, had
// glibc's thresholds raised and never saw it.) The memory stays with the
// thread until it exits; BNORM_SCRATCH_CACHE=0 turns the cache off (the
// allocation-failure tests count one allocation per block and call).
constexpr int kCachedBlocks = 8;
constexpr size_t kCachedBytes = size_t{8} << 20;

// A scratch block and its size.
struct scratch_block {
  void* p = nullptr;
  size_t bytes = 0;
};

class scratch_cache {
 public:
  ~scratch_cache() {
    for (scratch_block& b : blocks_)
      if (b.p) ::operator delete[](b.p, kScratchAlign);
    closed = true;  // calls made later on this thread (from other thread_local or
                    // static destructors) allocate and free as without the cache
  }
  // A kept block of at least `bytes` (the smallest such), or none.
  scratch_block take(size_t bytes) {
    scratch_block* best = nullptr;
    for (scratch_block& b : blocks_)
      if (b.p && b.bytes >= bytes && (!best || b.bytes < best->bytes)) best = &b;
    if (!best) return {};
    const scratch_block got = *best;
    held_ -= got.bytes;
    *best = scratch_block{};
    return got;
  }
  // Keeps the block if there is room; else frees it.
  void give(scratch_block block) {
    if (enabled() && held_ + block.bytes <= kCachedBytes)
      for (scratch_block& b : blocks_)
        if (!b.p) {
          b = block;
          held_ += block.bytes;
          return;
        }
    ::operator delete[](block.p, kScratchAlign);
  }
  static bool enabled() {
    static const bool on = [] {
      const char* env = std::getenv("BNORM_SCRATCH_CACHE");
      return !(env && std::strcmp(env, "0") == 0);
    }();
    return on;
  }

  // Set when this thread's cache has been destroyed. A trivially
  // destructible thread_local stays valid until the thread is gone.
  static thread_local bool closed;

 private:
  scratch_block blocks_[kCachedBlocks];
  size_t held_ = 0;
};
thread_local bool scratch_cache::closed = false;
thread_local scratch_cache t_scratch;

struct scratch_delete {
  size_t bytes = 0;  // the block's size (a kept block may be larger than asked for)
  template <class T>
  void operator()(T* p) const {
    if (scratch_cache::closed)
      ::operator delete[](p, kScratchAlign);
    else
      t_scratch.give({p, bytes});
  }
};
template <class T>
using buffer = std::unique_ptr<T[], scratch_delete>;

// n values of scratch, 64-byte aligned, from this thread's cache or new[];
// null if that fails (or n values do not fit in size_t bytes).
template <class T>
buffer<T> allocate(int64_t n) {
  static_assert(std::is_trivially_destructible<T>::value, "scratch_delete runs no destructors");
  static_assert(alignof(T) <= static_cast<size_t>(kScratchAlign), "blocks are 64-byte aligned");
  if (n < 0 || static_cast<uint64_t>(n) > SIZE_MAX / sizeof(T)) return buffer<T>();
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  scratch_block b = scratch_cache::closed ? scratch_block{} : t_scratch.take(bytes);
  if (!b.p) b = {new (kScratchAlign, std::nothrow) unsigned char[bytes], bytes};
  return buffer<T>(static_cast<T*>(b.p), scratch_delete{b.bytes});
}

// Per-thread NHWC scratch: a chunk's per-channel results and per-channel
// floats of work space (the moments' shifts).
struct nhwc_scratch {
  buffer<unsigned char> bytes;
  int64_t result_bytes = 0, per_thread = 0;

  bool allocate_for(const plan& p, int nt, int64_t result_bytes_per_channel,
                    int64_t work_floats_per_channel) {
    if (!p.nhwc) return true;
    result_bytes = p.c * result_bytes_per_channel;
    // Each thread's part starts on a cache line: aligned for the doubles of
    // the results, and no line shared between threads.
    const int64_t need = result_bytes + p.c * work_floats_per_channel * static_cast<int64_t>(sizeof(float));
    per_thread = (need + 63) / 64 * 64;
    bytes = allocate<unsigned char>(nt * per_thread);
    return bytes != nullptr;
  }
  template <class T>
  T* result(int thread) const {
    return reinterpret_cast<T*>(bytes.get() + thread * per_thread);
  }
  float* work(int thread) const {
    return reinterpret_cast<float*>(bytes.get() + thread * per_thread + result_bytes);
  }
};

// NCHW planes of fewer than kShortPlaneFloats values (7x7, 14x14) in one
// slice, at batches from kPlaneSumsRows or kPlaneMomentsRows on, are reduced image after image
// (plane_walk): a group of W channels (a vector's width) is one run of
// every image, seen as one row of a matrix whose columns are the group's
// values; the rows are taken four at a time, as an NHWC reduction takes
// its rows, with the columns' float sums in L1 (at most kPlaneRows rows per
// sum), and a channel's column sums are then added in double. Reduced
// channel by channel, with the sums of each channel's values in registers,
// they took 2.2-3.2 times a read of x (and dy) on Zen 5; bnorm_ab, time of
// the sums of x and dy (backward_reduce) before -> after, read 195-220 us
// / 1.5-0.6 ms: 32x2048x7x7 760 -> 275 us, 128x2048x7x7 4.6 -> 1.75 ms,
// 128x256x14x14 1.03 -> 0.78 ms; moments 128x2048x7x7 1.55 -> 0.98 ms,
// 32x2048x7x7 237 -> 192 us. Groups of 64 channels (runs of 12.5 KiB per
// image at 7x7, sums out of L1 at 14x14) took 10-20% longer (session 17).
// At least kPlaneSumsRows images for the backward sums, kPlaneMomentsRows for
// the moments, whose provisional means read the first images once more:
// at batch 16 the moments took 25-60% longer as a walk than as groups
// (16x2048x7x7 117 -> 147 us, 16x512x7x7 22 -> 34 us), at batch 32 the same
// (7x7) or 15% longer (14x14), at 128 18-37% less (above).
constexpr int64_t kShortPlaneFloats = 256;
constexpr int64_t kPlaneSumsRows = 16;
constexpr int64_t kPlaneMomentsRows = 64;
constexpr int64_t kPlaneShiftValues = 128;
constexpr int64_t kPlaneRows = 256;  // one float lane sums at most 256 values (docs/numerics.md)
bool short_planes(const plan& p, int64_t min_rows) {
  return !p.nhwc && p.spatial < kShortPlaneFloats && p.slices == 1 && p.rows >= min_rows;
}

// Per-thread scratch of the walks: a center per column, two float sums per column.
struct plane_scratch {
  buffer<float> block;
  int64_t per_thread = 0;

  bool allocate_for(const plan& p, int nt) {
    per_thread = 3 * kMaxWidth * p.spatial;
    block = allocate<float>(nt * per_thread);
    return block != nullptr;
  }
  float* center(int t) const { return block.get() + t * per_thread; }
  float* s1(int t) const { return center(t) + per_thread / 3; }
  float* s2(int t) const { return center(t) + 2 * per_thread / 3; }
};

// The sum of n floats in double, four partial sums (one dependent chain of
// 49 additions per channel and array cost as much time as the walk's data
// at batch 32).
double column_total(const float* s, int64_t n) {
  double a[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int q = 0; q < 4; ++q) a[q] += s[i + q];
  for (; i < n; ++i) a[i % 4] += s[i];
  return (a[0] + a[1]) + (a[2] + a[3]);
}

// The walk over the channels [c0, c1) (c0 a multiple of the width; c1 too,
// or the last channel), a group of W channels at a time: centers(g, out)
// gives the centres of channels g..g+W-1 in out[0..W), then for each run
// of at most kPlaneRows images columns(at, region, centers, s1, s2) sums
// the group's columns; finally done(c, centre, d1, d2) takes each channel's
// column sums added in double. The tensor's last channels that do not fill
// a vector's width go to tail(c).
template <class Centers, class Columns, class Done, class Tail>
void plane_walk(const kernel_table& k, const plan& p, const plane_scratch& scratch, int t,
                int64_t c0, int64_t c1, Centers centers, Columns columns, Done done, Tail tail) {
  float* const center = scratch.center(t);
  float* const s1 = scratch.s1(t);
  float* const s2 = scratch.s2(t);
  const int64_t w = k.width;
  float value[kMaxWidth];
  double d1[kMaxWidth], d2[kMaxWidth];
  const int64_t whole = c0 + (c1 - c0) / w * w;
  for (int64_t g = c0; g < whole; g += w) {
    centers(g, value);
    for (int64_t j = 0; j < w; ++j) {
      std::fill(center + j * p.spatial, center + (j + 1) * p.spatial, value[j]);
      d1[j] = d2[j] = 0;
    }
    for (int64_t n0 = 0; n0 < p.rows; n0 += kPlaneRows) {
      const region r{std::min(kPlaneRows, p.rows - n0), w * p.spatial, p.stride};
      columns(n0 * p.stride + g * p.spatial, r, center, s1, s2);
      for (int64_t j = 0; j < w; ++j) {
        d1[j] += column_total(s1 + j * p.spatial, p.spatial);
        d2[j] += column_total(s2 + j * p.spatial, p.spatial);
      }
    }
    for (int64_t j = 0; j < w; ++j) done(g + j, value[j], d1[j], d2[j]);
  }
  for (int64_t c = whole; c < c1; ++c) tail(c);
}

// The moments of the channels [c0, c1) of short planes into out[c]. Each
// channel's values are centred on a provisional mean, that of its first
// images' planes (at least kPlaneShiftValues values: within sigma/11 of the
// mean, were the values independent, as microkernels.hpp's kShiftValues); a channel whose centre is
// not within sigma/sqrt(7) of its mean (the test of moments_nchw_shifted),
// or whose sums are not finite, is reduced again as one slice.
void nchw_plane_moments(const kernel_table& k, const plan& p, const float* x,
                        const plane_scratch& scratch, int t, int64_t c0, int64_t c1, partial* out) {
  const int64_t head = std::min(p.rows, (kPlaneShiftValues + p.spatial - 1) / p.spatial);
  const region first{head, p.spatial, p.stride};
  const double count = static_cast<double>(p.count);
  auto redo = [&](int64_t c) { out[c] = nchw_slice_moments(k, p, x + c * p.spatial, 0); };
  plane_walk(
      k, p, scratch, t, c0, c1,
      [&](int64_t g, float* value) {
        moments m[kMaxWidth];
        k.moments_nchw_group(x + g * p.spatial, first, k.width, p.spatial, m);
        for (int64_t j = 0; j < k.width; ++j) value[j] = static_cast<float>(m[j].mean);
      },
      [&](int64_t at, region r, const float* center, float* s1, float* s2) {
        k.plane_deviations(x + at, r, center, s1, s2);
      },
      [&](int64_t c, float center, double d1, double d2) {
        if (std::isfinite(d1) && std::isfinite(d2) && 8.0 * d1 * d1 <= count * d2)
          out[c] = partial{{center + d1 / count, std::max(0.0, d2 - d1 * d1 / count)}, count};
        else
          redo(c);
      },
      redo);
}

// The backward sums of the channels [c0, c1) of short planes into out[c];
// a channel whose sums are not finite is summed again as one slice (in
// double where its float sums overflow).
void nchw_plane_sums(const kernel_table& k, const plan& p, const float* x, const float* dy,
                     const float* mean, const uint8_t* mask, const plane_scratch& scratch, int t,
                     int64_t c0, int64_t c1, sums* out) {
  auto redo = [&](int64_t c) { out[c] = nchw_slice_sums(k, p, x, dy, c, mean[c], mask, 0); };
  plane_walk(
      k, p, scratch, t, c0, c1,
      [&](int64_t g, float* value) { std::copy(mean + g, mean + g + k.width, value); },
      [&](int64_t at, region r, const float* center, float* s1, float* s2) {
        k.plane_sums(x + at, dy + at, r, center, {mask, at}, s1, s2);
      },
      [&](int64_t c, float, double d1, double d2) {
        if (std::isfinite(d1) && std::isfinite(d2))
          out[c] = sums{d1, d2};
        else
          redo(c);
      },
      redo);
}

// A reduction phase of short planes (as reduction_phase): each thread
// reduce(scratch, t, c0, c1)s its range of whole groups, then, after a
// barrier, then(team). Returns false if the scratch could not be had.
template <class Then, class Reduce>
bool plane_phase(const kernel_table& k, const plan& p, int nt, Then then, Reduce reduce) {
  plane_scratch scratch;
  if (!scratch.allocate_for(p, nt)) return false;
  run_threads(nt, [&](const team& tm) {
    const item_range r = share_of(groups(k, p), tm.t, tm.threads);
    reduce(scratch, tm.t, std::min(p.c, r.begin * k.width), std::min(p.c, r.end * k.width));
    tm.barrier();
    then(tm);
  });
  return true;
}

// One slice's results of c channels merged into the results of the slices
// before it (a slice holds the same count of values in every channel:
// merge_same_count, no division per channel; the bits of merge()).
void merge_into(partial* acc, const partial* part, int64_t c) {
  merge_same_count_of(acc, [part](int64_t j) -> const moments& { return part[j].m; }, c, part[0].n);
}
void merge_into(sums* acc, const sums* part, int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    acc[j].dy += part[j].dy;
    acc[j].dy_xmu += part[j].dy_xmu;
  }
}

// The skeleton both reductions share: the work split four ways (NHWC
// items, grouped NCHW channels, NCHW channels of one slice, NCHW channel
// slices), partial results per slice, then the slices merged in order into
// out[c] (which starts at R{}). With a single slice the partial results are
// the results (merging one set into nothing copies it), so they go to `out`
// directly.
//   items(work, r, part, scratch, t): thread t's NHWC items r of work, each
//   item it into part + it.slice * c, columns [c0, c1)
//   group(c0, c1, done): grouped NCHW channels, done(c, result)
//   chunk(c, ch, acc): chunk ch of NCHW channel c into acc (one slice)
//   slice(c, s): slice s of NCHW channel c
//   then(team): last, in the same parallel region; out[c] for c in
//   channels_of(p, t, threads) is final then.
// result_bytes, work_floats: per-channel NHWC scratch (see nhwc_scratch).
//
// NCHW channels of one slice (C >= kMaxSlices, or one chunk): each thread takes a range of
// channels and reduces them chunk row by chunk row, each row's chunks
// channel after channel: the thread's part of every image in memory order,
// a few long streams. Reducing channel after channel reads a channel's
// short pieces of every image, spread over the whole tensor, and took 1.5 to
// 3.7 times as long (bnorm_moments 32x512x28x28: 2.4 ms -> 0.65 ms,
// 32x256x56x56 -34%); the chunks and their order within a channel, hence
// the results, are the same.
bool nchw_one_slice(const plan& p) {
  return !p.nhwc && !grouped(p) && p.slices == 1;
}

// The NCHW channels [c0, c1) of one slice, chunk row by chunk row: chunk ch of
// every channel, then chunk ch + 1, so that each image's part of the
// channels is read in memory order; planes cut into pieces (more than
// kChunkValues values) go whole, all their pieces channel after channel.
// (Piece by piece, a thread read a 16 KiB piece of every 49 KiB plane, then
// the next: bnorm_moments of NCHW 32x64x112x112 -10..-14%, 1x64x112x112
// -8..-15%, forward training 8x64x112x112 -7..-12%, 1x64x112x112 -4..-11%
// this way; bnorm_ab, Zen 3, both orders twice.) out[c] = R{}, then
// chunk(c, ch, out[c]) for the channel's chunks in order (the order of its
// arithmetic, and so of its bits, either way).
template <class R, class Chunk>
void chunk_rows(const plan& p, int64_t c0, int64_t c1, R* out, Chunk chunk) {
  const int64_t row = p.row_chunk > 0 ? 1 : p.pieces;  // chunks a plane
  for (int64_t ch0 = 0; ch0 < p.chunks; ch0 += row)
    for (int64_t c = c0; c < c1; ++c) {
      if (ch0 == 0) out[c] = R{};
      for (int64_t ch = ch0; ch < ch0 + row; ++ch) chunk(c, ch, out[c]);
    }
}

template <class R, class Items, class Group, class Chunk, class Slice, class Then>
bool reduction_phase(const kernel_table& k, const plan& p, int nt, int64_t result_bytes,
                     int64_t work_floats, R* out, Items items, Group group, Chunk chunk,
                     Slice slice, Then then) {
  buffer<R> slices;
  if (p.slices > 1 && !(slices = allocate<R>(p.slices * p.c))) return false;
  R* const part = p.slices > 1 ? slices.get() : out;
  nhwc_scratch scratch;
  if (!scratch.allocate_for(p, nt, result_bytes, work_floats)) return false;
  run_threads(nt, [&](const team& tm) {
    const int t = tm.t, threads = tm.threads;
    if (p.nhwc) {
      const nhwc_work work(p, threads);  // as the elementwise passes' (elementwise_share)
      items(work, work.share(t, threads), part, scratch, t);
    } else if (grouped(p)) {  // one slice
      const item_range r = share_of(groups(k, p), t, threads);
      for (int64_t g = r.begin; g < r.end; ++g)
        group(g * k.width, std::min(p.c, (g + 1) * k.width),
              [&](int64_t c, const R& result) { part[c] = result; });
    } else if (nchw_one_slice(p)) {
      const item_range r = channels_of(p, t, threads);
      chunk_rows(p, r.begin, r.end, out, chunk);
    } else {
      const item_range r = share_of(p.c * p.slices, t, threads);
      for (int64_t i = r.begin; i < r.end; ++i) {
        const int64_t c = i / p.slices, s = i % p.slices;
        part[s * p.c + c] = slice(c, s);
      }
    }
    // Every branch but the NCHW channels of one slice (each thread's own
    // channels from end to end) leaves results that other threads take.
    if (!nchw_one_slice(p)) tm.barrier();
    if (p.slices > 1) {
      const item_range r = channels_of(p, t, threads);
      for (int64_t c = r.begin; c < r.end; ++c) out[c] = R{};
      if (r.end > r.begin)
        for (int64_t s = 0; s < p.slices; ++s)
          merge_into(out + r.begin, part + s * p.c + r.begin, r.end - r.begin);
    }
    then(tm);
  });
  return true;
}

// NHWC tensors of at least this many slices reduce the first chunk of every
// slice around the pilot (nhwc_item_moments). Every thread pays a pass over
// the first chunk for its pilot and saves a pass per slice: on two threads,
// k slices each, 1 + k passes instead of 2k. Until session 29 the pilot was
// the two-pass means of the first chunk, which slice 0's thread had from
// its own reduction and any other thread paid two passes for (2 + k against
// 1 + k for slice 0's); one pass for every thread, on Zen 5 (bnorm_ab both
// orders twice): bnorm_moments 32x512x7x7 -12..-14%, 8x256x14x14 and
// 32x256x14x14 -3..-6%; forward training 8x256x14x14 and 32x512x7x7
// -5..-8%, 8x128x28x28 -0..-2%. (Forward training 8x512x7x7, 2 slices, -35%, and
// 1x512x28x28, 4 slices, -17%, without the pilot and with equal chunks,
// session 8.) The choice depends on the shape alone, so results stay
// independent of the thread count.
constexpr int64_t kPilotSlices = 6;
bool piloted(const plan& p) { return p.slices >= kPilotSlices; }

// NHWC: the one-pass means (kernel_table::nhwc_means) of the tensor's first
// chunk in the columns [c0, c1), the pilot of nhwc_item_moments, into
// pilot[c0, c1).
void nhwc_pilot(const kernel_table& k, const plan& p, const float* x, int64_t c0, int64_t c1,
                float* pilot) {
  region r;
  const int64_t at = nhwc_part(p, nhwc_item{0, c0, c1}, 0, &r);
  k.nhwc_means(x + at, r, pilot + c0);
}

// NCHW channels reduced chunk row by chunk row (nchw_one_slice) whose
// planes are short (7x7, 14x14) read, per channel and chunk, one piece of a
// few cache lines per image, a whole image apart, which no hardware
// prefetcher follows. When the operation does not fit in the cache, chunk
// ch of channel c + kAheadChannels is asked for while that of channel c is
// reduced: 128x2048x7x7 forward training -19%, backward -9%; 128x256x14x14
// -15%, -12%; 128x512x7x7 backward -17%. Planes of 28x28 gained nothing
// (128x128x28x28 backward +7%), and in cache the requests cost more than
// they save (8x128x28x28 backward +30%). (Session 9.)
constexpr int64_t kAheadChannels = 2;
bool prefetches_ahead(const plan& p, int arrays) {
  return !p.nhwc && p.spatial < kShortPlaneFloats && exceeds_cache(p, arrays);
}
void prefetch_ahead(const plan& p, const float* x, int64_t c, int64_t ch) {
  if (c + kAheadChannels >= p.c) return;
  region r;
  const int64_t at = (c + kAheadChannels) * p.spatial + nchw_chunk(p, ch, &r);
  for (int64_t i = 0; i < r.rows; ++i) prefetch_floats(x + at + i * r.stride, r.cols);
}

template <class Then>
bool moments_phase(const kernel_table& k, const plan& p, const float* x, int nt, partial* out,
                   Then then) {
  if (short_planes(p, kPlaneMomentsRows))
    return plane_phase(k, p, nt, then,
                       [&](const plane_scratch& scratch, int t, int64_t c0, int64_t c1) {
                         nchw_plane_moments(k, p, x, scratch, t, c0, c1, out);
                       });
  // Each NCHW channel's shift, from one chunk to the next (nchw_slice_moments),
  // when its chunks are reduced chunk row by chunk row.
  buffer<float> around;
  if (nchw_one_slice(p) && !(around = allocate<float>(p.c))) return false;
  // NHWC: each thread's pilot (work(t) + c) holds the columns held[2t, 2t+1).
  auto held = allocate<int64_t>(2 * nt);
  if (!held) return false;
  const bool ahead = prefetches_ahead(p, 2);  // x and y
  for (int i = 0; i < 2 * nt; ++i) held[i] = 0;
  // Each thread's scratch: two chunks' moments, then the shifts of two
  // items and the pilot.
  return reduction_phase<partial>(
      k, p, nt, 2 * sizeof(moments), 3, out,
      [&](const nhwc_work& work, item_range r, partial* part, const nhwc_scratch& scratch, int t) {
        moments* const chunk = scratch.result<moments>(t);
        float* const shift = scratch.work(t);
        float* const pilot = piloted(p) ? shift + p.c : nullptr;
        int64_t* const cols = held.get() + 2 * t;
        auto walk = [&](const nhwc_item& it, int second) {
          if (pilot && !(cols[0] == it.c0 && cols[1] == it.c1))
            nhwc_pilot(k, p, x, it.c0, it.c1, pilot);
          cols[0] = it.c0;
          cols[1] = it.c1;
          return moments_walk(p, it, part + it.slice * p.c, chunk + second * p.c,
                              shift + second * 2 * p.c, pilot);
        };
        // Beyond the cache, items two at a time (moments_nhwc_pair).
        const bool pairs = far(p) && work.blocks == 1;
        for (int64_t i = r.begin; i < r.end;) {
          const nhwc_item a = work.item(i);
          moments_walk wa = walk(a, 0);
          if (!pairs || i + 1 == r.end) {
            nhwc_item_moments(k, p, x, wa);
            ++i;
            continue;
          }
          moments_walk wb = walk(work.item(i + 1), 1);
          nhwc_item_moments(k, p, x, wa, wb);
          i += 2;
        }
      },
      [&](int64_t c0, int64_t c1, auto done) { nchw_moments(k, p, x, c0, c1, done); },
      [&](int64_t c, int64_t ch, partial& acc) {
        if (ch == 0) around[c] = std::numeric_limits<float>::quiet_NaN();
        if (ahead) prefetch_ahead(p, x, c, ch);
        nchw_chunk_moments(k, p, x + c * p.spatial, ch, acc, &around[c]);
      },
      [&](int64_t c, int64_t s) { return nchw_slice_moments(k, p, x + c * p.spatial, s); }, then);
}

bool moments_phase(const kernel_table& k, const plan& p, const float* x, int nt, partial* out) {
  return moments_phase(k, p, x, nt, out, [](const team&) {});
}

template <class Then>
bool sums_phase(const kernel_table& k, const plan& p, const float* x, const float* dy,
                const float* mean, const uint8_t* mask, int nt, sums* out, Then then) {
  if (short_planes(p, kPlaneSumsRows))
    return plane_phase(k, p, nt, then,
                       [&](const plane_scratch& scratch, int t, int64_t c0, int64_t c1) {
                         nchw_plane_sums(k, p, x, dy, mean, mask, scratch, t, c0, c1, out);
                       });
  const bool ahead = prefetches_ahead(p, 3);  // x, dy and dx
  return reduction_phase<sums>(
      k, p, nt, 2 * sizeof(double), 0, out,
      [&](const nhwc_work& work, item_range r, sums* part, const nhwc_scratch& scratch, int t) {
        for (int64_t i = r.begin; i < r.end; ++i) {
          const nhwc_item it = work.item(i);
          nhwc_item_sums(k, p, x, dy, mean, mask, it, part + it.slice * p.c,
                         scratch.result<double>(t));
        }
      },
      [&](int64_t c0, int64_t c1, auto done) {
        nchw_sums(k, p, x, dy, mean, mask, c0, c1, ahead, done);
      },
      [&](int64_t c, int64_t ch, sums& acc) {
        if (ahead) {
          prefetch_ahead(p, x, c, ch);
          prefetch_ahead(p, dy, c, ch);
        }
        nchw_chunk_sums(k, p, x, dy, c, mean[c], mask, ch, acc);
      },
      [&](int64_t c, int64_t s) { return nchw_slice_sums(k, p, x, dy, c, mean[c], mask, s); },
      then);
}

bool sums_phase(const kernel_table& k, const plan& p, const float* x, const float* dy,
                const float* mean, const uint8_t* mask, int nt, sums* out) {
  return sums_phase(k, p, x, dy, mean, mask, nt, out, [](const team&) {});
}

// The elementwise passes. NHWC: each thread takes the chunks of the same
// items it reduced (nhwc_work::share); after a reduction in the same call,
// on a tensor that fits in the cache with its output, it walks them
// backwards, so that it first rereads what the reduction read last.
// Otherwise (inference, the split-phase normalize and apply, tensors beyond
// the cache) it walks forwards: chunks backwards cost the hardware
// prefetcher, which runs on past the end of every chunk, and NHWC inference
// of 32x64x112x112 took 12-20% longer, 128x64x112x112 6-7% (session 9). On
// Zen 5 beyond the cache the reread part was worth less than that cost:
// forwards, NHWC backward 128x64x56x56 -9..-13%, 32x64x56x56 -19%,
// 128x128x28x28 -11%, forward training 32x256x56x56 -12..-17%,
// 65536x256 -10% (bnorm_ab both orders; 32x1024x14x14 backward +4%,
// session 16). NCHW: runs in memory order.
//
// NHWC tensors whose reduction the threads split by columns (too few slices,
// see nhwc_work) keep the columns here only when every block is a whole
// number of 4 KiB pages of each row (kPageFloats channels); else the
// threads take whole rows, in multiples of kSplitRows rows (so that no two
// threads write into the same byte of a ReLU mask). Threads writing column
// blocks of the same pages ran 1.5-4x slower than alone on this project's
// machine (inference with ReLU 1x256x14x14 12.2 -> 3.6 us, 1x1024x14x14
// 31 -> 14 us, 256x256 14.5 -> 4.6 us; session 8); with page-sized blocks
// (C = 2048 on two threads) the columns measured faster than rows, whose
// 24 KiB of coefficients per row do not stay in L1 next to the data
// (1x2048x7x7 9.4 vs 11.9 us).
constexpr int64_t kSplitRows = 8;

// Thread t's share of the elementwise pass, of `threads` threads;
// after_reduction: the same call has just reduced the tensor.
template <class Run, class Part>
void elementwise_share(const plan& p, int t, int threads, bool after_reduction, Run run,
                       Part part) {
  if (!p.nhwc) {
    const int64_t items = elementwise_items(p);
    const item_range r = share_of(items, t, threads);
    for (int64_t i = r.begin; i < r.end; ++i) run(i);
    return;
  }
  const nhwc_work work(p, threads);
  if (work.blocks > 1 && work.narrowest() < kPageFloats) {
    const int64_t units = (p.rows + kSplitRows - 1) / kSplitRows;
    const item_range u = share_of(units, t, threads);
    const int64_t r0 = std::min(p.rows, u.begin * kSplitRows);
    const int64_t r1 = std::min(p.rows, u.end * kSplitRows);
    if (r1 > r0) part(r0 * p.c, region{r1 - r0, p.c, p.c}, 0);
    return;
  }
  const item_range r = work.share(t, threads);
  auto chunk = [&](const nhwc_item& it, int64_t ch) {
    region part_region;
    const int64_t at = nhwc_part(p, it, ch, &part_region);
    part(at, part_region, it.c0);
  };
  if (!after_reduction || exceeds_cache(p, 2)) {  // forwards
    for (int64_t i = r.begin; i < r.end; ++i) {
      const nhwc_item it = work.item(i);
      for (int64_t ch = slice_begin(p, it.slice); ch < slice_begin(p, it.slice + 1); ++ch)
        chunk(it, ch);
    }
    return;
  }
  for (int64_t i = r.end - 1; i >= r.begin; --i) {
    const nhwc_item it = work.item(i);
    for (int64_t ch = slice_begin(p, it.slice + 1) - 1; ch >= slice_begin(p, it.slice); --ch)
      chunk(it, ch);
  }
}

void normalize_share(const kernel_table& k, const plan& p, const normalize_args& args, int t,
                     int threads, bool after_reduction) {
  elementwise_share(
      p, t, threads, after_reduction, [&](int64_t i) { normalize_item(k, p, args, i); },
      [&](int64_t at, region r, int64_t c0) { normalize_part(k, args, at, r, c0); });
}

void normalize_phase(const kernel_table& k, const plan& p, const normalize_args& args, int nt) {
  run_threads(nt, [&](const team& tm) { normalize_share(k, p, args, tm.t, tm.threads, false); });
}

void apply_share(const kernel_table& k, const plan& p, const apply_args& args, int t, int threads,
                 bool after_reduction) {
  elementwise_share(
      p, t, threads, after_reduction, [&](int64_t i) { apply_item(k, p, args, i); },
      [&](int64_t at, region r, int64_t c0) { apply_part(k, args, at, r, c0); });
}

void apply_phase(const kernel_table& k, const plan& p, const apply_args& args, int nt) {
  run_threads(nt, [&](const team& tm) { apply_share(k, p, args, tm.t, tm.threads, false); });
}

// The phases on a folding (fold()): the whole's, then the rest's on one
// thread (fewer than kFoldFloats values).

// The moments into out[0, c); out holds f.results() partials.
bool folded_moments(const kernel_table& k, const folding& f, const float* x, int nt, partial* out) {
  if (!moments_phase(k, f.whole, x, nt, out)) return false;
  if (f.spread > 1) {  // in place: channel j's columns lie at or after j
    for (int64_t j = 0; j < f.channels / f.spread; ++j)
      out[j] = merge_columns(out + j * f.spread, f.spread);
  }
  if (f.g == 1) return true;
  const int64_t c = f.channels / f.g;
  const partial* rest = out + f.channels;
  if (f.rest.count > 0 && !moments_phase(k, f.rest, x + f.at, 1, out + f.channels)) return false;
  // Each channel's folded channels, then its rest, in that order (merge_into:
  // the bits of merge()).
  for (int64_t i = 1; i < f.g; ++i) merge_into(out, out + i * c, c);
  if (f.rest.count > 0) merge_into(out, rest, c);
  return true;
}

// The sums into out[0, c); out holds f.results() sums.
bool folded_sums(const kernel_table& k, const folding& f, const float* x, const float* dy,
                 const float* mean, const uint8_t* mask, int nt, sums* out) {
  if (!f.changed()) return sums_phase(k, f.whole, x, dy, mean, mask, nt, out);
  const int64_t c = f.channels / (f.g * f.spread);
  auto wide = allocate<float>(f.channels);
  if (!wide) return false;
  std::copy(mean, mean + c, wide.get());
  repeat_channels(f, c, {wide.get()});
  if (!sums_phase(k, f.whole, x, dy, wide.get(), mask, nt, out)) return false;
  if (f.spread > 1) {  // in place, as folded_moments
    for (int64_t j = 0; j < c; ++j) {
      out[j] = out[j * f.spread];
      for (int64_t i = 1; i < f.spread; ++i) merge_into(out + j, out + j * f.spread + i, 1);
    }
    return true;
  }
  const sums* rest = out + f.channels;
  if (f.rest.count > 0 && !sums_phase(k, f.rest, x + f.at, dy + f.at, mean,
                                      mask ? mask + f.at / 8 : nullptr, 1, out + f.channels))
    return false;
  for (int64_t i = 1; i < f.g; ++i) merge_into(out, out + i * c, c);
  if (f.rest.count > 0) merge_into(out, rest, c);
  return true;
}

void folded_normalize(const kernel_table& k, const folding& f, const normalize_args& a, int nt) {
  normalize_phase(k, f.whole, a, nt);
  if (f.rest.count == 0) return;
  normalize_args r = a;
  r.x += f.at;
  r.y += f.at;
  if (r.mask) r.mask += f.at / 8;
  normalize_phase(k, f.rest, r, 1);
}

void folded_apply(const kernel_table& k, const folding& f, const apply_args& a, int nt) {
  apply_phase(k, f.whole, a, nt);
  if (f.rest.count == 0) return;
  apply_args r = a;
  if (r.x) r.x += f.at;
  r.dy += f.at;
  r.dx += f.at;
  if (r.mask) r.mask += f.at / 8;
  apply_phase(k, f.rest, r, 1);
}

// NCHW backward of tensors that do not fit in the L3 (inputs and output
// together) with enough channels: each thread takes blocks of whole channels
// and runs both passes on one block while it is still in cache: the sums
// channel by channel, then dx image by image (each
// image's part of a block is one run), asking for the next block's part of
// the same image to be brought into L2 meanwhile, so that the memory bus
// does not idle while the core works on cached data. The arithmetic is the
// same as the phases', so the results are bitwise the same.
//
// Blocks hold as many channels as fit, x and dy, in a quarter of L2 (the
// next block is arriving meanwhile), else in a quarter of the thread's share
// of the L3 (no requests ahead then), and every thread gets at least four
// blocks. Returns 0 (use the phases) when there are too few channels, when
// one channel does not fit even the L3's quarter, or when an image's
// part of a block would be shorter than kMinRunBytes: short runs cost their
// fixed overhead and split cache lines at both ends, and measured slower
// than the two phases (7x7 and, at large batches, 14x14 ResNet-50 layers;
// docs/performance-notes.md). When the whole operation fits in the L3, its
// second pass reads the L3 anyway, and the phases, each a few long streams,
// measured 10-25% faster than blocks (forward training and backward of 1-6
// MB tensors, session 7).
//
// The NCHW forward training ran the same blocks until session 15. On AMD
// Zen 5, this project's machine since, the phases with streaming stores
// beat them on every shape measured (bnorm_ab, time / copy, blocks against
// phases: 32x512x28x28 3.65 / 2.80, 32x1024x14x14 4.92 / 4.25, 8x256x56x56
// 3.25 / 2.96, 128x2048x7x7 4.48 / 4.60; with one channel per block,
// 128x256x56x56 3.1 / 2.0), while the backward's blocks measured within 6%
// of its phases either way (-6..+6%), and stay.
constexpr int64_t kMinRunBytes = 2048;
// NHWC tensors of few rows run the forward training fused too, each block a
// set of whole columns (channels) of all the rows: the reduction as the
// phases do it, slice by slice, then the normalize down the same columns.
// That saves the second parallel region and a second trip to L2 or L3.
// Column blocks of more rows measured slower than the phases, whose chunks
// read whole rows (8x1024x14x14, 1568 rows: forward training +90%;
// 32x512x7x7 +25%). Hence at most this many rows (N x spatial):
constexpr int64_t kNhwcFusedRows = 1024;
// And only when each thread's columns are at least kPageFloats channels (4
// KiB of every row, C >= 2048 on two threads): threads writing narrower
// column blocks of the same pages ran 2-3x slower than on whole rows
// (1x256x14x14 training 17 -> 8.6 us, 1x1024x14x14 56 -> 31 us, 256x1024
// 69 -> 38 us), while with C = 2048 the blocks keep their coefficients in
// L1 and win (1x2048x7x7 38 vs 77 us, 8x2048x7x7 153 vs 187 us). The
// backward measured faster in phases even then (1x2048x7x7 107 vs 86 us,
// 8x2048x7x7 296 vs 191 us; on one thread 92 vs 65 us): it has no NHWC
// blocks. (Session 8.) On Zen 5 (session 18, bnorm_ab-style A/B in one
// process, median of 30 rounds) the blocks must be whole pages too: 8x2048x7x7
// (392 rows, blocks of 320 channels that fit half of L2) took 141 us fused
// against 97 us in phases on two threads; with blocks of 1024 channels the
// fused path still wins 3-8% (1x2048x7x7 21.3 vs 22.9 us, 2x2048x7x7, 128x2048,
// 64x4096). On one thread the phases won everywhere (4x1024x14x14 143 vs
// 194 us, 1x1024x14x14 33 vs 37, 8x2048x7x7 140 vs 149): no second region to
// save there.

// NHWC: blocks are whole 64-channel column groups (kColumnGroup) of all the
// rows, as many as fit, of x, in half of L2 (nothing is prefetched
// meanwhile), and at most an even share of the groups per thread. Returns 0
// (use the phases) on one thread, for more than kNhwcFusedRows rows, for
// narrower shares of the columns (above), and when the blocks that fit are
// not whole pages of each row.
int64_t nhwc_fused_block(const plan& p, int nt) {
  if (nt < 2 || p.rows > kNhwcFusedRows || p.c / nt < kPageFloats) return 0;
  const int64_t per_group = p.rows * kColumnGroup * static_cast<int64_t>(sizeof(float));
  const int64_t fit = l2_bytes() / 2 / per_group;
  const int64_t groups = (p.c + kColumnGroup - 1) / kColumnGroup;
  const int64_t block = std::min(fit, (groups + nt - 1) / nt) * kColumnGroup;
  return block % kPageFloats == 0 ? block : 0;
}

// Scratch for the fused NHWC forward training, indexed by channel (the
// blocks' channels are disjoint, so the threads share it): per-slice
// moments, their merge, the item kernel's per-chunk moments and shifts.
// Fused tensors have too few slices for the pilot.
static_assert((kNhwcFusedRows + kChunkRows - 1) / kChunkRows + 1 < kPilotSlices,
              "nhwc_columns reduces without the pilot");
struct nhwc_columns {
  const plan& p;
  buffer<partial> slice, total;
  buffer<moments> chunk;
  buffer<float> work;

  explicit nhwc_columns(const plan& p_)
      : p(p_), slice(allocate<partial>(p.c)), total(allocate<partial>(p.c)),
        chunk(allocate<moments>(p.c)), work(allocate<float>(p.c)) {}
  explicit operator bool() const { return slice && total && chunk && work; }

  // The moments of the columns [c0, c1) of all the rows, as moments_phase
  // computes them: each slice's, merged in order (a single slice is the
  // result). Returns them, indexed by channel.
  const partial* reduce(const kernel_table& k, const float* x, int64_t c0, int64_t c1) {
    auto item = [&](int64_t s, partial* out) {
      moments_walk w(p, nhwc_item{s, c0, c1}, out, chunk.get(), work.get(), nullptr);
      nhwc_item_moments(k, p, x, w);
    };
    if (p.slices == 1) {
      item(0, total.get());
      return total.get();
    }
    for (int64_t c = c0; c < c1; ++c) total[c] = partial{};
    for (int64_t s = 0; s < p.slices; ++s) {
      item(s, slice.get());
      merge_into(total.get() + c0, slice.get() + c0, c1 - c0);
    }
    return total.get();
  }
};

// The NHWC backward of few rows runs in column blocks of a page of each row
// (bnorm_backward): when a block's x and dy fit in half of L2 (32 rows
// here) and every thread has a block. Against the phases (op harness,
// median of 5, including -3..-5% from nhwc_item_sums): 2x1048576 6.8 ->
// 3.6 ms, 16x65536 459 -> 340 us, 8x65536 280 -> 221, 16x4096 -13%,
// 32x4096 -8%; with 64 rows (blocks beyond L2) 64x2048 +8%.
bool few_rows(const plan& p, int nt) {
  const int64_t block_row = kPageFloats * 2 * static_cast<int64_t>(sizeof(float));  // x and dy
  return p.nhwc && p.rows <= l2_bytes() / 2 / block_row && p.c >= nt * kPageFloats;
}

// NCHW channel blocks whose `arrays` inputs (x, or x and dy) stay in the
// cache between a reduction and the elementwise pass that follows (forward
// training, backward): `count` blocks (0: the two phases), block b the
// channels [begin(b), begin(b + 1)), whole vector groups when the channels
// are reduced in groups. The count is a multiple of the thread count where
// the channels allow, so that the threads have as many channels each (128
// channels in 13 blocks of 10 gave one thread 70 and the other 58).
//
// The forward training took the two phases until session 24: in session 19
// such blocks, each channel reduced over all its images in turn, had
// measured -5..-12%, and on Zen 5 (one channel a block, session 15) slower
// than the phases. Reduced chunk row by chunk row instead, as the phases
// reduce a thread's channels (the images' parts of the block in memory
// order), against the phases on this Zen 3 (bnorm_ab, both orders twice):
// 32x64x56x56 -29..-33%, 128x128x28x28 -14..-22%, 32x64x112x112 -11..-18%,
// 8x256x56x56 -12..-15%, 32x512x28x28 -5..-15%, 128x512x28x28 -3..-15%,
// 32x256x56x56 -1..-19%, 8x64x112x112 -0..-7%, 128x64x56x56 -11..+4%;
// channel after channel 128x128x28x28 had taken +2..+20%. The backward's
// sums go the same way since (-0..-10%, 32x256x56x56 +3..+5%).
struct channel_blocks {
  int64_t c = 0, unit = 1, units = 0, count = 0;
  bool planes = false;  // short planes, reduced by the plane walk as the phases do
  int64_t begin(int64_t b) const { return std::min(c, b * units / count * unit); }
  // Whether every image's part of every block starts on a byte of the ReLU
  // mask: then no two threads write one byte, and the kernels write whole
  // bytes (relu_mode::bytes).
  bool on_mask_bytes(const plan& p) const { return p.stride % 8 == 0 && unit * p.spatial % 8 == 0; }
};

channel_blocks nchw_blocks(const kernel_table& k, const plan& p, int nt, int arrays) {
  // Short planes take the phases, whose sums walk the images in memory order
  // (nchw_plane_sums): blocks of a few channels read runs of a few KiB, and
  // the backward of 32x1024x14x14 (5 channels a block) took 2497 us against
  // 1943 in phases, 32x2048x7x7 1253 against 996 (bnorm_ab, session 17);
  // the forward training of 32x1024x14x14 +20..+33% (session 24), its
  // blocks reduced chunk by chunk (a plane a chunk), each normalize call
  // then fenced (run_threads). Since session 26 short planes that the
  // phases reduce by the plane walk (kPlaneMomentsRows images for the
  // moments, kPlaneSumsRows for the backward sums) take blocks of whole
  // vector groups, each reduced by that walk (the phases' bits), of an
  // eighth of a thread's share of the L3. bnorm_ab, both orders twice:
  // forward training 128x1024x14x14 -18..-24%, 128x2048x7x7 -10..-15%,
  // 128x256x14x14 -8..-22%, 128x512x7x7 (12.8 MB) -7..+7%; backward
  // 128x2048x7x7 -21..-27%, 128x1024x14x14 -16..-30%, 32x1024x14x14
  // -17..-19%, 128x256x14x14 -3..-28%, 128x512x7x7 -3..-17%, 32x2048x7x7
  // -16..+4%; with ReLU alike. (Blocks of 400 KB-1.6 MB measured -6..-20%
  // in one process; those of a quarter of L2 are under kMinRunBytes an
  // image at 7x7.)
  // As moments_phase (x) and sums_phase (x, dy) choose the plane walk.
  const bool planes = short_planes(p, arrays == 1 ? kPlaneMomentsRows : kPlaneSumsRows);
  if (p.nhwc || (short_planes(p, kPlaneSumsRows) && !planes) || (nt > 1 && p.c < 4 * nt) ||
      (arrays == 1 && !nchw_one_slice(p) && !planes))
    return {};
  if (!exceeds_cache(p, arrays + 1)) return {};
  const int64_t per_channel = p.count * static_cast<int64_t>(sizeof(float)) * arrays;
  // Channels of more than a quarter of L2 but at most half of it go one a
  // block, in L2 (session 28, bnorm_ab, Zen 3, both orders twice, against
  // the L3 blocks below: backward 8x256x56x56 -11..-22%, 32x512x28x28
  // -7..-11%, 32x128x28x28 -3..-11%, with ReLU -11..-20% and -6..-12%;
  // forward training 16x256x56x56 -8..-18%, 64x256x28x28 -3..-12%; a bare
  // loop of the backward's traffic gained -15% from blocks of x and dy in
  // L2, -7..+2% from blocks of 1-4 MiB). Up to all of L2 with 16 ways or
  // more: a channel's pieces, one an image, lie a multiple of 64 KiB apart
  // in most shapes and so fall into the same sets, and on Zen 3 (512 KiB,
  // 8 ways) channels of a half to all of L2 one a block took +7..+34%,
  // while on Zen 5 (1 MiB, 16 ways; session 29, bnorm_ab both orders twice)
  // they took less time than in L3 blocks: backward 8x64x112x112
  // -26..-29%, 32x64x56x56 -15..-18%, 128x128x28x28 -0..-8%, 32x256x56x56
  // -1..-6%, 128x512x28x28 -0..-7%, with ReLU 8x64x112x112 -23..-27%,
  // 32x64x56x56 -8..-12%; forward training 64x64x56x56 -3..-10%,
  // 16x256x56x56 -1..-4%.
  // Larger channels go in blocks of a quarter of each
  // thread's share of the L3 instead: the second pass then reads the L3,
  // not memory (read 2S + write S against 4S + S in phases). On AMD Zen 3
  // (512 KiB L2, 32 MiB L3; session 19, bnorm_ab, both orders) against the
  // phases: 32x64x112x112 -25%, 8x64x112x112 -22%, 32x256x56x56 -17%,
  // 128x256x56x56 -15%, 128x512x28x28 -15%, 128x64x56x56 -13%,
  // 128x128x28x28 -2%. A channel of more than that but at most half a
  // thread's share takes a block of its own: forward training
  // 128x64x112x112 (6.3 MiB of x a channel) -10..-14% against the phases;
  // blocks of half a share where a quarter fits more channels measured
  // +3..+17% (session 24). Larger channels (the backward of
  // 128x64x112x112, 12.5 MiB of x and dy) take the phases.
  int64_t fit = planes ? cache_bytes() / (8 * nt) / per_channel : l2_bytes() / 4 / per_channel;
  if (fit == 0 && !planes && per_channel <= l2_bytes() * std::min<int64_t>(l2_ways(), 16) / 16)
    fit = 1;
  if (fit == 0) fit = cache_bytes() / (4 * nt) / per_channel;
  if (fit == 0 && per_channel <= cache_bytes() / (2 * nt)) fit = 1;
  if (fit == 0) return {};
  channel_blocks b;
  b.c = p.c;
  b.planes = planes;
  b.unit = grouped(p) || planes ? k.width : 1;
  b.units = (p.c + b.unit - 1) / b.unit;
  const int64_t most = std::max<int64_t>(1, std::min(fit, p.c / (4 * nt)) / b.unit);
  b.count = std::min(b.units, ((b.units + most - 1) / most + nt - 1) / nt * nt);
  const int64_t least = b.units / b.count * b.unit;  // channels in the smallest block
  if (least * p.spatial * static_cast<int64_t>(sizeof(float)) < kMinRunBytes) return {};
  return b;
}

// Image n's part of the channels [c0, c1): its first index and its length.
struct block_part {
  int64_t at, count;
};
block_part image_part(const plan& p, int64_t n, int64_t c0, int64_t c1) {
  return {n * p.stride + c0 * p.spatial, (c1 - c0) * p.spatial};
}

// The elementwise pass of block b (nchw_blocks): run(at, count) for each
// image's part in turn. The next block's part of
// every image is asked for (in each of the `arrays`) only when a block fits
// in the quarter of L2 it was sized for: single channels of more
// (8x64x112x112, 800 KB of x and dy) evicted their own data, and without
// the requests the backward took 27-30% less time (8x64x112x112),
// 5-8% less (32x64x112x112, 32x256x56x56); 32x512x28x28 (200 KB blocks)
// took 35% more without them. (Session 9.)
template <class Run>
void block_pass(const plan& p, const channel_blocks& blocks, int64_t b,
                std::initializer_list<const float*> arrays, Run run) {
  const int64_t c0 = blocks.begin(b), c1 = blocks.begin(b + 1);
  const int64_t bytes = (c1 - c0) * p.count * static_cast<int64_t>(sizeof(float) * arrays.size());
  const bool ahead = c1 < p.c && bytes <= l2_bytes() / 4;
  for (int64_t n = 0; n < p.rows; ++n) {
    if (ahead) {
      const block_part next = image_part(p, n, c1, blocks.begin(b + 2));
      for (const float* a : arrays) prefetch_floats(a + next.at, next.count);
    }
    const block_part part = image_part(p, n, c0, c1);
    run(part.at, part.count);
  }
}

// ---------------------------------------------------------------------------
// Argument checks.

bool overlap(const float* a, const float* b, int64_t n) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  const auto bytes = static_cast<uintptr_t>(n) * sizeof(float);
  return n > 0 && pa < pb + bytes && pb < pa + bytes;
}

// The most floats one array can hold.
constexpr int64_t kMaxElements = PTRDIFF_MAX / static_cast<int64_t>(sizeof(float));
// The most channels: their elementwise scratch (kApplyScratch floats each,
// plus coefficient_scratch's page) must fit too, even for an empty tensor.
constexpr int64_t kMaxChannels = kMaxElements / 8;

// The shape's checks, and its element count in *total.
bnorm_status check_shape(const char* fn, const bnorm_shape* s, int64_t* total) {
  if (!s) return fail(BNORM_INVALID_ARGUMENT, "%s: shape is NULL", fn);
  // Read as an integer: a caller may store any value in the enum's bytes,
  // and loading an out-of-range value as bnorm_layout is undefined in C++.
  uint32_t layout = 0;
  static_assert(sizeof layout == sizeof s->layout, "bnorm_layout is 32 bits");
  std::memcpy(&layout, &s->layout, sizeof layout);
  if (layout != BNORM_NCHW && layout != BNORM_NHWC)
    return fail(BNORM_INVALID_ARGUMENT, "%s: unknown layout %u", fn, layout);
  if (s->n < 0 || s->c <= 0 || s->spatial < 0)
    return fail(BNORM_INVALID_ARGUMENT,
                "%s: shape n=%lld c=%lld spatial=%lld (need n >= 0, c > 0, spatial >= 0)", fn,
                static_cast<long long>(s->n), static_cast<long long>(s->c),
                static_cast<long long>(s->spatial));
  int64_t nc = 0, count = 0;
  if (__builtin_mul_overflow(s->n, s->c, &nc) || __builtin_mul_overflow(nc, s->spatial, &count) ||
      count > kMaxElements || s->c > kMaxChannels)
    return fail(BNORM_INVALID_ARGUMENT,
                "%s: n*c*spatial = %lld*%lld*%lld floats (or c channels' scratch) does not fit in "
                "memory",
                fn, static_cast<long long>(s->n), static_cast<long long>(s->c),
                static_cast<long long>(s->spatial));
  *total = count;
  return BNORM_SUCCESS;
}

bnorm_status check_channels(const char* fn, int64_t c) {
  if (c <= 0 || c > kMaxElements)
    return fail(BNORM_INVALID_ARGUMENT, "%s: c = %lld channels (need 0 < c <= %lld)", fn,
                static_cast<long long>(c), static_cast<long long>(kMaxElements));
  return BNORM_SUCCESS;
}

bnorm_status check_eps_flags(const char* fn, float eps, unsigned flags, unsigned allowed) {
  if (!(eps >= 0.f)) return fail(BNORM_INVALID_ARGUMENT, "%s: eps %g is negative or NaN", fn, eps);
  if (flags & ~allowed)
    return fail(BNORM_INVALID_ARGUMENT, "%s: flags 0x%x not supported here (allowed 0x%x)", fn,
                flags, allowed);
  return BNORM_SUCCESS;
}

#define BNORM_REQUIRE(ptr)                                                       \
  do {                                                                           \
    if (!(ptr)) return fail(BNORM_INVALID_ARGUMENT, "%s: " #ptr " is NULL", fn); \
  } while (0)

// Tensor arguments (x, y, dy, dx, relu_mask) may be NULL when the tensor has
// no values (n * spatial == 0; `total` in scope): nothing is read or written
// then, and frameworks hand over an empty tensor's data pointer, which is
// often NULL (PyTorch's data_ptr()). bnorm_mpi.h says the same per rank.
#define BNORM_REQUIRE_TENSOR(ptr)     \
  do {                                \
    if (total > 0) BNORM_REQUIRE(ptr); \
  } while (0)

#define BNORM_CHECK(expr)                      \
  do {                                         \
    const bnorm_status status_ = (expr);       \
    if (status_ != BNORM_SUCCESS) return status_; \
  } while (0)

// Checks shared by the operators that read a tensor with given statistics.
bnorm_status check_common(const char* fn, const bnorm_shape* shape, float eps, unsigned flags,
                          unsigned allowed, int64_t* total) {
  BNORM_CHECK(check_shape(fn, shape, total));
  return check_eps_flags(fn, eps, flags, allowed);
}

bnorm_status out_of_memory(const char* fn, int64_t c) {
  return fail(BNORM_OUT_OF_MEMORY, "%s: no memory for %lld channels' scratch", fn,
              static_cast<long long>(c));
}

// The elementwise scratch (kNormalizeScratch, kApplyScratch), for a pass
// that writes `out`, starts 2 KiB (mod 4 KiB) away from out's first byte.
// When rows are whole 4 KiB pages (NHWC, C = 1024 or 2048), a load of a
// coefficient whose address shares its low 12 bits with the store just
// made to `out` waits for that store (4K aliasing), and all three arrays
// then alias at once: NHWC inference 1x1024x14x14 took 12 or
// 21 us depending on where malloc put the scratch (session 8); here it takes
// 12 wherever it lands. It starts at out's offset within a cache line (on a
// line when out is on one), so that when C (of the folded tensor) is a
// multiple of 16 the NHWC kernels' vectors of coefficients lie on vector
// boundaries exactly when their vectors of data do (they align their stores
// to `out`).
struct coefficient_scratch {
  buffer<float> block;
  float* base = nullptr;

  coefficient_scratch(int64_t floats, const void* out)
      : block(allocate<float>(floats + kPageFloats)) {
    if (!block) return;
    const uintptr_t at = reinterpret_cast<uintptr_t>(block.get()) % 4096;
    const uintptr_t want =
        (reinterpret_cast<uintptr_t>(out) + 2048) % 4096 / sizeof(float) * sizeof(float);
    base = block.get() + (want + 4096 - at) % 4096 / sizeof(float);
  }
  explicit operator bool() const { return base != nullptr; }
  float* get() const { return base; }
};

// y from given statistics; writes the mask if `relu_mask` is not NULL.
// f: fold(*shape); coef: kNormalizeScratch * f.channels floats of scratch.
void normalize_op(const bnorm_shape* shape, const folding& f, float eps, unsigned flags,
                  const float* x, const float* gamma, const float* beta, const float* mean,
                  const float* var, float* y, uint8_t* relu_mask, float* coef) {
  const int64_t total = shape->n * shape->c * shape->spatial;
  if (total == 0) return;
  const kernel_table& k = kernels();
  const int64_t c = shape->c;
  float* scale = coef;
  float* shift = coef + f.channels;
  float* aligned_mean = coef + 2 * f.channels;
  auto coefficients = [&](int64_t c0, int64_t c1) {
    scale_shift(k, gamma, beta, var, eps, c0, c1, scale, shift);
    std::copy(mean + c0, mean + c1, aligned_mean + c0);
  };
  const int64_t bytes = 2 * total * static_cast<int64_t>(sizeof(float));
  const normalize_args args{x,     y, aligned_mean, scale, shift, (flags & BNORM_FUSE_RELU) != 0,
                            relu_mask, stream_for(bytes)};
  const int nt = threads_for(bytes, kStreamBytesPerThread);
  if (f.changed()) {
    coefficients(0, c);
    repeat_channels(f, c, {scale, shift, aligned_mean});
    folded_normalize(k, f, args, nt);
    return;
  }
  // Unfolded, in one region as the forward training: each thread the
  // coefficients of its channel range (a square root and a division a
  // channel: 9 of the 10.6 us of NHWC 1x10000x1x1 on one thread), then,
  // after a barrier, its share of y.
  run_threads(nt, [&](const team& tm) {
    const item_range r = share_of(c, tm.t, tm.threads);
    coefficients(r.begin, r.end);
    tm.barrier();
    normalize_share(k, f.whole, args, tm.t, tm.threads, false);
  });
}

// dx from the per-channel sum(dy), sum(dy * xhat) over `count` values.
// f: fold(*shape); coef: kApplyScratch * f.channels floats of scratch.
void apply_op(const bnorm_shape* shape, const folding& f, unsigned flags, const float* x,
              const float* dy, const float* gamma, const float* mean, const double* invstd,
              const uint8_t* relu_mask, const sums* channel_sums, int64_t count, float* dx,
              float* coef) {
  const int64_t total = shape->n * shape->c * shape->spatial;
  if (total == 0) return;
  const kernel_table& k = kernels();
  const int64_t wide = f.channels;
  const bool global = flags & BNORM_GLOBAL_STATS;
  const backward_coefficients coefficients{k,      gamma, invstd,      static_cast<double>(count),
                                           global, coef,  coef + wide, coef + 2 * wide};
  for (int64_t c = 0; c < shape->c; ++c)
    coefficients(c, channel_sums ? channel_sums[c] : sums{0, 0});
  const int64_t bytes = 3 * total * static_cast<int64_t>(sizeof(float));
  float* aligned_mean = coef + 3 * wide;
  std::copy(mean, mean + shape->c, aligned_mean);
  repeat_channels(f, shape->c, {coefficients.a, coefficients.b, coefficients.c, aligned_mean});
  const apply_args args{global ? nullptr : x,
                        dy,
                        dx,
                        aligned_mean,
                        coefficients.a,
                        coefficients.b,
                        coefficients.c,
                        (flags & BNORM_FUSE_RELU) ? relu_mask : nullptr,
                        stream_for(bytes)};
  folded_apply(k, f, args, threads_for(bytes, kStreamBytesPerThread));
}

// BNORM_FUSE_RELU needs the mask, unless the tensor is empty (see
// BNORM_REQUIRE_TENSOR).
bnorm_status check_relu_mask(const char* fn, unsigned flags, const void* relu_mask,
                             int64_t total) {
  if ((flags & BNORM_FUSE_RELU) && !relu_mask && total > 0)
    return fail(BNORM_INVALID_ARGUMENT, "%s: BNORM_FUSE_RELU needs relu_mask", fn);
  return BNORM_SUCCESS;
}

bnorm_status check_overlap(const char* fn, const float* out, const char* out_name, const float* in,
                           const char* in_name, int64_t total, bool may_equal) {
  if ((out != in || !may_equal) && overlap(out, in, total))
    return fail(BNORM_INVALID_ARGUMENT, "%s: %s overlaps %s%s", fn, out_name, in_name,
                may_equal ? " without being it" : "");
  return BNORM_SUCCESS;
}

}  // namespace
}  // namespace bnorm

using namespace bnorm;

extern "C" {

bnorm_status bnorm_forward_training(const bnorm_shape* shape, float eps, unsigned flags,
                                    const float* x, const float* gamma, const float* beta,
                                    float* y, float* mean, float* var, uint8_t* relu_mask) {
  static const char fn[] = "bnorm_forward_training";
  int64_t total = 0;
  BNORM_CHECK(check_shape(fn, shape, &total));
  if (flags & BNORM_GLOBAL_STATS)
    return fail(BNORM_INVALID_ARGUMENT,
                "%s: BNORM_GLOBAL_STATS does not apply to training (use "
                "bnorm_forward_inference with the global statistics)",
                fn);
  BNORM_CHECK(check_eps_flags(fn, eps, flags, BNORM_FUSE_RELU));
  if (shape->n * shape->spatial == 0)
    return fail(BNORM_INVALID_ARGUMENT, "%s: no values per channel (n*spatial == 0)", fn);
  BNORM_REQUIRE(x);
  BNORM_REQUIRE(y);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(var);
  const bool relu = flags & BNORM_FUSE_RELU;
  BNORM_CHECK(check_relu_mask(fn, flags, relu_mask, total));
  BNORM_CHECK(check_overlap(fn, y, "y", x, "x", total, true));

  const plan p = make_plan(*shape);
  const kernel_table& k = kernels();
  const int nt = threads_for(2 * total * static_cast<int64_t>(sizeof(float)), kBytesPerThread);
  if (const folding f = fold(*shape, k.width); f.changed()) {
    // moments -> merge -> normalize of the folded tensor, as the split-phase
    // API computes them.
    auto channel = allocate<partial>(f.results());
    coefficient_scratch coef(kNormalizeScratch * f.channels, y);
    if (!channel || !coef || !folded_moments(k, f, x, nt, channel.get()))
      return out_of_memory(fn, p.c);
    k.finish(channel.get(), p.c, mean, var);
    normalize_op(shape, f, eps, flags, x, gamma, beta, mean, var, y, relu ? relu_mask : nullptr,
                 coef.get());
    return succeed();
  }
  const int64_t block = p.nhwc ? nhwc_fused_block(p, nt) : 0;
  coefficient_scratch coef(kNormalizeScratch * p.c, y);
  if (!coef) return out_of_memory(fn, p.c);
  float* scale = coef.get();
  float* shift = coef.get() + p.c;
  float* aligned_mean = coef.get() + 2 * p.c;  // as normalize_op, written channel range by range
  const normalize_args args{x,    y,         aligned_mean, scale,
                            shift, relu, relu_mask, stream_for(2 * total * static_cast<int64_t>(sizeof(float)))};
  // Channels [c0, c1) of `moments` finished: their mean and var, then the
  // normalize's coefficients (each path below, on its own channel ranges).
  auto finish_channels = [&](const partial* moments, int64_t c0, int64_t c1) {
    k.finish(moments + c0, c1 - c0, mean + c0, var + c0);
    scale_shift(k, gamma, beta, var, eps, c0, c1, scale, shift);
    std::copy(mean + c0, mean + c1, aligned_mean + c0);
  };
  // NCHW channel blocks whose x stays in the cache between its moments and
  // its normalize (nchw_blocks), as the backward's; each channel's moments
  // those of its one slice (or the plane walk's), as in the phases. With
  // ReLU only when every image's part of a block starts on a byte of the
  // mask (7x7 and 14x14 in blocks of 8 channels do).
  channel_blocks cached = p.nhwc ? channel_blocks{} : nchw_blocks(k, p, nt, 1);
  if (relu && !cached.on_mask_bytes(p)) cached = {};
  if (cached.count > 0) {
    auto channel = allocate<partial>(p.c);
    auto around = allocate<float>(p.c);
    plane_scratch planes;
    if (!channel || !around || (cached.planes && !planes.allocate_for(p, nt)))
      return out_of_memory(fn, p.c);
    parallel_for(nt, cached.count, [&](int64_t b, int t) {
      const int64_t c0 = cached.begin(b), c1 = cached.begin(b + 1);
      // As the phases reduce a thread's channels.
      if (cached.planes) {
        nchw_plane_moments(k, p, x, planes, t, c0, c1, channel.get());
      } else {
        chunk_rows(p, c0, c1, channel.get(), [&](int64_t c, int64_t ch, partial& acc) {
          if (ch == 0) around[c] = std::numeric_limits<float>::quiet_NaN();
          nchw_chunk_moments(k, p, x + c * p.spatial, ch, acc, &around[c]);
        });
      }
      finish_channels(channel.get(), c0, c1);
      block_pass(p, cached, b, {x},
                 [&](int64_t at, int64_t count) { normalize_run(k, p, args, at, count); });
    });
    return succeed();
  }
  if (block == 0) {
    // moments -> merge -> normalize, as the split-phase API computes them,
    // in one parallel region: each thread finishes the statistics and the
    // coefficients of its range of channels, then, after a barrier,
    // normalizes its share. Two regions with the per-channel work serial
    // between them took longer on small tensors (mean per call, session 8:
    // NHWC 1x512x7x7 7.3 -> 5.7 us, NCHW 1x2048x7x7 34.8 -> 26.1 us, NCHW
    // 8x256x14x14 -11%; large tensors within noise).
    auto channel = allocate<partial>(p.c);
    if (!channel) return out_of_memory(fn, p.c);
    const bool ok = moments_phase(k, p, x, nt, channel.get(), [&](const team& tm) {
      const item_range r = channels_of(p, tm.t, tm.threads);
      const int64_t c0 = r.begin, c1 = r.end;
      finish_channels(channel.get(), c0, c1);
      tm.barrier();
      normalize_share(k, p, args, tm.t, tm.threads, true);
    });
    if (!ok) return out_of_memory(fn, p.c);
    return succeed();
  }

  // NHWC column blocks (nhwc_fused_block).
  const int64_t blocks = (p.c + block - 1) / block;
  nhwc_columns scratch(p);
  if (!scratch) return out_of_memory(fn, p.c);
  parallel_for(nt, blocks, [&](int64_t b) {
    const int64_t c0 = b * block, c1 = std::min(p.c, c0 + block);
    const partial* total = scratch.reduce(k, x, c0, c1);
    finish_channels(total, c0, c1);
    k.normalize_nhwc(x + c0, y + c0, {p.rows, c1 - c0, p.c}, aligned_mean + c0, scale + c0,
                     shift + c0, {relu, relu_mask, c0}, args.stream);
  });
  return succeed();
}

bnorm_status bnorm_forward_inference(const bnorm_shape* shape, float eps, unsigned flags,
                                     const float* x, const float* gamma, const float* beta,
                                     const float* mean, const float* var, float* y) {
  static const char fn[] = "bnorm_forward_inference";
  int64_t total = 0;
  BNORM_CHECK(check_common(fn, shape, eps, flags, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS, &total));
  BNORM_REQUIRE_TENSOR(x);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(var);
  BNORM_REQUIRE_TENSOR(y);
  BNORM_CHECK(check_overlap(fn, y, "y", x, "x", total, true));
  const folding f = fold(*shape, kernels().width);
  coefficient_scratch coef(kNormalizeScratch * f.channels, y);
  if (!coef) return out_of_memory(fn, shape->c);
  normalize_op(shape, f, eps, flags, x, gamma, beta, mean, var, y, nullptr, coef.get());
  return succeed();
}

bnorm_status bnorm_normalize(const bnorm_shape* shape, float eps, unsigned flags, const float* x,
                             const float* gamma, const float* beta, const float* mean,
                             const float* var, float* y, uint8_t* relu_mask) {
  static const char fn[] = "bnorm_normalize";
  int64_t total = 0;
  BNORM_CHECK(check_common(fn, shape, eps, flags, BNORM_FUSE_RELU, &total));
  BNORM_REQUIRE_TENSOR(x);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(var);
  BNORM_REQUIRE_TENSOR(y);
  BNORM_CHECK(check_relu_mask(fn, flags, relu_mask, total));
  BNORM_CHECK(check_overlap(fn, y, "y", x, "x", total, true));
  const folding f = fold(*shape, kernels().width);
  coefficient_scratch coef(kNormalizeScratch * f.channels, y);
  if (!coef) return out_of_memory(fn, shape->c);
  normalize_op(shape, f, eps, flags, x, gamma, beta, mean, var, y,
               (flags & BNORM_FUSE_RELU) ? relu_mask : nullptr, coef.get());
  return succeed();
}

bnorm_status bnorm_moments(const bnorm_shape* shape, const float* x, double* mean, double* m2) {
  static const char fn[] = "bnorm_moments";
  int64_t total = 0;
  BNORM_CHECK(check_shape(fn, shape, &total));
  BNORM_REQUIRE_TENSOR(x);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(m2);
  const plan p = make_plan(*shape);
  const folding f = fold(*shape, kernels().width);
  auto channel = allocate<partial>(f.results());
  if (!channel) return out_of_memory(fn, p.c);
  if (total == 0) {
    for (int64_t c = 0; c < p.c; ++c) channel[c] = {{0, 0}, 0};
  } else if (!folded_moments(
                 kernels(), f, x,
                 threads_for(total * static_cast<int64_t>(sizeof(float)), kBytesPerThread),
                 channel.get())) {
    return out_of_memory(fn, p.c);
  }
  for (int64_t c = 0; c < p.c; ++c) {
    mean[c] = channel[c].m.mean;
    m2[c] = channel[c].m.m2;
  }
  return succeed();
}

bnorm_status bnorm_merge_moments(int64_t k, int64_t c, const int64_t* counts, const double* mean,
                                 const double* m2, float* merged_mean, float* merged_var) {
  static const char fn[] = "bnorm_merge_moments";
  BNORM_CHECK(check_channels(fn, c));
  if (k <= 0)
    return fail(BNORM_INVALID_ARGUMENT, "%s: k = %lld sets (need k > 0)", fn,
                static_cast<long long>(k));
  BNORM_REQUIRE(counts);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(m2);
  BNORM_REQUIRE(merged_mean);
  BNORM_REQUIRE(merged_var);
  int64_t kc = 0, sum = 0;
  if (__builtin_mul_overflow(k, c, &kc) || kc > PTRDIFF_MAX / static_cast<int64_t>(sizeof(double)))
    return fail(BNORM_INVALID_ARGUMENT, "%s: k*c overflows", fn);
  for (int64_t i = 0; i < k; ++i) {
    if (counts[i] < 0 || __builtin_add_overflow(sum, counts[i], &sum))
      return fail(BNORM_INVALID_ARGUMENT, "%s: counts[%lld] = %lld is negative or overflows", fn,
                  static_cast<long long>(i), static_cast<long long>(counts[i]));
  }
  if (sum == 0) return fail(BNORM_INVALID_ARGUMENT, "%s: no values (all counts are 0)", fn);
  // Sets merged in index order: every caller that passes the same sets in
  // the same order (every MPI rank) gets bitwise the same result.
  for (int64_t j = 0; j < c; ++j) {
    partial acc{{0, 0}, 0};
    for (int64_t i = 0; i < k; ++i)
      if (counts[i] > 0) merge(acc, {mean[i * c + j], m2[i * c + j]}, static_cast<double>(counts[i]));
    finish_moments(acc, &merged_mean[j], &merged_var[j]);
  }
  return succeed();
}

bnorm_status bnorm_backward_reduce(const bnorm_shape* shape, float eps, unsigned flags,
                                   const float* x, const float* dy, const float* mean,
                                   const float* var, const uint8_t* relu_mask, double* sum_dy,
                                   double* sum_dy_xhat) {
  static const char fn[] = "bnorm_backward_reduce";
  int64_t total = 0;
  BNORM_CHECK(check_common(fn, shape, eps, flags, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS, &total));
  BNORM_REQUIRE_TENSOR(x);
  BNORM_REQUIRE_TENSOR(dy);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(var);
  BNORM_REQUIRE(sum_dy);
  BNORM_REQUIRE(sum_dy_xhat);
  BNORM_CHECK(check_relu_mask(fn, flags, relu_mask, total));
  const plan p = make_plan(*shape);
  const folding f = fold(*shape, kernels().width);
  auto channel = allocate<sums>(f.results());
  auto invstd = allocate<double>(p.c);
  if (!channel || !invstd) return out_of_memory(fn, p.c);
  if (total == 0) {
    for (int64_t c = 0; c < p.c; ++c) channel[c] = {0, 0};
  } else if (!folded_sums(
                 kernels(), f, x, dy, mean, (flags & BNORM_FUSE_RELU) ? relu_mask : nullptr,
                 threads_for(2 * total * static_cast<int64_t>(sizeof(float)), kBytesPerThread),
                 channel.get())) {
    return out_of_memory(fn, p.c);
  }
  kernels().invstd(var, eps, p.c, invstd.get());
  for (int64_t c = 0; c < p.c; ++c) {
    const sums s = to_xhat(channel[c], invstd[c]);
    sum_dy[c] = s.dy;
    sum_dy_xhat[c] = s.dy_xmu;
  }
  return succeed();
}

bnorm_status bnorm_backward_apply(const bnorm_shape* shape, float eps, unsigned flags,
                                  const float* x, const float* dy, const float* gamma,
                                  const float* mean, const float* var, const uint8_t* relu_mask,
                                  const double* sum_dy, const double* sum_dy_xhat, int64_t count,
                                  float* dx) {
  static const char fn[] = "bnorm_backward_apply";
  int64_t total = 0;
  BNORM_CHECK(check_common(fn, shape, eps, flags, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS, &total));
  const bool global = flags & BNORM_GLOBAL_STATS;
  BNORM_REQUIRE_TENSOR(x);
  BNORM_REQUIRE_TENSOR(dy);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(var);
  BNORM_REQUIRE_TENSOR(dx);
  if (!global) {
    BNORM_REQUIRE(sum_dy);
    BNORM_REQUIRE(sum_dy_xhat);
    if (count < shape->n * shape->spatial || count <= 0)
      return fail(BNORM_INVALID_ARGUMENT,
                  "%s: count = %lld must be the global number of values per channel (>= n*spatial "
                  "= %lld, > 0)",
                  fn, static_cast<long long>(count),
                  static_cast<long long>(shape->n * shape->spatial));
  }
  BNORM_CHECK(check_relu_mask(fn, flags, relu_mask, total));
  BNORM_CHECK(check_overlap(fn, dx, "dx", dy, "dy", total, true));
  BNORM_CHECK(check_overlap(fn, dx, "dx", x, "x", total, false));
  const plan p = make_plan(*shape);
  auto channel = allocate<sums>(p.c);
  const folding f = fold(*shape, kernels().width);
  coefficient_scratch coef(kApplyScratch * f.channels, dx);
  auto invstd = allocate<double>(p.c);
  if (!channel || !coef || !invstd) return out_of_memory(fn, p.c);
  for (int64_t c = 0; c < p.c; ++c)
    channel[c] = global ? sums{0, 0} : sums{sum_dy[c], sum_dy_xhat[c]};
  kernels().invstd(var, eps, p.c, invstd.get());
  apply_op(shape, f, flags, x, dy, gamma, mean, invstd.get(), relu_mask, channel.get(), count, dx,
           coef.get());
  return succeed();
}

bnorm_status bnorm_backward(const bnorm_shape* shape, float eps, unsigned flags, const float* x,
                            const float* dy, const float* gamma, const float* mean,
                            const float* var, const uint8_t* relu_mask, float* dx, float* dgamma,
                            float* dbeta) {
  static const char fn[] = "bnorm_backward";
  int64_t total = 0;
  BNORM_CHECK(check_common(fn, shape, eps, flags, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS, &total));
  BNORM_REQUIRE_TENSOR(x);
  BNORM_REQUIRE_TENSOR(dy);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(var);
  BNORM_REQUIRE_TENSOR(dx);
  const bool relu = flags & BNORM_FUSE_RELU;
  const bool global = flags & BNORM_GLOBAL_STATS;
  BNORM_CHECK(check_relu_mask(fn, flags, relu_mask, total));
  BNORM_CHECK(check_overlap(fn, dx, "dx", dy, "dy", total, true));
  BNORM_CHECK(check_overlap(fn, dx, "dx", x, "x", total, false));

  const plan p = make_plan(*shape);
  const kernel_table& k = kernels();
  const int nt = threads_for(3 * total * static_cast<int64_t>(sizeof(float)), kBytesPerThread);
  const bool need_sums = total > 0 && (!global || dgamma || dbeta);
  const uint8_t* mask = relu ? relu_mask : nullptr;
  const folding f = fold(*shape, k.width);
  auto channel = allocate<sums>(f.results());
  coefficient_scratch coef(kApplyScratch * f.channels, dx);
  auto invstd = allocate<double>(p.c);
  if (!channel || !coef || !invstd) return out_of_memory(fn, p.c);

  const channel_blocks blocks =
      total == 0 || f.changed() ? channel_blocks{} : nchw_blocks(k, p, nt, 2);  // x, dy
  const backward_coefficients coefficients{
      k,      gamma,      invstd.get(),     static_cast<double>(p.count),
      global, coef.get(), coef.get() + p.c, coef.get() + 2 * p.c};
  float* aligned_mean = coef.get() + 3 * p.c;  // as apply_op (not folded here)
  const apply_args args{global ? nullptr : x, dy,   dx,
                        aligned_mean,         coefficients.a, coefficients.b,
                        coefficients.c,       mask, stream_for(3 * total * static_cast<int64_t>(sizeof(float)))};
  if (blocks.count == 0 && (!need_sums || f.changed())) {
    // No sums needed (global statistics without dgamma and dbeta, or no
    // values), or a folded tensor: reduce -> apply as the split-phase API
    // computes them.
    if (!need_sums) {
      for (int64_t c = 0; c < p.c; ++c) channel[c] = {0, 0};
    } else if (!folded_sums(k, f, x, dy, mean, mask, nt, channel.get())) {
      return out_of_memory(fn, p.c);
    }
    k.invstd(var, eps, p.c, invstd.get());
    for (int64_t c = 0; c < p.c; ++c) {
      channel[c] = to_xhat(channel[c], invstd[c]);
      if (dgamma) dgamma[c] = static_cast<float>(channel[c].dy_xmu);
      if (dbeta) dbeta[c] = static_cast<float>(channel[c].dy);
    }
    apply_op(shape, f, flags, x, dy, gamma, mean, invstd.get(), relu_mask, channel.get(), p.count,
             dx, coef.get());
    return succeed();
  }
  if (total > 0 && !f.changed() && few_rows(p, nt)) {
    // Each thread a range of column blocks, each block's sums, coefficients
    // and dx in turn, so that the per-column scratch stays in L1 (in the
    // phases its arrays, 16 bytes of sums and more a column, went to memory
    // and back). The same kernels on the same columns: the bits of the
    // phases.
    const int64_t blocks = (p.c + kPageFloats - 1) / kPageFloats;
    auto local = allocate<double>(2 * kPageFloats * nt);
    if (!local) return out_of_memory(fn, p.c);
    run_threads(nt, [&](const team& tm) {
      double* s_dy = local.get() + 2 * kPageFloats * tm.t;
      double* s_xmu = s_dy + kPageFloats;
      const item_range r = share_of(blocks, tm.t, tm.threads);
      for (int64_t b = r.begin; b < r.end; ++b) {
        const int64_t c0 = b * kPageFloats, c1 = std::min(p.c, c0 + kPageFloats);
        const region cols{p.rows, c1 - c0, p.c};
        k.invstd(var + c0, eps, c1 - c0, invstd.get() + c0);
        if (need_sums) {
          k.backward_reduce_nhwc(x + c0, dy + c0, cols, mean + c0, {mask, c0}, backward_far(p),
                                 s_dy, s_xmu);
          for (int64_t c = c0; c < c1; ++c) channel[c] = {s_dy[c - c0], s_xmu[c - c0]};
        } else {
          std::fill(channel.get() + c0, channel.get() + c1, sums{0, 0});
        }
        coefficients.finish(c0, c1, channel.get(), dgamma, dbeta);
        std::copy(mean + c0, mean + c1, aligned_mean + c0);
        apply_part(k, args, c0, cols, c0);
      }
    });
    return succeed();
  }
  if (blocks.count == 0) {
    // reduce -> apply, as the split-phase API computes them, in one parallel
    // region (as the forward training): each thread finishes the sums and
    // coefficients of its channel range, then, after a barrier, computes its
    // share of dx.
    const bool ok = sums_phase(k, p, x, dy, mean, mask, nt, channel.get(), [&](const team& tm) {
      const item_range r = channels_of(p, tm.t, tm.threads);
      const int64_t c0 = r.begin, c1 = r.end;
      k.invstd(var + c0, eps, c1 - c0, invstd.get() + c0);
      coefficients.finish(c0, c1, channel.get(), dgamma, dbeta);
      std::copy(mean + c0, mean + c1, aligned_mean + c0);
      tm.barrier();
      apply_share(k, p, args, tm.t, tm.threads, true);
    });
    if (!ok) return out_of_memory(fn, p.c);
    return succeed();
  }

  std::copy(mean, mean + p.c, aligned_mean);
  plane_scratch planes;
  if (blocks.planes && !planes.allocate_for(p, nt)) return out_of_memory(fn, p.c);
  parallel_for(nt, blocks.count, [&](int64_t b, int t) {
    const int64_t c0 = blocks.begin(b), c1 = blocks.begin(b + 1);
    k.invstd(var + c0, eps, c1 - c0, invstd.get() + c0);
    // The block's sums (its own channels: no other thread's), then their
    // coefficients a vector of channels at a time.
    if (need_sums && blocks.planes) {
      nchw_plane_sums(k, p, x, dy, mean, mask, planes, t, c0, c1, channel.get());
    } else if (need_sums && nchw_one_slice(p)) {  // as the phases and the training's blocks
      chunk_rows(p, c0, c1, channel.get(), [&](int64_t c, int64_t ch, sums& acc) {
        nchw_chunk_sums(k, p, x, dy, c, mean[c], mask, ch, acc);
      });
    } else if (need_sums) {
      nchw_sums(k, p, x, dy, mean, mask, c0, c1, false,
                [&](int64_t c, const sums& acc) { channel[c] = acc; });
    } else {
      std::fill(channel.get() + c0, channel.get() + c1, sums{0, 0});
    }
    coefficients.finish(c0, c1, channel.get(), dgamma, dbeta);
    block_pass(p, blocks, b, {x, dy},
               [&](int64_t at, int64_t count) { apply_run(k, p, args, at, count); });
  });
  return succeed();
}

bnorm_status bnorm_update_running_stats(int64_t c, int64_t count, float momentum,
                                        const float* mean, const float* var,
                                        float* running_mean, float* running_var) {
  static const char fn[] = "bnorm_update_running_stats";
  BNORM_CHECK(check_channels(fn, c));
  if (count < 2)
    return fail(BNORM_INVALID_ARGUMENT,
                "%s: count = %lld; the unbiased variance needs at least 2 values per channel", fn,
                static_cast<long long>(count));
  if (!(momentum >= 0.f && momentum <= 1.f))
    return fail(BNORM_INVALID_ARGUMENT, "%s: momentum %g is not in [0, 1]", fn, momentum);
  BNORM_REQUIRE(mean);
  BNORM_REQUIRE(var);
  BNORM_REQUIRE(running_mean);
  BNORM_REQUIRE(running_var);
  // PyTorch's convention: the running variance is unbiased (Bessel's correction).
  const double m = momentum, keep = 1.0 - m;
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  kernels().running_stats(c, keep, m, bessel, mean, var, running_mean, running_var);
  return succeed();
}

const char* bnorm_status_string(bnorm_status status) {
  uint32_t value = 0;  // any value, as in check_shape
  std::memcpy(&value, &status, sizeof value);
  switch (value) {
    case BNORM_SUCCESS: return "success";
    case BNORM_INVALID_ARGUMENT: return "invalid argument";
    case BNORM_UNSUPPORTED: return "unsupported";
    case BNORM_OUT_OF_MEMORY: return "out of memory";
  }
  return "unknown status";
}

const char* bnorm_isa(void) { return kernels().isa; }

const char* bnorm_last_error_message(void) { return g_message; }

// Not declared in bnorm.h: bnorm_mpi (mpi/bnorm_mpi.cpp), which checks its
// own arguments and agrees with the other ranks, reports through it, so that
// bnorm_last_error_message() explains its failures too. "" clears it.
BNORM_API void bnorm_set_last_error_message(const char* message) {
  std::snprintf(g_message, sizeof g_message, "%s", message ? message : "");
}

}  // extern "C"
