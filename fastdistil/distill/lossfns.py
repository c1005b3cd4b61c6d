"""The loss functions the objectives call, in one place: each routes to `fastdistil.losses` (fused kernels
where they exist). Conventions: every function returns a scalar; the first tensor argument is the student's (it
carries the gradient), the second the teacher's (a constant target); inputs are raw logits / states, never
probabilities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _losses():
    try:
        from .. import losses
    except ModuleNotFoundError:  # TEMPORARY until fastdistil.losses lands
        return None
    return losses


def logit_kd(student_logits, teacher_logits, temperature: float):
    """T^2 * mean_rows KL(softmax(t/T) || softmax(s/T)). Logits (N, C) of both; returns a scalar."""
    lo = getattr(_losses(), "logit_kd", None)
    if lo is not None:
        return lo(student_logits, teacher_logits, temperature=temperature)
    t = temperature
    ls = F.log_softmax(student_logits.float() / t, -1)
    lt = F.log_softmax(teacher_logits.float() / t, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * t * t


def logit_mse(student_logits, teacher_logits):
    """mean over all elements of (s - t)^2."""
    lo = getattr(_losses(), "logit_mse", None)
    if lo is not None:
        return lo(student_logits, teacher_logits)
    return F.mse_loss(student_logits.float(), teacher_logits.float())


def hidden_mse(student_hidden, teacher_hidden, proj):
    """mean over rows and teacher dims of (proj(h_s) - h_t)^2; rows are the (T or B) real tokens given."""
    return F.mse_loss(proj(student_hidden).float(), teacher_hidden.float())


def cosine(student, teacher):
    """mean over rows of 1 - cos(student_row, teacher_row)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


pooled_cosine = cosine


def pooled_mse(student, teacher):
    """mean over batch and dims of (e_s - e_t)^2."""
    return F.mse_loss(student.float(), teacher.float())


def _pad_heads(x, cu_seqlens, max_seqlen, heads):  # (T, H, D) -> (B, A, L, H*D/A), key mask (B, L)
    from ..reference import seq_ids
    T, H, D = x.shape
    B = cu_seqlens.shape[0] - 1
    seq, pos = seq_ids(cu_seqlens, T)
    flat = x.reshape(T, H * D)
    out = flat.new_zeros(B, max_seqlen, H * D)
    out[seq, pos] = flat
    mask = torch.zeros(B, max_seqlen, dtype=torch.bool, device=x.device)
    mask[seq, pos] = True
    A = heads
    return out.view(B, max_seqlen, A, H * D // A).transpose(1, 2), mask


def _relation_logp(x, y, cu, L, A):
    xs, mask = _pad_heads(x.float(), cu, L, A)
    ys, _ = _pad_heads(y.float(), cu, L, A)
    s = xs @ ys.transpose(-1, -2) / math.sqrt(xs.shape[-1])  # (B, A, L, L)
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.log_softmax(s, -1), mask


def relation_kl(sx, sy, tx, ty, cu_seqlens, max_seqlen: int, relation_heads: int | None):
    """mean over relation heads and real rows of KL(softmax(t_x t_y^T / sqrt(d_t)) || softmax(s_x s_y^T /
    sqrt(d_s))), each model's concatenated heads split into `relation_heads` (None: each model's own heads)."""
    A_s = relation_heads or sx.shape[1]
    A_t = relation_heads or tx.shape[1]
    if A_s != A_t:
        raise ValueError(f"relation heads differ: student {A_s}, teacher {A_t}")
    for n, x in (("student", sx), ("teacher", tx)):
        if (x.shape[1] * x.shape[2]) % A_s:
            raise ValueError(f"{n} width {x.shape[1] * x.shape[2]} does not split into {A_s} relation heads")
    lo = getattr(_losses(), "relation_kl", None)
    if lo is not None:
        return lo(sx, sy, tx, ty, cu_seqlens, max_seqlen, num_relation_heads=A_s)
    ls, mask = _relation_logp(sx, sy, cu_seqlens, max_seqlen, A_s)
    lt, _ = _relation_logp(tx, ty, cu_seqlens, max_seqlen, A_s)
    kl = (lt.exp() * (lt - ls)).masked_fill(~mask[:, None, None, :], 0).sum(-1)  # (B, A, L)
    kl = kl * mask[:, None, :]
    return kl.sum() / (mask.sum() * A_s)


def attention_kl(sq, sk, tq, tk, cu_seqlens, max_seqlen: int):
    """MiniLM v1 attention KL: relation_kl on (q, k) with each model's own heads; the softmax scale is
    1/sqrt(head_dim) as in the attention itself."""
    return relation_kl(sq, sk, tq, tk, cu_seqlens, max_seqlen, None)
