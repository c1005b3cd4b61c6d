"""Relation KL op: per-query-row KL(softmax(a_t b_t^T c_t) || softmax(a_s b_s^T c_s)) over relation heads.

One op serves MiniLM's attention-distribution KL (a = q, b = k) and the self-relations of MiniLM v1 (value
relation, a = b = v) and MiniLMv2 (Q-Q, K-K, V-V). Relation heads split the concatenated head dimensions of each
side, so teacher and student may differ in head count and head dim. Three implementations behind the backend seam:
torch materialises the (B, R, L, L) relations (fastdistil.reference.relation_kl_rows, the float64 truth); triton
(kernels/relation.py) streams keys flash-style, never writes an L x L matrix and recomputes in the backward,
registered with torch.library (custom_op + register_fake + register_autograd); native (CPU) runs one sequence at a
time at its true length with batched GEMMs, saving only the logsumexps and recomputing in the backward (at 32 x 128
tokens, 12 relation heads: 18 MiB peak against the reference's 240 MiB, tests/test_losses.py). The teacher is a
constant target: it is detached everywhere.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .checks import check_cu_seqlens, check_float, check_same
from . import amp
from .dispatch import kernel_module, lookup, register
from .eager import fast


def _heads(x, lead: int, r: int, name: str):
    """(*lead dims, ...) -> (*lead, R, width / R) view (copy only if the trailing dims cannot be merged)."""
    shape = tuple(x.shape[:lead])
    width = math.prod(x.shape[lead:])
    if width % r:
        raise ValueError(f"{name}: width {width} (product of {tuple(x.shape[lead:])}) is not divisible by "
                         f"num_relation_heads={r}")
    y = x.reshape(*shape, r, width // r)
    return y if y.stride(-1) == 1 else y.contiguous()


def relation_kl_rows(a_s, b_s, a_t, b_t, *, num_relation_heads: int, cu_seqlens=None, max_seqlen=None,
                     attention_mask=None, scale_s=None, scale_t=None):
    """Per-row relation KL, KL(R_t || R_s) for each relation head and query token, without reduction.

    With the concatenated head dims of each input split into R = num_relation_heads relation heads of width d
    (d_s for the student, d_t for the teacher), for relation head r and query token i of a sequence:
        R_s[r, i, :] = softmax_j(a_s[i, r] . b_s[j, r] * scale_s),   R_t likewise with the teacher's tensors,
        out[r, i] = sum_j R_t[r, i, j] * (log R_t[r, i, j] - log R_s[r, i, j])
    over the real tokens j of the same sequence.

    Args:
        a_s, b_s: student tensors; gradients flow to them. Packed (T, H, D) or (T, H*D) when cu_seqlens is given,
            else padded (B, L, H, D) or (B, L, H*D) in token-major layout (for transformers' (B, H, L, D) pass
            x.transpose(1, 2)). Any strides (q/k/v views of a fused QKV output work without a copy).
            Attention KL: a = q, b = k. Self-relation (value relation, MiniLMv2 Q-Q/K-K/V-V): a = b = x.
        a_t, b_t: teacher tensors, same layout and device; their width may differ from the student's. Treated
            as a constant target (detached; inference-mode tensors are accepted) and cast to the student's dtype
            when they differ (an fp16 teacher under a bf16 autocast student, for example).
        num_relation_heads: R; must divide both sides' widths (R = H gives the per-head attention KL).
        cu_seqlens: (B+1,) int32/int64 prefix sums of sequence lengths, for packed inputs.
        max_seqlen: the longest sequence length (a Python int), required with cu_seqlens.
        attention_mask: optional (B, L) for padded inputs, nonzero = real token (keys and queries), any pattern.
        scale_s, scale_t: multipliers of the relation logits; default 1/sqrt(d_s) and 1/sqrt(d_t), the
            scaled-dot-product of MiniLM v1/v2.
    Returns:
        (R, N) float32 (float64 for float64 inputs): N = T for packed inputs, B*L for padded ones (0 at
        padded query rows).
    """
    r = int(num_relation_heads)
    if r < 1:
        raise ValueError(f"num_relation_heads must be >= 1, got {num_relation_heads}")
    for n, t in (("a_s", a_s), ("b_s", b_s), ("a_t", a_t), ("b_t", b_t)):
        check_float(n, t)
    check_same("a_s, b_s", a_s, b_s)
    check_same("a_t, b_t", a_t, b_t)
    if a_t.device != a_s.device:
        raise ValueError(f"the student's tensors are on {a_s.device} but the teacher's on {a_t.device}")
    packed = cu_seqlens is not None
    lead = 1 if packed else 2
    for n, t in (("a_s", a_s), ("b_s", b_s), ("a_t", a_t), ("b_t", b_t)):
        if t.dim() < lead + 1 or tuple(t.shape[:lead]) != tuple(a_s.shape[:lead]):
            want = "(T, ...)" if packed else "(B, L, ...)"
            raise ValueError(f"{n} has shape {tuple(t.shape)}; expected {want} with the leading dims of a_s "
                             f"{tuple(a_s.shape[:lead])}")
    if math.prod(a_s.shape[lead:]) != math.prod(b_s.shape[lead:]):
        raise ValueError(f"a_s and b_s widths differ: {tuple(a_s.shape)} vs {tuple(b_s.shape)}")
    if math.prod(a_t.shape[lead:]) != math.prod(b_t.shape[lead:]):
        raise ValueError(f"a_t and b_t widths differ: {tuple(a_t.shape)} vs {tuple(b_t.shape)}")
    if packed:
        if attention_mask is not None:
            raise ValueError("pass either cu_seqlens (packed inputs) or attention_mask (padded inputs), not both")
        if max_seqlen is None:
            raise ValueError("max_seqlen is required with cu_seqlens")
        max_seqlen = check_cu_seqlens(cu_seqlens, a_s.shape[0], max_seqlen, a_s.device)  # values: CPU only
    elif attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(a_s.shape[:2]):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{tuple(a_s.shape[:2])}")
        if attention_mask.device != a_s.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the inputs are on {a_s.device}")
    xs = [_heads(x, lead, r, n) for n, x in (("a_s", a_s), ("b_s", b_s))]
    xt = [_heads(x.detach().to(a_s.dtype), lead, r, n) for n, x in (("a_t", a_t), ("b_t", b_t))]
    c_s = 1.0 / math.sqrt(xs[0].shape[-1]) if scale_s is None else float(scale_s)
    c_t = 1.0 / math.sqrt(xt[0].shape[-1]) if scale_t is None else float(scale_t)
    with amp.region(a_s.device):  # autocast off inside: fp32 statistics on every backend (ops/amp.py)
        return lookup("relation_kl", a_s.device)(xs[0], xs[1], xt[0], xt[1], c_s, c_t, cu_seqlens,
                                                 None if max_seqlen is None else int(max_seqlen), attention_mask)


@register("relation_kl", "torch")
def _relation_torch(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask):
    return reference.relation_kl_rows(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask)


# ------------------------------------------------------------------------------------------------ triton
@torch.library.custom_op("fastdistil::relation_kl_fwd", mutates_args=())
def _rel_fwd_op(a_s: Tensor, b_s: Tensor, a_t: Tensor, b_t: Tensor, scale_s: float, scale_t: float,
                cu_seqlens: Optional[Tensor], max_seqlen: int, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(kl, lse_t, lse_s), each (R, N) fp32; inputs (T, R, D) with cu_seqlens or (B, L, R, D)."""
    K = kernel_module("relation")
    return K.relation_forward(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask)


def _rows(a_s):
    return (a_s.shape[-2], a_s.shape[0]) if a_s.dim() == 3 else (a_s.shape[-2], a_s.shape[0] * a_s.shape[1])


@_rel_fwd_op.register_fake
def _(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask):
    return tuple(a_s.new_empty(_rows(a_s), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastdistil::relation_kl_bwd", mutates_args=())
def _rel_bwd_op(grad: Tensor, a_s: Tensor, b_s: Tensor, a_t: Tensor, b_t: Tensor, lse_t: Tensor, lse_s: Tensor,
                scale_s: float, scale_t: float, cu_seqlens: Optional[Tensor], max_seqlen: int,
                mask: Optional[Tensor], need_a: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    """(d_a_s, d_b_s) in the student's dtype; a gradient not asked for is an empty tensor."""
    K = kernel_module("relation")
    da, db = K.relation_backward(grad, a_s, b_s, a_t, b_t, lse_t, lse_s, scale_s, scale_t, cu_seqlens, max_seqlen,
                                 mask, need_a, need_b)
    return (da if need_a else a_s.new_empty(0)), (db if need_b else b_s.new_empty(0))


@_rel_bwd_op.register_fake
def _(grad, a_s, b_s, a_t, b_t, lse_t, lse_s, scale_s, scale_t, cu_seqlens, max_seqlen, mask, need_a, need_b):
    return (torch.empty(a_s.shape, dtype=a_s.dtype, device=a_s.device) if need_a else a_s.new_empty(0),
            torch.empty(b_s.shape, dtype=b_s.dtype, device=b_s.device) if need_b else b_s.new_empty(0))


def _rel_setup(ctx, inputs, output):
    a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask = inputs
    _, lse_t, lse_s = output
    ctx.args = (scale_s, scale_t, max_seqlen)
    # Teacher tensors from torch.inference_mode() cannot go through save_for_backward; they never need a
    # gradient (nor a version check), so they are kept as plain attributes instead of being copied.
    inf = a_t.is_inference() or b_t.is_inference()
    ctx.teacher = (a_t, b_t) if inf else None
    ctx.save_for_backward(a_s, b_s, None if inf else a_t, None if inf else b_t, lse_t, lse_s, cu_seqlens, mask)


def _rel_backward(ctx, grad, _g_lse_t, _g_lse_s):
    a_s, b_s, a_t, b_t, lse_t, lse_s, cu_seqlens, mask = ctx.saved_tensors
    if ctx.teacher is not None:
        a_t, b_t = ctx.teacher
    scale_s, scale_t, max_seqlen = ctx.args
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return (None,) * 9
    da, db = _rel_bwd(grad, a_s, b_s, a_t, b_t, lse_t, lse_s, scale_s, scale_t, cu_seqlens, max_seqlen, mask,
                         need_a, need_b)
    return (da if need_a else None), (db if need_b else None), None, None, None, None, None, None, None


_rel_fwd_op.register_autograd(_rel_backward, setup_context=_rel_setup)
_rel_fwd = fast(_rel_fwd_op, _rel_setup, _rel_backward)  # eager fast path (ops/eager.py)
_rel_bwd = fast(_rel_bwd_op)


@register("relation_kl", "triton")
def _relation_triton(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask):
    if a_s.dtype == torch.float64:  # the kernels compute in fp32: float64 stays exact on the reference
        return _relation_torch(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask)
    if torch.compiler.is_compiling():  # dynamo traces import statements, not importlib (kernel_module)
        from ..kernels.relation import MAX_HEAD_DIM
    else:  # eagerly: the cached module, no import statement per call
        MAX_HEAD_DIM = kernel_module("relation").MAX_HEAD_DIM  # noqa: N806
    if a_s.shape[-1] > MAX_HEAD_DIM or a_t.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the fused relation kernel supports relation-head widths up to {MAX_HEAD_DIM}, got "
                         f"student {a_s.shape[-1]}, teacher {a_t.shape[-1]}: use more relation heads (or the torch "
                         "backend)")
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32)
    m = None if mask is None else (mask != 0).to(torch.int8).contiguous()
    L = int(max_seqlen) if cu is not None else a_s.shape[1]
    return _rel_fwd(a_s, b_s, a_t, b_t, scale_s, scale_t, cu, L, m)[0]


# ------------------------------------------------------------------------------------------------ native (CPU)
# The CPU backend: the kernel's maths with torch batched GEMMs, one sequence at a time at its true length (packed:
# no padding work), saving only the (R, N) logsumexps and recomputing the relations in the backward. At most one
# sequence's (R, L, L) relations exist at any moment; the reference keeps several (B, R, L, L) tensors alive.
def _segments(a_s, cu_seqlens, mask):
    """[(rows of one sequence in the flattened N order: a slice or an index tensor), ...]."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()  # CPU tensors: no device sync
        return [slice(cu[b], cu[b + 1]) for b in range(len(cu) - 1) if cu[b + 1] > cu[b]]
    B, L = a_s.shape[:2]
    if mask is None:
        return [slice(b * L, (b + 1) * L) for b in range(B)]
    flat = mask.reshape(-1).to(torch.bool)
    out = []
    for b in range(B):
        idx = flat[b * L:(b + 1) * L].nonzero().flatten()
        if idx.numel():
            out.append(idx + b * L)
    return out


def _flat(x):
    """(T, R, D) or (B, L, R, D) -> (N, R, D) (a view when possible)."""
    return x if x.dim() == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])


def _relations(a, b, scale, c):
    """(L, R, D) x (L, R, D) -> (R, L, L) relation logits in dtype c."""
    a, b = a.to(c).transpose(0, 1), b.to(c).transpose(0, 1)  # (R, L, D)
    return torch.bmm(a, b.transpose(1, 2)) * scale


class _RelationBySequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, mask):
        segs = _segments(a_s, cu_seqlens, mask)
        fa_s, fb_s, fa_t, fb_t = (_flat(x) for x in (a_s, b_s, a_t, b_t))
        n, r = fa_s.shape[0], fa_s.shape[1]
        c = torch.promote_types(a_s.dtype, torch.float32)
        kl = a_s.new_zeros((r, n), dtype=c)
        lse_t, lse_s = torch.zeros_like(kl), torch.zeros_like(kl)
        for rows in segs:
            s_t = _relations(fa_t[rows], fb_t[rows], scale_t, c)  # (R, L, L)
            s_s = _relations(fa_s[rows], fb_s[rows], scale_s, c)
            lt, ls = torch.logsumexp(s_t, -1), torch.logsumexp(s_s, -1)  # (R, L)
            kl[:, rows] = (torch.exp(s_t - lt[..., None]) * (s_t - s_s)).sum(-1) - lt + ls
            lse_t[:, rows], lse_s[:, rows] = lt, ls
        ctx.segs, ctx.scales = segs, (scale_s, scale_t)
        inf = a_t.is_inference() or b_t.is_inference()  # see _rel_setup
        ctx.teacher = (a_t, b_t) if inf else None
        ctx.save_for_backward(a_s, b_s, None if inf else a_t, None if inf else b_t, lse_t, lse_s)
        return kl

    @staticmethod
    def backward(ctx, grad):
        a_s, b_s, a_t, b_t, lse_t, lse_s = ctx.saved_tensors
        if ctx.teacher is not None:
            a_t, b_t = ctx.teacher
        scale_s, scale_t = ctx.scales
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fa_s, fb_s, fa_t, fb_t = (_flat(x) for x in (a_s, b_s, a_t, b_t))
        c = lse_t.dtype
        g = grad.to(c) * scale_s
        da = fa_s.new_zeros(fa_s.shape, dtype=c) if need_a else None
        db = fb_s.new_zeros(fb_s.shape, dtype=c) if need_b else None
        for rows in ctx.segs:
            s_t = _relations(fa_t[rows], fb_t[rows], scale_t, c)
            s_s = _relations(fa_s[rows], fb_s[rows], scale_s, c)
            dsc = g[:, rows, None] * (torch.exp(s_s - lse_s[:, rows, None]) - torch.exp(s_t - lse_t[:, rows, None]))
            if need_a:  # dA = dS B: (R, L, L) x (R, L, D) -> (L, R, D)
                da[rows] = torch.bmm(dsc, fb_s[rows].to(c).transpose(0, 1)).transpose(0, 1)
            if need_b:  # dB = dS^T A
                db[rows] = torch.bmm(dsc.transpose(1, 2), fa_s[rows].to(c).transpose(0, 1)).transpose(0, 1)
        da = None if da is None else da.to(a_s.dtype).reshape(a_s.shape)
        db = None if db is None else db.to(b_s.dtype).reshape(b_s.shape)
        return da, db, None, None, None, None, None, None


def _relation_native_cpu(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask):
    return _RelationBySequence.apply(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, mask)


@register("relation_kl", "native")
def _relation_native(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask):
    if a_s.device.type != "cpu":
        return _relation_torch(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask)
    return _relation_native_cpu(a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask)
