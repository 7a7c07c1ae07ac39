// The microkernels compiled for sse2 (see kernels/CMakeLists.txt for the flags).
#include "microkernels.hpp"

namespace bnorm {
kernel_table sse2_kernels() { return make_kernel_table<xsimd::sse2>("sse2"); }
}  // namespace bnorm
