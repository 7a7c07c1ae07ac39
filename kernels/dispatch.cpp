// Chooses the microkernels once per process: the best instruction set the CPU
// has, or a lower one named by the environment variable BNORM_ISA.
#include <cstdlib>
#include <cstring>
#include <xsimd/xsimd.hpp>

#include "kernel_table.hpp"

namespace bnorm {
namespace {

kernel_table choose() {
  // xsimd reads the CPUID bits for AVX2, FMA and AVX-512 correctly but not
  // whether the OS saves the wide registers; GCC's __builtin_cpu_supports
  // does check that, so both must agree.
  const auto cpu = xsimd::available_architectures();
  const bool has_avx512 = cpu.avx512f && __builtin_cpu_supports("avx512f");
  const bool has_avx2 = cpu.avx2 && cpu.fma3_avx2 && __builtin_cpu_supports("avx2") &&
                        __builtin_cpu_supports("fma");

  const char* want = std::getenv("BNORM_ISA");
  const bool forced_sse2 = want && std::strcmp(want, "sse2") == 0;
  const bool forced_avx2 = want && std::strcmp(want, "avx2") == 0;
  if (forced_sse2) return sse2_kernels();
  if (has_avx2 && (forced_avx2 || !has_avx512)) return avx2_kernels();
  if (has_avx512) return avx512_kernels();
  return sse2_kernels();
}

}  // namespace

const kernel_table& kernels() {
  static const kernel_table table = choose();
  return table;
}

}  // namespace bnorm
