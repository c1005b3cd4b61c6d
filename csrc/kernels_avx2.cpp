// The kernels compiled for AVX2 with FMA (Haswell and later, AMD Zen 1-3), chosen at run time by fd::kernels() when
// the CPU has AVX2 + FMA but not AVX-512: the common x86-64 server. Only this file is compiled for AVX2 (a pragma,
// not -march), so the extension still loads and runs on any x86-64 CPU. The attention kernels' 16-float vectors
// become pairs of 256-bit ymm operations with fused multiply-adds. Shared headers with inline code are included
// before the pragma (see kernels_avx512.cpp).
#pragma GCC diagnostic ignored "-Wpsabi"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/common.h"
#include "kernels/table.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c,prefer-vector-width=256")
#define FD_ISA avx2
#define FD_ISA_NAME "avx2"
#define FD_VEC_BYTES 32
#include "kernels/impl.h"
#pragma GCC pop_options
#else
namespace fd {
namespace avx2 {
const KernelTable& table() { return generic::table(); }
}  // namespace avx2
}  // namespace fd
#endif
