"""Attention ops: padded (B, H, L, D) and variable-length packed (T, H, D).

The torch implementation is the reference module's; the triton implementation (kernels/attention.py) registers
here. Dropout is applied whenever dropout_p > 0 (callers pass 0 in eval mode, as with
torch.nn.functional.scaled_dot_product_attention).
"""
from __future__ import annotations

import torch

from .. import reference
from . import amp
from .checks import check_cu_seqlens, check_float, check_same, check_shape
from .dispatch import kernel_module, lookup, register
from .eager import fast


def attention(q, k, v, attention_mask=None, *, dropout_p: float = 0.0, softmax_scale=None):
    """Scaled dot-product attention over a key padding mask.

    Args:
        q, k, v: (B, H, L, D) tensors of one floating dtype and device.
        attention_mask: optional (B, L); 1 = real token, 0 = padding (transformers' convention).
        dropout_p: dropout probability on the attention probabilities.
        softmax_scale: multiplies q k^T; defaults to 1/sqrt(D).
    Returns:
        (B, H, L, D); a query row with no real key is zeros.
    """
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_float(n, t)
    dt = amp.autocast_dtype(q.device)
    if dt is not None:  # autocast: q, k, v in its dtype (as scaled_dot_product_attention), the op without it
        with amp.disabled(q.device):
            return attention(*amp.cast(dt, q, k, v), attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)
    check_same("q, k, v", q, k, v)
    check_shape("q", q, (None, None, None, None))
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    if attention_mask is not None:
        check_shape("attention_mask", attention_mask, (q.shape[0], q.shape[2]))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return lookup("attention", q.device)(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, dropout_p: float = 0.0, softmax_scale=None):
    """Attention over packed variable-length sequences (no padding anywhere).

    Args:
        q, k, v: (T, H, D) real tokens of B sequences laid end to end.
        cu_seqlens: (B+1,) int32 or int64 prefix sums of the lengths; cu_seqlens[0] = 0, cu_seqlens[-1] = T.
        max_seqlen: the longest length, a Python int (used for grid sizes; computed once per batch); an upper
            bound <= T is allowed. Both are checked (ValueError) for CPU tensors; on CUDA they are trusted, as
            checking would cost a host sync per call.
        dropout_p, softmax_scale: as in :func:`attention`.
    Returns:
        (T, H, D).
    """
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_float(n, t)
    dt = amp.autocast_dtype(q.device)
    if dt is not None:  # autocast: q, k, v in its dtype (as scaled_dot_product_attention), the op without it
        with amp.disabled(q.device):
            return varlen_attention(*amp.cast(dt, q, k, v), cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                    softmax_scale=softmax_scale)
    check_same("q, k, v", q, k, v)
    check_shape("q", q, (None, None, None))
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    max_seqlen = check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q.device)  # values: CPU tensors only
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return lookup("varlen_attention", q.device)(q, k, v, cu_seqlens, int(max_seqlen), dropout_p=dropout_p,
                                                softmax_scale=softmax_scale)


@register("attention", "torch")
def _attention_torch(q, k, v, attention_mask, *, dropout_p, softmax_scale):
    return reference.attention(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)


@register("varlen_attention", "torch")
def _varlen_torch(q, k, v, cu_seqlens, max_seqlen, *, dropout_p, softmax_scale):
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                      softmax_scale=softmax_scale)


# ------------------------------------------------------------------------------------------------ triton
# Registered through torch.library (custom_op + register_fake + register_autograd) so that torch.compile traces it
# with fullgraph=True, on CUDA and in interpreter mode on CPU (where triton_op/wrap_triton would hand fake tensors
# to the interpreter). One pair of ops serves both layouts: q.dim() == 4 is the padded form, 3 the varlen form.
# The kernels (kernels/attention.py) are imported on first call, never at import.
import math  # noqa: E402
import warnings  # noqa: E402
from typing import Optional  # noqa: E402

from torch import Tensor  # noqa: E402

from .rng import dropout_seed  # noqa: E402

_TRITON_HEAD_DIMS = (16, 32, 64, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set = set()


# One seed policy for every op (ops/rng.py): drawn on the tensor's device, no host round trip. The old name stays
# for the tests and the GPU harness that import it.
attention_dropout_seed = dropout_seed


def _lse_shape(q: Tensor, cu_seqlens: Optional[Tensor]) -> tuple:
    return tuple(q.shape[:3]) if q.dim() == 4 else (q.shape[1], q.shape[0])


@torch.library.custom_op("fastdistil::attention_fwd", mutates_args=())
def _attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                 seed: Optional[Tensor], max_seqlen: int, dropout_p: float,
                 softmax_scale: float) -> tuple[Tensor, Tensor]:
    """(o, lse): o contiguous in q's shape; lse fp32 (B, H, L) or (H, T), log2 units (see kernels/attention.py)."""
    K = kernel_module("attention")
    return K.attention_fwd(q, k, v, key_mask, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale)


@_attn_fwd_op.register_fake
def _(q, k, v, key_mask, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("fastdistil::attention_bwd", mutates_args=())
def _attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, key_mask: Optional[Tensor],
                 cu_seqlens: Optional[Tensor], seed: Optional[Tensor], max_seqlen: int, dropout_p: float,
                 softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous in q's shape; the dropout mask is regenerated from `seed`."""
    K = kernel_module("attention")
    return K.attention_bwd(do, q, k, v, o, lse, key_mask, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_mask, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, key_mask, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale = inputs
    o, lse = output
    ctx.max_seqlen, ctx.p, ctx.scale = max_seqlen, dropout_p, softmax_scale
    ctx.save_for_backward(q, k, v, o, lse, key_mask, cu_seqlens, seed)


def _attn_backward(ctx, do, _dlse):
    q, k, v, o, lse, key_mask, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, key_mask, cu_seqlens, seed, ctx.max_seqlen, ctx.p, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup)
_attn_fwd = fast(_attn_fwd_op, _attn_setup, _attn_backward)  # eager fast path (ops/eager.py)
_attn_bwd = fast(_attn_bwd_op)


def _triton_supported(q: Tensor) -> bool:
    """fp16/bf16/fp32 with head_dim 16/32/64/128 run the kernels; anything else the torch reference (float64 stays
    exact there; other head dims say so once)."""
    if q.dtype in _TRITON_DTYPES and q.shape[-1] in _TRITON_HEAD_DIMS:
        return True
    if q.dtype != torch.float64 and q.shape[-1] not in _warned:
        _warned.add(q.shape[-1])
        warnings.warn(f"triton attention supports head_dim {_TRITON_HEAD_DIMS}; head_dim {q.shape[-1]} runs the "
                      "torch implementation", stacklevel=3)
    return False


@register("attention", "triton")
def _attention_triton(q, k, v, attention_mask, *, dropout_p, softmax_scale):
    if not _triton_supported(q):
        return _attention_torch(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    key_mask = None if attention_mask is None else (attention_mask != 0).to(torch.int8)  # (B, L)
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    return _attn_fwd(q, k, v, key_mask, None, seed, q.shape[2], float(dropout_p), scale)[0]


@register("varlen_attention", "triton")
def _varlen_triton(q, k, v, cu_seqlens, max_seqlen, *, dropout_p, softmax_scale):
    if not _triton_supported(q):
        return _varlen_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    return _attn_fwd(q, k, v, None, cu_seqlens.to(torch.int32), seed, int(max_seqlen), float(dropout_p),
                        scale)[0]


# ------------------------------------------------------------------------------------------------ native (CPU)
# C++ forward and backward (csrc/, fastdistil._C) for float32/bfloat16 CPU tensors; any other dtype runs the torch
# reference. The padded form goes through the varlen kernel too. Registered only once the extension imports.
from ._common import EXT, _C, key_packing, native_ok, needs_grad  # noqa: E402
from .rng import host_seed  # noqa: E402


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


@register("varlen_attention", "native", needs=EXT)
def _varlen_native(q, k, v, cu_seqlens, max_seqlen, *, dropout_p, softmax_scale):
    if not native_ok(q, k, v):
        return _varlen_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _as_heads(q), _as_heads(k), _as_heads(v)
    seed = host_seed() if dropout_p > 0.0 else 0
    if needs_grad(q, k, v):
        return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, None, 0, scale, dropout_p, seed)
    return _C.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, False)[0]


@register("attention", "native", needs=EXT)
def _attention_native(q, k, v, attention_mask, *, dropout_p, softmax_scale):
    """Padded (B, H, L, D) attention through the varlen kernel: every query position (padding included, as in the
    reference) attends over its row's real keys only, packed once; a row without real keys gives zeros."""
    if not native_ok(q, k, v):
        return _attention_torch(q, k, v, attention_mask, dropout_p=dropout_p, softmax_scale=softmax_scale)
    B, H, L, D = q.shape
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    qt = q.transpose(1, 2).reshape(B * L, H, D)  # (B L, H, D)
    cu_q = torch.arange(0, (B + 1) * L, L, dtype=torch.int32)
    max_q = L if B else 0  # max_seqlen may not exceed the token count
    kt, vt = k.transpose(1, 2).reshape(B * L, H, D), v.transpose(1, 2).reshape(B * L, H, D)
    cu_k, max_k = None, 0
    if attention_mask is not None:
        idx, cu_k, max_k = key_packing(attention_mask.to(q.device))
        kt, vt = kt.index_select(0, idx), vt.index_select(0, idx)  # (Tk, H, D) real keys
    seed = host_seed() if dropout_p > 0.0 else 0
    if needs_grad(q, k, v):
        o = _VarlenAttention.apply(qt, kt, vt, cu_q, max_q, cu_k, max_k, scale, dropout_p, seed)
    else:
        o = _C.varlen_attention_fwd(qt, kt, vt, cu_q, max_q, scale, dropout_p, seed, False, cu_k, max_k)[0]
    return o.view(B, L, H, D).transpose(1, 2)
