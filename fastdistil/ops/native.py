"""The ``native`` backend: the C++ kernels of csrc/ (fastdistil._C) behind the op seam, with autograd.

Imported lazily by ops/dispatch.py the first time the native backend is resolved (only once the extension is
known to import). Each op is a thin layer: float32 and bfloat16 CPU tensors go to C++, any other dtype (float16,
float64) to the torch reference, so the op never fails where the reference works.

Gradients: attention, layer_norm and bias_gelu have C++ backward kernels (the maths is in the header comments of
csrc/kernels/*.h); embed_layer_norm's backward recomputes the reference (it runs once per step, on gathered rows).
Dropout masks come from a counter-based hash of a seed drawn from torch's default generator
(``torch.manual_seed`` makes them reproducible) and are regenerated in the backward pass, never stored.

Inference: ``encoder`` runs every layer of an inference forward in one C++ call (csrc/layer.cpp) and
``encoder_layer`` one layer, each from LayerWeights (fastdistil/layer_weights.py), QKV as one GEMM over the
concatenated weight. By default the GEMMs go to oneDNN's prepacked matmul (weights reordered once and cached in
fastdistil/weight_cache.py, see _packed; C++ calls it through the dispatcher, no Python per layer) and the rest to
the C++ kernels; with FASTDISTIL_NATIVE_GEMM=blas, for bfloat16 on CPUs where oneDNN cannot prepack it, and for
inference-tensor weights the GEMMs go to ATen's addmm.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .. import _C, reference
from ..padding import gather, unpad
from ..layer_weights import layer_ops
from ..weight_cache import derived
from .dispatch import register

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native(*ts) -> bool:
    """True when every tensor can go to the C++ kernels (float32/bfloat16 on CPU, one dtype)."""
    d = ts[0].dtype
    if d is torch.bfloat16:
        _note_bf16()
    return d in _NATIVE_DTYPES and all(t.device.type == "cpu" and t.dtype == d for t in ts)


def _seed() -> int:
    """A 62-bit dropout seed from torch's default CPU generator."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# ---------------------------------------------------------------------------------------------------- attention
class _VarlenAttention(torch.autograd.Function):
    """o = softmax(scale q k^T) v per sequence (C++ forward saves the fp32 log-sum-exp; C++ backward)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, max_q, cu_k, max_k, scale, dropout_p, seed):
        o, lse = _C.varlen_attention_fwd(q, k, v, cu_q, max_q, scale, dropout_p, seed, True, cu_k, max_k)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k if cu_k is not None else cu_q)
        ctx.cfg = (max_q, cu_k is not None, max_k, scale, dropout_p, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, cross, max_k, scale, dropout_p, seed = ctx.cfg
        dq, dk, dv = _C.varlen_attention_bwd(do.contiguous(), q, k, v, o, lse, cu_q, max_q, scale, dropout_p, seed,
                                             cu_k if cross else None, max_k)
        return dq, dk, dv, None, None, None, None, None, None, None


def _as_heads(t):
    """(T, H, D) with a unit stride on D (strided views such as the unbind of a fused QKV pass unchanged)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@register("varlen_attention", "native")
def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, dropout_p=0.0, softmax_scale=None):
    if not _native(q, k, v):
        return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                          softmax_scale=softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _as_heads(q), _as_heads(k), _as_heads(v)
    seed = _seed() if dropout_p > 0.0 else 0
    if _needs_grad(q, k, v):
        return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, None, 0, scale, dropout_p, seed)
    return _C.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, False)[0]


@register("attention", "native")
def attention(q, k, v, attention_mask=None, *, dropout_p=0.0, softmax_scale=None):
    """Padded (B, H, L, D) attention through the varlen kernel: every query position (padding included, as in the
    reference) attends over its row's real keys only, packed once; a row without real keys gives zeros."""
    if not _native(q, k, v):
        return reference.attention(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)
    B, H, L, D = q.shape
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    qt = q.transpose(1, 2).reshape(B * L, H, D)  # (B L, H, D)
    cu_q = torch.arange(0, (B + 1) * L, L, dtype=torch.int32)
    max_q = L if B else 0  # max_seqlen may not exceed the token count
    if attention_mask is None:
        kt, vt = k.transpose(1, 2).reshape(B * L, H, D), v.transpose(1, 2).reshape(B * L, H, D)
        cu_k, max_k = None, 0
    else:
        p = unpad(attention_mask.to(q.device), B, L, q.device)
        kt, vt = gather(k.transpose(1, 2), p), gather(v.transpose(1, 2), p)  # (Tk, H, D)
        cu_k, max_k = p.cu_seqlens, p.max_seqlen
    seed = _seed() if dropout_p > 0.0 else 0
    if _needs_grad(q, k, v):
        o = _VarlenAttention.apply(qt, kt, vt, cu_q, max_q, cu_k, max_k, scale, dropout_p, seed)
    else:
        o = _C.varlen_attention_fwd(qt, kt, vt, cu_q, max_q, scale, dropout_p, seed, False, cu_k, max_k)[0]
    return o.view(B, L, H, D).transpose(1, 2)


# --------------------------------------------------------------------------------------------------- layer norm
class _LayerNorm(torch.autograd.Function):
    """y = LN(dropout(x + input_bias) + residual); saves the pre-norm sum s and fp32 mean/rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, input_bias, eps, dropout_p, seed):
        y, s, mean, rstd = _C.layer_norm_fwd(x, weight, bias, eps, residual, input_bias, dropout_p, seed, True)
        ctx.save_for_backward(s, mean, rstd, weight)
        ctx.cfg = (dropout_p, seed, residual is not None, input_bias is not None, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        s, mean, rstd, weight = ctx.saved_tensors
        dropout_p, seed, has_res, has_ib, pdtype = ctx.cfg
        ds, dx, dw, db, dib = _C.layer_norm_bwd(dy.contiguous(), s, mean, rstd, weight, dropout_p, seed)
        return (dx, dw.to(weight.dtype), db.to(pdtype), ds if has_res else None,
                dib.to(pdtype) if has_ib else None, None, None, None)


@register("layer_norm", "native")
def layer_norm(x, weight, bias, eps, residual, *, input_bias=None, dropout_p=0.0):
    if not _native(x) or (residual is not None and residual.dtype != x.dtype):
        return reference.layer_norm(x, weight, bias, eps, residual, input_bias=input_bias, dropout_p=dropout_p,
                                    training=True)
    seed = _seed() if dropout_p > 0.0 else 0
    if _needs_grad(x, weight, bias, residual, input_bias):
        return _LayerNorm.apply(x, weight, bias, residual, input_bias, float(eps), dropout_p, seed)
    return _C.layer_norm_fwd(x, weight, bias, float(eps), residual, input_bias, dropout_p, seed, False)[0]


# ------------------------------------------------------------------------------------------------------- gelu
class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, tanh):
        ctx.save_for_backward(x, bias)
        ctx.tanh = tanh
        return _C.bias_gelu_fwd(x, bias, tanh)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = _C.bias_gelu_bwd(dy.contiguous(), x, bias, ctx.tanh)
        return dx, db.to(bias.dtype), None


@register("bias_gelu", "native")
def bias_gelu(x, bias, *, approximate="none"):
    if not _native(x):
        return reference.bias_gelu(x, bias, approximate)
    tanh = approximate == "tanh"
    if _needs_grad(x, bias):
        return _BiasGelu.apply(x, bias, tanh)
    return _C.bias_gelu_fwd(x, bias, tanh)


# ----------------------------------------------------------------------------------- GEMM + epilogue blocks
# The bias stays inside the GEMM (addmm), as in transformers and the torch backend: the same fp32 rounding, so six
# layers of real weights stay within 1e-5 of transformers (a bias added after the GEMM drifts to ~1.5e-5).
_ZEROS: dict = {}


def _zeros(n: int, dtype) -> torch.Tensor:
    key = (n, dtype)
    if key not in _ZEROS:  # a normal tensor even when first made under inference_mode (a teacher's forward)
        with torch.inference_mode(False):
            _ZEROS[key] = torch.zeros(n, dtype=dtype)
    return _ZEROS[key]


@register("linear_gelu", "native")
def linear_gelu(x, weight, bias, *, approximate="none"):
    h = F.linear(x, weight, bias)  # (..., N)
    return bias_gelu(h, _zeros(h.shape[-1], h.dtype), approximate=approximate)


@register("linear_layer_norm", "native")
def linear_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps=1e-12, *, dropout_p=0.0):
    return layer_norm(F.linear(x, weight, bias), ln_weight, ln_bias, eps, residual, dropout_p=dropout_p)


# -------------------------------------------------------------------------------------------------- embeddings
class _EmbedLayerNorm(torch.autograd.Function):
    """C++ forward; the backward recomputes the reference on the same rows (autograd of gather + LN)."""

    @staticmethod
    def forward(ctx, ids, tt, pos, word, posw, typew, ln_w, ln_b, eps):
        ctx.save_for_backward(ids, tt, pos, word, posw, typew, ln_w, ln_b)
        ctx.eps = eps
        return _C.embed_layer_norm_fwd(ids, tt, pos, word, posw, typew, ln_w, ln_b, eps)

    @staticmethod
    def backward(ctx, dy):
        ids, tt, pos, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(need) for p, need in zip(params, ctx.needs_input_grad[3:8])]
            y = reference.embed_layer_norm(ids, tt, pos, *leaves, ctx.eps)
            wanted = [p for p in leaves if p.requires_grad]
            got = iter(torch.autograd.grad(y, wanted, dy)) if wanted else iter(())
        return (None, None, None, *[next(got) if p.requires_grad else None for p in leaves], None)


@register("embed_layer_norm", "native")
def embed_layer_norm(ids, tt, pos, word, posw, typew, ln_w, ln_b, eps):
    if not _native(word, posw, typew):
        return reference.embed_layer_norm(ids, tt, pos, word, posw, typew, ln_w, ln_b, eps)
    if _needs_grad(word, posw, typew, ln_w, ln_b):
        return _EmbedLayerNorm.apply(ids, tt, pos, word, posw, typew, ln_w, ln_b, float(eps))
    return _C.embed_layer_norm_fwd(ids, tt, pos, word, posw, typew, ln_w, ln_b, float(eps))


# ------------------------------------------------------------------------------------------ whole layer (inference)
def _layer_ok(w, x) -> bool:
    """Whether the C++ layer can take LayerWeights w and x: one native dtype, every tensor contiguous."""
    ts = w.tensors()
    return (x.dtype in _NATIVE_DTYPES and x.is_contiguous() and x.device.type == "cpu"
            and all(t.dtype == x.dtype and t.is_contiguous() for t in ts))


_ONEDNN: dict = {}


def _onednn_runs(dtype) -> bool:
    """Whether oneDNN's prepacked matmul (reorder + linear, plain and with the GELU post-op) runs in `dtype` here,
    tried once per dtype on an 8 x 8 weight before any real layer chooses it: a CPU, an ONEDNN_MAX_CPU_ISA cap or a
    torch build that refuses it then sends every layer to the BLAS route instead of raising from inside oneDNN."""
    if dtype not in _ONEDNN:
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
        _ONEDNN[dtype] = ok
    return _ONEDNN[dtype]


def _onednn_bf16() -> bool:
    """Whether oneDNN can reorder (prepack) bfloat16 weights on this CPU: it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    (an AVX2-only CPU such as AMD Zen 3 has neither and raises "mkldnn_reorder_linear_weight: bf16 path needs the cpu
    support ..."). torch's own predicate (it honours ONEDNN_MAX_CPU_ISA), then the probe of _onednn_runs.
    One module-level function so tests can patch it."""
    if "bf16" not in _ONEDNN:
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        _ONEDNN["bf16"] = bool(probe is not None and torch.backends.mkldnn.is_available() and probe()
                               and _onednn_runs(torch.bfloat16))
    return _ONEDNN["bf16"]


def native_bf16() -> bool:
    """Whether bfloat16 GEMMs run on native bf16 dot products on this CPU (avx512_bf16, AMX-BF16 or AVX-NE-CONVERT,
    with oneDNN allowed to use them). Elsewhere a bfloat16 model still runs: bf16 storage, fp32 compute (the C++
    kernels always compute in fp32; the GEMMs go to ATen, which converts)."""
    f = _C.cpu_features()
    return any(f.get(k, False) for k in ("avx512_bf16", "amx_bf16", "avx_ne_convert")) and _onednn_bf16()


def _note_bf16() -> None:
    """Once per process: a bfloat16 model on a CPU without native bf16 dot products is storage-only bf16."""
    if "noted" not in _ONEDNN:
        _ONEDNN["noted"] = True
        if not native_bf16():
            import warnings
            warnings.warn("fastdistil: this CPU has no native bf16 dot products (avx512_bf16, AMX or AVX-NE-CONVERT; "
                          "`fastdistil info` lists the features seen): bfloat16 runs as a storage format with fp32 "
                          f"compute ({_C.isa()} C++ kernels, GEMMs on ATen), usually no faster than float32 here",
                          RuntimeWarning, stacklevel=3)


def _use_onednn(ws) -> bool:
    """GEMMs of inference layers on oneDNN's prepacked matmul unless FASTDISTIL_NATIVE_GEMM=blas (ATen's addmm:
    MKL sgemm in fp32) or this torch has no oneDNN. Measured on the 2-core AMD EPYC (AVX-512) of this project:
    oneDNN's fp32 GEMMs are 2.2x (32 x 128 batch) to 2.6x (batch 1) faster than MKL's, at the same accuracy
    against transformers (both ~1e-5: fp32 sums in a different order). Also the BLAS route: any dtype oneDNN
    refuses here (checked before choosing it, see _onednn_runs and _onednn_bf16), and inference-tensor weights
    (see _packed)."""
    choice = os.environ.get("FASTDISTIL_NATIVE_GEMM", "onednn").lower()
    if choice not in ("onednn", "blas"):
        raise ValueError(f"FASTDISTIL_NATIVE_GEMM must be 'onednn' or 'blas', got {choice!r}")
    if ws[0].dtype == torch.bfloat16:
        _note_bf16()
    if choice == "blas" or any(ws[i].is_inference() for i in (0, 2, 6, 8)):
        return False
    return _onednn_bf16() if ws[0].dtype == torch.bfloat16 else _onednn_runs(ws[0].dtype)


def _packed(w):
    """oneDNN-reordered copies of the four GEMM weights, held in fastdistil/weight_cache.py (not on the model: packed
    tensors have no storage to save) and rebuilt when any of the four is another tensor or was updated in place
    (version counter; the fused QKV is replaced, never updated, when q, k or v change). Never for inference
    tensors, which inference_mode updates in place without a version bump: _use_onednn sends those to the BLAS
    route, which reads the weights as they are on every call."""
    reorder = torch.ops.mkldnn._reorder_linear_weight
    return derived("onednn", (w.w_qkv, w.w_o, w.w_in, w.w_out), lambda src: [reorder(t.detach(), 32) for t in src])


def _prepacked(ws, x):
    """Per layer, the oneDNN-prepacked weights when every layer's GEMMs go to oneDNN (see _use_onednn), else None
    (the C++ layers then run their GEMMs on ATen's addmm)."""
    if x.shape[0] == 0 or not all(_use_onednn(w.tensors()) for w in ws):
        return None
    return [_packed(w) for w in ws]


@register("encoder_layer", "native")
def encoder_layer(w, x, p):
    """One inference layer (LayerWeights w, packed x (T, d), Packing p) in one C++ call (eval mode, no autograd,
    no taps: the caller checks that); the torch op sequence where the C++ layer cannot take it."""
    if not _layer_ok(w, x):
        return layer_ops(w, x, p)
    pk = _prepacked((w,), x)
    return _C.encoder_layer(x, w, p.cu_seqlens, p.max_seqlen, None if pk is None else pk[0])


@register("encoder", "native")
def encoder(ws, x, p):
    """Every inference layer (a list of LayerWeights) on packed x (T, d) in one C++ call: per-layer Python, argument
    checks and workspace setup happen once per forward instead of once per layer (the batch-1 latency)."""
    if not all(_layer_ok(w, x) for w in ws):
        for w in ws:
            x = encoder_layer(w, x, p)
        return x
    return _C.encoder(x, ws, p.cu_seqlens, p.max_seqlen, _prepacked(ws, x))


__all__ = ["varlen_attention", "attention", "layer_norm", "bias_gelu", "linear_gelu", "linear_layer_norm",
           "embed_layer_norm", "encoder_layer", "encoder"]
