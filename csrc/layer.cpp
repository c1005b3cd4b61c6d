// One whole post-LN BERT encoder layer for inference, in one call from Python (the batch-1 path is bound by
// per-op overhead): the four GEMMs go to the BLAS ATen uses (MKL sgemm in fp32, oneDNN with avx512_bf16/AMX
// in bf16; QKV as one GEMM over the concatenated weight), the rest to the fused kernels. Intermediates live in
// a per-thread workspace reused across layers and calls (no allocation or page faults per layer); the layer runs
// under InferenceMode, so the workspace is always an inference tensor and a call under no_grad after one under
// inference_mode (or the other way round) writes into it legally; the output is allocated outside that mode.
//
//   qkv = x W_qkv^T + b_qkv                 (T, 3d)
//   ctx = varlen_attention(qkv)             (T, d)    per (sequence, head), real tokens only
//   x1  = LN((ctx W_o^T + b_o) + x)         (T, d)
//   h   = gelu(x1 W_1^T + b_1)              (T, f)
//   out = LN((h W_2^T + b_2) + x1)          (T, d)
#include "ops.h"

namespace fd {
namespace {

Tensor& workspace() {
  thread_local Tensor ws;
  return ws;
}

// A (rows, cols) view of the workspace at element offset `off` in dtype `dt`.
Tensor slab(const Tensor& ws, int64_t off, int64_t rows, int64_t cols) {
  return ws.narrow(0, off, rows * cols).view({rows, cols});
}

void check_weight(const Tensor& w, const char* name, const Tensor& x, std::initializer_list<int64_t> shape) {
  check_cpu(w, name);
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "fastdistil native: ", name, " must have x's dtype ",
                   x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.sizes() == at::IntArrayRef(shape), "fastdistil native: ", name, " must have shape ",
                    at::IntArrayRef(shape), ", got ", w.sizes());
  TORCH_CHECK_VALUE(w.is_contiguous(), "fastdistil native: ", name, " must be contiguous");
}

}  // namespace

Tensor encoder_layer(const Tensor& x, const std::vector<Tensor>& weights, const Tensor& cu_seqlens,
                     int64_t max_seqlen, int64_t n_head, double eps1, double eps2, bool tanh_approx) {
  dtype_index(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.is_contiguous(),
                    "fastdistil native: x must be a contiguous (T, d) tensor with d > 0, got ", x.sizes());
  TORCH_CHECK_VALUE(weights.size() == 12, "fastdistil native: encoder_layer takes 12 weights (w_qkv, b_qkv, w_o, "
                    "b_o, ln1_w, ln1_b, w_1, b_1, w_2, b_2, ln2_w, ln2_b), got ", weights.size());
  TORCH_CHECK_VALUE(weights[6].dim() == 2 && weights[6].size(0) > 0, "fastdistil native: w_1 must be (f, d) with ",
                    "f > 0, got ", weights[6].sizes());
  const int64_t T = x.size(0), d = x.size(1), f = weights[6].size(0);
  TORCH_CHECK_VALUE(n_head > 0 && d % n_head == 0, "fastdistil native: n_head must be > 0 and divide the hidden ",
                    "size ", d, ", got ", n_head);
  check_weight(weights[0], "w_qkv", x, {3 * d, d});
  check_weight(weights[1], "b_qkv", x, {3 * d});
  check_weight(weights[2], "w_o", x, {d, d});
  check_weight(weights[3], "b_o", x, {d});
  check_weight(weights[4], "ln1_weight", x, {d});
  check_weight(weights[5], "ln1_bias", x, {d});
  check_weight(weights[6], "w_1", x, {f, d});
  check_weight(weights[7], "b_1", x, {f});
  check_weight(weights[8], "w_2", x, {d, f});
  check_weight(weights[9], "b_2", x, {d});
  check_weight(weights[10], "ln2_weight", x, {d});
  check_weight(weights[11], "ln2_bias", x, {d});
  Tensor out = at::empty({T, d}, x.options());  // made in the caller's mode, like any op's output
  if (T == 0) return out;
  c10::InferenceMode inference;  // also: the GEMMs' out= forms are not recorded by autograd
  const int64_t need = mul_checked(T, 6 * d + f);
  Tensor& ws = workspace();
  if (!ws.defined() || ws.scalar_type() != x.scalar_type() || ws.numel() < need)
    ws = at::empty({need + need / 4}, x.options());
  Tensor qkv = slab(ws, 0, T, 3 * d);
  Tensor ctx = slab(ws, T * 3 * d, T, d);
  Tensor tmp = slab(ws, T * 4 * d, T, d);
  Tensor x1 = slab(ws, T * 5 * d, T, d);
  Tensor h = slab(ws, T * 6 * d, T, f);
  // Biases go inside the GEMMs (addmm), as in transformers: the same rounding as its fp32 path, which keeps
  // six layers of real weights within 1e-5 of it (a bias added after the GEMM drifts to ~1.5e-5 by layer 5).
  at::addmm_out(qkv, weights[1], x, weights[0].t());
  attention_into(qkv, ctx, cu_seqlens, n_head, max_seqlen);
  at::addmm_out(tmp, weights[3], ctx, weights[2].t());
  layer_norm_into(tmp, x, Tensor(), weights[4], weights[5], eps1, x1);
  at::addmm_out(h, weights[7], x1, weights[6].t());
  bias_gelu_inplace(h, Tensor(), tanh_approx);
  at::addmm_out(tmp, weights[9], h, weights[8].t());
  layer_norm_into(tmp, x1, Tensor(), weights[10], weights[11], eps2, out);
  return out;
}

}  // namespace fd
