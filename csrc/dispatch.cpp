// Run-time choice of the kernel table, and the scratch sizes of the attention kernels.
#include <cstdlib>
#include <cstring>

#include "ops.h"

namespace fd {

// Sizes in overflow-checked arithmetic: L and D come from the caller (the build has -fwrapv, so an unchecked
// product silently wrapped to a small buffer that the kernel then overran).
static int64_t up16(int64_t n) { return mul_checked((n + 15) / 16, 16); }
static int64_t sum(std::initializer_list<int64_t> xs) {
  int64_t s = 0;
  for (int64_t x : xs)
    TORCH_CHECK_VALUE(!__builtin_add_overflow(s, x, &s), "fastdistil native: a buffer size overflows int64");
  return s;
}

size_t attn_fwd_work(int64_t L, int64_t D) {
  const int64_t Lp = up16(L), Dp = up16(D);
  return static_cast<size_t>(sum({16, mul_checked(D, Lp), up16(mul_checked(L, Dp)), mul_checked(4, Lp),
                                  mul_checked(8, Dp)}));
}

size_t attn_bwd_work(int64_t L, int64_t D) {
  const int64_t Lp = up16(L), Dp = up16(D);
  return static_cast<size_t>(sum({16, mul_checked(2 * D, Lp), mul_checked(3, up16(mul_checked(L, Dp))),
                                  mul_checked(8, Lp), mul_checked(12, Dp)}));
}

static bool has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return true;
#endif
  return false;
}

static const KernelTable* choose() {
  // FASTDISTIL_NATIVE_ISA=generic forces the portable kernels; so does ATen's own cap below AVX-512
  // (ATEN_CPU_CAPABILITY=default or avx2), which lets an AVX-512 machine run what an AVX2 machine runs.
  const char* force = std::getenv("FASTDISTIL_NATIVE_ISA");
  if (force && std::strcmp(force, "generic") == 0) return &generic::table();
  const char* aten = std::getenv("ATEN_CPU_CAPABILITY");
  if (aten && (std::strcmp(aten, "default") == 0 || std::strcmp(aten, "avx2") == 0)) return &generic::table();
  return has_avx512() ? &avx512::table() : &generic::table();
}

static const KernelTable*& current() {
  static const KernelTable* t = choose();
  return t;
}

const KernelTable& kernels() { return *current(); }

bool set_isa(const char* name) {
  if (std::strcmp(name, "generic") == 0) current() = &generic::table();
  else if (std::strcmp(name, "avx512") == 0 && has_avx512()) current() = &avx512::table();
  else if (std::strcmp(name, "auto") == 0) current() = choose();
  else return false;
  return true;
}

}  // namespace fd
