#include "timing.h"

#include <immintrin.h>
#include <omp.h>

namespace driver {
namespace {

// Each thread fences its own streaming stores, so the copy is complete when the parallel
// region ends.
__attribute__((target("avx512f"))) void stream_avx512(float* dst, const float* src, int64_t count) {
  for (int64_t i = 0; i < count; i += 16) _mm512_stream_ps(dst + i, _mm512_load_ps(src + i));
  _mm_sfence();
}

void stream_sse(float* dst, const float* src, int64_t count) {
  for (int64_t i = 0; i < count; i += 4) _mm_stream_ps(dst + i, _mm_load_ps(src + i));
  _mm_sfence();
}

}  // namespace

void nontemporal_copy(float* dst, const float* src, int64_t count) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
#pragma omp parallel
  {
    // Contiguous chunks, whole 64-byte lines each.
    const int64_t lines = count / 16, threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t begin = lines * t / threads * 16, end = lines * (t + 1) / threads * 16;
    if (avx512)
      stream_avx512(dst + begin, src + begin, end - begin);
    else
      stream_sse(dst + begin, src + begin, end - begin);
  }
}

}  // namespace driver
