// Attention over one packed sequence for one head: the blocked, vectorised inner kernel of varlen attention.
//
// Layout: q, k, v, o address token 0 of the sequence for this head; consecutive tokens are `s*` elements
// apart (so q/k/v may be strided views of one fused (T, 3, H, D) QKV GEMM output) and the head dimension D is
// contiguous. Everything is computed in fp32 in a per-thread scratch buffer: K^T and V are converted once per
// (sequence, head); queries go in blocks of 4 rows so that each K^T / V vector loaded feeds 4 FMAs.
// Vectors are GCC vector extensions of the table's register width (16 floats under AVX-512, 8 under AVX2, 4 in the
// generic build); scratch rows are padded to 16 floats for all three.
//
// Forward, per query row i (keys j < L only; nothing is ever padded to another sequence's length):
//   s_j = scale * q_i . k_j,  m = max_j s_j,  lse_i = m + log sum_j exp(s_j - m),  p_j = exp(s_j - lse_i)
//   o_i = sum_j p_j * keep_ij / (1 - p_drop) * v_j
// Backward (recomputes p from the saved lse; the dropout mask is regenerated from its counter-based hash):
//   pd_j = p_j keep_ij/(1-p_drop), dpd_j = do_i . v_j, dp_j = dpd_j keep_ij/(1-p_drop)
//   D_i = do_i . o_i (= sum_j pd_j dpd_j),  ds_j = p_j (dp_j - D_i)
//   dq_i = scale sum_j ds_j k_j,  dk_j += scale ds_j q_i,  dv_j += pd_j do_i
#pragma once

#include "common.h"
#include "table.h"

namespace fd {
namespace FD_ISA {

// Native vectors of the table's ISA (FD_VEC_BYTES: 16 generic, 32 avx2, 64 avx512; GCC lowers a wider vector type
// through the stack, which made the AVX2 build slower than SSE2). Scratch rows are padded to 16 floats; a pass
// covers kStep columns with kCH registers per query row, 4 rows at once (8 + 4 + 1 registers below AVX-512).
#ifndef FD_VEC_BYTES
#define FD_VEC_BYTES 16
#endif
typedef float vec __attribute__((vector_size(FD_VEC_BYTES)));
typedef float vecu __attribute__((vector_size(FD_VEC_BYTES), aligned(4), may_alias));
constexpr int kW = FD_VEC_BYTES / 4;      // floats per register
constexpr int kCH = kW >= 16 ? 1 : 2;     // registers per row and pass
constexpr int kStep = kCH * kW;           // columns per pass; divides 16

FD_INLINE vec ldv(const float* p) { return *reinterpret_cast<const vecu*>(p); }
FD_INLINE void stv(float* p, vec v) { *reinterpret_cast<vecu*>(p) = v; }
// The argument blocks carry untyped pointers; the kernels view them as T (float or bf16 bits).
template <typename T> FD_INLINE const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T> FD_INLINE T* typed(void* p) { return static_cast<T*>(p); }
FD_INLINE int64_t up16(int64_t n) { return (n + 15) & ~int64_t(15); }
FD_INLINE float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Y[r][0:N] = sum_{k<K} X[r][k] * B[k][0:N] for r < 4, k ascending (X rows sx apart; B and Y rows N apart, N a
// multiple of kStep): S = Q K^T and dO V^T (K = D, N = Lp), then P V and dS K (K = L, N = Dp).
FD_INLINE void rows4_times(const float* X, int64_t sx, const float* B, int64_t K, int64_t N, float* Y) {
  int64_t c0 = 0;
  if (kCH == 1) {  // AVX-512: two registers per row and pass where N allows (8 accumulators, each broadcast used
                   // twice); the sum over k keeps its order, so the results are the single-register pass's bits
    for (; c0 + 2 * kW <= N; c0 += 2 * kW) {
      vec a0 = {}, a1 = {}, a2 = {}, a3 = {}, e0 = {}, e1 = {}, e2 = {}, e3 = {};
      for (int64_t k = 0; k < K; ++k) {
        const float x0 = X[k], x1 = X[sx + k], x2 = X[2 * sx + k], x3 = X[3 * sx + k];
        const vec u = ldv(B + k * N + c0), w = ldv(B + k * N + c0 + kW);
        a0 += x0 * u;
        e0 += x0 * w;
        a1 += x1 * u;
        e1 += x1 * w;
        a2 += x2 * u;
        e2 += x2 * w;
        a3 += x3 * u;
        e3 += x3 * w;
      }
      stv(Y + c0, a0);
      stv(Y + c0 + kW, e0);
      stv(Y + N + c0, a1);
      stv(Y + N + c0 + kW, e1);
      stv(Y + 2 * N + c0, a2);
      stv(Y + 2 * N + c0 + kW, e2);
      stv(Y + 3 * N + c0, a3);
      stv(Y + 3 * N + c0 + kW, e3);
    }
  }
  for (; c0 < N; c0 += kStep) {
    vec a0[kCH] = {}, a1[kCH] = {}, a2[kCH] = {}, a3[kCH] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float x0 = X[k], x1 = X[sx + k], x2 = X[2 * sx + k], x3 = X[3 * sx + k];
      for (int u = 0; u < kCH; ++u) {
        const vec b = ldv(B + k * N + c0 + u * kW);
        a0[u] += x0 * b;
        a1[u] += x1 * b;
        a2[u] += x2 * b;
        a3[u] += x3 * b;
      }
    }
    for (int u = 0; u < kCH; ++u) {
      stv(Y + c0 + u * kW, a0[u]);
      stv(Y + N + c0 + u * kW, a1[u]);
      stv(Y + 2 * N + c0 + u * kW, a2[u]);
      stv(Y + 3 * N + c0 + u * kW, a3[u]);
    }
  }
}

// Rows of one head are s elements apart in the fused QKV output (4.6 KB for d = 384), just written by the GEMM and
// mostly out of L2: without prefetching, loading them was ~40% of the forward kernel's time (each row's D values
// are one or two cache lines the hardware prefetcher does not run ahead of). Prefetch kAhead rows ahead.
constexpr int64_t kAhead = 8;
template <typename T>
FD_INLINE void prefetch_row(const T* row, int64_t D) {
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + b, 0, 3);
}

// max_{j < n} s[j] (n >= 1), kW lanes at a time (GCC left the `omp simd reduction(max)` loop scalar).
FD_INLINE float max_of(const float* s, int64_t n) {
  vec mv = vec{} - INFINITY;
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const vec x = ldv(s + j);
    mv = mv > x ? mv : x;
  }
  float m = -INFINITY;
  for (int u = 0; u < kW; ++u) m = std::max(m, mv[u]);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

template <typename T>
FD_INLINE void load_t(const T* x, int64_t s, int64_t L, int64_t D, int64_t Lp, float* XT) {  // XT[d][j] = x[j][d]
  for (int64_t j = 0; j < std::min(L, kAhead); ++j) prefetch_row(x + j * s, D);
  for (int64_t j = 0; j < L; ++j) {
    if (j + kAhead < L) prefetch_row(x + (j + kAhead) * s, D);
    for (int64_t d = 0; d < D; ++d) XT[d * Lp + j] = to_f32(x[j * s + d]);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = L; j < Lp; ++j) XT[d * Lp + j] = 0.0f;
}

template <typename T>
FD_INLINE void load_rows(const T* x, int64_t s, int64_t n, int64_t D, int64_t Dp, float mul, float* X) {
  for (int64_t j = 0; j < n; ++j) {
    if (j + kAhead < n) prefetch_row(x + (j + kAhead) * s, D);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) X[j * Dp + d] = to_f32(x[j * s + d]) * mul;
    for (int64_t d = D; d < Dp; ++d) X[j * Dp + d] = 0.0f;
  }
}

// Rows i0..i0+3 of x (L rows; clamped to the last row, so a partial block reads valid memory) into X (4 x Dp).
template <typename T>
FD_INLINE void load_block(const T* x, int64_t s, int64_t i0, int64_t L, int64_t D, int64_t Dp, float mul, float* X) {
  for (int r = 0; r < 4; ++r) {
    int64_t i = std::min(i0 + r, L - 1);
    load_rows(x + i * s, s, 1, D, Dp, mul, X + r * Dp);
  }
}

template <typename T>
void attn_fwd(const AttnFwdArgs& a) {
  const int64_t Lq = a.Lq, L = a.L, D = a.D, Lp = up16(L), Dp = up16(D);
  const T *q = typed<T>(a.q), *k = typed<T>(a.k), *v = typed<T>(a.v);
  T* o = typed<T>(a.o);
  float* KT = align64(a.work);      // D x Lp
  float* V = KT + D * Lp;           // L x Dp
  float* S = V + up16(L * Dp);      // 4 x Lp
  float* Q = S + 4 * Lp;            // 4 x Dp
  float* O = Q + 4 * Dp;            // 4 x Dp
  load_t(k, a.sk, L, D, Lp, KT);
  load_rows(v, a.sv, L, D, Dp, 1.0f, V);
  const bool drop = a.drop_threshold != 0;
  for (int64_t i0 = 0; i0 < Lq; i0 += 4) {
    const int64_t nr = std::min<int64_t>(4, Lq - i0);
    for (int64_t r = 4; r < 8 && i0 + r < Lq; ++r) prefetch_row(q + (i0 + r) * a.sq, D);
    load_block(q, a.sq, i0, Lq, D, Dp, a.scale, Q);
    rows4_times(Q, Dp, KT, D, Lp, S);
    for (int64_t r = 0; r < 4; ++r) {
      float* s = S + r * Lp;
      if (r >= nr) {
        for (int64_t j = 0; j < Lp; ++j) s[j] = 0.0f;
        continue;
      }
      const float m = max_of(s, L);
      // Over the padded row (Lp, a multiple of 16: no scalar tail); padding columns become exp(-87.3) ~ 1e-38,
      // which no float sum >= 1 can register, and are zeroed below.
      for (int64_t j = L; j < Lp; ++j) s[j] = -INFINITY;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < Lp; ++j) {
        float e = exp_f32(s[j] - m);
        s[j] = e;
        sum += e;
      }
      const float inv = 1.0f / sum;
      if (a.lse) a.lse[(i0 + r) * a.slse] = m + std::log(sum);
      if (drop) {
        const uint32_t base = static_cast<uint32_t>((i0 + r) * L);
#pragma omp simd
        for (int64_t j = 0; j < L; ++j)
          s[j] *= inv * keep_scale(a.drop_key, base + static_cast<uint32_t>(j), a.drop_threshold, a.inv_keep);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) s[j] *= inv;
      }
      for (int64_t j = L; j < Lp; ++j) s[j] = 0.0f;
    }
    rows4_times(S, Lp, V, L, Dp, O);
    for (int64_t r = 0; r < nr; ++r) {
      T* orow = o + (i0 + r) * a.so;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] = from_f32<T>(O[r * Dp + d]);
    }
  }
}

template <typename T>
void attn_bwd(const AttnBwdArgs& a) {
  const int64_t Lq = a.Lq, L = a.L, D = a.D, Lp = up16(L), Dp = up16(D);
  const T *q = typed<T>(a.q), *k = typed<T>(a.k), *v = typed<T>(a.v), *o = typed<T>(a.o), *dout = typed<T>(a.dout);
  float* KT = align64(a.work);     // D x Lp
  float* VT = KT + D * Lp;         // D x Lp
  float* K = VT + D * Lp;          // L x Dp
  float* dK = K + up16(L * Dp);    // L x Dp
  float* dV = dK + up16(L * Dp);   // L x Dp
  float* S = dV + up16(L * Dp);    // 4 x Lp: scores, then pd
  float* P = S + 4 * Lp;           // 4 x Lp: dpd, then ds
  float* Q = P + 4 * Lp;           // 4 x Dp (scaled queries)
  float* dO = Q + 4 * Dp;          // 4 x Dp
  float* Ob = dO + 4 * Dp;         // 4 x Dp: o, then dq
  load_t(k, a.sk, L, D, Lp, KT);
  load_t(v, a.sv, L, D, Lp, VT);
  load_rows(k, a.sk, L, D, Dp, 1.0f, K);
  for (int64_t i = 0; i < L * Dp; ++i) dK[i] = dV[i] = 0.0f;
  const bool drop = a.drop_threshold != 0;
  for (int64_t i0 = 0; i0 < Lq; i0 += 4) {
    const int64_t nr = std::min<int64_t>(4, Lq - i0);
    load_block(q, a.sq, i0, Lq, D, Dp, a.scale, Q);
    load_block(dout, a.sdo, i0, Lq, D, Dp, 1.0f, dO);
    load_block(o, a.so, i0, Lq, D, Dp, 1.0f, Ob);
    rows4_times(Q, Dp, KT, D, Lp, S);
    rows4_times(dO, Dp, VT, D, Lp, P);
    for (int64_t r = 0; r < 4; ++r) {
      float* s = S + r * Lp;
      float* dp = P + r * Lp;
      if (r >= nr) {
        for (int64_t j = 0; j < Lp; ++j) s[j] = dp[j] = 0.0f;
        continue;
      }
      float Di = 0.0f;
      for (int64_t d = 0; d < D; ++d) Di += dO[r * Dp + d] * Ob[r * Dp + d];
      const float lse = a.lse[(i0 + r) * a.slse];
      if (drop) {
        const uint32_t base = static_cast<uint32_t>((i0 + r) * L);
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          float p = exp_f32(s[j] - lse);
          float keep = keep_scale(a.drop_key, base + static_cast<uint32_t>(j), a.drop_threshold, a.inv_keep);
          s[j] = p * keep;
          dp[j] = p * (dp[j] * keep - Di);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          float p = exp_f32(s[j] - lse);
          s[j] = p;
          dp[j] = p * (dp[j] - Di);
        }
      }
      for (int64_t j = L; j < Lp; ++j) s[j] = dp[j] = 0.0f;
    }
    // dV[j] += sum_r pd[r][j] dO[r];  dK[j] += sum_r ds[r][j] Q[r] (Q already carries the scale)
    for (int64_t j = 0; j < L; ++j) {
      const float p0 = S[j], p1 = S[Lp + j], p2 = S[2 * Lp + j], p3 = S[3 * Lp + j];
      const float d0 = P[j], d1 = P[Lp + j], d2 = P[2 * Lp + j], d3 = P[3 * Lp + j];
      for (int64_t c0 = 0; c0 < Dp; c0 += kW) {
        vec acc = ldv(dV + j * Dp + c0);
        acc += p0 * ldv(dO + c0) + p1 * ldv(dO + Dp + c0) + p2 * ldv(dO + 2 * Dp + c0) + p3 * ldv(dO + 3 * Dp + c0);
        stv(dV + j * Dp + c0, acc);
        vec acck = ldv(dK + j * Dp + c0);
        acck += d0 * ldv(Q + c0) + d1 * ldv(Q + Dp + c0) + d2 * ldv(Q + 2 * Dp + c0) + d3 * ldv(Q + 3 * Dp + c0);
        stv(dK + j * Dp + c0, acck);
      }
    }
    rows4_times(P, Lp, K, L, Dp, Ob);  // dq / scale
    T* dq = typed<T>(a.dq);
    for (int64_t r = 0; r < nr; ++r) {
      T* row = dq + (i0 + r) * a.sdq;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) row[d] = from_f32<T>(Ob[r * Dp + d] * a.scale);
    }
  }
  T *dk = typed<T>(a.dk), *dv = typed<T>(a.dv);
  for (int64_t j = 0; j < L; ++j) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      dk[j * a.sdk + d] = from_f32<T>(dK[j * Dp + d]);
      dv[j * a.sdv + d] = from_f32<T>(dV[j * Dp + d]);
    }
  }
}

}  // namespace FD_ISA
}  // namespace fd
