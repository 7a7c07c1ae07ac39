// The microkernels compiled for avx512 (see kernels/CMakeLists.txt for the flags).
#include "microkernels.hpp"

namespace bnorm {
kernel_table avx512_kernels() { return make_kernel_table<xsimd::avx512f>("avx512"); }
}  // namespace bnorm
