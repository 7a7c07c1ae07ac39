// A libFuzzer target for the C ABI of bnorm (include/bnorm/bnorm.h).
//
// Each input describes one call, or the chain training -> backward ->
// update_running_stats, with its shape, eps, flags, NULL pointers, aliasing,
// misalignment and data (fuzz/README.md documents the bytes; make_seeds.py
// writes them). The target decides from the ABI's rules alone whether the
// arguments are valid, then requires
//   invalid: BNORM_INVALID_ARGUMENT, a message, and every byte of every
//            argument unchanged ("writes nothing on error");
//   valid:   BNORM_SUCCESS, an empty message, inputs and the guard bytes
//            before each argument unchanged, outputs within float error
//            bounds of reference.hpp wherever the data is finite and in
//            range, the documented NaN and ReLU-mask behaviour exactly, and
//            bitwise the same outputs from a second call with other
//            alignments and another thread count (batchnorm.cpp promises
//            results independent of pointers and thread split).
// A failure prints the case and traps, so libFuzzer keeps the input.
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bnorm/bnorm.h"
#include "reference.hpp"

extern "C" const char* fuzz_status_string_of_int(int value);  // status_from_c.c

namespace {

// Float's unit roundoff, and a few of its smallest denormals: the absolute
// error floor of results (and coefficients: scale, the backward a, b, c) that
// underflow, where relative bounds say nothing.
constexpr double kU = 1.0 / (1 << 24);
constexpr double kDenormal = 1.40129846e-45;
constexpr double kTiny = 8 * kDenormal;
// Elements per tensor: small inputs run in microseconds; large ones reach the
// library's multi-threaded paths (about 512 KiB per thread).
constexpr int64_t kSmallLimit = 4096;
constexpr int64_t kLargeLimit = 131072;
// Hostile shapes with more channels than this are only ever called when the
// call is invalid: a valid one would need that much memory.
constexpr int64_t kMaxChannels = 65536;
// The most floats one array can hold.
constexpr int64_t kMaxElements = PTRDIFF_MAX / static_cast<int64_t>(sizeof(float));
// The longest run of values the library may accumulate in float before
// going to double (one 16 KiB chunk); the error bounds below scale with it.
constexpr int64_t kFloatRun = 4096;
// Outputs are filled with these before a call: a NaN no arithmetic makes,
// and a byte with both bit values.
constexpr uint32_t kFloatFill = 0x7FC0A5A5u;
constexpr uint8_t kByteFill = 0xA5;

std::string g_case;  // printed with every failure

[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "\n==== bnorm fuzz failure: ");
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n     case: %s\n", g_case.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// ---------------------------------------------------------------------------
// The input, read front to back. Past its end bytes come from splitmix64
// seeded with the input's hash, so a short input still fills a large tensor.

class byte_source {
 public:
  byte_source(const uint8_t* data, size_t size) : data_(data), size_(size) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 1099511628211ull;
    state_ = h;
  }
  uint8_t u8() {
    if (pos_ < size_) return data_[pos_++];
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return static_cast<uint8_t>(z ^ (z >> 31));
  }
  uint16_t u16() {
    const uint16_t lo = u8();
    return static_cast<uint16_t>(lo | u8() << 8);
  }
  uint32_t u32() {
    const uint32_t lo = u16();
    return lo | static_cast<uint32_t>(u16()) << 16;
  }
  uint64_t u64() {
    const uint64_t lo = u32();
    return lo | static_cast<uint64_t>(u32()) << 32;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  uint64_t state_;
};

// ---------------------------------------------------------------------------
// The decoded case.

enum op_kind {
  op_training,
  op_inference,
  op_backward,
  op_running_stats,
  op_chain,           // training, then backward and update_running_stats on its outputs
  op_split_training,  // moments -> merge_moments -> normalize, against forward_training
  op_split_backward,  // backward_reduce -> backward_apply, against backward
  op_status_string,
  op_isa,
  op_last_error,
  op_kinds
};
const char* const kOpNames[op_kinds] = {
    "training",       "inference",      "backward",      "running_stats", "chain",
    "split_training", "split_backward", "status_string", "isa",           "last_error"};

// How the tensor arguments share memory. "out" is y (forward) or dx
// (backward); "in" is x (forward) or dy (backward) unless named.
enum alias_kind {
  alias_separate,
  alias_in_place,      // y == x, dx == dy: allowed
  alias_partial,       // out starts inside in (or in inside out), or right after it
  alias_dy_is_x,       // backward: dy == x, two inputs: allowed
  alias_dx_is_x,       // backward: invalid unless the tensor is empty
  alias_dx_partial_x,  // backward: invalid unless disjoint
};
const char* const kAliasNames[] = {"separate", "in_place", "partial",
                                   "dy_is_x",  "dx_is_x",  "dx_partial_x"};

struct problem {
  int op = 0;
  int32_t layout = 0;  // raw: a C caller may store any int in the enum field
  bool hostile = false;
  int64_t n = 0, c = 0, spatial = 0;
  float eps = 0;
  unsigned flags = 0;
  // NULL pointers: bit i of null_bits is the call's i-th pointer parameter
  // (signature order, shape included) when nulls_any; otherwise bit j picks
  // the j-th of the parameters that may be NULL (see nulls_for()).
  bool nulls_any = false;
  uint16_t null_bits = 0;
  alias_kind alias = alias_separate;
  uint32_t alias_pick = 0;
  uint16_t misalign = 0;  // 2 bits per argument: 0-3 elements before its start
  float momentum = 0;
  int64_t count = 0;  // update_running_stats
  // Split-phase ops: the batch cut into `parts` (1-3) calls; `corrupt` 1
  // makes one merge count -1, 2 the first INT64_MAX, 3 passes k = 0;
  // `apply_count` uses `count` for backward_apply instead of n*spatial.
  int parts = 1;
  int corrupt = 0;
  bool apply_count = false;

  // The ABI's shape rules, and what the target allocates.
  bool shape_ok = false;
  bool shape_ambiguous = false;  // see shape_rules()
  int64_t total = 0;             // n*c*spatial when shape_ok
  int64_t t_alloc = 0, c_alloc = 0;
  bool fits = false;  // a valid call can be made with t_alloc, c_alloc

  std::vector<float> x, dy, gamma, beta, mean, var, running_mean, running_var;
  std::vector<uint8_t> mask;
  bool data_has_fill = false;  // some input float has the fill's bits

  bool nhwc() const { return layout == BNORM_NHWC; }
};

// The ABI's shape rules: known layout, n >= 0, c > 0, spatial >= 0, and
// n*c*spatial and c floats addressable (<= PTRDIFF_MAX / 4 elements). When a
// factor is 0 the total is 0 but n*c, evaluated first, may still overflow;
// the ABI does not say which answer that deserves, so *ambiguous accepts both.
bool shape_rules(int32_t layout, int64_t n, int64_t c, int64_t s, int64_t* total, bool* ambiguous) {
  *total = 0;
  *ambiguous = false;
  if (layout != BNORM_NCHW && layout != BNORM_NHWC) return false;
  if (n < 0 || c <= 0 || s < 0) return false;
  const __int128 limit = kMaxElements;
  if (c > limit) return false;  // per-channel arrays must fit too
  const __int128 nc = static_cast<__int128>(n) * c;
  if (n == 0 || s == 0) {
    *ambiguous = nc > INT64_MAX;
    return true;
  }
  if (nc > limit || nc * s > limit) return false;
  *total = static_cast<int64_t>(nc * s);
  return true;
}

int64_t hostile_size(byte_source& in) {
  static const int64_t table[15] = {0,
                                    1,
                                    -1,
                                    2,
                                    7,
                                    64,
                                    INT64_MAX,
                                    INT64_MIN,
                                    3037000500,  // its square just exceeds INT64_MAX
                                    int64_t{1} << 31,
                                    int64_t{1} << 32,
                                    PTRDIFF_MAX / 4,
                                    PTRDIFF_MAX / 4 + 1,
                                    int64_t{1} << 62,
                                    -(int64_t{1} << 40)};
  const int k = in.u8() % 16;
  return k < 15 ? table[k] : static_cast<int64_t>(in.u64());
}

float decode_eps(byte_source& in) {
  static const float table[15] = {1e-5f,    0.f,     -0.f, 1e-3f, 1.f,  0.1f,    1e-45f, 1e30f,
                                  INFINITY, -1e-30f, -1.f, NAN,   -NAN, FLT_MAX, 1e-5f};
  const int k = in.u8() % 16;
  return k < 15 ? table[k] : bits_to_float(in.u32());
}

float decode_momentum(byte_source& in) {
  static const float table[15] = {0.1f,   0.f,      1.f,       0.5f,    -0.f,
                                  1e-45f, 0.9f,     0.01f,     -1e-30f, 1.00000012f,
                                  NAN,    INFINITY, -INFINITY, -1.f,    2.f};
  const int k = in.u8() % 16;
  return k < 15 ? table[k] : bits_to_float(in.u32());
}

unsigned decode_flags(byte_source& in) {
  switch (in.u8() % 8) {
    case 0:
    case 4:
      return 0;
    case 1:
    case 5:
      return BNORM_FUSE_RELU;
    case 2:
      return BNORM_GLOBAL_STATS;
    case 3:
      return BNORM_FUSE_RELU | BNORM_GLOBAL_STATS;
    case 6:
      return in.u32();
    default: {
      const unsigned bit = 1u << (in.u8() % 32);
      return bit | (in.u8() % 4);
    }
  }
}

// A tensor's values: header byte = mode (2 bits) | offset index (3) | scale
// index (3). Modes: 0 (b - 128) * scale + offset per byte; 1 the same with
// bytes 250-255 special (NaN, inf, -inf, a denormal, 1e18, -1e18); 2 raw
// float bits, 4 bytes each; 3 one value for the whole tensor.
void decode_values(byte_source& in, uint8_t header, bool magnitude, std::vector<float>* out) {
  static const float scale[8] = {1.f, 0.0625f, 1.f / 1024, 1000.f, 1e-20f, 1e15f, 0.5f, 3.f};
  static const float offset[8] = {0.f, 0.f, 1.f, -3.f, 100.f, 1e4f, 1e6f, -1e18f};
  static const float special[6] = {NAN, INFINITY, -INFINITY, 1e-40f, 1e18f, -1e18f};
  const int mode = header >> 6;
  const float s = scale[header & 7], o = offset[(header >> 3) & 7];
  auto affine = [&](uint8_t b) { return static_cast<float>(b - 128) * s + o; };
  const float constant = affine(mode == 3 ? in.u8() : 0);
  for (float& v : *out) {
    if (mode == 0) {
      v = affine(in.u8());
    } else if (mode == 1) {
      const uint8_t b = in.u8();
      v = b >= 250 ? special[b - 250] : affine(b);
    } else if (mode == 2) {
      v = bits_to_float(in.u32());
    } else {
      v = constant;
    }
    // Variances are mostly magnitudes; raw bits may still make them negative.
    if (magnitude && mode != 2) v = std::fabs(v);
  }
}

problem decode(const uint8_t* data, size_t size) {
  byte_source in(data, size);
  problem p;
  p.op = in.u8() % op_kinds;

  const int layout = in.u8() % 16;
  if (layout < 7) {
    p.layout = BNORM_NCHW;
  } else if (layout < 14) {
    p.layout = BNORM_NHWC;
  } else if (layout == 14) {
    p.layout = static_cast<int32_t>(in.u32());
  } else {
    static const int32_t bad[4] = {2, -1, INT32_MIN, INT32_MAX};
    p.layout = bad[in.u8() % 4];
  }

  const int size_mode = in.u8() % 4;
  p.hostile = size_mode == 3;
  if (p.hostile) {
    p.n = hostile_size(in);
    p.c = hostile_size(in);
    p.spatial = hostile_size(in);
  } else {
    const int64_t limit = size_mode == 2 ? kLargeLimit : kSmallLimit;
    int64_t n = in.u8() % 33, c = 1 + in.u8(), s = in.u16() % 10000;
    if (n * c * s > limit && s > 1) s = std::max<int64_t>(1, limit / (n * c));
    if (n * c * s > limit && c > 1) c = std::max<int64_t>(1, limit / (n * s));
    if (n * c * s > limit) n = limit / (c * s);
    p.n = n;
    p.c = c;
    p.spatial = s;
  }

  p.eps = decode_eps(in);
  p.flags = decode_flags(in);
  p.nulls_any = in.u8() % 4 == 0;  // else only optional pointers are NULL
  p.null_bits = p.nulls_any ? in.u16() : in.u8();
  const int alias = in.u8() % 8;
  p.alias_pick = in.u16();
  p.alias = alias < 4    ? alias_separate
            : alias == 4 ? alias_in_place
            : alias == 5 ? alias_partial
            : alias == 6 ? alias_dy_is_x
                         : (p.alias_pick & 1 ? alias_dx_partial_x : alias_dx_is_x);
  p.misalign = in.u16();
  p.momentum = decode_momentum(in);
  const int64_t per_channel = p.hostile ? 2 : std::max<int64_t>(2, p.n * p.spatial);
  switch (in.u8() % 8) {
    case 0:
      p.count = per_channel;
      break;
    case 1:
      p.count = 2;
      break;
    case 2:
      p.count = 1;
      break;
    case 3:
      p.count = 0;
      break;
    case 4:
      p.count = -1;
      break;
    case 5:
      p.count = 3;
      break;
    case 6:
      p.count = INT64_MAX;
      break;
    default:
      p.count = static_cast<int64_t>(in.u64());
  }
  const uint8_t split = in.u8();
  p.parts = 1 + (split & 3) % 3;
  p.corrupt = ((split >> 2) & 7) < 5 ? 0 : ((split >> 2) & 7) - 4;
  p.apply_count = ((split >> 5) & 3) == 0;

  p.shape_ok = shape_rules(p.layout, p.n, p.c, p.spatial, &p.total, &p.shape_ambiguous);
  // Memory: the real sizes where they are small, else a few elements (the
  // library must then reject the call before touching them).
  int64_t elements = -1;
  if (p.n >= 0 && p.c > 0 && p.spatial >= 0) {
    if (p.n == 0 || p.spatial == 0)
      elements = 0;
    else if (p.n <= kLargeLimit && p.c <= kLargeLimit && p.spatial <= kLargeLimit &&
             p.n * p.c * p.spatial <= kLargeLimit)
      elements = p.n * p.c * p.spatial;
  }
  p.t_alloc = elements >= 0 ? elements : 8;
  p.c_alloc = p.c >= 1 && p.c <= kMaxChannels ? p.c : 8;
  p.fits = p.shape_ok && p.total == p.t_alloc && p.c == p.c_alloc;

  uint8_t header[8];
  for (uint8_t& h : header) h = in.u8();
  const size_t t = static_cast<size_t>(p.t_alloc), c = static_cast<size_t>(p.c_alloc);
  p.gamma.resize(c);
  p.beta.resize(c);
  p.mean.resize(c);
  p.var.resize(c);
  p.running_mean.resize(c);
  p.running_var.resize(c);
  p.x.resize(t);
  p.dy.resize(t);
  p.mask.resize((t + 7) / 8);
  decode_values(in, header[0], false, &p.gamma);
  decode_values(in, header[1], false, &p.beta);
  decode_values(in, header[2], false, &p.mean);
  decode_values(in, header[3], true, &p.var);
  decode_values(in, header[4], false, &p.running_mean);
  decode_values(in, header[5], true, &p.running_var);
  decode_values(in, header[6], false, &p.x);
  decode_values(in, header[7], false, &p.dy);
  for (uint8_t& b : p.mask) b = in.u8();

  for (const auto* v :
       {&p.x, &p.dy, &p.gamma, &p.beta, &p.mean, &p.var, &p.running_mean, &p.running_var})
    for (float f : *v) p.data_has_fill |= float_bits(f) == kFloatFill;
  return p;
}

std::string describe(const problem& p) {
  char text[640];
  std::snprintf(text, sizeof text,
                "op=%s layout=%d n=%lld c=%lld spatial=%lld eps=%a flags=0x%x nulls=%s0x%x "
                "alias=%s pick=%u misalign=0x%04x momentum=%a count=%lld parts=%d corrupt=%d "
                "apply_count=%d isa=%s threads=%d",
                kOpNames[p.op], p.layout, static_cast<long long>(p.n), static_cast<long long>(p.c),
                static_cast<long long>(p.spatial), p.eps, p.flags,
                p.nulls_any ? "any:" : "optional:", p.null_bits, kAliasNames[p.alias], p.alias_pick,
                p.misalign, p.momentum, static_cast<long long>(p.count), p.parts, p.corrupt,
                p.apply_count, bnorm_isa(), omp_get_max_threads());
  return text;
}

// ---------------------------------------------------------------------------
// Argument memory. Every argument gets its own heap block (two arguments one
// block when they alias), `guard` elements before its start and nothing after
// its end: AddressSanitizer catches reads and writes past the end, the
// snapshot catches writes into the guard. Before each call every range is
// snapshotted; after it, inputs and guards must be unchanged, and on an
// invalid call outputs too.

class arena {
 public:
  arena() = default;
  arena(const arena&) = delete;
  arena& operator=(const arena&) = delete;
  ~arena() {
    for (void* b : blocks_) std::free(b);
  }

  // A block of `guard` fill elements followed by `count` fill elements.
  template <class T>
  T* allocate(size_t count, size_t guard, const char* name) {
    const size_t bytes = (guard + count) * sizeof(T);
    // malloc(0) under ASan is a valid pointer no access may use.
    T* base = static_cast<T*>(std::malloc(bytes));
    if (!base) fail("harness: malloc(%zu) failed", bytes);
    blocks_.push_back(base);
    fill(base, guard + count);
    watch(base, guard * sizeof(T), false, name);
    return base + guard;
  }

  // A range the calls read (output == false) or may write.
  void watch(const void* p, size_t bytes, bool output, const char* name) {
    ranges_.push_back({static_cast<const uint8_t*>(p), bytes, output, name, {}});
  }

  void snapshot() {
    for (range& r : ranges_) r.before.assign(r.p, r.p + r.bytes);
  }

  // The first range that changed although it must not, or nullptr.
  const char* changed(bool invalid_call) const {
    for (const range& r : ranges_)
      if ((invalid_call || !r.output) && r.bytes > 0 &&
          std::memcmp(r.p, r.before.data(), r.bytes) != 0)
        return r.name;
    return nullptr;
  }

  static void fill(float* p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = bits_to_float(kFloatFill);
  }
  static void fill(double* p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = bits_to_float(kFloatFill);
  }
  static void fill(uint8_t* p, size_t n) { std::memset(p, kByteFill, n); }
  static void fill(int64_t* p, size_t n) { std::memset(p, kByteFill, n * sizeof *p); }

 private:
  struct range {
    const uint8_t* p;
    size_t bytes;
    bool output;
    const char* name;
    std::vector<uint8_t> before;
  };
  std::vector<void*> blocks_;
  std::vector<range> ranges_;
};

// How a case is run: its own alignments and aliasing, or (the second run)
// other alignments and separate buffers.
struct variant {
  uint16_t misalign;
  bool separate;
};

size_t guard_of(const variant& v, int slot) { return (v.misalign >> (2 * (slot % 8))) & 3u; }

// A tensor argument in its own block, holding `data` (or the fill if null).
template <class T>
T* tensor(arena& a, const std::vector<T>* data, size_t count, size_t guard, bool output,
          const char* name) {
  T* p = a.allocate<T>(count, guard, name);
  if (data) std::copy(data->begin(), data->begin() + static_cast<std::ptrdiff_t>(count), p);
  a.watch(p, count * sizeof(T), output, name);
  return p;
}

// An input and an output of t floats. offset == nullopt: separate blocks;
// else one block with out `*offset` elements after in (0: the same memory,
// which then counts as written when in_is_output).
struct float_pair {
  float* in;
  float* out;
};
float_pair make_pair(arena& a, const std::vector<float>& in_data, size_t t,
                     std::optional<int64_t> offset, bool in_is_output, size_t guard_in,
                     size_t guard_out, const char* in_name, const char* out_name) {
  float_pair r{};
  if (!offset) {
    r.out = tensor<float>(a, nullptr, t, guard_out, true, out_name);
    r.in = tensor(a, &in_data, t, guard_in, false, in_name);
    return r;
  }
  const int64_t d = *offset;
  const size_t span = t + static_cast<size_t>(d < 0 ? -d : d);
  float* base = a.allocate<float>(span, guard_in, in_name);
  r.in = d >= 0 ? base : base - d;
  r.out = d >= 0 ? base + d : base;
  std::copy(in_data.begin(), in_data.begin() + static_cast<std::ptrdiff_t>(t), r.in);
  if (d != 0 || !in_is_output) a.watch(r.in, t * sizeof(float), false, in_name);
  a.watch(r.out, t * sizeof(float), true, out_name);
  return r;
}

// Where out starts relative to in for an alias kind (nullopt: separate).
std::optional<int64_t> pair_offset(alias_kind kind, uint32_t pick, int64_t t) {
  if (kind == alias_in_place || kind == alias_dx_is_x) return 0;
  if (kind == alias_partial || kind == alias_dx_partial_x) {
    // 1..t elements apart: overlapping, or (t) adjacent and disjoint.
    const int64_t d = 1 + static_cast<int64_t>(pick >> 2) % std::max<int64_t>(1, t);
    return pick & 2 ? -d : d;
  }
  return std::nullopt;
}

// x and y of a forward call.
float_pair forward_tensors(arena& a, const problem& p, const variant& v) {
  const alias_kind kind = v.separate ? alias_separate : p.alias;
  const bool shared = kind == alias_in_place || kind == alias_partial;
  return make_pair(a, p.x, static_cast<size_t>(p.t_alloc),
                   pair_offset(shared ? kind : alias_separate, p.alias_pick, p.t_alloc), true,
                   guard_of(v, 0), guard_of(v, 1), "x", "y");
}

// x, dy and dx of a backward call; dy_data is what dy holds (x itself for
// alias_dy_is_x).
struct backward_tensors {
  float *x, *dy, *dx;
};
backward_tensors make_backward_tensors(arena& a, const problem& p, const variant& v,
                                       const std::vector<float>& dy_data) {
  const size_t t = static_cast<size_t>(p.t_alloc);
  const alias_kind kind = v.separate ? alias_separate : p.alias;
  backward_tensors r{};
  if (kind == alias_dx_is_x || kind == alias_dx_partial_x) {
    const float_pair xdx = make_pair(a, p.x, t, pair_offset(kind, p.alias_pick, p.t_alloc), false,
                                     guard_of(v, 0), guard_of(v, 2), "x", "dx");
    r.x = xdx.in;
    r.dx = xdx.out;
    r.dy = tensor(a, &dy_data, t, guard_of(v, 1), false, "dy");
    return r;
  }
  r.x = tensor(a, &p.x, t, guard_of(v, 0), false, "x");
  if (kind == alias_dy_is_x) {
    r.dy = r.x;
    r.dx = tensor<float>(a, nullptr, t, guard_of(v, 2), true, "dx");
    return r;
  }
  const bool shared = kind == alias_in_place || kind == alias_partial;
  const float_pair dydx =
      make_pair(a, dy_data, t, pair_offset(shared ? kind : alias_separate, p.alias_pick, p.t_alloc),
                true, guard_of(v, 1), guard_of(v, 2), "dy", "dx");
  r.dy = dydx.in;
  r.dx = dydx.out;
  return r;
}

const std::vector<float>& dy_data_of(const problem& p, const variant& v) {
  return !v.separate && p.alias == alias_dy_is_x ? p.x : p.dy;
}

bool overlap(const void* a, const void* b, int64_t n) {
  const auto pa = static_cast<unsigned __int128>(reinterpret_cast<uintptr_t>(a));
  const auto pb = static_cast<unsigned __int128>(reinterpret_cast<uintptr_t>(b));
  const auto bytes = static_cast<unsigned __int128>(n) * sizeof(float);
  return n > 0 && pa < pb + bytes && pb < pa + bytes;
}

// The shape argument: the raw layout goes in through memcpy, as a C caller's
// int would.
bnorm_shape make_shape(const problem& p, int64_t n) {
  static_assert(sizeof(bnorm_layout) == sizeof(int32_t), "bnorm_layout is an int");
  bnorm_shape s{};
  s.n = n;
  s.c = p.c;
  s.spatial = p.spatial;
  std::memcpy(&s.layout, &p.layout, sizeof p.layout);
  return s;
}

reference::shape ref_shape(const problem& p) { return {p.n, p.c, p.spatial, p.nhwc()}; }

// The NULL parameters of one call: bit i for its i-th pointer parameter.
// `optional` lists the parameters the ABI lets be NULL.
uint32_t nulls_for(const problem& p, std::initializer_list<int> optional) {
  if (p.nulls_any) return p.null_bits;
  uint32_t r = 0;
  int j = 0;
  for (int pos : optional)
    if ((p.null_bits >> j++) & 1) r |= 1u << pos;
  return r;
}
bool null_at(uint32_t nulls, int pos) { return (nulls >> pos) & 1; }
template <class T>
T* arg(uint32_t nulls, int pos, T* ptr) {
  return null_at(nulls, pos) ? nullptr : ptr;
}

// A tensor parameter (x, y, dy, dx, relu_mask) may be NULL where the tensor
// (this call's part of the batch: n rows) has no values (bnorm.h).
bool tensor_ok(uint32_t nulls, int pos, const problem& p, int64_t n) {
  return !null_at(nulls, pos) || n == 0 || p.spatial == 0;
}

bool eps_flags_ok(const problem& p, unsigned allowed) {
  return p.eps >= 0.f && (p.flags & ~allowed) == 0;
}

// The status and message every call must give, and the untouched memory.
// either: the ABI does not decide (success and BNORM_INVALID_ARGUMENT both pass).
bool check_call(const char* fn, bool valid, bool either, bnorm_status status, const arena& a) {
  const char* message = bnorm_last_error_message();
  if (!message) fail("%s: bnorm_last_error_message() returned NULL", fn);
  if (either && (status == BNORM_SUCCESS || status == BNORM_INVALID_ARGUMENT))
    valid = status == BNORM_SUCCESS;
  if (valid && status != BNORM_SUCCESS)
    fail("%s: valid call returned %d (%s): \"%s\"", fn, status, bnorm_status_string(status),
         message);
  if (!valid && status != BNORM_INVALID_ARGUMENT)
    fail("%s: invalid call returned %d (%s), expected BNORM_INVALID_ARGUMENT", fn, status,
         bnorm_status_string(status));
  if (valid && message[0] != '\0') fail("%s: success but message \"%s\"", fn, message);
  if (!valid && message[0] == '\0') fail("%s: invalid call left no message", fn);
  if (const char* what = a.changed(!valid))
    fail("%s: %s call changed %s", fn, valid ? "valid" : "invalid", what);
  return valid;
}

// A valid call must write every element of its outputs.
template <class T>
void check_written(const char* fn, const char* name, const T* p, int64_t n, const problem& c) {
  if (c.data_has_fill) return;
  T fill;
  arena::fill(&fill, 1);
  for (int64_t i = 0; i < n; ++i)
    if (std::memcmp(&p[i], &fill, sizeof fill) == 0)
      fail("%s: %s[%lld] was never written", fn, name, static_cast<long long>(i));
}

bool finite_in(double v, double bound) { return std::isfinite(v) && std::fabs(v) <= bound; }

// For the bitwise comparisons: equal bits, or NaN both (payloads may differ).
bool same(float a, float b) {
  return float_bits(a) == float_bits(b) || (std::isnan(a) && std::isnan(b));
}
void check_same(const char* what, const char* name, const float* a, const float* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!same(a[i], b[i])) fail("%s: %s[%zu] differs: %a vs %a", what, name, i, a[i], b[i]);
}
void check_same(const char* what, const char* name, const std::vector<float>& a,
                const std::vector<float>& b) {
  if (a.size() != b.size()) fail("%s: %s sizes differ", what, name);
  check_same(what, name, a.data(), b.data(), a.size());
}
void check_same_bits(const char* what, const uint8_t* a, const uint8_t* b, int64_t total) {
  for (int64_t i = 0; i < total; ++i)
    if (reference::mask_bit(a, i) != reference::mask_bit(b, i))
      fail("%s: relu_mask bit %lld differs", what, static_cast<long long>(i));
}

// ---------------------------------------------------------------------------
// Error bounds (docs/numerics.md explains the arithmetic). The library
// accumulates runs of at most kFloatRun values in float, with FMA or not,
// then continues in double. Recursive summation of k terms errs by at most
// about k*u*sum|terms|, so each bound below is that, plus the roundings of
// the few float operations after it, doubled; plus an absolute floor for
// results that underflow to denormals.

struct run_bound {
  double k;     // longest float run, plus a margin
  double tiny;  // absolute floor of a sum
};
run_bound bound_for(int64_t count) {
  const double k = static_cast<double>(std::min(count, kFloatRun) + 8);
  return {k, (k + 8) * kDenormal};
}

// Batch statistics and y = gamma*(x - mean)/sqrt(var + eps) + beta of a
// training step (forward_training, or moments -> merge -> normalize).
void check_training_values(const char* fn, const problem& p, const float* gamma, const float* beta,
                           const float* mean_out, const float* var_out, const float* y,
                           const uint8_t* mask_written) {
  const reference::shape rs = ref_shape(p);
  const bool relu = p.flags & BNORM_FUSE_RELU;
  const float* x = p.x.data();
  for (int64_t ch = 0; ch < p.c; ++ch) {
    const std::vector<int64_t> idx = rs.channel(ch);
    const float mean = mean_out[ch], var = var_out[ch];
    bool finite = true;
    double maxabs = 0;
    for (int64_t i : idx) {
      finite &= std::isfinite(x[i]) != 0;
      maxabs = std::max(maxabs, std::fabs(static_cast<double>(x[i])));
    }
    if (!finite) {
      // docs/numerics.md: var NaN (mean NaN, or inf for an infinite input),
      // y NaN (a ReLU may clamp it).
      if (!std::isnan(var) || std::isfinite(mean))
        fail("%s: channel %lld holds inf/NaN but mean=%a var=%a", fn, static_cast<long long>(ch),
             mean, var);
      for (int64_t i : idx)
        if (!std::isnan(y[i]) && !(relu && y[i] == 0))
          fail("%s: channel %lld holds inf/NaN but y[%lld]=%a", fn, static_cast<long long>(ch),
               static_cast<long long>(i), y[i]);
      continue;
    }
    if (maxabs > 1e18) continue;  // the variance may not fit a float
    const reference::moments m = reference::channel_moments(x, idx);
    const double cnt = static_cast<double>(idx.size());
    double s1 = 0, maxdev = 0;
    for (int64_t i : idx) {
      const double d = std::fabs(x[i] - m.mean);
      s1 += d;
      maxdev = std::max(maxdev, d);
    }
    const run_bound rb = bound_for(p.n * p.spatial);
    // The library sums deviations from a provisional float mean, which is
    // off by at most `drift` (its own float sum, then one rounding).
    const double drift = 2 * rb.k * kU * maxdev + kU * std::fabs(m.mean);
    // mean: that sum of deviations, then one rounding to float.
    const double sum_dev = (rb.k + 2) * kU * (s1 / cnt + drift);
    const double tol_mean = 2 * (sum_dev + kU * std::fabs(m.mean)) + rb.tiny;
    // var: the sum of squared deviations (including drift^2) minus
    // sum(d)^2 / count, whose error is about 2 * drift * sum_dev.
    const double tol_var =
        2 * ((rb.k + 6) * kU * (m.var + drift * drift) + 2 * drift * sum_dev) + rb.tiny;
    if (!(std::fabs(mean - m.mean) <= tol_mean))
      fail("%s: mean[%lld] = %.9g, reference %.17g (tolerance %.3g)", fn,
           static_cast<long long>(ch), mean, m.mean, tol_mean);
    if (!(std::fabs(var - m.var) <= tol_var))
      fail("%s: var[%lld] = %.9g, reference %.17g (tolerance %.3g)", fn, static_cast<long long>(ch),
           var, m.var, tol_var);

    // y, where gamma/sqrt(var + eps) is well defined and nothing overflows.
    const double g = gamma ? gamma[ch] : 1.0, b = beta ? beta[ch] : 0.0;
    if (!finite_in(g, 1e18) || !finite_in(b, 1e18)) continue;
    const double vpe = m.var + p.eps;
    if (!std::isinf(p.eps) && !(vpe >= 1e-36 && vpe <= 1e38)) continue;
    const double invstd = 1 / std::sqrt(vpe);
    // Relative error of fl(var + eps), then of gamma / sqrt(that).
    const double rv = std::isinf(vpe) ? 0 : (tol_var + kU * vpe) / vpe;
    if (rv > 0.25) continue;  // the variance is lost in rounding: ill-conditioned
    const double rscale = rv / 2 + 3 * kU;
    if (std::fabs(g) * invstd * (maxdev + tol_mean) > 1e30) continue;
    for (int64_t i : idx) {
      const double pre = reference::normalize(x[i], m.mean, m.var, p.eps, g, b);
      const double want = relu ? std::max(pre, 0.0) : pre;
      const double xm = std::fabs(x[i] - m.mean);
      const double tol =
          2 * (std::fabs(g) * invstd * ((xm + tol_mean) * (rscale + 2 * kU) + tol_mean) +
               2 * kU * (std::fabs(pre) + std::fabs(b))) +
          kTiny * (1 + xm);
      if (!(std::fabs(y[i] - want) <= tol))
        fail(
            "%s: y[%lld] (channel %lld) = %.9g, reference %.17g (tolerance %.3g; mean %.9g "
            "var %.9g)",
            fn, static_cast<long long>(i), static_cast<long long>(ch), y[i], want, tol, mean, var);
    }
  }

  if (!relu || !mask_written) return;
  for (int64_t i = 0; i < p.total; ++i) {
    const bool bit = reference::mask_bit(mask_written, i);
    if (bit != (y[i] > 0))
      fail("%s: relu_mask bit %lld is %d but y = %a", fn, static_cast<long long>(i), bit, y[i]);
    if (!(y[i] >= 0) && !std::isnan(y[i]))
      fail("%s: FUSE_RELU but y[%lld] = %a", fn, static_cast<long long>(i), y[i]);
  }
  // Bits past the last element belong to the caller.
  const int64_t used = p.total % 8;
  if (used != 0) {
    const uint8_t theirs = static_cast<uint8_t>(0xFFu << used);
    if ((mask_written[p.total / 8] & theirs) != (kByteFill & theirs))
      fail("%s: relu_mask bits past element %lld changed: 0x%02x", fn,
           static_cast<long long>(p.total), mask_written[p.total / 8]);
  }
}

// y from given statistics (forward_inference).
void check_inference_values(const char* fn, const problem& p, const float* y) {
  const reference::shape rs = ref_shape(p);
  const bool relu = p.flags & BNORM_FUSE_RELU;
  const float* x = p.x.data();
  const uint32_t nulls = nulls_for(p, {2, 3});
  for (int64_t ch = 0; ch < p.c && p.total > 0; ++ch) {
    const double g = null_at(nulls, 2) ? 1.0 : p.gamma[ch];
    const double b = null_at(nulls, 3) ? 0.0 : p.beta[ch];
    const double m = p.mean[ch], var_c = p.var[ch];
    const double vpe = var_c + p.eps;
    const double invstd = 1 / std::sqrt(vpe);
    const bool in_range = finite_in(g, 1e18) && finite_in(b, 1e18) && finite_in(m, 1e18) &&
                          finite_in(var_c, 1e38) &&
                          (std::isinf(p.eps) || (vpe >= 1e-36 && vpe <= 1e38));
    for (int64_t i : rs.channel(ch)) {
      const double pre = reference::normalize(x[i], m, var_c, p.eps, g, b);
      if (std::isnan(pre)) {
        // The maths has no value here; neither may the library (a ReLU may clamp).
        if (!std::isnan(y[i]) && !(relu && y[i] == 0))
          fail("%s: y[%lld] = %a where the reference is NaN", fn, static_cast<long long>(i), y[i]);
        continue;
      }
      if (!in_range || !finite_in(x[i], 1e18)) continue;
      const double xm = std::fabs(x[i] - m);
      if (std::fabs(g) * invstd * xm > 1e30) continue;
      const double want = relu ? std::max(pre, 0.0) : pre;
      const double tol =
          2 * (std::fabs(g) * invstd * xm * 6 * kU + 2 * kU * (std::fabs(pre) + std::fabs(b))) +
          kTiny * (1 + xm);
      if (!(std::fabs(y[i] - want) <= tol))
        fail("%s: y[%lld] (channel %lld) = %.9g, reference %.17g (tolerance %.3g)", fn,
             static_cast<long long>(i), static_cast<long long>(ch), y[i], want, tol);
    }
  }
}

// dx, dgamma, dbeta (either may be null: not computed) of a backward step.
struct backward_data {  // what backward read
  const float* x;
  const float* dy;
  const float* gamma;  // nullptr: 1
  const float* mean;
  const float* var;
  const uint8_t* mask;  // nullptr: no ReLU
};
void check_backward_values(const char* fn, const problem& p, const backward_data& in,
                           const float* dx, const float* dgamma, const float* dbeta) {
  const reference::shape rs = ref_shape(p);
  const bool global = p.flags & BNORM_GLOBAL_STATS;
  const int64_t count = p.n * p.spatial;
  for (int64_t ch = 0; ch < p.c; ++ch) {
    const double m = in.mean[ch], var_c = in.var[ch];
    const double vpe = var_c + p.eps;
    if (count == 0) {
      // Sums over no values are 0 (dgamma = 0 * invstd: NaN when invstd is).
      if (dbeta && dbeta[ch] != 0)
        fail("%s: no values, but dbeta[%lld] = %a", fn, static_cast<long long>(ch), dbeta[ch]);
      if (dgamma && dgamma[ch] != 0 && !(std::isnan(dgamma[ch]) && !(vpe > 0)))
        fail("%s: no values, but dgamma[%lld] = %a", fn, static_cast<long long>(ch), dgamma[ch]);
      continue;
    }
    const double gam = in.gamma ? in.gamma[ch] : 1.0;
    if (!finite_in(gam, 1e18) || !finite_in(m, 1e18) || !finite_in(var_c, 1e38)) continue;
    if (!std::isinf(p.eps) && !(vpe >= 1e-36 && vpe <= 1e38)) continue;
    const std::vector<int64_t> idx = rs.channel(ch);
    auto g = [&](int64_t i) {
      return !in.mask || reference::mask_bit(in.mask, i) ? static_cast<double>(in.dy[i]) : 0.0;
    };
    bool in_range = true;
    double abs_g = 0, abs_gxm = 0, max_g = 0, max_xm = 0;
    for (int64_t i : idx) {
      in_range &= finite_in(in.x[i], 1e18) && finite_in(g(i), 1e18);
      abs_g += std::fabs(g(i));
      abs_gxm += std::fabs(g(i) * (in.x[i] - m));
      max_g = std::max(max_g, std::fabs(g(i)));
      max_xm = std::max(max_xm, std::fabs(in.x[i] - m));
    }
    if (!in_range) continue;
    const reference::channel_grads ref =
        reference::channel_backward(in.x, in.dy, in.mask, idx, m, var_c, p.eps, gam, global);
    const double invstd = 1 / std::sqrt(vpe);
    const double cnt = static_cast<double>(count);
    const run_bound rb = bound_for(count);
    const double tol_s0 = (rb.k + 2) * kU * abs_g + rb.tiny;
    const double tol_s1 = (rb.k + 4) * kU * abs_gxm + rb.tiny;
    if (dbeta && abs_g <= 1e30) {
      const double tol = 2 * (tol_s0 + kU * std::fabs(ref.dbeta)) + kTiny;
      if (!(std::fabs(dbeta[ch] - ref.dbeta) <= tol))
        fail("%s: dbeta[%lld] = %.9g, reference %.17g (tolerance %.3g)", fn,
             static_cast<long long>(ch), dbeta[ch], ref.dbeta, tol);
    }
    if (dgamma && abs_gxm * invstd <= 1e30) {
      const double tol = 2 * (tol_s1 * invstd + 2 * kU * std::fabs(ref.dgamma)) + kTiny;
      if (!(std::fabs(dgamma[ch] - ref.dgamma) <= tol))
        fail("%s: dgamma[%lld] = %.9g, reference %.17g (tolerance %.3g)", fn,
             static_cast<long long>(ch), dgamma[ch], ref.dgamma, tol);
    }
    // dx = a*g + (x - mean)*b + c with a = gamma*invstd and b, c (bounded
    // here by magnitude) from the sums; each float coefficient may also
    // underflow, hence the floor scaled by what multiplies it.
    const double a = std::fabs(gam) * invstd;
    const double b = global ? 0 : a * invstd * invstd * abs_gxm / cnt;
    const double c = global ? 0 : a * abs_g / cnt;
    if (a > 1e30 || b > 1e30 || c > 1e30 || a * max_g > 1e30 || b * max_xm > 1e30) continue;
    for (size_t j = 0; j < idx.size(); ++j) {
      const int64_t i = idx[j];
      const double xm = std::fabs(in.x[i] - m);
      const double tol = global ? 2 * (2 * kU * a * std::fabs(g(i))) + kTiny * (1 + std::fabs(g(i)))
                                : 2 * (4 * kU * (a * std::fabs(g(i)) + xm * b + c) +
                                       xm * a * invstd * invstd * tol_s1 / cnt + a * tol_s0 / cnt) +
                                      kTiny * (1 + xm + std::fabs(g(i)));
      if (!(std::fabs(dx[i] - ref.dx[j]) <= tol))
        fail("%s: dx[%lld] (channel %lld) = %.9g, reference %.17g (tolerance %.3g)", fn,
             static_cast<long long>(i), static_cast<long long>(ch), dx[i], ref.dx[j], tol);
    }
  }
}

// ---------------------------------------------------------------------------
// forward_training(shape, x, gamma, beta, y, mean, var, relu_mask)

struct training_out {
  bool valid = false;
  std::vector<float> y, mean, var;
  std::vector<uint8_t> mask;
};

training_out run_training(const problem& p, const variant& v) {
  static const char fn[] = "bnorm_forward_training";
  const size_t t = static_cast<size_t>(p.t_alloc), c = static_cast<size_t>(p.c_alloc);
  const bool relu = p.flags & BNORM_FUSE_RELU;
  arena a;
  const float_pair xy = forward_tensors(a, p, v);
  float* gamma = tensor(a, &p.gamma, c, guard_of(v, 2), false, "gamma");
  float* beta = tensor(a, &p.beta, c, guard_of(v, 3), false, "beta");
  float* mean = tensor<float>(a, nullptr, c, guard_of(v, 4), true, "mean");
  float* var = tensor<float>(a, nullptr, c, guard_of(v, 5), true, "var");
  // Written only with FUSE_RELU.
  uint8_t* mask = tensor<uint8_t>(a, nullptr, (t + 7) / 8, guard_of(v, 6), relu, "relu_mask");

  const uint32_t nulls = nulls_for(p, {2, 3});
  const bool valid = !null_at(nulls, 0) && p.shape_ok && eps_flags_ok(p, BNORM_FUSE_RELU) &&
                     p.n * p.spatial > 0 && !null_at(nulls, 1) && !null_at(nulls, 4) &&
                     !null_at(nulls, 5) && !null_at(nulls, 6) && !(relu && null_at(nulls, 7)) &&
                     !(xy.in != xy.out && overlap(xy.in, xy.out, p.total));
  training_out o;
  if (valid && !p.fits) return o;  // would need more memory than the case has
  a.snapshot();
  const bnorm_shape shape = make_shape(p, p.n);
  const bnorm_status status =
      bnorm_forward_training(arg(nulls, 0, &shape), p.eps, p.flags, arg(nulls, 1, xy.in),
                             arg(nulls, 2, gamma), arg(nulls, 3, beta), arg(nulls, 4, xy.out),
                             arg(nulls, 5, mean), arg(nulls, 6, var), arg(nulls, 7, mask));
  if (!check_call(fn, valid, false, status, a)) return o;

  o.valid = true;
  o.y.assign(xy.out, xy.out + t);
  o.mean.assign(mean, mean + c);
  o.var.assign(var, var + c);
  o.mask.assign(mask, mask + (t + 7) / 8);
  check_written(fn, "y", xy.out, p.total, p);
  check_written(fn, "mean", mean, p.c, p);
  check_written(fn, "var", var, p.c, p);
  check_training_values(fn, p, null_at(nulls, 2) ? nullptr : p.gamma.data(),
                        null_at(nulls, 3) ? nullptr : p.beta.data(), mean, var, xy.out,
                        relu ? mask : nullptr);
  return o;
}

// ---------------------------------------------------------------------------
// forward_inference(shape, x, gamma, beta, mean, var, y)

std::optional<std::vector<float>> run_inference(const problem& p, const variant& v) {
  static const char fn[] = "bnorm_forward_inference";
  const size_t t = static_cast<size_t>(p.t_alloc), c = static_cast<size_t>(p.c_alloc);
  arena a;
  const float_pair xy = forward_tensors(a, p, v);
  float* gamma = tensor(a, &p.gamma, c, guard_of(v, 2), false, "gamma");
  float* beta = tensor(a, &p.beta, c, guard_of(v, 3), false, "beta");
  float* mean = tensor(a, &p.mean, c, guard_of(v, 4), false, "mean");
  float* var = tensor(a, &p.var, c, guard_of(v, 5), false, "var");

  const uint32_t nulls = nulls_for(p, {2, 3});
  const bool valid = !null_at(nulls, 0) && p.shape_ok &&
                     eps_flags_ok(p, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS) &&
                     tensor_ok(nulls, 1, p, p.n) && !null_at(nulls, 4) && !null_at(nulls, 5) &&
                     tensor_ok(nulls, 6, p, p.n) &&
                     !(xy.in != xy.out && overlap(xy.in, xy.out, p.total));
  if (valid && !p.fits) return std::nullopt;
  a.snapshot();
  const bnorm_shape shape = make_shape(p, p.n);
  const bnorm_status status = bnorm_forward_inference(
      arg(nulls, 0, &shape), p.eps, p.flags, arg(nulls, 1, xy.in), arg(nulls, 2, gamma),
      arg(nulls, 3, beta), arg(nulls, 4, mean), arg(nulls, 5, var), arg(nulls, 6, xy.out));
  if (!check_call(fn, valid, p.shape_ambiguous, status, a)) return std::nullopt;
  check_written(fn, "y", xy.out, p.total, p);
  check_inference_values(fn, p, xy.out);
  return std::vector<float>(xy.out, xy.out + t);
}

// ---------------------------------------------------------------------------
// backward(shape, x, dy, gamma, mean, var, relu_mask, dx, dgamma, dbeta)

struct backward_out {
  bool valid = false;
  std::vector<float> dx, dgamma, dbeta;
};

// mean, var, mask: what backward reads (the case's, or training's outputs).
backward_out run_backward(const problem& p, const variant& v, const std::vector<float>& mean_in,
                          const std::vector<float>& var_in, const std::vector<uint8_t>& mask_in) {
  static const char fn[] = "bnorm_backward";
  const size_t t = static_cast<size_t>(p.t_alloc), c = static_cast<size_t>(p.c_alloc);
  arena a;
  const std::vector<float>& dy_data = dy_data_of(p, v);
  const backward_tensors bt = make_backward_tensors(a, p, v, dy_data);
  float* gamma = tensor(a, &p.gamma, c, guard_of(v, 3), false, "gamma");
  float* mean = tensor(a, &mean_in, c, guard_of(v, 4), false, "mean");
  float* var = tensor(a, &var_in, c, guard_of(v, 5), false, "var");
  uint8_t* mask = tensor(a, &mask_in, (t + 7) / 8, guard_of(v, 6), false, "relu_mask");
  float* dgamma = tensor<float>(a, nullptr, c, guard_of(v, 7), true, "dgamma");
  float* dbeta = tensor<float>(a, nullptr, c, guard_of(v, 0) ^ 1, true, "dbeta");

  const bool relu = p.flags & BNORM_FUSE_RELU;
  const uint32_t nulls = nulls_for(p, {3, 8, 9});
  const bool valid =
      !null_at(nulls, 0) && p.shape_ok && eps_flags_ok(p, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS) &&
      tensor_ok(nulls, 1, p, p.n) && tensor_ok(nulls, 2, p, p.n) && !null_at(nulls, 4) &&
      !null_at(nulls, 5) && tensor_ok(nulls, 7, p, p.n) && (!relu || tensor_ok(nulls, 6, p, p.n)) &&
      !(bt.dx != bt.dy && overlap(bt.dx, bt.dy, p.total)) && !overlap(bt.dx, bt.x, p.total);
  backward_out o;
  if (valid && !p.fits) return o;
  a.snapshot();
  const bnorm_shape shape = make_shape(p, p.n);
  const bnorm_status status = bnorm_backward(
      arg(nulls, 0, &shape), p.eps, p.flags, arg(nulls, 1, bt.x), arg(nulls, 2, bt.dy),
      arg(nulls, 3, gamma), arg(nulls, 4, mean), arg(nulls, 5, var), arg(nulls, 6, mask),
      arg(nulls, 7, bt.dx), arg(nulls, 8, dgamma), arg(nulls, 9, dbeta));
  if (!check_call(fn, valid, p.shape_ambiguous, status, a)) return o;

  o.valid = true;
  o.dx.assign(bt.dx, bt.dx + t);
  o.dgamma.assign(dgamma, dgamma + c);
  o.dbeta.assign(dbeta, dbeta + c);
  const bool has_dgamma = !null_at(nulls, 8), has_dbeta = !null_at(nulls, 9);
  check_written(fn, "dx", bt.dx, p.total, p);
  if (has_dgamma) check_written(fn, "dgamma", dgamma, p.c, p);
  if (has_dbeta) check_written(fn, "dbeta", dbeta, p.c, p);
  // Gradients not asked for stay as they were.
  for (size_t i = 0; i < c; ++i) {
    if (!has_dgamma && float_bits(dgamma[i]) != kFloatFill) fail("%s: dgamma written", fn);
    if (!has_dbeta && float_bits(dbeta[i]) != kFloatFill) fail("%s: dbeta written", fn);
  }
  const backward_data in{
      p.x.data(),     dy_data.data(), null_at(nulls, 3) ? nullptr : p.gamma.data(),
      mean_in.data(), var_in.data(),  relu ? mask_in.data() : nullptr};
  check_backward_values(fn, p, in, bt.dx, has_dgamma ? dgamma : nullptr,
                        has_dbeta ? dbeta : nullptr);
  return o;
}

// ---------------------------------------------------------------------------
// update_running_stats(c, count, momentum, mean, var, running_mean, running_var)

struct running_out {
  bool valid = false;
  std::vector<float> mean, var;
};

running_out run_running_stats(const problem& p, const variant& v, const std::vector<float>& mean_in,
                              const std::vector<float>& var_in, int64_t count) {
  static const char fn[] = "bnorm_update_running_stats";
  const size_t c = static_cast<size_t>(p.c_alloc);
  arena a;
  float* mean = tensor(a, &mean_in, c, guard_of(v, 0), false, "mean");
  float* var = tensor(a, &var_in, c, guard_of(v, 1), false, "var");
  float* rmean = tensor(a, &p.running_mean, c, guard_of(v, 2), true, "running_mean");
  float* rvar = tensor(a, &p.running_var, c, guard_of(v, 3), true, "running_var");
  const float mom = p.momentum;
  const uint32_t nulls = nulls_for(p, {});
  const bool valid = p.c > 0 && p.c <= kMaxElements && count >= 2 && mom >= 0.f && mom <= 1.f &&
                     !null_at(nulls, 0) && !null_at(nulls, 1) && !null_at(nulls, 2) &&
                     !null_at(nulls, 3);
  running_out o;
  if (valid && p.c != p.c_alloc) return o;
  a.snapshot();
  const bnorm_status status =
      bnorm_update_running_stats(p.c, count, mom, arg(nulls, 0, mean), arg(nulls, 1, var),
                                 arg(nulls, 2, rmean), arg(nulls, 3, rvar));
  if (!check_call(fn, valid, false, status, a)) return o;

  o.valid = true;
  o.mean.assign(rmean, rmean + c);
  o.var.assign(rvar, rvar + c);
  for (size_t i = 0; i < c; ++i) {
    const double rm = p.running_mean[i], rv = p.running_var[i], m = mean_in[i], s = var_in[i];
    if (!finite_in(rm, 1e36) || !finite_in(rv, 1e36) || !finite_in(m, 1e36) || !finite_in(s, 1e36))
      continue;
    const double unbiased = s * static_cast<double>(count) / static_cast<double>(count - 1);
    if (std::fabs(unbiased) > 1e36) continue;
    const double want_m = reference::running_mean(rm, m, mom);
    const double want_v = reference::running_var(rv, s, count, mom);
    const double tol_m = 4 * kU * (std::fabs((1 - mom) * rm) + std::fabs(mom * m)) + kTiny;
    const double tol_v = 4 * kU * (std::fabs((1 - mom) * rv) + std::fabs(mom * unbiased)) + kTiny;
    if (!(std::fabs(o.mean[i] - want_m) <= tol_m))
      fail("%s: running_mean[%zu] = %.9g, reference %.17g", fn, i, o.mean[i], want_m);
    if (!(std::fabs(o.var[i] - want_v) <= tol_v))
      fail("%s: running_var[%zu] = %.9g, reference %.17g", fn, i, o.var[i], want_v);
  }
  return o;
}

// ---------------------------------------------------------------------------
// The split-phase API, one worker holding `parts` consecutive pieces of the
// batch (each a valid tensor of its own). With one part the header promises
// bitwise the results of the fused call; with several, the reference.

// The first batch row of part j of `parts`.
int64_t part_begin(const problem& p, int parts, int j) { return p.n * j / parts; }

void run_split_training(const problem& p) {
  const size_t t = static_cast<size_t>(p.t_alloc), c = static_cast<size_t>(p.c_alloc);
  const int parts = p.hostile || !p.shape_ok ? 1 : p.parts;
  const int64_t per_row = parts > 1 ? p.c * p.spatial : 0;  // floats per batch row
  const variant v{p.misalign, false};
  arena a;
  const float_pair xy = forward_tensors(a, p, v);
  float* gamma = tensor(a, &p.gamma, c, guard_of(v, 2), false, "gamma");
  float* beta = tensor(a, &p.beta, c, guard_of(v, 3), false, "beta");
  const bool relu = p.flags & BNORM_FUSE_RELU;
  uint8_t* mask = tensor<uint8_t>(a, nullptr, (t + 7) / 8, guard_of(v, 6), relu, "relu_mask");
  // parts sets of c moments, then the merged statistics.
  const size_t kc = static_cast<size_t>(parts) * c;
  double* set_mean = tensor<double>(a, nullptr, kc, guard_of(v, 4), true, "moments mean");
  double* set_m2 = tensor<double>(a, nullptr, kc, guard_of(v, 5), true, "moments m2");
  std::vector<int64_t> count_data(static_cast<size_t>(parts));
  int64_t* counts = tensor<int64_t>(a, nullptr, count_data.size(), guard_of(v, 7), false, "counts");
  float* mean = tensor<float>(a, nullptr, c, guard_of(v, 4) ^ 1, true, "merged_mean");
  float* var = tensor<float>(a, nullptr, c, guard_of(v, 5) ^ 1, true, "merged_var");

  // moments(shape, x, mean, m2), per part.
  {
    static const char fn[] = "bnorm_moments";
    const uint32_t nulls = nulls_for(p, {});
    for (int j = 0; j < parts; ++j) {
      const int64_t n0 = part_begin(p, parts, j), nj = part_begin(p, parts, j + 1) - n0;
      const float* x = xy.in + (parts > 1 ? n0 * per_row : 0);
      const bool valid = !null_at(nulls, 0) && p.shape_ok &&
                         tensor_ok(nulls, 1, p, nj) && !null_at(nulls, 2) &&
                         !null_at(nulls, 3);
      if (valid && !p.fits) return;
      a.snapshot();
      const bnorm_shape shape = make_shape(p, parts > 1 ? nj : p.n);
      const bnorm_status status =
          bnorm_moments(arg(nulls, 0, &shape), arg(nulls, 1, x), arg(nulls, 2, set_mean + j * c),
                        arg(nulls, 3, set_m2 + j * c));
      if (!check_call(fn, valid, p.shape_ambiguous, status, a)) return;
      check_written(fn, "mean", set_mean + j * c, p.c, p);
      check_written(fn, "m2", set_m2 + j * c, p.c, p);
      if (shape.n * p.spatial == 0)
        for (size_t i = 0; i < c; ++i)
          if (set_mean[j * c + i] != 0 || set_m2[j * c + i] != 0)
            fail("%s: no values but mean=%a m2=%a", fn, set_mean[j * c + i], set_m2[j * c + i]);
      count_data[static_cast<size_t>(j)] = shape.n * p.spatial;
    }
  }

  // merge_moments(counts, mean, m2, merged_mean, merged_var).
  int64_t k = parts;
  if (p.corrupt == 1) count_data.back() = -1;
  if (p.corrupt == 2) count_data.front() = INT64_MAX;
  if (p.corrupt == 3) k = 0;
  std::copy(count_data.begin(), count_data.end(), counts);
  {
    static const char fn[] = "bnorm_merge_moments";
    const uint32_t nulls = nulls_for(p, {});
    bool counts_ok = true;
    int64_t sum = 0;
    for (int64_t n_i : count_data) counts_ok &= n_i >= 0 && !__builtin_add_overflow(sum, n_i, &sum);
    const bool valid = p.c > 0 && p.c <= kMaxElements && k > 0 && !null_at(nulls, 0) &&
                       !null_at(nulls, 1) && !null_at(nulls, 2) && !null_at(nulls, 3) &&
                       !null_at(nulls, 4) && counts_ok && sum > 0;
    if (valid && p.c != p.c_alloc) return;
    a.snapshot();
    const bnorm_status status =
        bnorm_merge_moments(k, p.c, arg(nulls, 0, counts), arg(nulls, 1, set_mean),
                            arg(nulls, 2, set_m2), arg(nulls, 3, mean), arg(nulls, 4, var));
    if (!check_call(fn, valid, false, status, a)) return;
    check_written(fn, "merged_mean", mean, p.c, p);
    check_written(fn, "merged_var", var, p.c, p);
  }

  // normalize(shape, x, gamma, beta, mean, var, y, relu_mask) on the whole tensor.
  {
    static const char fn[] = "bnorm_normalize";
    const uint32_t nulls = nulls_for(p, {2, 3});
    const bool valid = !null_at(nulls, 0) && p.shape_ok && eps_flags_ok(p, BNORM_FUSE_RELU) &&
                       tensor_ok(nulls, 1, p, p.n) && !null_at(nulls, 4) && !null_at(nulls, 5) &&
                       tensor_ok(nulls, 6, p, p.n) && (!relu || tensor_ok(nulls, 7, p, p.n)) &&
                       !(xy.in != xy.out && overlap(xy.in, xy.out, p.total));
    if (valid && !p.fits) return;
    a.snapshot();
    const bnorm_shape shape = make_shape(p, p.n);
    const bnorm_status status =
        bnorm_normalize(arg(nulls, 0, &shape), p.eps, p.flags, arg(nulls, 1, xy.in),
                        arg(nulls, 2, gamma), arg(nulls, 3, beta), arg(nulls, 4, mean),
                        arg(nulls, 5, var), arg(nulls, 6, xy.out), arg(nulls, 7, mask));
    if (!check_call(fn, valid, false, status, a)) return;
    check_written(fn, "y", xy.out, p.total, p);
    if (p.corrupt != 0) return;  // other statistics than the batch's
    if (parts == 1) {
      // Exactly forward_training, which must agree on validity too.
      const training_out fused =
          run_training(p, {static_cast<uint16_t>(p.misalign ^ 0x5555u), true});
      if (!fused.valid) fail("split training valid, forward_training not");
      const char what[] = "moments -> merge_moments -> normalize vs forward_training";
      check_same(what, "mean", mean, fused.mean.data(), c);
      check_same(what, "var", var, fused.var.data(), c);
      check_same(what, "y", xy.out, fused.y.data(), t);
      if (relu) check_same_bits(what, mask, fused.mask.data(), p.total);
    } else {
      check_training_values("split training", p, null_at(nulls, 2) ? nullptr : p.gamma.data(),
                            null_at(nulls, 3) ? nullptr : p.beta.data(), mean, var, xy.out,
                            relu ? mask : nullptr);
    }
  }
}

void run_split_backward(const problem& p) {
  const size_t t = static_cast<size_t>(p.t_alloc), c = static_cast<size_t>(p.c_alloc);
  const int parts = p.hostile || !p.shape_ok ? 1 : p.parts;
  const int64_t per_row = parts > 1 ? p.c * p.spatial : 0;
  // A part's dx overlapping another part's x or dy is the caller's bug, not
  // one the ABI can see: several parts get separate buffers (or dx == dy).
  const variant v{p.misalign, parts > 1 && p.alias != alias_in_place && p.alias != alias_dy_is_x};
  const bool relu = p.flags & BNORM_FUSE_RELU;
  const bool global = p.flags & BNORM_GLOBAL_STATS;
  arena a;
  const std::vector<float>& dy_data = dy_data_of(p, v);
  const backward_tensors bt = make_backward_tensors(a, p, v, dy_data);
  float* gamma = tensor(a, &p.gamma, c, guard_of(v, 3), false, "gamma");
  float* mean = tensor(a, &p.mean, c, guard_of(v, 4), false, "mean");
  float* var = tensor(a, &p.var, c, guard_of(v, 5), false, "var");
  uint8_t* mask = tensor(a, &p.mask, (t + 7) / 8, guard_of(v, 6), false, "relu_mask");
  const size_t kc = static_cast<size_t>(parts) * c;
  double* part_dy = tensor<double>(a, nullptr, kc, guard_of(v, 7), true, "sum_dy");
  double* part_dy_xhat = tensor<double>(a, nullptr, kc, guard_of(v, 0) ^ 1, true, "sum_dy_xhat");
  // The worker's sums of all parts, added in part order (an allreduce of one).
  std::vector<double> sum_dy_data(c), sum_dy_xhat_data(c);
  double* sum_dy = nullptr;  // their own blocks, once known
  double* sum_dy_xhat = nullptr;

  auto part_shape = [&](int j) {
    return make_shape(p, parts > 1 ? part_begin(p, parts, j + 1) - part_begin(p, parts, j) : p.n);
  };
  auto part_offset = [&](int j) { return parts > 1 ? part_begin(p, parts, j) * per_row : 0; };
  // Each part's mask bits start at its own first element.
  std::vector<uint8_t*> part_mask(static_cast<size_t>(parts), mask);
  for (int j = 0; j < parts && parts > 1; ++j) {
    const int64_t at = part_offset(j), n = part_offset(j + 1) - at;
    std::vector<uint8_t> bits(static_cast<size_t>((n + 7) / 8));
    for (int64_t i = 0; i < n; ++i)
      if (reference::mask_bit(p.mask.data(), at + i)) bits[i / 8] |= 1 << (i % 8);
    part_mask[j] = tensor(a, &bits, bits.size(), guard_of(v, j), false, "relu_mask (part)");
  }

  // backward_reduce(shape, x, dy, mean, var, relu_mask, sum_dy, sum_dy_xhat), per part.
  {
    static const char fn[] = "bnorm_backward_reduce";
    const uint32_t nulls = nulls_for(p, {});
    for (int j = 0; j < parts; ++j) {
      const int64_t nj = part_shape(j).n;
      const bool valid = !null_at(nulls, 0) && p.shape_ok &&
                         eps_flags_ok(p, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS) &&
                         tensor_ok(nulls, 1, p, nj) && tensor_ok(nulls, 2, p, nj) &&
                         !null_at(nulls, 3) && !null_at(nulls, 4) &&
                         (!relu || tensor_ok(nulls, 5, p, nj)) && !null_at(nulls, 6) &&
                         !null_at(nulls, 7);
      if (valid && !p.fits) return;
      a.snapshot();
      const bnorm_shape shape = part_shape(j);
      const int64_t at = part_offset(j);
      const bnorm_status status =
          bnorm_backward_reduce(arg(nulls, 0, &shape), p.eps, p.flags, arg(nulls, 1, bt.x + at),
                                arg(nulls, 2, bt.dy + at), arg(nulls, 3, mean), arg(nulls, 4, var),
                                arg(nulls, 5, part_mask[j]), arg(nulls, 6, part_dy + j * c),
                                arg(nulls, 7, part_dy_xhat + j * c));
      if (!check_call(fn, valid, p.shape_ambiguous, status, a)) return;
      check_written(fn, "sum_dy", part_dy + j * c, p.c, p);
      check_written(fn, "sum_dy_xhat", part_dy_xhat + j * c, p.c, p);
      for (size_t i = 0; i < c; ++i) {
        // The first part as it is (0 + -0 would be +0), then the others added.
        const double dy = part_dy[j * c + i], dy_xhat = part_dy_xhat[j * c + i];
        sum_dy_data[i] = j ? sum_dy_data[i] + dy : dy;
        sum_dy_xhat_data[i] = j ? sum_dy_xhat_data[i] + dy_xhat : dy_xhat;
      }
    }
    sum_dy = tensor(a, &sum_dy_data, c, guard_of(v, 1) ^ 2, false, "sum_dy (total)");
    sum_dy_xhat = tensor(a, &sum_dy_xhat_data, c, guard_of(v, 2) ^ 2, false, "sum_dy_xhat (total)");
  }

  // backward_apply(shape, x, dy, gamma, mean, var, relu_mask, sum_dy, sum_dy_xhat, dx), per part.
  const int64_t count = p.apply_count ? p.count : p.n * p.spatial;
  {
    static const char fn[] = "bnorm_backward_apply";
    const uint32_t nulls = nulls_for(p, {3});
    for (int j = 0; j < parts; ++j) {
      const bnorm_shape shape = part_shape(j);
      const int64_t at = part_offset(j);
      const int64_t part_total = parts > 1 ? shape.n * p.c * p.spatial : p.total;
      const bool valid =
          !null_at(nulls, 0) && p.shape_ok &&
          eps_flags_ok(p, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS) &&
          tensor_ok(nulls, 1, p, shape.n) && tensor_ok(nulls, 2, p, shape.n) &&
          !null_at(nulls, 4) && !null_at(nulls, 5) && tensor_ok(nulls, 9, p, shape.n) &&
          (global || (!null_at(nulls, 7) && !null_at(nulls, 8) && count > 0 &&
                      count >= shape.n * p.spatial)) &&
          (!relu || tensor_ok(nulls, 6, p, shape.n)) &&
          !(bt.dx + at != bt.dy + at && overlap(bt.dx + at, bt.dy + at, part_total)) &&
          !overlap(bt.dx + at, bt.x + at, part_total);
      if (valid && !p.fits) return;
      a.snapshot();
      const bnorm_status status = bnorm_backward_apply(
          arg(nulls, 0, &shape), p.eps, p.flags, arg(nulls, 1, bt.x + at),
          arg(nulls, 2, bt.dy + at), arg(nulls, 3, gamma), arg(nulls, 4, mean), arg(nulls, 5, var),
          arg(nulls, 6, part_mask[j]), arg(nulls, 7, sum_dy), arg(nulls, 8, sum_dy_xhat), count,
          arg(nulls, 9, bt.dx + at));
      if (!check_call(fn, valid, p.shape_ambiguous, status, a)) return;
      check_written(fn, "dx", bt.dx + at, part_total, p);
    }
  }
  if (count != p.n * p.spatial) return;  // other than the batch's gradient

  std::vector<float> dgamma(c), dbeta(c);
  for (size_t i = 0; i < c; ++i) {
    dgamma[i] = static_cast<float>(sum_dy_xhat_data[i]);
    dbeta[i] = static_cast<float>(sum_dy_data[i]);
  }
  const uint32_t nulls = nulls_for(p, {3});
  if (parts == 1) {
    // Exactly backward (which must agree on validity too) with apply's
    // gamma, and dgamma = (float) sum_dy_xhat, dbeta = (float) sum_dy.
    problem q = p;
    q.nulls_any = true;
    q.null_bits = null_at(nulls, 3) ? 1u << 3 : 0;
    q.dy = dy_data;
    const backward_out fused =
        run_backward(q, {static_cast<uint16_t>(p.misalign ^ 0x5555u), true}, p.mean, p.var, p.mask);
    if (!fused.valid) fail("split backward valid, backward not");
    const char what[] = "backward_reduce -> backward_apply vs backward";
    check_same(what, "dx", bt.dx, fused.dx.data(), t);
    check_same(what, "dgamma", dgamma, fused.dgamma);
    check_same(what, "dbeta", dbeta, fused.dbeta);
  } else {
    const backward_data in{
        p.x.data(),    dy_data.data(), null_at(nulls, 3) ? nullptr : p.gamma.data(),
        p.mean.data(), p.var.data(),   relu ? p.mask.data() : nullptr};
    check_backward_values("split backward", p, in, bt.dx, dgamma.data(), dbeta.data());
  }
}

// ---------------------------------------------------------------------------
// The small functions.

// Known statuses have distinct names; any other int (a C caller's) has one
// that is none of those.
void check_status_strings(int other) {
  const bnorm_status all[4] = {BNORM_SUCCESS, BNORM_INVALID_ARGUMENT, BNORM_UNSUPPORTED,
                               BNORM_OUT_OF_MEMORY};
  for (int i = 0; i < 4; ++i) {
    const char* s = bnorm_status_string(all[i]);
    if (!s || !s[0]) fail("bnorm_status_string(%d) is NULL or empty", i);
    for (int j = 0; j < i; ++j)
      if (std::strcmp(s, bnorm_status_string(all[j])) == 0)
        fail("bnorm_status_string(%d) == bnorm_status_string(%d)", i, j);
  }
  for (int value : {other, -1, 4, INT32_MIN, INT32_MAX}) {
    if (value >= 0 && value < 4) continue;
    const char* s = fuzz_status_string_of_int(value);
    if (!s || !s[0]) fail("bnorm_status_string(%d) is NULL or empty", value);
    for (bnorm_status known : all)
      if (std::strcmp(s, bnorm_status_string(known)) == 0)
        fail("bnorm_status_string(%d) = \"%s\", a known status's name", value, s);
  }
}

void check_isa() {
  const char* isa = bnorm_isa();
  if (!isa) fail("bnorm_isa() is NULL");
  const std::string s = isa;
  if (s != "sse2" && s != "avx2" && s != "avx512") fail("bnorm_isa() = \"%s\"", isa);
  if (std::strcmp(isa, bnorm_isa()) != 0) fail("bnorm_isa() changed");
  const char* want = std::getenv("BNORM_ISA");
  if (want && std::strcmp(want, "sse2") == 0 && s != "sse2")
    fail("BNORM_ISA=sse2 but bnorm_isa() = \"%s\"", isa);
  if (want && std::strcmp(want, "avx2") == 0 && s == "avx512")
    fail("BNORM_ISA=avx2 but bnorm_isa() = \"%s\"", isa);
}

// The message is per thread: a failure on one thread and a success on
// another do not see each other's.
void check_last_error_per_thread() {
  const float one = 1, zero = 0;
  float rm = 0, rv = 0;
  if (bnorm_update_running_stats(0, 2, 0.5f, &one, &one, &rm, &rv) != BNORM_INVALID_ARGUMENT)
    fail("update_running_stats(c = 0) did not fail");
  const std::string mine = bnorm_last_error_message();
  if (mine.empty()) fail("no message after a failure");
  std::string theirs = "unset";
  std::thread other([&] {
    float m = 0, v = 0;
    if (bnorm_update_running_stats(1, 2, 0.5f, &zero, &zero, &m, &v) != BNORM_SUCCESS)
      theirs = "call failed";
    else
      theirs = bnorm_last_error_message();
  });
  other.join();
  if (!theirs.empty()) fail("other thread's message after success: \"%s\"", theirs.c_str());
  if (mine != bnorm_last_error_message())
    fail("a success on another thread changed this thread's message to \"%s\"",
         bnorm_last_error_message());
}

// ---------------------------------------------------------------------------

// For the second run: one thread if the first had several, else two.
class other_thread_count {
 public:
  other_thread_count() : before_(omp_get_max_threads()) {
    omp_set_num_threads(before_ > 1 ? 1 : 2);
  }
  ~other_thread_count() { omp_set_num_threads(before_); }
  other_thread_count(const other_thread_count&) = delete;
  other_thread_count& operator=(const other_thread_count&) = delete;

 private:
  int before_;
};

void run_case(const problem& p) {
  const variant first{p.misalign, false};
  const variant again{static_cast<uint16_t>(p.misalign ^ 0x5555u), true};
  const char repeat[] = "second run (other alignments, separate buffers, other thread count)";
  switch (p.op) {
    case op_training: {
      const training_out a = run_training(p, first);
      if (!a.valid) return;
      training_out b;
      {
        other_thread_count scope;
        b = run_training(p, again);
      }
      if (!b.valid) fail("training: valid once, not the second time");
      check_same(repeat, "y", a.y, b.y);
      check_same(repeat, "mean", a.mean, b.mean);
      check_same(repeat, "var", a.var, b.var);
      if (p.flags & BNORM_FUSE_RELU) check_same_bits(repeat, a.mask.data(), b.mask.data(), p.total);
      return;
    }
    case op_inference: {
      const std::optional<std::vector<float>> a = run_inference(p, first);
      if (!a) return;
      std::optional<std::vector<float>> b;
      {
        other_thread_count scope;
        b = run_inference(p, again);
      }
      if (!b) fail("inference: valid once, not the second time");
      check_same(repeat, "y", *a, *b);
      return;
    }
    case op_backward: {
      const backward_out a = run_backward(p, first, p.mean, p.var, p.mask);
      if (!a.valid) return;
      backward_out b;
      {
        other_thread_count scope;
        // dy == x is part of the data, not only of the memory: keep it.
        problem q = p;
        q.dy = dy_data_of(p, first);
        b = run_backward(q, again, p.mean, p.var, p.mask);
      }
      if (!b.valid) fail("backward: valid once, not the second time");
      check_same(repeat, "dx", a.dx, b.dx);
      const uint32_t nulls = nulls_for(p, {3, 8, 9});
      if (!null_at(nulls, 8)) check_same(repeat, "dgamma", a.dgamma, b.dgamma);
      if (!null_at(nulls, 9)) check_same(repeat, "dbeta", a.dbeta, b.dbeta);
      return;
    }
    case op_running_stats: {
      const running_out a = run_running_stats(p, first, p.mean, p.var, p.count);
      if (!a.valid) return;
      running_out b;
      {
        other_thread_count scope;
        b = run_running_stats(p, again, p.mean, p.var, p.count);
      }
      check_same(repeat, "running_mean", a.mean, b.mean);
      check_same(repeat, "running_var", a.var, b.var);
      return;
    }
    case op_chain: {
      // Backward and the running statistics on what training produced: the
      // realistic case (the batch's own mean and var, the mask training wrote).
      const training_out t = run_training(p, {p.misalign, true});
      if (!t.valid) return;
      problem q = p;
      q.dy = dy_data_of(p, first);
      run_backward(q, first, t.mean, t.var, p.flags & BNORM_FUSE_RELU ? t.mask : p.mask);
      run_running_stats(p, first, t.mean, t.var, p.n * p.spatial);
      return;
    }
    case op_split_training:
      run_split_training(p);
      return;
    case op_split_backward:
      run_split_backward(p);
      return;
    case op_status_string:
      check_status_strings(p.layout);  // the layout field's raw int32
      return;
    case op_isa:
      check_isa();
      return;
    default:
      check_last_error_per_thread();
      return;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const problem p = decode(data, size);
  g_case = describe(p);
  run_case(p);
  return 0;
}
