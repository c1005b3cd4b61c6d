// Bias + GELU rows: y = gelu(x + b), exact erf form (BERT's `gelu`) or the tanh form when a config asks.
// Forward:  u = x + b,  erf:  y = u/2 (1 + erf(u/sqrt 2));  tanh: y = u/2 (1 + tanh(k (u + 0.044715 u^3))), k = sqrt(2/pi)
// Backward: dx = dy * gelu'(u),  erf:  gelu'(u) = Phi(u) + u phi(u), phi(u) = exp(-u^2/2)/sqrt(2 pi);
//           tanh: gelu'(u) = (1 + t)/2 + u/2 (1 - t^2) k (1 + 3 * 0.044715 u^2);  dbias = sum_rows dx.
#pragma once

#include "common.h"
#include "table.h"

namespace fd {
namespace FD_ISA {

template <typename T, bool kTanh, bool kBias>
void gelu_fwd_rows(const GeluArgs& a) {
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.sx;
    T* y = static_cast<T*>(a.y) + r * a.sy;
#pragma omp simd
    for (int64_t c = 0; c < a.N; ++c) {
      const float u = kBias ? to_f32(x[c]) + to_f32(b[c]) : to_f32(x[c]);
      float g;
      if (kTanh) g = 0.5f * u * (1.0f + tanh_f32(0.7978845608028654f * (u + 0.044715f * u * u * u)));
      else g = 0.5f * u * (1.0f + erf_f32(u * 0.7071067811865476f));
      y[c] = from_f32<T>(g);
    }
  }
}

template <typename T, bool kTanh>
void gelu_bwd_rows(const GeluArgs& a) {
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.sx;
    const T* dy = static_cast<const T*>(a.dy) + r * a.sdy;
    T* dx = static_cast<T*>(a.y) + r * a.sy;
#pragma omp simd
    for (int64_t c = 0; c < a.N; ++c) {
      const float u = to_f32(x[c]) + to_f32(b[c]);
      float d;
      if (kTanh) {
        const float k = 0.7978845608028654f;
        const float t = tanh_f32(k * (u + 0.044715f * u * u * u));
        d = 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * u * u);
      } else {
        d = 0.5f * (1.0f + erf_f32(u * 0.7071067811865476f)) + u * 0.3989422804014327f * exp_f32(-0.5f * u * u);
      }
      const float v = to_f32(dy[c]) * d;
      dx[c] = from_f32<T>(v);
      if (a.dbias) a.dbias[c] += v;
    }
  }
}

template <typename T>
void gelu_fwd(const GeluArgs& a) {
  const bool b = a.bias != nullptr;  // null: x already holds x W^T + b (bias inside the GEMM)
  if (a.tanh_approx) b ? gelu_fwd_rows<T, true, true>(a) : gelu_fwd_rows<T, true, false>(a);
  else b ? gelu_fwd_rows<T, false, true>(a) : gelu_fwd_rows<T, false, false>(a);
}

template <typename T>
void gelu_bwd(const GeluArgs& a) {
  if (a.tanh_approx) gelu_bwd_rows<T, true>(a);
  else gelu_bwd_rows<T, false>(a);
}

}  // namespace FD_ISA
}  // namespace fd
