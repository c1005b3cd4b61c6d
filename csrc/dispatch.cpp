// Run-time choice of the kernel table, and the scratch sizes of the attention kernels.
#include <cstdlib>
#include <cstring>

#include "kernels/table.h"

namespace fd {

static int64_t up16(int64_t n) { return (n + 15) & ~int64_t(15); }

size_t attn_fwd_work(int64_t L, int64_t D) {
  const int64_t Lp = up16(L), Dp = up16(D);
  return static_cast<size_t>(16 + D * Lp + up16(L * Dp) + 4 * Lp + 8 * Dp);
}

size_t attn_bwd_work(int64_t L, int64_t D) {
  const int64_t Lp = up16(L), Dp = up16(D);
  return static_cast<size_t>(16 + 2 * D * Lp + 3 * up16(L * Dp) + 8 * Lp + 12 * Dp);
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
  // FASTDISTIL_NATIVE_ISA=generic forces the portable kernels.
  const char* force = std::getenv("FASTDISTIL_NATIVE_ISA");
  if (force && std::strcmp(force, "generic") == 0) return &generic::table();
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
  else if (std::strcmp(name, "auto") == 0) current() = has_avx512() ? &avx512::table() : &generic::table();
  else return false;
  return true;
}

}  // namespace fd
