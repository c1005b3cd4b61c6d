// The kernels for baseline x86-64 (SSE2, no FMA; or any other architecture): the table when AVX2 + FMA are absent.
#pragma GCC diagnostic ignored "-Wpsabi"
#define FD_NO_FMA
#include "kernels/common.h"
#include "kernels/table.h"

#define FD_ISA generic
#define FD_ISA_NAME "generic"
#define FD_VEC_BYTES 16
#include "kernels/impl.h"
