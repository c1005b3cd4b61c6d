// Run-time choice of the kernel table (generic, avx2, avx512), the CPU features it is chosen from, and the
// scratch sizes of the attention kernels.
//
// The choice is a pure function of (features, FASTDISTIL_NATIVE_ISA, ATEN_CPU_CAPABILITY), choose_isa, bound to
// Python so that tests can run it on mocked features. Naming a table the CPU cannot run, or an unknown name, is a
// ValueError naming the table, what it needs and what the CPU has: never a silent fallback to another table.
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <cctype>
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

// ---- CPU features: CPUID bits that the OS has also enabled (XCR0), named as in /proc/cpuinfo ----
std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> f;
  for (const char* n : {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                        "avx512_vnni", "avx512_bf16", "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16",
                        "amx_int8"})
    f[n] = false;
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool os_avx = (xcr0 & 0x6) == 0x6;           // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;      // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;   // XTILECFG, XTILEDATA
  f["avx"] = os_avx && (c & (1u << 28));
  f["fma"] = os_avx && (c & (1u << 12));
  f["f16c"] = os_avx && (c & (1u << 29));
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f["bmi1"] = b & (1u << 3);
    f["bmi2"] = b & (1u << 8);
    f["avx2"] = os_avx && (b & (1u << 5));
    f["avx512f"] = os_avx512 && (b & (1u << 16));
    f["avx512dq"] = os_avx512 && (b & (1u << 17));
    f["avx512bw"] = os_avx512 && (b & (1u << 30));
    f["avx512vl"] = os_avx512 && (b & (1u << 31));
    f["avx512_vnni"] = os_avx512 && (c & (1u << 11));
    f["amx_bf16"] = os_amx && (d & (1u << 22));
    f["amx_tile"] = os_amx && (d & (1u << 24));
    f["amx_int8"] = os_amx && (d & (1u << 25));
    const unsigned subleaves = a;
    if (subleaves >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      f["avx_vnni"] = os_avx && (a & (1u << 4));
      f["avx512_bf16"] = os_avx512 && (a & (1u << 5));
      f["avx_ne_convert"] = os_avx && (d & (1u << 5));
    }
  }
#endif
  return f;
}

// ---- the tables and what each needs (the pragma of its kernels_<isa>.cpp enables exactly these) ----
namespace {

struct Isa {
  const char* name;
  std::vector<const char*> needs;
  const KernelTable& (*table)();
};

const std::vector<Isa>& isas() {
  static const std::vector<Isa> v = {
      {"generic", {}, &generic::table},
      {"avx2", {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2"}, &avx2::table},
      {"avx512", {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
       &avx512::table},
  };
  return v;
}

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

std::vector<std::string> missing(const Isa& isa, const std::map<std::string, bool>& features) {
  std::vector<std::string> out;
  for (const char* n : isa.needs) {
    auto it = features.find(n);
    if (it == features.end() || !it->second) out.push_back(n);
  }
  return out;
}

std::string join(const std::vector<std::string>& xs) {
  std::string s;
  for (const auto& x : xs) s += (s.empty() ? "" : " ") + x;
  return s.empty() ? "none" : s;
}

const Isa& by_name(const std::string& name) {
  for (const Isa& i : isas())
    if (name == i.name) return i;
  TORCH_CHECK_VALUE(false, "fastdistil native: no kernel table named '", name, "'");
  return isas()[0];
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

std::string choose_isa(const std::map<std::string, bool>& features, const std::string& forced,
                       const std::string& aten_cap, const std::string& what) {
  std::vector<std::string> seen;
  for (const auto& kv : features)
    if (kv.second) seen.push_back(kv.first);
  const std::string f = lower(forced);
  if (f.empty() || f == "auto") {
    // ATen's own cap (ATEN_CPU_CAPABILITY=default|avx2) caps ours too: an AVX-512 machine then runs what a machine
    // with only that ISA runs. Other values (avx512, unknown) leave the best table the CPU supports.
    const std::string cap = lower(aten_cap);
    size_t top = cap == "default" ? 0 : cap == "avx2" ? 1 : isas().size() - 1;
    for (size_t i = top + 1; i-- > 0;)
      if (missing(isas()[i], features).empty()) return isas()[i].name;
    return "generic";
  }
  bool known = false;
  for (const Isa& i : isas()) known = known || f == i.name;
  TORCH_CHECK_VALUE(known, "fastdistil native: ", what, "='", forced,
                    "' is not a kernel table; use one of auto, generic, avx2, avx512");
  const auto lacks = missing(by_name(f), features);
  std::vector<std::string> ok;
  for (const Isa& i : isas())
    if (missing(i, features).empty()) ok.push_back(i.name);
  TORCH_CHECK_VALUE(lacks.empty(), "fastdistil native: ", what, "='", f, "' asks for the ", f,
                    " kernel table, but this CPU lacks ", join(lacks), " (CPU features seen: ", join(seen),
                    "); tables this CPU can run: ", join(ok));
  return f;
}

std::vector<std::string> supported_isas() {
  const auto feats = cpu_features();
  std::vector<std::string> out;
  for (const Isa& i : isas())
    if (missing(i, feats).empty()) out.push_back(i.name);
  return out;
}

static const char* env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {  // first use: from the environment (a bad FASTDISTIL_NATIVE_ISA raises here, and again next time)
    const std::string name = choose_isa(cpu_features(), env_or_empty("FASTDISTIL_NATIVE_ISA"),
                                        env_or_empty("ATEN_CPU_CAPABILITY"), "FASTDISTIL_NATIVE_ISA");
    t = &by_name(name).table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

void set_isa(const std::string& name) {
  if (lower(name) == "auto") {
    g_table.store(nullptr, std::memory_order_release);
    kernels();
    return;
  }
  const std::string chosen = choose_isa(cpu_features(), name, "", "set_isa");
  g_table.store(&by_name(chosen).table(), std::memory_order_release);
}

}  // namespace fd
