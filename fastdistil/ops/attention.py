"""Attention ops: padded (B, H, L, D) and variable-length packed (T, H, D).

The torch implementation is the reference module's; the triton implementation (kernels/attention.py) registers
here. Dropout is applied whenever dropout_p > 0 (callers pass 0 in eval mode, as with
torch.nn.functional.scaled_dot_product_attention).
"""
from __future__ import annotations

import torch

from .. import reference
from .checks import check_float, check_same, check_shape
from .dispatch import lookup, register


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
        max_seqlen: the longest length, a Python int (used for grid sizes; computed once per batch).
        dropout_p, softmax_scale: as in :func:`attention`.
    Returns:
        (T, H, D).
    """
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_float(n, t)
    check_same("q, k, v", q, k, v)
    check_shape("q", q, (None, None, None))
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    check_shape("cu_seqlens", cu_seqlens, (None,))
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
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
