// The torch-free CPU kernels (csrc/kernels/*.h) against float64 references, without torch or Python: the check
// that runs where no torch wheel does (aarch64 under qemu-user, see `make test-aarch64`) and natively.
//
//   attention forward (o, lse) and backward (dq, dk, dv) on strided q/k/v, LayerNorm with bias and residual,
//   bias + GELU (erf and tanh forms), embeddings + LayerNorm; float32 and bfloat16 storage.
//
// Every table the CPU runs is checked (generic everywhere; avx2 and avx512 on x86-64 when the CPU has them),
// on awkward sizes (1, 7, 33, 129 tokens; widths 1, 7, 384), with outputs poisoned with NaN first. Tolerances:
// float32 kernels within 2e-5 (relative to the reference's magnitude), bfloat16 within its storage rounding.
// Exit status 0 when every check passes; each failure prints one line.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/kernels/common.h"
#include "../../csrc/kernels/table.h"

namespace {

int failures = 0, checks = 0;
std::mt19937 rng(1234);

float randn() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }
std::vector<float> randv(size_t n, float scale = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = scale * randn();
  return v;
}

uint16_t to_bf16(float x) {  // round to nearest even, as the kernels store
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Storage of one dtype: float32 or bfloat16 bits, with the values the kernel actually sees as floats.
struct Buf {
  int dt;
  std::vector<float> f;
  std::vector<uint16_t> h;
  Buf(int dtype, const std::vector<float>& v) : dt(dtype), f(v) {
    if (dt == fd::kBF16) {
      h.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = to_bf16(v[i]), f[i] = from_bf16(h[i]);
    }
  }
  Buf(int dtype, size_t n) : Buf(dtype, std::vector<float>(n, std::numeric_limits<float>::quiet_NaN())) {}
  void* ptr() { return dt == fd::kBF16 ? static_cast<void*>(h.data()) : static_cast<void*>(f.data()); }
  float at(size_t i) const { return dt == fd::kBF16 ? from_bf16(h[i]) : f[i]; }
};

void expect_close(const char* what, const std::string& where, const Buf& got, const std::vector<double>& want,
                  double tol) {
  ++checks;
  double scale = 1e-6, worst = 0.0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got.at(i);
    const double e = std::isfinite(g) ? std::fabs(g - want[i]) / scale : INFINITY;
    worst = std::max(worst, e);
  }
  if (!(worst <= tol)) {
    ++failures;
    std::printf("FAIL %s %s: worst relative error %.3g > %.3g\n", what, where.c_str(), worst, tol);
  }
}

double tol_of(int dt) { return dt == fd::kBF16 ? 1.6e-2 : 2e-5; }

// LayerNorm of one fp32-rounded row sv (N) in float64, as transformers: (s - mean) * rstd * gamma + beta into out.
void layer_norm_ref(const std::vector<double>& sv, const Buf& g, const Buf& be, double* out) {
  const int64_t N = static_cast<int64_t>(sv.size());
  double mean = 0.0, var = 0.0;
  for (double v : sv) mean += v;
  mean /= N;
  for (double v : sv) var += (v - mean) * (v - mean);
  const double rstd = 1.0 / std::sqrt(var / N + 1e-12);
  for (int64_t c = 0; c < N; ++c) out[c] = (sv[c] - mean) * rstd * g.f[c] + be.f[c];
}

// Attention of one sequence, one head: q, k, v rows s = 3 * H * D apart (a fused QKV layout), this head's slice.
void check_attention(const fd::KernelTable& t, int dt, int64_t L, int64_t D) {
  const int64_t H = 2, s = 3 * H * D, h = 1;
  Buf qkv(dt, randv(L * s)), dout(dt, randv(L * D));
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto q = [&](int64_t i, int64_t d) { return double(qkv.f[i * s + h * D + d]); };
  auto k = [&](int64_t j, int64_t d) { return double(qkv.f[j * s + H * D + h * D + d]); };
  auto v = [&](int64_t j, int64_t d) { return double(qkv.f[j * s + 2 * H * D + h * D + d]); };
  // float64 reference: p = softmax(scale q k^T), o = p v; backward with do
  std::vector<double> P(L * L), O(L * D, 0.0), lse(L), dq(L * D, 0.0), dk(L * D, 0.0), dv(L * D, 0.0);
  for (int64_t i = 0; i < L; ++i) {
    double m = -INFINITY, z = 0.0;
    for (int64_t j = 0; j < L; ++j) {
      double sc = 0.0;
      for (int64_t d = 0; d < D; ++d) sc += q(i, d) * k(j, d);
      P[i * L + j] = sc * scale;
      m = std::max(m, P[i * L + j]);
    }
    for (int64_t j = 0; j < L; ++j) z += std::exp(P[i * L + j] - m);
    lse[i] = m + std::log(z);
    for (int64_t j = 0; j < L; ++j) P[i * L + j] = std::exp(P[i * L + j] - lse[i]);
    for (int64_t j = 0; j < L; ++j)
      for (int64_t d = 0; d < D; ++d) O[i * D + d] += P[i * L + j] * v(j, d);
  }
  for (int64_t i = 0; i < L; ++i) {
    double Di = 0.0;
    for (int64_t d = 0; d < D; ++d) Di += double(dout.f[i * D + d]) * double(static_cast<float>(O[i * D + d]));
    for (int64_t j = 0; j < L; ++j) {
      double dp = 0.0;
      for (int64_t d = 0; d < D; ++d) dp += double(dout.f[i * D + d]) * v(j, d);
      const double ds = P[i * L + j] * (dp - Di);
      for (int64_t d = 0; d < D; ++d) {
        dq[i * D + d] += scale * ds * k(j, d);
        dk[j * D + d] += scale * ds * q(i, d);
        dv[j * D + d] += P[i * L + j] * double(dout.f[i * D + d]);
      }
    }
  }
  const int64_t Lp = (L + 15) / 16 * 16, Dp = (D + 15) / 16 * 16;
  std::vector<float> work(64 + 2 * D * Lp + 3 * (L * Dp + 16) + 8 * Lp + 12 * Dp);
  Buf o(dt, L * D);
  std::vector<float> lse_got(L, NAN);
  const char* base = static_cast<const char*>(qkv.ptr());
  const size_t es = dt == fd::kBF16 ? 2 : 4;
  fd::AttnFwdArgs a{};
  a.q = base + (h * D) * es, a.k = base + (H * D + h * D) * es, a.v = base + (2 * H * D + h * D) * es;
  a.o = o.ptr(), a.lse = lse_got.data();
  a.sq = a.sk = a.sv = s, a.so = D, a.slse = 1, a.Lq = L, a.L = L, a.D = D, a.scale = scale;
  a.drop_key = 0, a.drop_threshold = 0, a.inv_keep = 1.0f, a.work = work.data();
  t.attn_fwd[dt](a);
  const std::string where = std::string(t.isa) + (dt ? " bf16" : " f32") + " L=" + std::to_string(L) +
                            " D=" + std::to_string(D);
  expect_close("attention o", where, o, O, tol_of(dt));
  ++checks;
  for (int64_t i = 0; i < L; ++i)
    if (!(std::fabs(lse_got[i] - lse[i]) <= 1e-4 * std::max(1.0, std::fabs(lse[i])))) {
      ++failures;
      std::printf("FAIL attention lse %s: row %lld %.7g vs %.7g\n", where.c_str(), (long long)i, lse_got[i], lse[i]);
      break;
    }
  Buf gq(dt, L * D), gk(dt, L * D), gv(dt, L * D);
  fd::AttnBwdArgs b{};
  b.q = a.q, b.k = a.k, b.v = a.v, b.o = o.ptr(), b.dout = dout.ptr(), b.lse = lse_got.data();
  b.dq = gq.ptr(), b.dk = gk.ptr(), b.dv = gv.ptr();
  b.sq = b.sk = b.sv = s, b.so = b.sdo = b.sdq = b.sdk = b.sdv = D, b.slse = 1;
  b.Lq = L, b.L = L, b.D = D, b.scale = scale, b.drop_key = 0, b.drop_threshold = 0, b.inv_keep = 1.0f;
  b.work = work.data();
  t.attn_bwd[dt](b);
  expect_close("attention dq", where, gq, dq, 2 * tol_of(dt));
  expect_close("attention dk", where, gk, dk, 2 * tol_of(dt));
  expect_close("attention dv", where, gv, dv, 2 * tol_of(dt));
}

// y = LN(x + bias + residual) * gamma + beta, rows of width N.
void check_layer_norm(const fd::KernelTable& t, int dt, int64_t rows, int64_t N) {
  Buf x(dt, randv(rows * N)), res(dt, randv(rows * N)), bias(dt, randv(N, 0.1f)), g(dt, randv(N)),
      be(dt, randv(N)), y(dt, rows * N);
  std::vector<double> want(rows * N);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> sv(N);
    for (int64_t c = 0; c < N; ++c)  // the kernel sums in fp32 (as transformers): the reference rounds the same way
      sv[c] = static_cast<float>(static_cast<float>(x.f[r * N + c] + bias.f[c]) + res.f[r * N + c]);
    layer_norm_ref(sv, g, be, &want[r * N]);
  }
  fd::LnFwdArgs a{};
  a.x = x.ptr(), a.residual = res.ptr(), a.in_bias = bias.ptr(), a.gamma = g.ptr(), a.beta = be.ptr();
  a.y = y.ptr(), a.sum = nullptr, a.mean = nullptr, a.rstd = nullptr;
  a.sx = a.sr = a.sy = a.ss = N, a.r0 = 0, a.r1 = rows, a.N = N, a.eps = 1e-12f;
  a.drop_key = 0, a.drop_threshold = 0, a.inv_keep = 1.0f;
  t.ln_fwd[dt](a);
  expect_close("layer_norm y", std::string(t.isa) + (dt ? " bf16" : " f32") + " N=" + std::to_string(N), y, want,
               tol_of(dt));
}

void check_gelu(const fd::KernelTable& t, int dt, int64_t rows, int64_t N, bool tanh_form) {
  Buf x(dt, randv(rows * N, 3.0f)), bias(dt, randv(N, 0.5f)), y(dt, rows * N);
  std::vector<double> want(rows * N);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < N; ++c) {
      const double u = double(static_cast<float>(x.f[r * N + c] + bias.f[c]));
      want[r * N + c] = tanh_form ? 0.5 * u * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (u + 0.044715 * u * u * u)))
                                  : 0.5 * u * (1.0 + std::erf(u / std::sqrt(2.0)));
    }
  fd::GeluArgs a{};
  a.x = x.ptr(), a.bias = bias.ptr(), a.dy = nullptr, a.y = y.ptr(), a.dbias = nullptr;
  a.sx = a.sy = a.sdy = N, a.r0 = 0, a.r1 = rows, a.N = N, a.tanh_approx = tanh_form;
  t.gelu_fwd[dt](a);
  expect_close(tanh_form ? "gelu_tanh" : "gelu_erf", std::string(t.isa) + (dt ? " bf16" : " f32"), y, want,
               tol_of(dt));
}

void check_embed(const fd::KernelTable& t, int dt, int64_t T, int64_t N) {
  const int64_t V = 11, P = 9, Ty = 2;
  Buf word(dt, randv(V * N)), pos(dt, randv(P * N)), type(dt, randv(Ty * N)), g(dt, randv(N)), be(dt, randv(N)),
      y(dt, T * N);
  std::vector<int64_t> ids(T), pids(T), tids(T);
  for (int64_t i = 0; i < T; ++i) ids[i] = (7 * i + 3) % V, pids[i] = i % P, tids[i] = i % Ty;
  std::vector<double> want(T * N);
  for (int64_t i = 0; i < T; ++i) {
    std::vector<double> sv(N);
    for (int64_t c = 0; c < N; ++c)
      sv[c] = static_cast<float>(static_cast<float>(word.f[ids[i] * N + c] + pos.f[pids[i] * N + c]) +
                                 type.f[tids[i] * N + c]);
    layer_norm_ref(sv, g, be, &want[i * N]);
  }
  fd::EmbedArgs a{};
  a.ids = ids.data(), a.pos_ids = pids.data(), a.type_ids = tids.data();
  a.word = word.ptr(), a.pos = pos.ptr(), a.type = type.ptr(), a.gamma = g.ptr(), a.beta = be.ptr();
  a.y = y.ptr(), a.r0 = 0, a.r1 = T, a.N = N, a.eps = 1e-12f;
  t.embed_fwd[dt](a);
  expect_close("embed", std::string(t.isa) + (dt ? " bf16" : " f32") + " N=" + std::to_string(N), y, want,
               tol_of(dt));
}

void check_table(const fd::KernelTable& t) {
  for (int dt : {fd::kF32, fd::kBF16}) {
    for (int64_t L : {1, 7, 33, 129})
      for (int64_t D : {16, 32}) check_attention(t, dt, L, D);
    for (int64_t N : {7, 384}) {
      check_layer_norm(t, dt, 5, N);
      check_embed(t, dt, 6, N);
    }
    for (bool tanh_form : {false, true}) check_gelu(t, dt, 3, 129, tanh_form);
  }
}

}  // namespace

#if defined(__x86_64__)
namespace fd {
namespace avx2 { const KernelTable& table(); }
namespace avx512 { const KernelTable& table(); }
}  // namespace fd
#endif

int main() {
  check_table(fd::generic::table());
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) check_table(fd::avx2::table());
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    check_table(fd::avx512::table());
#endif
  std::printf("%s: %d checks, %d failed\n", failures ? "FAILED" : "ok", checks, failures);
  return failures ? 1 : 0;
}
