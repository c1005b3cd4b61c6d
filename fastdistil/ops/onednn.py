"""oneDNN on this CPU: what it can run (probed once per process) and its prepacked weights for the native encoder.

The native backend's inference layers (ops/encoder.py) run their GEMMs on oneDNN's prepacked matmul by default
(weights reordered once and cached in fastdistil/weight_cache.py; C++ calls it through the dispatcher, no Python
per layer); with FASTDISTIL_NATIVE_GEMM=blas, for a dtype oneDNN refuses here, and for inference-tensor weights
they go to ATen's addmm. Nothing here imports the C++ extension at import time.
"""
from __future__ import annotations

import os
import weakref
import warnings

import torch

from ..weight_cache import derived

_PROBES: dict = {}  # dtype -> oneDNN runs it; "bf16" -> bf16 prepacking works; "noted" -> the bf16 warning was given


def runs(dtype) -> bool:
    """Whether oneDNN's prepacked matmul (reorder + linear, plain and with the GELU post-op) runs in `dtype` here,
    tried once per dtype on an 8 x 8 weight before any real layer chooses it: a CPU, an ONEDNN_MAX_CPU_ISA cap or a
    torch build that refuses it then sends every layer to the BLAS route instead of raising from inside oneDNN."""
    if dtype not in _PROBES:
        ok = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
        if ok:
            try:
                with torch.no_grad():
                    w, x = torch.eye(8, dtype=dtype), torch.ones(2, 8, dtype=dtype)
                    pw = torch.ops.mkldnn._reorder_linear_weight(w, 32)
                    y = torch.ops.mkldnn._linear_pointwise(x, pw, x[0], "none", [], "")
                    g = torch.ops.mkldnn._linear_pointwise(x, pw, x[0], "gelu", [], "tanh")
                ok = bool((y == 2).all()) and g.shape == y.shape
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _PROBES[dtype] = ok
    return _PROBES[dtype]


def bf16_ok() -> bool:
    """Whether oneDNN can reorder (prepack) bfloat16 weights on this CPU: it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    (an AVX2-only CPU such as AMD Zen 3 has neither and raises "mkldnn_reorder_linear_weight: bf16 path needs the cpu
    support ..."). torch's own predicate (it honours ONEDNN_MAX_CPU_ISA), then the probe of :func:`runs`.
    One module-level function so tests can patch it."""
    if "bf16" not in _PROBES:
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        _PROBES["bf16"] = bool(probe is not None and torch.backends.mkldnn.is_available() and probe()
                               and runs(torch.bfloat16))
    return _PROBES["bf16"]


def native_bf16() -> bool:
    """Whether bfloat16 GEMMs run on native bf16 dot products on this CPU (avx512_bf16, AMX-BF16 or AVX-NE-CONVERT,
    with oneDNN allowed to use them). Elsewhere a bfloat16 model still runs: bf16 storage, fp32 compute (the C++
    kernels always compute in fp32; the GEMMs go to ATen, which converts). Needs the C++ extension."""
    if "hw_bf16" not in _PROBES:  # the CPU's features: read once (every bf16 forward asks)
        from .. import _C
        f = _C.cpu_features()
        _PROBES["hw_bf16"] = any(f.get(k, False) for k in ("avx512_bf16", "amx_bf16", "avx_ne_convert"))
    return _PROBES["hw_bf16"] and bf16_ok()


def note_bf16() -> None:
    """Once per process: a bfloat16 model on a CPU without native bf16 dot products is storage-only bf16."""
    if "noted" not in _PROBES:
        _PROBES["noted"] = True
        if not native_bf16():
            from .. import _C
            warnings.warn("fastdistil: this CPU has no native bf16 dot products (avx512_bf16, AMX or AVX-NE-CONVERT; "
                          "`fastdistil info` lists the features seen): bfloat16 runs as a storage format with fp32 "
                          f"compute ({_C.isa()} C++ kernels, GEMMs on ATen), usually no faster than float32 here",
                          RuntimeWarning, stacklevel=3)


def use_onednn(ws) -> bool:
    """GEMMs of inference layers on oneDNN's prepacked matmul unless FASTDISTIL_NATIVE_GEMM=blas (ATen's addmm:
    MKL sgemm in fp32) or this torch has no oneDNN. Measured on the 2-core AMD EPYC (AVX-512) of this project:
    oneDNN's fp32 GEMMs are 2.2x (32 x 128 batch) to 2.6x (batch 1) faster than MKL's, at the same accuracy
    against transformers (both ~1e-5: fp32 sums in a different order). Also the BLAS route: any dtype oneDNN
    refuses here (checked before choosing it, see :func:`runs` and :func:`bf16_ok`), and inference-tensor weights
    (see :func:`packed`). `ws`: the twelve tensors of one LayerWeights."""
    choice = os.environ.get("FASTDISTIL_NATIVE_GEMM", "onednn").lower()
    if choice not in ("onednn", "blas"):
        raise ValueError(f"FASTDISTIL_NATIVE_GEMM must be 'onednn' or 'blas', got {choice!r}")
    if ws[0].dtype == torch.bfloat16:
        note_bf16()
    if choice == "blas" or any(ws[i].is_inference() for i in (0, 2, 6, 8)):
        return False
    return bf16_ok() if ws[0].dtype == torch.bfloat16 else runs(ws[0].dtype)


def packed(w):
    """oneDNN-reordered copies of the four GEMM weights of LayerWeights w, held in fastdistil/weight_cache.py (not on
    the model: packed tensors have no storage to save) and rebuilt when any of the four is another tensor or was
    updated in place (version counter; the fused QKV is replaced, never updated, when q, k or v change). Never for
    inference tensors, which inference_mode updates in place without a version bump: :func:`use_onednn` sends
    those to the BLAS route, which reads the weights as they are on every call."""
    reorder = torch.ops.mkldnn._reorder_linear_weight
    return derived("onednn", (w.w_qkv, w.w_o, w.w_in, w.w_out), lambda src: [reorder(t.detach(), 32) for t in src])


_last: list = [lambda: None, None, None]  # [weakref to ws, (dtype, FASTDISTIL_NATIVE_GEMM), result]


def prepacked(ws, x):
    """Per layer, the oneDNN-prepacked weights when every layer's GEMMs go to oneDNN (see :func:`use_onednn`), else
    None (the C++ layers then run their GEMMs on ATen's addmm). Asked again for the same list object (FastStudent
    caches its LayerWeights list while the weights are unchanged), the last answer is returned without a lookup."""
    if x.shape[0] == 0:
        return None
    mode = (x.dtype, os.environ.get("FASTDISTIL_NATIVE_GEMM"))
    if _last[0]() is ws and _last[1] == mode:
        return _last[2]
    out = [packed(w) for w in ws] if all(use_onednn(w.tensors()) for w in ws) else None
    try:  # held weakly: a dropped model's weights are not kept alive here
        _last[:] = [weakref.ref(ws), mode, out]
    except TypeError:  # a plain list (not FastStudent's LayerList) cannot be referenced weakly: not remembered
        pass
    return out
