// Argument blocks and the function table of the CPU kernels (no torch dependency).
//
// One kernel call handles one unit of work on one thread: one (sequence, head) of attention, or a range of
// rows of an elementwise/row op. The torch-facing files (csrc/*.cpp) check inputs, split the work with
// at::parallel_for and call through `fd::kernels()`, the table for the instruction set chosen at run time.
// Element types: index 0 = float32, 1 = bfloat16 (raw bits); parameters have the activations' type.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

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

// The table in use: chosen at the first call from FASTDISTIL_NATIVE_ISA, ATEN_CPU_CAPABILITY and the CPU features
// (dispatch.cpp), or by set_isa. A forced table the CPU lacks, or an unknown name, is a ValueError.
const KernelTable& kernels();

// Select the table by name ("auto": from the environment as at the first call; "generic", "avx2", "avx512").
void set_isa(const std::string& name);

// CPU features the OS has enabled, named as in /proc/cpuinfo (avx2, fma, avx512f, avx512_bf16, amx_tile, ...).
std::map<std::string, bool> cpu_features();

// The table a CPU with `features` runs: `forced` (FASTDISTIL_NATIVE_ISA; "" or "auto": the best the CPU supports,
// capped by `aten_cap`, ATEN_CPU_CAPABILITY: "default" -> generic, "avx2" -> avx2). `what` names the setting in
// error messages. Pure: tests call it with mocked features.
std::string choose_isa(const std::map<std::string, bool>& features, const std::string& forced,
                       const std::string& aten_cap, const std::string& what);

// The tables this CPU can run, baseline first.
std::vector<std::string> supported_isas();

namespace generic { const KernelTable& table(); }
namespace avx2 { const KernelTable& table(); }      // AVX2 + FMA (256-bit vectors)
namespace avx512 { const KernelTable& table(); }    // AVX-512 F/BW/VL/DQ + FMA (512-bit vectors)

}  // namespace fd
