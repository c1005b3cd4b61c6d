// The torch-facing entry points of fastdistil._C (bound in module.cpp). Each checks its inputs at the
// boundary (device, dtype, shapes, strides) with a clear message, splits the work over torch's intra-op
// threads (at::parallel_for, so torch.set_num_threads / OMP_NUM_THREADS apply) and calls the kernel table.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "kernels/common.h"
#include "kernels/table.h"

namespace fd {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- shared checks ----
int dtype_index(const Tensor& t, const char* name);  // kF32 or kBF16, else a clear error
void check_cpu(const Tensor& t, const char* name);   // defined, on the CPU, dense
void check_like(const Tensor& t, const char* name, const Tensor& x);  // CPU, x's dtype and shape
int64_t mul_checked(int64_t a, int64_t b);            // a * b of sizes >= 0, or a clear error on overflow
uint32_t threshold_of(double p);
Tensor param_like(const Tensor& p, const Tensor& x, const char* name, int64_t n);  // (n,) contiguous, x's dtype

// ---- attention.cpp ----
std::vector<Tensor> varlen_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                         int64_t max_seqlen, double scale, double dropout_p, int64_t seed,
                                         bool need_lse, const OptTensor& cu_seqlens_k, int64_t max_seqlen_k);
std::vector<Tensor> varlen_attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens,
                                         int64_t max_seqlen, double scale, double dropout_p, int64_t seed,
                                         const OptTensor& cu_seqlens_k, int64_t max_seqlen_k);
void attention_into(const Tensor& qkv, Tensor& out, const Tensor& cu_seqlens, int64_t n_head, int64_t max_seqlen);
// The same on cu_seqlens already validated by check_cu_seqlens (host copy) with an explicit softmax scale.
void attention_into(const Tensor& qkv, Tensor& out, const std::vector<int64_t>& cu, int64_t longest, int64_t n_head,
                    float scale);
// cu_seqlens as int64 on the host, validated against T tokens and max_seqlen; *longest = the longest length.
std::vector<int64_t> check_cu_seqlens(const Tensor& cu_seqlens, int64_t T, int64_t max_seqlen, int64_t* longest);
Tensor dropout_keep_mask(int64_t seed, int64_t stream, int64_t rows, int64_t cols, double p);

// ---- layer_norm.cpp ----
std::vector<Tensor> layer_norm_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                                   const OptTensor& residual, const OptTensor& input_bias, double dropout_p,
                                   int64_t seed, bool save);
std::vector<Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& sum, const Tensor& mean, const Tensor& rstd,
                                   const Tensor& weight, double dropout_p, int64_t seed);
void layer_norm_into(const Tensor& x, const Tensor& residual, const Tensor& input_bias, const Tensor& weight,
                     const Tensor& bias, double eps, Tensor& y);

// ---- gelu.cpp ----
Tensor bias_gelu_fwd(const Tensor& x, const Tensor& bias, bool tanh_approx);
std::vector<Tensor> bias_gelu_bwd(const Tensor& dy, const Tensor& x, const Tensor& bias, bool tanh_approx);
void bias_gelu_inplace(Tensor& x, const Tensor& bias, bool tanh_approx);

// ---- embedding.cpp ----
Tensor embed_layer_norm_fwd(const Tensor& ids, const Tensor& type_ids, const Tensor& pos_ids, const Tensor& word,
                            const Tensor& pos, const Tensor& type, const Tensor& weight, const Tensor& bias,
                            double eps);

// ---- layer.cpp ----
// One post-LN encoder layer's weights (fastdistil/layer_weights.py's LayerWeights; nn.Linear layout (out, in)).
struct LayerW {
  Tensor w_qkv, b_qkv, w_o, b_o, ln1_w, ln1_b, w_in, b_in, w_out, b_out, ln2_w, ln2_b;
  double eps1 = 1e-12, eps2 = 1e-12;
  int64_t heads = 0;
  bool tanh = false;               // GELU: false = erf, true = tanh approximation
  Tensor pk_qkv, pk_o, pk_in, pk_out;  // oneDNN-prepacked w_qkv, w_o, w_in, w_out, or undefined (ATen addmm)
};
// Every layer on x (T, d), one call: the per-thread workspace is reused across layers and calls. Either every
// layer carries prepacked weights (oneDNN matmul) or none does (addmm).
Tensor encoder(const Tensor& x, const std::vector<LayerW>& layers, const Tensor& cu_seqlens, int64_t max_seqlen);
// A LayerWeights (read by field name) and its optional [4] prepacked weights as a LayerW; i names it in errors.
LayerW layer_from_py(pybind11::handle w, pybind11::handle packed, size_t i);

// Rows per parallel chunk such that a chunk holds at least ~`min_elems` elements (small inputs stay on one thread).
inline int64_t row_grain(int64_t N, int64_t min_elems = 16384) { return std::max<int64_t>(1, min_elems / std::max<int64_t>(N, 1)); }

}  // namespace fd
