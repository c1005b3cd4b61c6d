// fastdistil._C: the native CPU backend's entry points (pybind11 through torch's cpp_extension).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdistil native CPU kernels: varlen attention, fused LayerNorm, bias+GELU, embeddings, encoder layer";
  namespace py = pybind11;
  m.def("varlen_attention_fwd", &fd::varlen_attention_fwd, "attention over packed sequences -> (o, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("need_lse"), py::arg("cu_seqlens_k") = py::none(),
        py::arg("max_seqlen_k") = 0);
  m.def("varlen_attention_bwd", &fd::varlen_attention_bwd, "-> (dq, dk, dv)", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("cu_seqlens"), py::arg("max_seqlen"),
        py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("cu_seqlens_k") = py::none(),
        py::arg("max_seqlen_k") = 0);
  m.def("dropout_keep_mask", &fd::dropout_keep_mask, "the scaled keep mask of one dropout stream (for tests)",
        py::arg("seed"), py::arg("stream"), py::arg("rows"), py::arg("cols"), py::arg("p"));
  m.def("layer_norm_fwd", &fd::layer_norm_fwd, "LN(dropout(x + input_bias) + residual) -> (y, sum, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("residual"),
        py::arg("input_bias"), py::arg("dropout_p"), py::arg("seed"), py::arg("save"));
  m.def("layer_norm_bwd", &fd::layer_norm_bwd, "-> (d residual, dx, dweight, dbias, d input_bias)", py::arg("dy"),
        py::arg("sum"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("dropout_p"), py::arg("seed"));
  m.def("bias_gelu_fwd", &fd::bias_gelu_fwd, "gelu(x + bias)", py::arg("x"), py::arg("bias"), py::arg("tanh_approx"));
  m.def("bias_gelu_bwd", &fd::bias_gelu_bwd, "-> (dx, dbias)", py::arg("dy"), py::arg("x"), py::arg("bias"),
        py::arg("tanh_approx"));
  m.def("embed_layer_norm_fwd", &fd::embed_layer_norm_fwd, "LN(word[ids] + pos[pos_ids] + type[type_ids])",
        py::arg("ids"), py::arg("type_ids"), py::arg("pos_ids"), py::arg("word"), py::arg("pos"), py::arg("type"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("encoder_layer", &fd::encoder_layer, "one post-LN BERT layer for inference", py::arg("x"),
        py::arg("weights"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("n_head"), py::arg("eps1"),
        py::arg("eps2"), py::arg("tanh_approx"));
  m.def("isa", []() { return std::string(fd::kernels().isa); }, "the instruction set of the kernels in use");
  m.def("set_isa", [](const std::string& name) { return fd::set_isa(name.c_str()); },
        "select the kernels: 'auto', 'avx512' or 'generic'; False if unsupported here", py::arg("name"));
}
