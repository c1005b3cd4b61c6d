// The kernels for baseline x86-64 (or any other architecture): the fallback when AVX-512 is absent.
#pragma GCC diagnostic ignored "-Wpsabi"
#define FD_NO_FMA
#include "kernels/common.h"
#include "kernels/table.h"

#define FD_ISA generic
#define FD_ISA_NAME "generic"
#include "kernels/impl.h"
