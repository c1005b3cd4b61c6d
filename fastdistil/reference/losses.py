"""Materialised references of the fused distillation losses (kernels/kd.py, kernels/relation.py).

Plain PyTorch, float64-capable, differentiable by autograd; they build the full (N, V) log-softmaxes and the
full (B, R, L, L) relation matrices the kernels avoid. The `torch` backend of the ops and the tests use them.
Statistics are computed in at least float32 (float64 stays float64).
"""
from __future__ import annotations

import torch

from .core import seq_ids

_NEG = -1.0e30  # finite fill for masked relation logits: a fully masked row stays finite (zeroed afterwards)


def kd_kl_rows(student_logits, teacher_logits, temperature: float, row_mask=None):
    """KL(softmax(teacher/T) || softmax(student/T)) per row, in temperature-scaled units (no T^2 factor).

    Args:
        student_logits: (N, V) student LOGITS (not log-probs).
        teacher_logits: (N, V) teacher LOGITS.
        temperature: T > 0.
        row_mask: optional (N,) bool/int, nonzero = real row; other rows give 0.
    Returns:
        (N,) in float32 (float64 for float64 inputs).
    """
    compute = torch.promote_types(student_logits.dtype, torch.float32)
    log_ps = torch.log_softmax(student_logits.to(compute) / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.to(compute) / temperature, dim=-1)
    p_t = log_pt.exp()
    kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0).sum(-1)  # (N,); p_t = 0 terms (t = -inf) are 0
    if row_mask is not None:
        kl = torch.where(row_mask.to(torch.bool), kl, torch.zeros_like(kl))
    return kl


def relation_logits(a, b, scale: float):
    """a b^T * scale per relation head: (B, L, R, D) x (B, L, R, D) -> (B, R, L, L) in at least float32."""
    compute = torch.promote_types(a.dtype, torch.float32)
    return torch.einsum("blrd,bmrd->brlm", a.to(compute), b.to(compute)) * scale


def _padded(x, cu_seqlens, max_seqlen):
    """(T, R, D) packed -> (B, L, R, D) zero-padded, plus the (B, L) mask and the (seq, pos) of each token."""
    T = x.shape[0]
    B = cu_seqlens.shape[0] - 1
    seq, pos = seq_ids(cu_seqlens, T)
    out = x.new_zeros((B, max_seqlen) + tuple(x.shape[1:]))
    out = out.index_put((seq, pos), x)
    return out, seq, pos


def relation_kl_rows(a_s, b_s, a_t, b_t, scale_s: float, scale_t: float, cu_seqlens=None, max_seqlen=None,
                     mask=None):
    """Per-query-row KL(softmax(a_t b_t^T c_t) || softmax(a_s b_s^T c_s)) over real keys, materialised.

    Args:
        a_s, b_s: student (T, R, Ds) packed tokens or (B, L, R, Ds) padded (R relation heads).
        a_t, b_t: teacher (T, R, Dt) or (B, L, R, Dt).
        scale_s, scale_t: multipliers c_s, c_t of the relation logits (usually 1/sqrt(D)).
        cu_seqlens, max_seqlen: packed sequence boundaries (B+1,) and the longest length (packed inputs).
        mask: optional (B, L) real-token mask for padded inputs (nonzero = real), any pattern.
    Returns:
        (R, N) per-row KL, N = T (packed) or B*L (padded, 0 at padded rows), float32 (float64 for float64).
    """
    packed = a_s.dim() == 3
    if packed:
        (a_s, seq, pos), b_s, a_t, b_t = (_padded(a_s, cu_seqlens, max_seqlen),
                                          *(_padded(x, cu_seqlens, max_seqlen)[0] for x in (b_s, a_t, b_t)))
        B, L = a_s.shape[:2]
        mask = torch.zeros(B, L, dtype=torch.bool, device=a_s.device)
        mask[seq, pos] = True
    B, L, R = a_s.shape[:3]
    keep = (torch.ones(B, L, dtype=torch.bool, device=a_s.device) if mask is None else mask.to(torch.bool))
    s_t = relation_logits(a_t, b_t, scale_t)  # (B, R, L, L)
    s_s = relation_logits(a_s, b_s, scale_s)
    key = keep[:, None, None, :]  # (B, 1, 1, L)
    log_pt = torch.log_softmax(s_t.masked_fill(~key, _NEG), dim=-1)
    log_ps = torch.log_softmax(s_s.masked_fill(~key, _NEG), dim=-1)
    terms = torch.where(key, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt))
    kl = terms.sum(-1)  # (B, R, L)
    kl = torch.where(keep[:, None, :], kl, torch.zeros_like(kl))
    kl = kl.permute(1, 0, 2)  # (R, B, L)
    if packed:
        return kl[:, seq, pos]  # (R, T)
    return kl.reshape(R, B * L)
