"""The ``native`` backend: the C++ kernels of csrc/ (fastdistil._C) behind the op seam, with autograd.

Imported lazily by ops/dispatch.py the first time the native backend is resolved (only once the extension is
known to import). Each op is a thin layer: float32 and bfloat16 CPU tensors go to C++, any other dtype (float16,
float64) to the torch reference, so the op never fails where the reference works.

Gradients: attention, layer_norm and bias_gelu have C++ backward kernels (the maths is in the header comments of
csrc/kernels/*.h); embed_layer_norm's backward recomputes the reference (it runs once per step, on gathered rows).
Dropout masks come from a counter-based hash of a seed drawn from torch's default generator
(``torch.manual_seed`` makes them reproducible) and are regenerated in the backward pass, never stored.

Inference: ``encoder_layer`` runs a whole BERT layer with QKV as one GEMM over the concatenated weight: by default
its GEMMs go to oneDNN's prepacked matmul (weights reordered once per layer and cached, see _packed) and the rest
to the C++ kernels; with FASTDISTIL_NATIVE_GEMM=blas, for bfloat16 on CPUs where oneDNN cannot prepack it, and for
inference-tensor weights the whole layer is one C++ call (csrc/layer.cpp) on ATen's addmm.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .. import _C, reference
from ..padding import gather, unpad
from ..weight_cache import derived_cache
from .dispatch import register

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native(*ts) -> bool:
    """True when every tensor can go to the C++ kernels (float32/bfloat16 on CPU, one dtype)."""
    d = ts[0].dtype
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
def _layer_weights(layer):
    """The 12 tensors of encoder_layer (or None when one has another dtype or is not contiguous) and the two eps.
    Gathered per call (a dozen attribute reads): a cached list kept replaced Parameters alive and in use."""
    w, b = layer.qkv_weight()
    a, o = layer.attention["output"], layer.output
    ws = [w, b, a["dense"].weight, a["dense"].bias, a["LayerNorm"].weight, a["LayerNorm"].bias,
          layer.intermediate["dense"].weight, layer.intermediate["dense"].bias, o["dense"].weight, o["dense"].bias,
          o["LayerNorm"].weight, o["LayerNorm"].bias]
    ok = w.dtype in _NATIVE_DTYPES and all(t.dtype == w.dtype and t.is_contiguous() for t in ws)
    return ws if ok else None, (a["LayerNorm"].eps, o["LayerNorm"].eps)


_ONEDNN: dict = {}


def _onednn_bf16() -> bool:
    """Whether oneDNN can reorder (prepack) bfloat16 weights on this CPU: it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    (an AVX2-only CPU such as AMD Zen 3 has neither and raises "mkldnn_reorder_linear_weight: bf16 path needs the cpu
    support ..."). Asked once, at the first bf16 layer, with torch's own predicate (torch >= 2.0; absent: False).
    One module-level function so tests can patch it."""
    if "bf16" not in _ONEDNN:
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        _ONEDNN["bf16"] = bool(probe is not None and torch.backends.mkldnn.is_available() and probe())
    return _ONEDNN["bf16"]


def _use_onednn(ws) -> bool:
    """GEMMs of inference layers on oneDNN's prepacked matmul unless FASTDISTIL_NATIVE_GEMM=blas (ATen's addmm:
    MKL sgemm in fp32) or this torch has no oneDNN. Measured on the 2-core AMD EPYC (AVX-512) of this project:
    oneDNN's fp32 GEMMs are 2.2x (32 x 128 batch) to 2.6x (batch 1) faster than MKL's, at the same accuracy
    against transformers (both ~1e-5: fp32 sums in a different order). Also the BLAS route: bfloat16 where oneDNN
    cannot prepack it (see _onednn_bf16), and inference-tensor weights (see _packed)."""
    choice = os.environ.get("FASTDISTIL_NATIVE_GEMM", "onednn").lower()
    if choice not in ("onednn", "blas"):
        raise ValueError(f"FASTDISTIL_NATIVE_GEMM must be 'onednn' or 'blas', got {choice!r}")
    if choice == "blas":
        return False
    if "ok" not in _ONEDNN:
        _ONEDNN["ok"] = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                         and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    if not _ONEDNN["ok"] or any(ws[i].is_inference() for i in (0, 2, 6, 8)):
        return False
    return ws[0].dtype != torch.bfloat16 or _onednn_bf16()


def _packed(layer, ws):
    """oneDNN-reordered copies of the four GEMM weights, held in the layer's derived-tensor cache (invisible to
    deepcopy, pickle and state_dict: packed tensors have no storage to save) and rebuilt when any of the four is
    another tensor or was updated in place (version counter). Never for inference tensors, which inference_mode
    updates in place without a version bump (load_state_dict under inference_mode): _use_onednn sends those to
    the BLAS route, which reads the weights as they are on every call."""
    src = [ws[i] for i in (0, 2, 6, 8)]  # the fused QKV is replaced (never updated) when q, k or v change
    key = [(t.data_ptr(), t._version) for t in src]
    cache = derived_cache(layer)
    hit = cache.get("onednn")
    if hit is None or any(a is not b for a, b in zip(hit[0], src)) or hit[1] != key:
        reorder = torch.ops.mkldnn._reorder_linear_weight
        with torch.no_grad():
            hit = cache["onednn"] = (src, key, [reorder(t.detach(), 32) for t in src])
    return hit[2]


def _encoder_layer_onednn(layer, ws, eps1, eps2, x, p):
    """The layer with its GEMMs (bias inside, GELU fused as oneDNN's erf post-op) on oneDNN's prepacked matmul and
    the rest on the C++ kernels: eight calls from Python, against one for the BLAS route (see _use_onednn)."""
    lin = torch.ops.mkldnn._linear_pointwise
    pq, po, p1, p2 = _packed(layer, ws)
    T, d = x.shape
    H = layer.n_head
    qkv = lin(x, pq, ws[1], "none", [], "").view(T, 3, H, d // H)
    q, k, v = qkv.unbind(1)
    ctx = _C.varlen_attention_fwd(q, k, v, p.cu_seqlens, p.max_seqlen, 1.0 / math.sqrt(d // H), 0.0, 0, False)[0]
    x1 = _C.layer_norm_fwd(lin(ctx.view(T, d), po, ws[3], "none", [], ""), ws[4], ws[5], eps1, x, None, 0.0, 0,
                           False)[0]
    h = lin(x1, p1, ws[7], "gelu", [], "tanh" if layer.gelu_approximate == "tanh" else "none")
    return _C.layer_norm_fwd(lin(h, p2, ws[9], "none", [], ""), ws[10], ws[11], eps2, x1, None, 0.0, 0, False)[0]


@register("encoder_layer", "native")
def encoder_layer(layer, x, p):
    """One inference layer in one C++ call (eval mode, no autograd, no taps; the model checks that)."""
    ws, (eps1, eps2) = _layer_weights(layer)
    if ws is None or x.dtype != ws[0].dtype or not x.is_contiguous():
        return layer.forward_ops(x, p)
    if x.shape[0] > 0 and _use_onednn(ws):
        return _encoder_layer_onednn(layer, ws, eps1, eps2, x, p)
    return _C.encoder_layer(x, ws, p.cu_seqlens, p.max_seqlen, layer.n_head, eps1, eps2,
                            layer.gelu_approximate == "tanh")


__all__ = ["varlen_attention", "attention", "layer_norm", "bias_gelu", "linear_gelu", "linear_layer_norm",
           "embed_layer_norm", "encoder_layer"]
