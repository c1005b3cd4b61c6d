// Scalar building blocks of the CPU kernels, written so that GCC auto-vectorises the loops that call them.
//
// This header has no torch dependency: the kernel headers that include it are compiled three times, for
// baseline x86-64 (kernels_generic.cpp), under `#pragma GCC target("avx2,fma...")` (kernels_avx2.cpp) and under
// `#pragma GCC target("avx512...")` (kernels_avx512.cpp); the extension picks a table at run time (dispatch.cpp).
// No -march=native.
//
// Element types: float, and bf16 held as its raw uint16_t bits (upper half of an IEEE float). Every
// computation is in float32; bf16 is only a storage format (round to nearest even on store).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define FD_INLINE static inline __attribute__((always_inline))

// Fused multiply-add where the kernels' instruction set has it (the AVX2 and AVX-512 builds inline these into
// functions compiled with FMA); the generic build defines FD_NO_FMA and multiplies then adds, which keeps loops vectorisable.
#ifdef FD_NO_FMA
#define FD_FMA(a, b, c) ((a) * (b) + (c))
#else
#define FD_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#endif

namespace fd {

using bf16 = uint16_t;

FD_INLINE float to_f32(float x) { return x; }
FD_INLINE float to_f32(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> FD_INLINE T from_f32(float x);
template <> inline __attribute__((always_inline)) float from_f32<float>(float x) { return x; }
template <> inline __attribute__((always_inline)) bf16 from_f32<bf16>(float x) {
  // Round to nearest even; NaN stays NaN (a quiet NaN's payload keeps a high mantissa bit set).
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  uint32_t out = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (u | 0x00400000u) : rounded;
  return static_cast<bf16>(out >> 16);
}

// exp(x) for x <= 88.7, to about 1 ulp: x = n ln2 + r with |r| <= ln2/2, Cephes' degree-5 polynomial for e^r,
// 2^n assembled in the exponent bits. Inputs below -87.3 give 2^-126 * e^r (about 1e-38), never a denormal.
FD_INLINE float exp_f32(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in round-to-nearest mode
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return p * s;
}

// erf(x) to about 1 ulp (|error| < 6e-8 over the whole range; Abramowitz & Stegun 7.1.26, which ATen's vectorised
// erf uses, is off by up to 6e-7 in float32 arithmetic, enough to move six real-weight layers past 1e-5).
// Two minimax polynomials (N. Juffa's float erf): an odd polynomial in x below |x| = 0.9277, and
// 1 - exp(poly(|x|)) above; both are computed and one selected so that loops stay vectorisable.
FD_INLINE float erf_f32(float x) {
  const float t = std::fabs(x), s = x * x;
  float r = FD_FMA(-1.72853470e-5f, t, 3.83197126e-4f);
  const float u = FD_FMA(-3.88396438e-3f, t, 2.42546219e-2f);
  r = FD_FMA(r, s, u);
  r = FD_FMA(r, t, -1.06777877e-1f);
  r = FD_FMA(r, t, -6.34846687e-1f);
  r = FD_FMA(r, t, -1.28717512e-1f);
  r = FD_FMA(r, t, -t);
  const float big = std::copysign(1.0f - exp_f32(r), x);
  float p = -5.96761703e-4f;
  p = FD_FMA(p, s, 4.99119423e-3f);
  p = FD_FMA(p, s, -2.67681349e-2f);
  p = FD_FMA(p, s, 1.12819925e-1f);
  p = FD_FMA(p, s, -3.76125336e-1f);
  p = FD_FMA(p, s, 1.28379166e-1f);
  const float small = FD_FMA(p, x, x);
  return t > 0.927734375f ? big : small;
}

// tanh(x) = 1 - 2 / (e^{2x} + 1), for the tanh-approximate GELU some checkpoints ask for.
FD_INLINE float tanh_f32(float x) {
  float e = exp_f32(2.0f * std::min(x, 44.0f));
  return 1.0f - 2.0f / (e + 1.0f);
}

// Counter-based dropout: a 32-bit integer hash of (stream key, element index), compared with p * 2^32.
// Deterministic for a seed, so the backward pass regenerates the forward's mask instead of storing it.
FD_INLINE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The key of one dropout stream (e.g. one sequence x head of one attention call, or one row of a LayerNorm).
FD_INLINE uint32_t stream_key(uint64_t seed, uint64_t stream) {
  uint32_t k = hash32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  k = hash32(k ^ static_cast<uint32_t>(seed >> 32));
  k = hash32(k ^ static_cast<uint32_t>(stream));
  return hash32(k ^ static_cast<uint32_t>(stream >> 32) ^ 0x85EBCA6Bu);
}

// keep <=> hash >= threshold, threshold = round(p * 2^32) (so P(keep) = 1 - p).
FD_INLINE uint32_t drop_threshold(float p) {
  double t = static_cast<double>(p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}
FD_INLINE float keep_scale(uint32_t key, uint32_t idx, uint32_t threshold, float inv_keep) {
  return hash32(key ^ hash32(idx)) >= threshold ? inv_keep : 0.0f;
}

}  // namespace fd
