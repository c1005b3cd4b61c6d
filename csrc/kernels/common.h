// Scalar building blocks of the CPU kernels, written so that GCC auto-vectorises the loops that call them.
//
// This header has no torch dependency: the kernel headers that include it are compiled twice, once for
// baseline x86-64 (kernels_generic.cpp) and once under `#pragma GCC target("avx512...")`
// (kernels_avx512.cpp), and the extension picks a table at run time (dispatch.cpp). No -march=native.
//
// Element types: float, and bf16 held as its raw uint16_t bits (upper half of an IEEE float). Every
// computation is in float32; bf16 is only a storage format (round to nearest even on store).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define FD_INLINE inline __attribute__((always_inline))

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
template <> FD_INLINE float from_f32<float>(float x) { return x; }
template <> FD_INLINE bf16 from_f32<bf16>(float x) {
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

// erf(x) by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the same form ATen's vectorised erf uses).
FD_INLINE float erf_f32(float x) {
  float a = std::fabs(x);
  float t = 1.0f / (1.0f + 0.3275911f * a);
  float y = 1.061405429f;
  y = y * t - 1.453152027f;
  y = y * t + 1.421413741f;
  y = y * t - 0.284496736f;
  y = y * t + 0.254829592f;
  y = 1.0f - y * t * exp_f32(-a * a);
  return std::copysign(y, x);
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
