// Row kernels of the LayerNorm family: residual + bias + dropout + LayerNorm (forward and backward) and the
// embedding gather + sum + LayerNorm. One call handles rows [r0, r1) on one thread; the pre-norm sum is fp32 (as in
// transformers), the forward statistics are two-pass float64 over it (mean, then mean squared deviation), the
// saved mean/rstd and the backward are fp32.
//
// Forward:  s = dropout(x + in_bias) + residual,  xhat = (s - mean) * rstd,  y = xhat * gamma + beta
// Backward: g = dy * gamma,  ds = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dresidual = ds,
//           dx = ds * keep / (1 - p),  dgamma = sum_rows dy * xhat,  dbeta = sum_rows dy,  din_bias = sum_rows dx
#pragma once

#include <vector>

#include "common.h"
#include "table.h"

namespace fd {
namespace FD_ISA {

// Normalise the fp32 row `s` into y; returns (mean, rstd) through the pointers. The statistics and the affine map
// run in float64 (8 lanes under AVX-512, cheap next to the GEMMs) and y is rounded once: an almost correctly
// rounded LayerNorm, so a model's deviation from transformers is transformers' own fp32 rounding, not twice it
// (six real-weight layers amplify 1-ulp differences to ~1e-5).
template <typename T>
FD_INLINE void normalize_row(const float* s, int64_t N, const T* gamma, const T* beta, float eps, T* y,
                             float* mean_out, float* rstd_out) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < N; ++c) sum += static_cast<double>(s[c]);
  const double mean = sum / static_cast<double>(N);
  double sq = 0.0;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < N; ++c) {
    const double dv = static_cast<double>(s[c]) - mean;
    sq += dv * dv;
  }
  const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(N) + static_cast<double>(eps));
#pragma omp simd
  for (int64_t c = 0; c < N; ++c)
    y[c] = from_f32<T>(static_cast<float>((static_cast<double>(s[c]) - mean) * rstd * to_f32(gamma[c]) +
                                          to_f32(beta[c])));
  if (mean_out) *mean_out = static_cast<float>(mean);
  if (rstd_out) *rstd_out = static_cast<float>(rstd);
}

template <typename T, bool kBias, bool kRes, bool kDrop>
void ln_fwd_rows(const LnFwdArgs& a, float* buf) {
  const int64_t N = a.N;
  const T* bias = static_cast<const T*>(a.in_bias);
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.sx;
    const T* res = kRes ? static_cast<const T*>(a.residual) + r * a.sr : nullptr;
    const uint32_t base = static_cast<uint32_t>(r * N);
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      float v = to_f32(x[c]);
      if (kBias) v += to_f32(bias[c]);
      if (kDrop) v *= keep_scale(a.drop_key, base + static_cast<uint32_t>(c), a.drop_threshold, a.inv_keep);
      if (kRes) v += to_f32(res[c]);
      buf[c] = v;
    }
    if (a.sum) {
      T* s = static_cast<T*>(a.sum) + r * a.ss;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) s[c] = from_f32<T>(buf[c]);
    }
    normalize_row(buf, N, static_cast<const T*>(a.gamma), static_cast<const T*>(a.beta), a.eps,
                  static_cast<T*>(a.y) + r * a.sy, a.mean ? a.mean + r : nullptr, a.rstd ? a.rstd + r : nullptr);
  }
}

template <typename T>
void ln_fwd(const LnFwdArgs& a) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < a.N) buf.resize(a.N);
  const bool b = a.in_bias != nullptr, r = a.residual != nullptr, d = a.drop_threshold != 0;
  if (d) {
    if (b && r) ln_fwd_rows<T, true, true, true>(a, buf.data());
    else if (b) ln_fwd_rows<T, true, false, true>(a, buf.data());
    else if (r) ln_fwd_rows<T, false, true, true>(a, buf.data());
    else ln_fwd_rows<T, false, false, true>(a, buf.data());
  } else {
    if (b && r) ln_fwd_rows<T, true, true, false>(a, buf.data());
    else if (b) ln_fwd_rows<T, true, false, false>(a, buf.data());
    else if (r) ln_fwd_rows<T, false, true, false>(a, buf.data());
    else ln_fwd_rows<T, false, false, false>(a, buf.data());
  }
}

template <typename T>
void ln_bwd(const LnBwdArgs& a) {
  thread_local std::vector<float> buf;
  const int64_t N = a.N;
  if (static_cast<int64_t>(buf.size()) < 2 * N) buf.resize(2 * N);
  float* xhat = buf.data();
  float* g = xhat + N;
  const T* gamma = static_cast<const T*>(a.gamma);
  const bool drop = a.drop_threshold != 0;
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const T* dy = static_cast<const T*>(a.dy) + r * a.sdy;
    const T* s = static_cast<const T*>(a.sum) + r * a.ss;
    const float mean = a.mean[r], rstd = a.rstd[r];
    float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t c = 0; c < N; ++c) {
      const float xh = (to_f32(s[c]) - mean) * rstd;
      const float gc = to_f32(dy[c]) * to_f32(gamma[c]);
      xhat[c] = xh;
      g[c] = gc;
      sg += gc;
      sgx += gc * xh;
    }
    const float mg = sg / static_cast<float>(N), mgx = sgx / static_cast<float>(N);
    T* ds = static_cast<T*>(a.ds) + r * a.sds;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      const float v = rstd * (g[c] - mg - xhat[c] * mgx);
      ds[c] = from_f32<T>(v);
      g[c] = v;
    }
    if (a.dgamma) {
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) {
        const float d = to_f32(dy[c]);
        a.dgamma[c] += d * xhat[c];
        a.dbeta[c] += d;
      }
    }
    if (drop) {
      T* dx = static_cast<T*>(a.dx) + r * a.sdx;
      const uint32_t base = static_cast<uint32_t>(r * N);
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) {
        const float v = g[c] * keep_scale(a.drop_key, base + static_cast<uint32_t>(c), a.drop_threshold, a.inv_keep);
        dx[c] = from_f32<T>(v);
        g[c] = v;
      }
    }
    if (a.dbias) {
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) a.dbias[c] += g[c];
    }
  }
}

template <typename T>
void embed_fwd(const EmbedArgs& a) {
  thread_local std::vector<float> buf;
  const int64_t N = a.N;
  if (static_cast<int64_t>(buf.size()) < N) buf.resize(N);
  float* s = buf.data();
  for (int64_t t = a.r0; t < a.r1; ++t) {
    const T* w = static_cast<const T*>(a.word) + a.ids[t] * N;
    const T* p = static_cast<const T*>(a.pos) + a.pos_ids[t] * N;
    const T* ty = static_cast<const T*>(a.type) + a.type_ids[t] * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) s[c] = to_f32(w[c]) + to_f32(p[c]) + to_f32(ty[c]);
    normalize_row(s, N, static_cast<const T*>(a.gamma), static_cast<const T*>(a.beta), a.eps,
                  static_cast<T*>(a.y) + t * N, nullptr, nullptr);
  }
}

}  // namespace FD_ISA
}  // namespace fd
