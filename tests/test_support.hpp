// Shared test machinery: guarded buffers, random data, ISA queries, tensor comparisons.
#ifndef BNORM_TESTS_TEST_SUPPORT_HPP
#define BNORM_TESTS_TEST_SUPPORT_HPP

#include <bnorm/bnorm.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "reference.hpp"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define BNORM_TEST_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define BNORM_TEST_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define BNORM_TEST_POISON(p, n) ((void)(p), (void)(n))
#define BNORM_TEST_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace bnorm_test {

// f32 unit roundoff: every correctly rounded f32 operation has relative error <= u.
constexpr double kU = 1.0 / (1 << 24);

// A signaling-NaN bit pattern no kernel produces: fills guards and untouched outputs.
constexpr uint32_t kFloatSentinelBits = 0x7FA5A5A5u;
constexpr uint8_t kByteSentinel = 0xA5;

template <class T>
T sentinel() {
  if constexpr (sizeof(T) == 4) {
    T v;
    std::memcpy(&v, &kFloatSentinelBits, 4);
    return v;
  } else {
    return T(kByteSentinel);
  }
}

// Heap buffer of `count` elements whose data starts `offset` elements past a 64-byte boundary,
// with guard zones before and after (64 bytes + offset, and 64 bytes) holding the sentinel.
// A kernel that writes outside [data, data+count) changes a guard; guards_intact() notices.
// Under AddressSanitizer the guards are poisoned too, so that a read of them fails at once
// (a 16-bit read of a ReLU mask's last byte, say, which the sentinel would hide).
template <class T>
class Buffer {
 public:
  static constexpr size_t kGuard = 64 / sizeof(T);

  explicit Buffer(size_t count = 0, size_t offset = 0)
      : count_(count), front_(kGuard + offset), total_(front_ + count + kGuard) {
    void* p = nullptr;
    const size_t bytes = (total_ * sizeof(T) + 63) / 64 * 64;
    if (posix_memalign(&p, 64, bytes) != 0) throw std::bad_alloc();
    base_ = static_cast<T*>(p);
    std::fill(base_, base_ + total_, sentinel<T>());
    poison_guards();
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    swap(o);
    return *this;
  }
  ~Buffer() {
    unpoison_guards();
    std::free(base_);
  }

  T* data() { return base_ + front_; }
  const T* data() const { return base_ + front_; }
  size_t size() const { return count_; }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }

  void fill_sentinel() { std::fill(data(), data() + count_, sentinel<T>()); }
  void assign(const std::vector<T>& v) { std::copy(v.begin(), v.end(), data()); }
  std::vector<T> values() const { return std::vector<T>(data(), data() + count_); }

  bool guards_intact() const {
    const T s = sentinel<T>();
    bool intact = true;
    unpoison_guards();
    for (size_t i = 0; i < front_; ++i)
      if (std::memcmp(&base_[i], &s, sizeof(T)) != 0) intact = false;
    for (size_t i = front_ + count_; i < total_; ++i)
      if (std::memcmp(&base_[i], &s, sizeof(T)) != 0) intact = false;
    poison_guards();
    return intact;
  }
  // Every byte, guards included: compare before/after to prove a call wrote nothing.
  std::vector<uint8_t> raw_bytes() const {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(base_);
    unpoison_guards();
    std::vector<uint8_t> bytes(b, b + total_ * sizeof(T));
    poison_guards();
    return bytes;
  }

 private:
  void poison_guards() const {
    if (!base_) return;
    BNORM_TEST_POISON(base_, front_ * sizeof(T));
    BNORM_TEST_POISON(base_ + front_ + count_, (total_ - front_ - count_) * sizeof(T));
  }
  void unpoison_guards() const {
    if (base_) BNORM_TEST_UNPOISON(base_, total_ * sizeof(T));
  }

  void swap(Buffer& o) {
    std::swap(count_, o.count_);
    std::swap(front_, o.front_);
    std::swap(total_, o.total_);
    std::swap(base_, o.base_);
  }
  size_t count_ = 0, front_ = 0, total_ = 0;
  T* base_ = nullptr;
};

inline bool bitwise_equal(const float* a, const float* b, size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0;
}

// First index where two float arrays differ bitwise, or -1.
inline int64_t first_bit_difference(const float* a, const float* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return int64_t(i);
  return -1;
}

inline std::string describe(const bnorm_shape& sh) {
  std::ostringstream os;
  os << (sh.layout == BNORM_NCHW ? "nchw" : "nhwc") << " n" << sh.n << "c" << sh.c << "s"
     << sh.spatial;
  return os.str();
}

inline std::string where(const bnorm_shape& sh, int64_t i) {
  // Inverse of bnorm_ref::index.
  std::ostringstream os;
  int64_t n, c, s;
  if (sh.layout == BNORM_NCHW) {
    s = i % sh.spatial;
    c = (i / sh.spatial) % sh.c;
    n = i / (sh.spatial * sh.c);
  } else {
    c = i % sh.c;
    s = (i / sh.c) % sh.spatial;
    n = i / (sh.c * sh.spatial);
  }
  os << "index " << i << " (n=" << n << " c=" << c << " s=" << s << ")";
  return os.str();
}

inline int64_t channel_of(const bnorm_shape& sh, int64_t i) {
  return sh.layout == BNORM_NCHW ? (i / sh.spatial) % sh.c : i % sh.c;
}

// Compares got[i] with want[i] within tol(i) for every element; a NaN never passes. Reports the
// count, the first mismatch and the worst |diff|/tol, as one failure rather than thousands.
template <class Tol>
::testing::AssertionResult close_elements(const char* what, const bnorm_shape& sh, const float* got,
                                          const std::vector<double>& want, Tol tol) {
  int64_t bad = 0, first = -1, worst_i = -1;
  double worst = 0;
  for (int64_t i = 0; i < int64_t(want.size()); ++i) {
    const double diff = std::fabs(double(got[i]) - want[i]);
    const double t = tol(i);
    if (!(diff <= t)) {
      if (bad++ == 0) first = i;
      const double r = std::isnan(diff) ? INFINITY : diff / t;
      if (worst_i < 0 || r > worst) worst = r, worst_i = i;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  auto detail = [&](int64_t i) {
    std::ostringstream os;
    os.precision(9);
    os << where(sh, i) << ": got " << got[i] << " expected " << want[i] << " |diff| "
       << std::fabs(double(got[i]) - want[i]) << " tol " << tol(i);
    return os.str();
  };
  return ::testing::AssertionFailure() << what << " [" << describe(sh) << "]: " << bad << " of "
                                       << want.size() << " elements out of tolerance; first at "
                                       << detail(first) << "; worst at " << detail(worst_i);
}

// Per-channel values (mean, var, dgamma, ...).
template <class Tol>
::testing::AssertionResult close_channels(const char* what, const bnorm_shape& sh, const float* got,
                                          const std::vector<double>& want, Tol tol) {
  int64_t bad = 0;
  std::ostringstream os;
  os.precision(9);
  for (int64_t c = 0; c < int64_t(want.size()); ++c) {
    const double diff = std::fabs(double(got[c]) - want[c]);
    if (!(diff <= tol(c))) {
      if (bad++ < 3)
        os << "\n  c=" << c << ": got " << got[c] << " expected " << want[c] << " |diff| " << diff
           << " tol " << tol(c);
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << " [" << describe(sh) << "]: " << bad << " of "
                                       << want.size() << " channels out of tolerance" << os.str();
}

// ---- Random data (fixed seeds) --------------------------------------------------------------

// x = offset + shift[c] + scale[c]*N(0,1): channels with different means and spreads, so a
// kernel that mixes channels up or uses the wrong index function is visibly wrong.
inline std::vector<float> random_x(const bnorm_shape& sh, double offset, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> shift(-5, 5), scale(0.5, 2);
  std::normal_distribution<double> z;
  std::vector<double> sh_c(sh.c), sc_c(sh.c);
  for (int64_t c = 0; c < sh.c; ++c) sh_c[c] = shift(rng), sc_c[c] = scale(rng);
  std::vector<float> x(bnorm_ref::elements(sh));
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t c = 0; c < sh.c; ++c)
      for (int64_t s = 0; s < sh.spatial; ++s)
        x[bnorm_ref::index(sh, n, c, s)] = float(offset + sh_c[c] + sc_c[c] * z(rng));
  return x;
}

inline std::vector<float> random_normal(size_t count, std::mt19937_64& rng) {
  std::normal_distribution<double> z;
  std::vector<float> v(count);
  for (auto& e : v) e = float(z(rng));
  return v;
}

// gamma in +-[0.5, 2] (both signs), beta in [-1, 1].
inline std::vector<float> random_gamma(int64_t c, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> mag(0.5, 2);
  std::bernoulli_distribution neg(0.3);
  std::vector<float> g(c);
  for (auto& e : g) e = float(neg(rng) ? -mag(rng) : mag(rng));
  return g;
}

inline std::vector<float> random_uniform(size_t count, double lo, double hi, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<float> v(count);
  for (auto& e : v) e = float(d(rng));
  return v;
}

// ---- Instruction sets ------------------------------------------------------------------------

inline bool cpu_supports(const std::string& isa) {
  if (isa == "sse2") return __builtin_cpu_supports("sse2");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  return false;
}

inline std::string best_isa() {
  for (const char* isa : {"avx512", "avx2", "sse2"})
    if (cpu_supports(isa)) return isa;
  return "sse2";
}

// What BNORM_ISA asks for ("" when unset).
inline std::string requested_isa() {
  const char* e = std::getenv("BNORM_ISA");
  return e ? e : "";
}

// The set bnorm_isa() must report: the requested one when it is known and the CPU has it,
// otherwise the best the CPU has.
inline std::string expected_isa() {
  const std::string r = requested_isa();
  if ((r == "sse2" || r == "avx2" || r == "avx512") && cpu_supports(r)) return r;
  return best_isa();
}

}  // namespace bnorm_test

#endif  // BNORM_TESTS_TEST_SUPPORT_HPP
