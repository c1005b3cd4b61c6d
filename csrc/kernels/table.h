// Argument blocks and the function table of the CPU kernels (no torch dependency).
//
// One kernel call handles one unit of work on one thread: one (sequence, head) of attention, or a range of
// rows of an elementwise/row op. The torch-facing files (csrc/*.cpp) check inputs, split the work with
// at::parallel_for and call through `fd::kernels()`, the table for the best instruction set this CPU has.
// Element types: index 0 = float32, 1 = bfloat16 (raw bits); parameters have the activations' type.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fd {

enum DType : int { kF32 = 0, kBF16 = 1 };

// Attention of Lq queries over L keys (one sequence, one head; Lq == L for self-attention over packed tokens).
// Pointers address the sequence's first token of this head; strides are in elements between consecutive tokens
// (the head dimension D is contiguous). Requires Lq >= 1 and L >= 1 (callers handle empty sequences).
struct AttnFwdArgs {
  const void *q, *k, *v;
  void* o;
  float* lse;  // (L,) log-sum-exp of the scaled scores per query, fp32, stride slse; may be null
  int64_t sq, sk, sv, so, slse;
  int64_t Lq, L, D;
  float scale;
  uint32_t drop_key, drop_threshold;  // threshold 0: no dropout
  float inv_keep;                     // 1 / (1 - p)
  float* work;                        // attn_fwd_work(L, D) floats, 64-byte aligned
};

struct AttnBwdArgs {
  const void *q, *k, *v, *o, *dout;
  const float* lse;
  void *dq, *dk, *dv;
  int64_t sq, sk, sv, so, sdo, sdq, sdk, sdv, slse;
  int64_t Lq, L, D;
  float scale;
  uint32_t drop_key, drop_threshold;
  float inv_keep;
  float* work;  // attn_bwd_work(L, D) floats
};

// y = LayerNorm(dropout(x + in_bias) + residual) * gamma + beta over rows [r0, r1) of width N.
struct LnFwdArgs {
  const void *x, *residual, *in_bias, *gamma, *beta;  // residual, in_bias may be null
  void* y;
  void* sum;            // optional: the pre-norm sum s (rows x N, x's type), kept for the backward
  float *mean, *rstd;   // optional: per-row statistics (fp32)
  int64_t sx, sr, sy, ss;  // row strides in elements
  int64_t r0, r1, N;
  float eps;
  uint32_t drop_key, drop_threshold;
  float inv_keep;
};

// Given dy and the saved s, mean, rstd: ds (the gradient of s, = d residual), dx = ds * keep / (1 - p),
// and per-column partial sums of dy * xhat (dgamma), dy (dbeta) and dx (d in_bias) accumulated into fp32
// buffers of width N owned by the calling thread.
struct LnBwdArgs {
  const void *dy, *sum, *gamma;
  const float *mean, *rstd;
  void *ds, *dx;  // dx may be null (no dropout: dx == ds)
  float *dgamma, *dbeta, *dbias;  // fp32 partial sums (may be null)
  int64_t sdy, ss, sds, sdx;
  int64_t r0, r1, N;
  uint32_t drop_key, drop_threshold;
  float inv_keep;
};

// y = gelu(x + bias) (erf form, or tanh form when tanh_approx) over rows [r0, r1) of width N.
struct GeluArgs {
  const void *x, *bias, *dy;  // dy: backward only
  void* y;                    // forward: output; backward: dx
  float* dbias;               // backward: fp32 partial column sums of dx (may be null)
  int64_t sx, sy, sdy;
  int64_t r0, r1, N;
  bool tanh_approx;
};

// y[t] = LayerNorm(word[ids[t]] + pos[pos_ids[t]] + type[type_ids[t]]) for tokens [r0, r1).
struct EmbedArgs {
  const int64_t *ids, *pos_ids, *type_ids;
  const void *word, *pos, *type, *gamma, *beta;
  void* y;
  int64_t r0, r1, N;
  float eps;
};

struct KernelTable {
  const char* isa;
  void (*attn_fwd[2])(const AttnFwdArgs&);
  void (*attn_bwd[2])(const AttnBwdArgs&);
  void (*ln_fwd[2])(const LnFwdArgs&);
  void (*ln_bwd[2])(const LnBwdArgs&);
  void (*gelu_fwd[2])(const GeluArgs&);
  void (*gelu_bwd[2])(const GeluArgs&);
  void (*embed_fwd[2])(const EmbedArgs&);
};

// Scratch sizes in floats (include alignment slack).
size_t attn_fwd_work(int64_t L, int64_t D);
size_t attn_bwd_work(int64_t L, int64_t D);

// The table for this CPU, chosen once (AVX-512 when the CPU and OS support it, else baseline x86-64).
const KernelTable& kernels();

// Select the table by name ("auto", "avx512", "generic"); false if unknown or unsupported on this CPU.
bool set_isa(const char* name);

namespace generic { const KernelTable& table(); }
namespace avx512 { const KernelTable& table(); }

}  // namespace fd
