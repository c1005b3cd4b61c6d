// The kernels compiled for AVX-512 (F, BW, VL, DQ) with FMA, chosen at run time by fd::kernels() when the CPU
// supports it. Only this file is compiled for AVX-512 (a pragma, not -march), so the extension still loads and
// runs on any x86-64 CPU. Headers with inline code shared with the generic build are included before the pragma
// so that no AVX-512 copy of a shared inline function can be picked by the linker for the generic path.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c,prefer-vector-width=512")
#define FD_ISA avx512
#define FD_ISA_NAME "avx512"
#define FD_VEC_BYTES 64
#include "kernels/impl.h"
#pragma GCC pop_options
#else
namespace fd {
namespace avx512 {
const KernelTable& table() { return generic::table(); }
}  // namespace avx512
}  // namespace fd
#endif
