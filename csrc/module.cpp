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
  // Encoder layers for inference (layer.cpp): LayerWeights objects, optional prepacked [w_qkv, w_o, w_in, w_out].
  m.def("encoder_layer", [](const at::Tensor& x, py::handle w, const at::Tensor& cu, int64_t max_seqlen,
                            py::handle packed) {
          return fd::encoder(x, {fd::layer_from_py(w, packed, 0)}, cu, max_seqlen);
        }, "one post-LN encoder layer for inference", py::arg("x"), py::arg("weights"), py::arg("cu_seqlens"),
        py::arg("max_seqlen"), py::arg("packed") = py::none());
  m.def("encoder", [](const at::Tensor& x, const py::list& layers, const at::Tensor& cu, int64_t max_seqlen,
                      py::object packed) {
          TORCH_CHECK_VALUE(packed.is_none() || py::len(packed) == py::len(layers), "fastdistil native: packed ",
                            "must hold one entry per layer");
          std::vector<fd::LayerW> ws;
          ws.reserve(py::len(layers));
          for (size_t i = 0; i < py::len(layers); ++i) {
            py::object pk = packed.is_none() ? py::none() : py::object(packed[py::int_(i)]);
            ws.push_back(fd::layer_from_py(layers[i], pk, i));
          }
          return fd::encoder(x, ws, cu, max_seqlen);
        }, "every post-LN encoder layer in one call, for inference", py::arg("x"), py::arg("layers"),
        py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("packed") = py::none());
  // Kernel tables (dispatch.cpp): a table the CPU lacks, or an unknown name, is a ValueError.
  m.def("isa", []() { return std::string(fd::kernels().isa); },
        "the kernel table in use ('generic', 'avx2' or 'avx512'), chosen at the first call from FASTDISTIL_NATIVE_ISA");
  m.def("set_isa", [](const std::string& name) { fd::set_isa(name); return true; },
        "select the kernel table: 'auto', 'generic', 'avx2' or 'avx512'; ValueError if this CPU cannot run it",
        py::arg("name"));
  m.def("supported_isas", &fd::supported_isas, "the kernel tables this CPU can run, baseline first");
  m.def("cpu_features", &fd::cpu_features, "{feature: usable} as CPUID and the OS report them (cpuinfo names)");
  m.def("choose_isa", &fd::choose_isa, "the table a CPU with `features` gets (pure; for tests with mocked features)",
        py::arg("features"), py::arg("forced") = "", py::arg("aten_cap") = "",
        py::arg("what") = "FASTDISTIL_NATIVE_ISA");
}
