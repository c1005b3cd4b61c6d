// Post-LN encoder layers for inference, all of them in one call from Python (the batch-1 path is bound by per-op
// overhead). Each layer reads a LayerW (fastdistil/layer_weights.py's LayerWeights); its four GEMMs go either to
// oneDNN's prepacked matmul (mkldnn::_linear_pointwise through the dispatcher, weights reordered once and cached
// by the caller, GELU fused as its erf/tanh post-op) or, without prepacked weights, to the BLAS ATen uses (MKL
// sgemm in fp32; QKV as one GEMM over the concatenated weight). The rest goes to the fused kernels.
// Intermediates and the layers' outputs but the last live in a per-thread workspace reused across layers and calls
// (no allocation or page faults per layer); the layers run under InferenceMode, so the workspace is always an
// inference tensor and a call under no_grad after one under inference_mode (or the other way round) writes into it
// legally; the output is allocated outside that mode. Every argument is checked once, before any layer runs.
//
//   qkv = x W_qkv^T + b_qkv                 (T, 3d)
//   ctx = varlen_attention(qkv)             (T, d)    per (sequence, head), real tokens only
//   x1  = LN((ctx W_o^T + b_o) + x)         (T, d)
//   h   = gelu(x1 W_in^T + b_in)            (T, f)
//   out = LN((h W_out^T + b_out) + x1)      (T, d)
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstring>

#include "ops.h"

namespace fd {
namespace {

Tensor& workspace() {
  thread_local Tensor ws;
  return ws;
}

// A (rows, cols) view of the workspace at element offset `off`.
Tensor slab(const Tensor& ws, int64_t off, int64_t rows, int64_t cols) {
  return ws.narrow(0, off, rows * cols).view({rows, cols});
}

void check_weight(const Tensor& w, const char* name, size_t layer, const Tensor& x,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK_VALUE(w.defined() && w.device().is_cpu() && w.layout() == at::kStrided, "fastdistil native: layer ",
                    layer, ": ", name, " must be a dense CPU tensor");
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "fastdistil native: layer ", layer, ": ", name,
                   " must have x's dtype ", x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.sizes() == at::IntArrayRef(shape), "fastdistil native: layer ", layer, ": ", name,
                    " must have shape ", at::IntArrayRef(shape), ", got ", w.sizes());
  TORCH_CHECK_VALUE(w.is_contiguous(), "fastdistil native: layer ", layer, ": ", name, " must be contiguous");
}

// Checks layer i's shapes against x (T, d) and returns its FFN width f.
int64_t check_layer(const LayerW& w, size_t i, const Tensor& x, bool packed) {
  const int64_t d = x.size(1);
  TORCH_CHECK_VALUE(w.w_in.defined() && w.w_in.dim() == 2 && w.w_in.size(0) > 0, "fastdistil native: layer ", i,
                    ": w_in must be (f, d) with f > 0, got ", w.w_in.defined() ? w.w_in.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(w.heads > 0 && d % w.heads == 0, "fastdistil native: layer ", i, ": heads must be > 0 and ",
                    "divide the hidden size ", d, ", got ", w.heads);
  const int64_t f = w.w_in.size(0);
  check_weight(w.w_qkv, "w_qkv", i, x, {3 * d, d});
  check_weight(w.b_qkv, "b_qkv", i, x, {3 * d});
  check_weight(w.w_o, "w_o", i, x, {d, d});
  check_weight(w.b_o, "b_o", i, x, {d});
  check_weight(w.ln1_w, "ln1_w", i, x, {d});
  check_weight(w.ln1_b, "ln1_b", i, x, {d});
  check_weight(w.w_in, "w_in", i, x, {f, d});
  check_weight(w.b_in, "b_in", i, x, {f});
  check_weight(w.w_out, "w_out", i, x, {d, f});
  check_weight(w.b_out, "b_out", i, x, {d});
  check_weight(w.ln2_w, "ln2_w", i, x, {d});
  check_weight(w.ln2_b, "ln2_b", i, x, {d});
  const bool has = w.pk_qkv.defined() && w.pk_o.defined() && w.pk_in.defined() && w.pk_out.defined();
  TORCH_CHECK_VALUE(has == packed && (has || !(w.pk_qkv.defined() || w.pk_o.defined() || w.pk_in.defined() ||
                                                w.pk_out.defined())),
                    "fastdistil native: layer ", i, ": either every layer has its four prepacked weights or none");
  return f;
}

// y = x W^T + b with W prepacked by mkldnn::_reorder_linear_weight, `attr` "none" or "gelu" (algorithm "none"
// = erf, "tanh"): torch.ops.mkldnn._linear_pointwise, called through the dispatcher (no Python in between).
Tensor onednn_linear(const Tensor& x, const Tensor& packed, const Tensor& b, const char* attr, const char* algo) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, std::string_view,
                        c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>)>();
  return op.call(x, packed, b, attr, c10::List<std::optional<at::Scalar>>(), std::string_view(algo));
}

// One layer: x (T, d) -> y (T, d) (y may be a workspace slab or the output; never x).
void run_layer(const LayerW& w, const Tensor& x, Tensor& y, const std::vector<int64_t>& cu, int64_t longest,
               const Tensor& ws) {
  const int64_t T = x.size(0), d = x.size(1), f = w.w_in.size(0), D = d / w.heads;
  Tensor ctx = slab(ws, 0, T, d), x1 = slab(ws, T * d, T, d);
  if (w.pk_qkv.defined()) {
    // The same calls and scale as the per-op route (varlen attention's 1/sqrt(D) rounded from double).
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    attention_into(onednn_linear(x, w.pk_qkv, w.b_qkv, "none", ""), ctx, cu, longest, w.heads, scale);
    layer_norm_into(onednn_linear(ctx, w.pk_o, w.b_o, "none", ""), x, Tensor(), w.ln1_w, w.ln1_b, w.eps1, x1);
    // GELU: oneDNN's post-op where our table is AVX-512 (0.75 ms per layer at workload A, cheaper than a pass over
    // h); below AVX-512 oneDNN's erf post-op took 3.5-5.7 ms per layer, our in-place kernel 2.4 ms (AMD EPYC Zen 4
    // with the AVX2 paths forced, benchmarks/native_parts.py).
    const bool post_op = std::strcmp(kernels().isa, "avx512") == 0;
    Tensor h = onednn_linear(x1, w.pk_in, w.b_in, post_op ? "gelu" : "none", post_op ? (w.tanh ? "tanh" : "none") : "");
    if (!post_op) bias_gelu_inplace(h, Tensor(), w.tanh);
    layer_norm_into(onednn_linear(h, w.pk_out, w.b_out, "none", ""), x1, Tensor(), w.ln2_w, w.ln2_b, w.eps2, y);
    return;
  }
  Tensor tmp = slab(ws, 2 * T * d, T, d), qkv = slab(ws, 3 * T * d, T, 3 * d), h = slab(ws, 6 * T * d, T, f);
  // Biases go inside the GEMMs (addmm), as in transformers: the same rounding as its fp32 path, which keeps
  // six layers of real weights within 1e-5 of it (a bias added after the GEMM drifts to ~1.5e-5 by layer 5).
  at::addmm_out(qkv, w.b_qkv, x, w.w_qkv.t());
  attention_into(qkv, ctx, cu, longest, w.heads, 1.0f / std::sqrt(static_cast<float>(D)));
  at::addmm_out(tmp, w.b_o, ctx, w.w_o.t());
  layer_norm_into(tmp, x, Tensor(), w.ln1_w, w.ln1_b, w.eps1, x1);
  at::addmm_out(h, w.b_in, x1, w.w_in.t());
  bias_gelu_inplace(h, Tensor(), w.tanh);
  at::addmm_out(tmp, w.b_out, h, w.w_out.t());
  layer_norm_into(tmp, x1, Tensor(), w.ln2_w, w.ln2_b, w.eps2, y);
}

}  // namespace

LayerW layer_from_py(pybind11::handle w, pybind11::handle packed, size_t i) {
  namespace py = pybind11;
  static const char* fields[] = {"w_qkv", "b_qkv", "w_o", "b_o", "ln1_w", "ln1_b", "w_in", "b_in", "w_out",
                                 "b_out", "ln2_w", "ln2_b", "eps1", "eps2", "heads", "activation", "norm"};
  for (const char* name : fields)
    TORCH_CHECK_TYPE(py::hasattr(w, name), "fastdistil native: layer ", i, " must be a LayerWeights ",
                     "(fastdistil/layer_weights.py), got ", std::string(py::str(py::type::of(w).attr("__name__"))),
                     " without .", name);
  LayerW r;
  Tensor* ts[] = {&r.w_qkv, &r.b_qkv, &r.w_o, &r.b_o, &r.ln1_w, &r.ln1_b, &r.w_in, &r.b_in, &r.w_out, &r.b_out,
                  &r.ln2_w, &r.ln2_b};
  for (int k = 0; k < 12; ++k) {
    py::object t = w.attr(fields[k]);
    TORCH_CHECK_TYPE(THPVariable_Check(t.ptr()), "fastdistil native: layer ", i, ": ", fields[k],
                     " must be a tensor");
    *ts[k] = THPVariable_Unpack(t.ptr());
  }
  r.eps1 = w.attr("eps1").cast<double>(), r.eps2 = w.attr("eps2").cast<double>();
  r.heads = w.attr("heads").cast<int64_t>();
  const auto act = w.attr("activation").cast<std::string>(), norm = w.attr("norm").cast<std::string>();
  TORCH_CHECK_VALUE(act == "gelu" || act == "gelu_tanh", "fastdistil native: layer ", i,
                    ": activation must be 'gelu' or 'gelu_tanh', got '", act, "'");
  TORCH_CHECK_VALUE(norm == "post", "fastdistil native: layer ", i, ": norm must be 'post', got '", norm, "'");
  r.tanh = act == "gelu_tanh";
  if (!packed.is_none()) {
    const auto pk = packed.cast<std::vector<Tensor>>();
    TORCH_CHECK_VALUE(pk.size() == 4, "fastdistil native: layer ", i, ": packed must hold 4 prepacked weights ",
                      "(w_qkv, w_o, w_in, w_out), got ", pk.size());
    r.pk_qkv = pk[0], r.pk_o = pk[1], r.pk_in = pk[2], r.pk_out = pk[3];
  }
  return r;
}

Tensor encoder(const Tensor& x, const std::vector<LayerW>& layers, const Tensor& cu_seqlens, int64_t max_seqlen) {
  dtype_index(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.is_contiguous(),
                    "fastdistil native: x must be a contiguous (T, d) tensor with d > 0, got ", x.sizes());
  const int64_t T = x.size(0), d = x.size(1);
  const bool packed = !layers.empty() && layers[0].pk_qkv.defined();
  int64_t fmax = 0;
  for (size_t i = 0; i < layers.size(); ++i) fmax = std::max(fmax, check_layer(layers[i], i, x, packed));
  int64_t longest = 0;
  const auto cu = check_cu_seqlens(cu_seqlens, T, max_seqlen, &longest);
  Tensor out = at::empty({T, d}, x.options());  // made in the caller's mode, like any op's output
  if (T == 0) return out;
  if (layers.empty()) return out.copy_(x);
  c10::InferenceMode inference;  // also: the GEMMs' out= forms are not recorded by autograd
  // ctx, x1, tmp, qkv (3), h (f), and two slabs the layers' outputs alternate between (the last writes `out`).
  const int64_t per_token = packed ? 4 * d : 8 * d + fmax, need = mul_checked(T, per_token);
  Tensor& ws = workspace();
  if (!ws.defined() || ws.scalar_type() != x.scalar_type() || ws.numel() < need)
    ws = at::empty({need + need / 4}, x.options());
  Tensor ping[2] = {slab(ws, need - 2 * T * d, T, d), slab(ws, need - T * d, T, d)};
  Tensor cur = x;
  for (size_t i = 0; i < layers.size(); ++i) {
    Tensor& y = i + 1 == layers.size() ? out : ping[i % 2];
    run_layer(layers[i], cur, y, cu, longest, ws);
    cur = y;
  }
  return out;
}

}  // namespace fd
