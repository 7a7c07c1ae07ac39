// The few vector operations xsimd 8.1 lacks, per instruction set, and the
// ReLU mask bit stream. Included only by the arch_*.cpp translation units.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <xsimd/xsimd.hpp>

namespace bnorm {
namespace simd {
namespace {  // internal linkage, as microkernels.hpp's kernels_for

template <class A>
using vfloat = xsimd::batch<float, A>;
template <class A>
using vmask = xsimd::batch_bool<float, A>;
// Half as many lanes as vfloat: the per-channel work in double.
template <class A>
using vdouble = xsimd::batch<double, A>;

template <class A>
constexpr bool is_avx512 = std::is_base_of<xsimd::avx512f, A>::value;
template <class A>
constexpr bool is_avx = std::is_base_of<xsimd::avx, A>::value;
template <class A>
constexpr bool has_fma = is_avx512<A> || std::is_base_of<xsimd::fma3<xsimd::avx2>, A>::value;

// a * b + c, one rounding where the instruction set has FMA. xsimd 8.1 has no
// avx512f fma (it writes a*b+c), so that one is spelled out; the translation
// units are compiled with -ffp-contract=off so that nothing else is fused
// behind our back and every element sees exactly the operations written here.
template <class A>
inline vfloat<A> madd(vfloat<A> a, vfloat<A> b, vfloat<A> c) {
  if constexpr (is_avx512<A>) {
    return _mm512_fmadd_ps(a, b, c);
  } else {
    return xsimd::fma(a, b, c);
  }
}

// Lane i: the sum of the lanes of rows[i] (W rows). xsimd 8.1's avx512f
// haddp returns the sums of rows 2-3 and 4-5 in each other's lanes, and
// those of rows 10-11 and 12-13 (checked on 8.1.0: lanes 2 and 4 swap, ...),
// so for AVX-512 the rows go in swapped and come out in place. The other
// instruction sets' haddp are right. tests/ compare every lane.
template <class A>
inline vfloat<A> haddp(vfloat<A>* rows) {
  if constexpr (std::is_base_of<xsimd::avx512f, A>::value) {
    for (int base : {2, 10}) {
      std::swap(rows[base], rows[base + 2]);
      std::swap(rows[base + 1], rows[base + 3]);
    }
  }
  return xsimd::haddp(rows);
}

// The scalar twin of madd for tails: the same rounding as the vector lanes.
template <class A>
inline float madd1(float a, float b, float c) {
  if constexpr (has_fma<A>) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// The vdouble<A>::size floats at p, converted to double (exactly; xsimd
// 8.1 converts only between types of the same size).
template <class A>
inline vdouble<A> load_widened(const float* p) {
  if constexpr (is_avx512<A>) {
    return _mm512_cvtps_pd(_mm256_loadu_ps(p));
  } else if constexpr (is_avx<A>) {
    return _mm256_cvtps_pd(_mm_loadu_ps(p));
  } else {
    return _mm_cvtps_pd(_mm_setr_ps(p[0], p[1], 0.f, 0.f));
  }
}

// v's lanes rounded to float (to nearest, as static_cast<float>), stored at p.
template <class A>
inline void store_narrowed(float* p, vdouble<A> v) {
  if constexpr (is_avx512<A>) {
    _mm256_storeu_ps(p, _mm512_cvtpd_ps(v));
  } else if constexpr (is_avx<A>) {
    _mm_storeu_ps(p, _mm256_cvtpd_ps(v));
  } else {
    alignas(16) float f[4];
    _mm_store_ps(f, _mm_cvtpd_ps(v));
    p[0] = f[0];
    p[1] = f[1];
  }
}

// p[2i] = a[i], p[2i + 1] = b[i]: pairs of doubles (vdouble<A>::size of them).
template <class A>
inline void store_pairs(double* p, vdouble<A> a, vdouble<A> b) {
  if constexpr (is_avx512<A>) {
    _mm512_storeu_pd(p, _mm512_permutex2var_pd(a, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), b));
    _mm512_storeu_pd(p + 8,
                     _mm512_permutex2var_pd(a, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), b));
  } else {
    constexpr int64_t N = vdouble<A>::size;
    alignas(64) double x[N], y[N];
    a.store_aligned(x);
    b.store_aligned(y);
    for (int64_t i = 0; i < N; ++i) {
      p[2 * i] = x[i];
      p[2 * i + 1] = y[i];
    }
  }
}

// a[i] = p[2i], b[i] = p[2i + 1]: the pairs of store_pairs.
template <class A>
inline void load_pairs(const double* p, vdouble<A>* a, vdouble<A>* b) {
  if constexpr (is_avx512<A>) {
    const __m512d u = _mm512_loadu_pd(p), v = _mm512_loadu_pd(p + 8);
    *a = _mm512_permutex2var_pd(u, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), v);
    *b = _mm512_permutex2var_pd(u, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), v);
  } else {
    constexpr int64_t N = vdouble<A>::size;
    alignas(64) double x[N], y[N];
    for (int64_t i = 0; i < N; ++i) {
      x[i] = p[2 * i];
      y[i] = p[2 * i + 1];
    }
    *a = vdouble<A>::load_aligned(x);
    *b = vdouble<A>::load_aligned(y);
  }
}

// a[i] = p[3i], b[i] = p[3i + 1], c[i] = p[3i + 2]: triples of doubles.
template <class A>
inline void load_triples(const double* p, vdouble<A>* a, vdouble<A>* b, vdouble<A>* c) {
  if constexpr (is_avx512<A>) {
    const __m512d u = _mm512_loadu_pd(p), v = _mm512_loadu_pd(p + 8), w = _mm512_loadu_pd(p + 16);
    // From u and v the lanes found there (0-15), then w's (16-23) into the last lanes.
    auto take = [&](__m512i from_uv, __m512i from_w) {
      return _mm512_permutex2var_pd(_mm512_permutex2var_pd(u, from_uv, v), from_w, w);
    };
    *a = take(_mm512_setr_epi64(0, 3, 6, 9, 12, 15, 0, 0),
              _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 10, 13));
    *b = take(_mm512_setr_epi64(1, 4, 7, 10, 13, 0, 0, 0),
              _mm512_setr_epi64(0, 1, 2, 3, 4, 8, 11, 14));
    *c = take(_mm512_setr_epi64(2, 5, 8, 11, 14, 0, 0, 0),
              _mm512_setr_epi64(0, 1, 2, 3, 4, 9, 12, 15));
  } else {
    constexpr int64_t N = vdouble<A>::size;
    alignas(64) double x[N], y[N], z[N];
    for (int64_t i = 0; i < N; ++i) {
      x[i] = p[3 * i];
      y[i] = p[3 * i + 1];
      z[i] = p[3 * i + 2];
    }
    *a = vdouble<A>::load_aligned(x);
    *b = vdouble<A>::load_aligned(y);
    *c = vdouble<A>::load_aligned(z);
  }
}

// Stores v at p; with `stream`, a non-temporal store (p must be aligned to
// the vector size): it skips the read-for-ownership of the destination line
// and does not evict the data we are about to read again.
template <class A>
inline void store(float* p, vfloat<A> v, bool stream) {
  if (!stream) {
    v.store_unaligned(p);
  } else if constexpr (is_avx512<A>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (is_avx<A>) {
    _mm256_stream_ps(p, v);
  } else {
    _mm_stream_ps(p, v);
  }
}

// AVX: all ones in the lanes below n, the mask of a masked load or store.
template <class A>
inline __m256i lanes_below(int64_t n) {
  static_assert(is_avx<A>, "AVX");
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
}

// The first n < W lanes: loaded from p (reading only those n floats),
// stored to p, or selected. For tails of rows, so that a row of 49 floats
// costs four AVX-512 iterations and no scalar loop.
template <class A>
inline vfloat<A> load_first(const float* p, int64_t n) {
  if constexpr (is_avx512<A>) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  } else if constexpr (is_avx<A>) {
    return _mm256_maskload_ps(p, lanes_below<A>(n));
  } else {
    alignas(16) float buffer[vfloat<A>::size] = {};
    for (int64_t i = 0; i < n; ++i) buffer[i] = p[i];
    return vfloat<A>::load_aligned(buffer);
  }
}

template <class A>
inline void store_first(float* p, vfloat<A> v, int64_t n) {
  if constexpr (is_avx512<A>) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
  } else if constexpr (is_avx<A>) {
    _mm256_maskstore_ps(p, lanes_below<A>(n), v);
  } else {
    alignas(16) float buffer[vfloat<A>::size];
    v.store_aligned(buffer);
    for (int64_t i = 0; i < n; ++i) p[i] = buffer[i];
  }
}

// Lanes [0, k) from p, lanes [k, W) from first[0], first[1], ... (0 < k <
// W): a vector of per-column values that runs past the last column of a row
// (p + k) into the first ones (first; at least W - k of them).
template <class A>
inline vfloat<A> load_wrapped(const float* p, int64_t k, const float* first) {
  if constexpr (is_avx512<A>) {
    const auto low = static_cast<__mmask16>((1u << k) - 1u);
    return _mm512_mask_expandloadu_ps(_mm512_maskz_loadu_ps(low, p), static_cast<__mmask16>(~low),
                                      first);
  } else if constexpr (is_avx<A>) {
    // Two masked loads (masked-off lanes read nothing): lanes [0, k) from
    // p, lanes [k, 8) from the address k floats before `first`. The lanes
    // assembled in a stack buffer and loaded as a vector (as SSE2 does
    // below) waited for the buffer's stores on every call: NHWC inference
    // of 64 channels from buffers 16 bytes past a page, where one vector a
    // row wraps, took 3.4 copies against 1.0 aligned (8x64x112x112).
    const auto* before_first =
        reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(first) - k * sizeof(float));
    const __m256i high = _mm256_xor_si256(lanes_below<A>(k), _mm256_set1_epi32(-1));
    return _mm256_or_ps(load_first<A>(p, k), _mm256_maskload_ps(before_first, high));
  } else {
    alignas(64) float buffer[vfloat<A>::size];
    for (int64_t i = 0; i < k; ++i) buffer[i] = p[i];
    for (int64_t i = k; i < static_cast<int64_t>(vfloat<A>::size); ++i) buffer[i] = first[i - k];
    return vfloat<A>::load_aligned(buffer);
  }
}

// Lane i: i.
template <class A>
inline vfloat<A> lane_index() {
  alignas(64) static const float lane[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return vfloat<A>::load_aligned(lane);
}

// v in the first n lanes, 0 in the others.
template <class A>
inline vfloat<A> keep_first(vfloat<A> v, int64_t n) {
  if constexpr (is_avx<A>) {
    // An and with load_first's mask, which GCC keeps out of a row loop; the
    // float compare it did not (NCHW 1x512x7x7 moments: 4 instructions a
    // row fewer).
    return _mm256_and_ps(v, _mm256_castsi256_ps(lanes_below<A>(n)));
  } else {
    return xsimd::select(lane_index<A>() < vfloat<A>(static_cast<float>(n)), v, vfloat<A>(0.f));
  }
}

// v in the lanes where m is set, 0 in the others (keep_where), or the
// reverse (zero_where). On AVX and SSE2 one and / and-not of the compare's
// all-ones lanes: xsimd::select(m, v, 0) is blendv there, which GCC 12
// turns into a sign-bit compare and an and-not, one instruction more per
// vector (NHWC training with ReLU of 1x2048x7x7 on AVX2: the normalize's
// instructions -21%, time -8%). On AVX-512 select is one masked move
// already. (xsimd 8.1's bitwise_andnot is ~x & y on batches of AVX and SSE
// but x & ~y on AVX-512 batch_bools: not used.)
template <class A>
inline vfloat<A> keep_where(vmask<A> m, vfloat<A> v) {
  if constexpr (is_avx512<A>) {
    return xsimd::select(m, v, vfloat<A>(0.f));
  } else if constexpr (is_avx<A>) {
    return _mm256_and_ps(m, v);
  } else {
    return _mm_and_ps(m, v);
  }
}
template <class A>
inline vfloat<A> zero_where(vmask<A> m, vfloat<A> v) {
  if constexpr (is_avx512<A>) {
    return xsimd::select(m, vfloat<A>(0.f), v);
  } else if constexpr (is_avx<A>) {
    return _mm256_andnot_ps(m, v);
  } else {
    return _mm_andnot_ps(m, v);
  }
}

// Lane i of the mask -> bit i.
template <class A>
inline uint32_t to_bits(vmask<A> m) {
  if constexpr (is_avx512<A>) {
    return static_cast<uint16_t>(static_cast<__mmask16>(m));
  } else if constexpr (is_avx<A>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(m));
  } else {
    return static_cast<uint32_t>(_mm_movemask_ps(m));
  }
}

// AVX2: lane i of m[u] -> bit 8u + i, the bits of four masks at once. Two
// saturating packs narrow the all-ones or zero lanes to bytes (each
// 128-bit half on its own: the bytes come out in dword groups m0 lo, m1 lo,
// m2 lo, m3 lo, m0 hi, ...), a dword permute puts them in order, and one
// vpmovmskb reads them: one 4-byte store of the ReLU mask per four vectors,
// where a vmovmskps and a byte store each took a normalize with the mask in
// L1 1.8 times as long as without (a bare loop; 1.2 times this way).
//
// AVX-512: the four 16-bit masks side by side, for one 8-byte store. A
// 2-byte store of each vector's bits took a normalize with the mask
// 1.30-1.35 times as long as without it on the Intel Xeon machine (a bare
// loop of NHWC rows of 256 channels, 1.6 MB, one thread; 1.03-1.05 times
// this way).
template <class A>
using quad_bits = std::conditional_t<is_avx512<A>, uint64_t, uint32_t>;

template <class A>
inline quad_bits<A> to_bits4(const vmask<A>* m) {
  if constexpr (is_avx512<A>) {
    uint64_t bits = 0;
    for (int u = 0; u < 4; ++u)
      bits |= uint64_t{to_bits<A>(m[u])} << (16 * u);
    return bits;
  } else {
    static_assert(is_avx<A>, "AVX2 or AVX-512");
    const __m256i m01 = _mm256_packs_epi32(_mm256_castps_si256(m[0]), _mm256_castps_si256(m[1]));
    const __m256i m23 = _mm256_packs_epi32(_mm256_castps_si256(m[2]), _mm256_castps_si256(m[3]));
    const __m256i bytes = _mm256_packs_epi16(m01, m23);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_permutevar8x32_epi32(bytes, order)));
  }
}

// Makes v's value opaque to the compiler: whatever computed it stays
// computed into a register, and is not folded into the instructions that use it.
template <class A>
inline void opaque(vfloat<A>& v) {
  asm("" : "+v"(v.data));
}

// Lane i: bit i.
alignas(64) constexpr int32_t kLaneBit[16] = {1,   2,   4,    8,    16,   32,   64,    128,
                                              256, 512, 1024, 2048, 4096, 8192, 16384, 32768};

// AVX and SSE2: the lanes i whose bit lane_bits[i] (one bit each) is set in
// lane i of `words`. An integer compare (the float compare of the lanes
// converted to float took one more instruction per vector).
template <class A>
inline vmask<A> lanes_set(xsimd::batch<int32_t, A> words, xsimd::batch<int32_t, A> lane_bits) {
  static_assert(!is_avx512<A>, "AVX-512 takes its mask register from the bits");
  const xsimd::batch<int32_t, A> set = words & lane_bits;
  if constexpr (is_avx<A>)
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bits));
  else
    return _mm_castsi128_ps(_mm_cmpeq_epi32(set, lane_bits));
}

// The lanes i whose bit lane_bits[i] is set in `bits`.
template <class A>
inline vmask<A> lanes_with_bits(uint32_t bits, xsimd::batch<int32_t, A> lane_bits) {
  return lanes_set<A>(xsimd::batch<int32_t, A>(static_cast<int32_t>(bits)), lane_bits);
}

// Bit i -> lane i of the mask.
template <class A>
inline vmask<A> from_bits(uint32_t bits) {
  if constexpr (is_avx512<A>) {
    return vmask<A>(static_cast<__mmask16>(bits));
  } else {
    return lanes_with_bits<A>(bits, xsimd::batch<int32_t, A>::load_aligned(kLaneBit));
  }
}

// AVX2: lane i set where bit i of the byte at p is. The byte broadcast
// from memory to every byte (vpbroadcastb) and each lane's bit tested:
// bits of the lane's other bytes fall outside its bit. One instruction for
// what a load, a move and a dword broadcast did (from_bits).
template <class A>
inline vmask<A> lanes_of_byte(const uint8_t* p) {
  static_assert(is_avx<A> && !is_avx512<A>, "AVX2");
  return lanes_set<A>(_mm256_set1_epi8(static_cast<char>(*p)),
                      xsimd::batch<int32_t, A>::load_aligned(kLaneBit));
}

// Bit k (k < 32) in lane k.
alignas(32) constexpr int32_t kQuadBit[32] = {
    1,       2,       4,       8,       16,      32,      64,      128,
    1 << 8,  1 << 9,  1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15,
    1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23,
    1 << 24, 1 << 25, 1 << 26, 1 << 27, 1 << 28, 1 << 29, 1 << 30, INT32_MIN};

// AVX2, the reverse of to_bits4: the 32 bits at p broadcast once, lane i of
// vector u (0-3) set where bit 8u + i is; per vector an and and an integer
// compare, where each vector's byte took a load, a move and a broadcast of
// its own.
template <class A>
class quad_lanes {
  static_assert(is_avx<A> && !is_avx512<A>, "AVX2");

 public:
  explicit quad_lanes(const uint8_t* p) {
    int32_t word;
    std::memcpy(&word, p, 4);
    word_ = xsimd::batch<int32_t, A>(word);
  }
  vmask<A> operator[](int u) const {
    return lanes_set<A>(word_, xsimd::batch<int32_t, A>::load_aligned(kQuadBit + 8 * u));
  }

 private:
  xsimd::batch<int32_t, A> word_;
};

// k <= 16 mask bits starting at bit `pos`. Reads only the bytes that hold them.
inline uint32_t load_bits(const uint8_t* mask, int64_t pos, int k) {
  const uint8_t* p = mask + (pos >> 3);
  const int shift = static_cast<int>(pos & 7);
  const int nbytes = (shift + k + 7) >> 3;
  uint32_t v = 0;
  for (int i = 0; i < nbytes; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return (v >> shift) & ((1u << k) - 1u);
}

// The W mask bits (a whole vector's: W = 8 or 16) from bit `pos`, without
// a branch: the W / 8 bytes from pos's, then the next byte when the bits
// start inside a byte, else the last one again (its bits shifted out), so
// only bytes that hold the bits are read. load_bits' loop over a count of
// bytes made GCC 12 keep the NHWC column groups' accumulators in memory, a
// store and a load on each add's chain (session 15).
template <int W>
inline uint32_t load_vector_bits(const uint8_t* mask, int64_t pos) {
  static_assert(W == 8 || W == 16, "a whole number of bytes, at most two");
  const uint8_t* p = mask + (pos >> 3);
  const int shift = static_cast<int>(pos & 7);
  uint32_t v = 0;
  for (int i = 0; i < W / 8; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  v |= static_cast<uint32_t>(p[W / 8 - 1 + (shift != 0)]) << W;
  return (v >> shift) & ((1u << W) - 1u);
}

// Writes the mask bits of one run of consecutive elements, in order. Bytes
// wholly inside the run are plain stores, four at a time; the first and last
// byte may be shared with a neighbouring run (another channel, perhaps on
// another thread), so there only our bits are changed, atomically. A null
// mask makes it a no-op (ReLU without a mask: inference).
class bit_writer {
 public:
  bit_writer(uint8_t* mask, int64_t index)
      : byte_(mask ? mask + (index >> 3) : nullptr),
        lead_(static_cast<unsigned>(index & 7)),
        pending_(static_cast<unsigned>(index & 7)) {}

  // The bits of the next k <= 16 elements, first element in bit 0.
  void push(uint32_t bits, unsigned k) {
    if (!byte_) return;
    acc_ |= static_cast<uint64_t>(bits) << pending_;
    pending_ += k;
    if (pending_ >= 32) {
      const uint32_t word = static_cast<uint32_t>(acc_);
      if (lead_ == 0) {
        std::memcpy(byte_, &word, 4);
      } else {  // once, at the start of a run that begins inside a byte
        emit(byte_, static_cast<uint8_t>(word), 0xFFu & ~((1u << lead_) - 1u));
        std::memcpy(byte_ + 1, reinterpret_cast<const uint8_t*>(&word) + 1, 3);
        lead_ = 0;
      }
      acc_ >>= 32;
      pending_ -= 32;
      byte_ += 4;
    }
  }

  void finish() {
    if (!byte_) return;
    for (; pending_ >= 8; pending_ -= 8, acc_ >>= 8, ++byte_, lead_ = 0)
      emit(byte_, static_cast<uint8_t>(acc_), 0xFFu & ~((1u << lead_) - 1u));
    if (pending_ > lead_)
      emit(byte_, static_cast<uint8_t>(acc_), ((1u << pending_) - 1u) & ~((1u << lead_) - 1u));
  }

 private:
  static void emit(uint8_t* byte, uint8_t value, unsigned ours) {
    if (ours == 0xFFu) {
      *byte = value;
    } else {
      __atomic_fetch_and(byte, static_cast<uint8_t>(~ours), __ATOMIC_RELAXED);
      __atomic_fetch_or(byte, static_cast<uint8_t>(value & ours), __ATOMIC_RELAXED);
    }
  }

  uint8_t* byte_;
  unsigned lead_;     // bits of the first byte that belong to the previous run
  unsigned pending_;  // bits in acc_, counting the lead
  uint64_t acc_ = 0;
};

}  // namespace
}  // namespace simd
}  // namespace bnorm
