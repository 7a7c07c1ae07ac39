// The microkernels compiled for avx2 (see kernels/CMakeLists.txt for the flags).
#include "microkernels.hpp"

namespace bnorm {
kernel_table avx2_kernels() { return make_kernel_table<xsimd::fma3<xsimd::avx2>>("avx2"); }
}  // namespace bnorm
