#include "memory_reference.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>

namespace bnorm_bench {
namespace {

// Four independent 64-byte streams per iteration keep enough loads in flight
// to saturate memory with one thread per core (and, in read_sum, four
// accumulators hide the add latency); the tail (< 64 floats) is scalar
// because there is at most one per thread.
template <bool Stream>
__attribute__((target("avx512f"))) void copy_avx512(float* dst, const float* src, size_t n) {
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512 a = _mm512_load_ps(src + i), b = _mm512_load_ps(src + i + 16);
    const __m512 c = _mm512_load_ps(src + i + 32), d = _mm512_load_ps(src + i + 48);
    if (Stream) {
      _mm512_stream_ps(dst + i, a);
      _mm512_stream_ps(dst + i + 16, b);
      _mm512_stream_ps(dst + i + 32, c);
      _mm512_stream_ps(dst + i + 48, d);
    } else {
      _mm512_store_ps(dst + i, a);
      _mm512_store_ps(dst + i + 16, b);
      _mm512_store_ps(dst + i + 32, c);
      _mm512_store_ps(dst + i + 48, d);
    }
  }
  for (; i < n; ++i) dst[i] = src[i];
  if (Stream) _mm_sfence();
}

__attribute__((target("avx512f"))) float sum_avx512(const float* src, size_t n) {
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a = _mm512_add_ps(a, _mm512_load_ps(src + i));
    b = _mm512_add_ps(b, _mm512_load_ps(src + i + 16));
    c = _mm512_add_ps(c, _mm512_load_ps(src + i + 32));
    d = _mm512_add_ps(d, _mm512_load_ps(src + i + 48));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
  float s = 0.f;
  for (float v : lanes) s += v;
  for (; i < n; ++i) s += src[i];
  return s;
}

template <bool Stream>
__attribute__((target("avx"))) void copy_avx(float* dst, const float* src, size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 a = _mm256_load_ps(src + i), b = _mm256_load_ps(src + i + 8);
    const __m256 c = _mm256_load_ps(src + i + 16), d = _mm256_load_ps(src + i + 24);
    if (Stream) {
      _mm256_stream_ps(dst + i, a);
      _mm256_stream_ps(dst + i + 8, b);
      _mm256_stream_ps(dst + i + 16, c);
      _mm256_stream_ps(dst + i + 24, d);
    } else {
      _mm256_store_ps(dst + i, a);
      _mm256_store_ps(dst + i + 8, b);
      _mm256_store_ps(dst + i + 16, c);
      _mm256_store_ps(dst + i + 24, d);
    }
  }
  for (; i < n; ++i) dst[i] = src[i];
  if (Stream) _mm_sfence();
}

__attribute__((target("avx"))) float sum_avx(const float* src, size_t n) {
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a = _mm256_add_ps(a, _mm256_load_ps(src + i));
    b = _mm256_add_ps(b, _mm256_load_ps(src + i + 8));
    c = _mm256_add_ps(c, _mm256_load_ps(src + i + 16));
    d = _mm256_add_ps(d, _mm256_load_ps(src + i + 24));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  float s = 0.f;
  for (float v : lanes) s += v;
  for (; i < n; ++i) s += src[i];
  return s;
}

template <bool Stream>
void copy_sse(float* dst, const float* src, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128 a = _mm_load_ps(src + i), b = _mm_load_ps(src + i + 4);
    const __m128 c = _mm_load_ps(src + i + 8), d = _mm_load_ps(src + i + 12);
    if (Stream) {
      _mm_stream_ps(dst + i, a);
      _mm_stream_ps(dst + i + 4, b);
      _mm_stream_ps(dst + i + 8, c);
      _mm_stream_ps(dst + i + 12, d);
    } else {
      _mm_store_ps(dst + i, a);
      _mm_store_ps(dst + i + 4, b);
      _mm_store_ps(dst + i + 8, c);
      _mm_store_ps(dst + i + 12, d);
    }
  }
  for (; i < n; ++i) dst[i] = src[i];
  if (Stream) _mm_sfence();
}

float sum_sse(const float* src, size_t n) {
  __m128 a = _mm_setzero_ps(), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a = _mm_add_ps(a, _mm_load_ps(src + i));
    b = _mm_add_ps(b, _mm_load_ps(src + i + 4));
    c = _mm_add_ps(c, _mm_load_ps(src + i + 8));
    d = _mm_add_ps(d, _mm_load_ps(src + i + 12));
  }
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, _mm_add_ps(_mm_add_ps(a, b), _mm_add_ps(c, d)));
  float s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < n; ++i) s += src[i];
  return s;
}

using copy_fn = void (*)(float*, const float*, size_t);
using sum_fn = float (*)(const float*, size_t);

struct reference_kernels {
  copy_fn stream_copy, store_copy;
  sum_fn sum;
  const char* name;
};

const reference_kernels& chosen() {
  static const reference_kernels k = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
      return reference_kernels{copy_avx512<true>, copy_avx512<false>, sum_avx512, "avx512"};
    if (__builtin_cpu_supports("avx"))
      return reference_kernels{copy_avx<true>, copy_avx<false>, sum_avx, "avx"};
    return reference_kernels{copy_sse<true>, copy_sse<false>, sum_sse, "sse"};
  }();
  return k;
}

// This thread's [begin, end) of n floats: contiguous runs whose starts stay
// 64-byte aligned.
void thread_range(size_t n, size_t* begin, size_t* end) {
  const size_t threads = static_cast<size_t>(omp_get_num_threads());
  const size_t t = static_cast<size_t>(omp_get_thread_num());
  const size_t lines = (n + 15) / 16;
  *begin = std::min(n, (lines * t / threads) * 16);
  *end = std::min(n, (lines * (t + 1) / threads) * 16);
}

void parallel_copy(copy_fn fn, float* dst, const float* src, size_t bytes) {
  const size_t n = bytes / sizeof(float);
#pragma omp parallel
  {
    size_t begin, end;
    thread_range(n, &begin, &end);
    if (end > begin) fn(dst + begin, src + begin, end - begin);
  }
}

}  // namespace

void nt_copy(float* dst, const float* src, size_t bytes) {
  parallel_copy(chosen().stream_copy, dst, src, bytes);
}

void plain_copy(float* dst, const float* src, size_t bytes) {
  parallel_copy(chosen().store_copy, dst, src, bytes);
}

float read_sum(const float* src, size_t bytes) {
  const size_t n = bytes / sizeof(float);
  const sum_fn fn = chosen().sum;
  float total = 0.f;
#pragma omp parallel reduction(+ : total)
  {
    size_t begin, end;
    thread_range(n, &begin, &end);
    if (end > begin) total += fn(src + begin, end - begin);
  }
  return total;
}

const char* memory_reference_isa() { return chosen().name; }

double nt_copy_seconds(float* dst, const float* src, size_t bytes) {
  using clock = std::chrono::steady_clock;
  static std::map<size_t, int> reps_for;  // copies per batch, found once per size
  auto it = reps_for.find(bytes);
  if (it == reps_for.end()) {
    nt_copy(dst, src, bytes);  // warm-up: page tables, thread pool
    int reps = 1;
    for (;;) {
      const auto t0 = clock::now();
      for (int r = 0; r < reps; ++r) nt_copy(dst, src, bytes);
      const double s = std::chrono::duration<double>(clock::now() - t0).count();
      if (s >= 200e-6 || reps >= (1 << 20)) break;
      reps *= 2;
    }
    it = reps_for.emplace(bytes, reps).first;
  }
  const int reps = it->second;
  double best = 1e30;
  for (int b = 0; b < 9; ++b) {
    const auto t0 = clock::now();
    for (int r = 0; r < reps; ++r) nt_copy(dst, src, bytes);
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count() / reps);
  }
  return best;
}

}  // namespace bnorm_bench
