"""Distillation objectives: logit KD, logit MSE, hidden-state MSE, MiniLM v1/v2 relations, embedding losses.

Conventions shared by every function here:
- Argument order is always (student, teacher). Every docstring says whether inputs are LOGITS, log-probs or
  plain features. The teacher is a constant target: it is detached (no gradient reaches it), tensors made
  under ``torch.inference_mode()`` are accepted without a copy, and a teacher in another floating dtype than the
  student is cast to the student's (fused losses) or both are computed in float32 (the others).
- Rows are what a reduction averages over: a row is one token (token-level losses) or one example. Padding is
  excluded through ``mask`` (padded inputs, nonzero = real) or by passing packed tokens (``cu_seqlens``).
- ``reduction``: ``"mean"`` averages over real rows (and relation heads), ``"sum"`` sums over them, ``"none"``
  returns the per-row values (zeros at padded rows). A batch with no real row gives 0, never NaN.
- ``weight`` multiplies the result; it is 1.0 unless the caller says otherwise (no hidden mixing weights and no
  default temperature: recipes set them explicitly).
- Losses are computed in float32 at least (float64 stays float64), whatever the input dtype.

The two costly objectives run on fused kernels under the triton backend (fastdistil.ops.kd_kl_rows: chunked
softmax-KL over the vocabulary; fastdistil.ops.relation_kl_rows: flash-style relation KL that never writes an
L x L matrix); every other backend runs the materialised references in fastdistil.reference.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

from . import ops

REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------- helpers
def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _target(t: torch.Tensor) -> torch.Tensor:
    """The teacher as a constant (detached). Inference-mode tensors need no copy: every loss below only lets
    autograd save tensors derived from the teacher (log-probs, unit vectors), never the teacher tensor itself,
    and the fused ops keep inference tensors outside save_for_backward."""
    return t.detach()


def _check_mask(mask, lead: tuple, like: torch.Tensor, what: str = "mask"):
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {tuple(lead)} (the rows' leading dims)")
    if mask.device != like.device:
        raise ValueError(f"{what} is on {mask.device} but the inputs are on {like.device}")
    return mask.to(torch.bool)


def _reduce_rows(per_row: torch.Tensor, mask, reduction: str, weight: float) -> torch.Tensor:
    """per_row (...) -> mean / sum over the rows where mask, or the masked per-row tensor, times weight."""
    if mask is not None:
        per_row = torch.where(mask, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row * weight
    total = per_row.sum()
    if reduction == "sum":
        return total * weight
    count = per_row.numel() if mask is None else mask.sum()
    if mask is None:
        return total * (weight / max(count, 1))
    return total * weight / count.clamp(min=1).to(total.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_pair(student, teacher, what: str, same_last: bool = True):
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError(f"{what}: student and teacher must be tensors")
    if student.device != teacher.device:
        raise ValueError(f"{what}: student is on {student.device}, teacher on {teacher.device}")
    want = teacher.shape if same_last else teacher.shape[:-1]
    got = student.shape if same_last else student.shape[:-1]
    if tuple(want) != tuple(got):
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")


def _rows(student, teacher, mask, reduction: str, what: str, same_last: bool = True):
    """The checks every row loss starts with (reduction, the pair, the mask); returns the mask over rows."""
    _check_reduction(reduction)
    _check_pair(student, teacher, what, same_last)
    return _check_mask(mask, student.shape[:-1], student)


# ---------------------------------------------------------------------------------------------- logits
def kd_kl_loss(student_logits, teacher_logits, *, temperature: float, mask=None, reduction: str = "mean",
               weight: float = 1.0):
    """Logit KD (Hinton et al.; DistilBERT; XtremeDistil stage 3 soft targets):

        loss = weight * T^2 * mean_{real rows i} KL(softmax(t_i / T) || softmax(s_i / T))

    with KL(p || q) = sum_c p_c (log p_c - log q_c) over the last (class / vocabulary) dimension. The T^2
    factor keeps gradient magnitudes independent of T. Fused kernel under the triton backend (no float32 copy
    of the (N, V) logits; V = 30522 MLM heads are fine).

    Args:
        student_logits: (..., V) student LOGITS (not log-probs), e.g. (B, C), (B, L, V) or packed (T, V).
        teacher_logits: (..., V) teacher LOGITS, same shape; a constant target.
        temperature: T > 0, required (no default).
        mask: optional (...) over the leading dims, nonzero = real row (e.g. the (B, L) attention mask of an MLM
            batch); None = every row is real.
        reduction: "mean" (batch-mean over real rows), "sum", or "none" ((...) per row, 0 at masked rows).
        weight: multiplies the loss.
    Returns:
        A scalar (float32, float64 for float64 inputs), or (...) per row for reduction="none"; includes T^2.
    """
    m = _rows(student_logits, teacher_logits, mask, reduction, "kd_kl_loss")
    per_row = ops.kd_kl_rows(student_logits, _target(teacher_logits), float(temperature), m)
    return _reduce_rows(per_row * (float(temperature) ** 2), m, reduction, weight)


def logit_mse_loss(student_logits, teacher_logits, *, mask=None, reduction: str = "mean", weight: float = 1.0):
    """Logit regression (XtremeDistil stage 2): loss = weight * mean_{real rows i} mean_c (s_ic - t_ic)^2.

    Args:
        student_logits: (..., C) student LOGITS (raw scores, no softmax).
        teacher_logits: (..., C) teacher LOGITS, same shape; a constant target.
        mask: optional (...) over the leading dims, nonzero = real row.
        reduction: "mean" over real rows, "sum" over real rows, or "none" ((...) per-row mean over classes).
        weight: multiplies the loss.
    Returns:
        A scalar, or (...) per row for reduction="none".
    """
    m = _rows(student_logits, teacher_logits, mask, reduction, "logit_mse_loss")
    c = _compute_dtype(student_logits)
    per_row = (student_logits.to(c) - _target(teacher_logits).to(c)).pow(2).mean(-1)
    return _reduce_rows(per_row, m, reduction, weight)


# ---------------------------------------------------------------------------------------------- hidden states
class HiddenProjection(nn.Module):
    """Learned linear maps student width -> teacher width, one per mapped layer (or one shared).

    XtremeDistil's representation transfer regresses projected student hidden states on the teacher's. The
    projections are trained with the student (put their parameters in the optimizer) and dropped afterwards.

    Args:
        student_dim: student hidden size d_s.
        teacher_dim: teacher hidden size d_t.
        num_maps: number of independent projections (e.g. one per entry of a layer map); 1 = one shared map.
        bias: whether each projection has a bias.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_maps: int = 1, bias: bool = True):
        super().__init__()
        if num_maps < 1:
            raise ValueError(f"num_maps must be >= 1, got {num_maps}")
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.maps = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=bias) for _ in range(num_maps))

    def forward(self, h: torch.Tensor, index: int = 0) -> torch.Tensor:
        """(..., d_s) -> (..., d_t) with projection `index` (always the shared one when num_maps == 1)."""
        if h.shape[-1] != self.student_dim:
            raise ValueError(f"HiddenProjection expects width {self.student_dim}, got {tuple(h.shape)}")
        return self.maps[0 if len(self.maps) == 1 else index](h)


def top_down_layer_map(num_student_layers: int, num_teacher_layers: int, *, include_embeddings: bool = True):
    """XtremeDistil's top-down layer map over hidden-state indices (0 = embeddings, i = output of layer i).

    The student's top layer maps to the teacher's top layer and each step down in the student moves
    k = num_teacher_layers // num_student_layers layers down in the teacher: student i <-> teacher
    L_t - (L_s - i) * k; embeddings map to embeddings. 6 -> 12 gives (0,0), (1,2), ..., (6,12).

    Returns:
        list of (student_index, teacher_index) pairs, bottom to top.
    """
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ValueError(f"need 1 <= student layers ({num_student_layers}) <= teacher layers "
                         f"({num_teacher_layers})")
    k = num_teacher_layers // num_student_layers
    pairs = [(i, num_teacher_layers - (num_student_layers - i) * k) for i in range(1, num_student_layers + 1)]
    return ([(0, 0)] if include_embeddings else []) + pairs


def cls_rows(hidden, *, cu_seqlens=None, mask=None):
    """The [CLS] (first real) token of each sequence: (B, d).

    Args:
        hidden: packed (T, d) with cu_seqlens, or padded (B, L, d) with an optional (B, L) mask (the first real
            token of each row is taken, so left padding works).
    """
    if cu_seqlens is not None:
        return hidden.index_select(0, cu_seqlens[:-1].to(torch.int64))
    if mask is None:
        return hidden[:, 0]
    first = mask.to(torch.bool).to(torch.int8).argmax(dim=1)  # (B,) first real position (0 for an empty row)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def hidden_mse_loss(student_hidden, teacher_hidden, *, projection=None, index: int = 0, tokens: str = "all",
                    mask=None, cu_seqlens=None, reduction: str = "mean", weight: float = 1.0):
    """Hidden-state regression: loss = weight * mean_{rows i} mean_c (P(h_s,i) - h_t,i)_c^2.

    Rows are every real token (tokens="all") or each sequence's [CLS] token (tokens="cls"). Only the selected
    rows are projected.

    Args:
        student_hidden: (B, L, d_s) padded or (T, d_s) packed student hidden states (features, not logits).
        teacher_hidden: (B, L, d_t) or (T, d_t) teacher hidden states of the same tokens; a constant target.
        projection: a :class:`HiddenProjection` (or any module (..., d_s) -> (..., d_t)); None needs d_s == d_t.
        index: which map of a HiddenProjection with several maps.
        tokens: "all" (every real token) or "cls" (one row per sequence).
        mask: (B, L) real-token mask for padded inputs (None = no padding).
        cu_seqlens: (B+1,) sequence boundaries for packed inputs; required for tokens="cls" on packed inputs.
        reduction: "mean" / "sum" over the selected rows, or "none" (per-row losses; padded rows are 0).
        weight: multiplies the loss.
    Returns:
        A scalar, or per-row losses for reduction="none".
    """
    _check_reduction(reduction)
    if tokens not in ("all", "cls"):
        raise ValueError(f"tokens must be 'all' or 'cls', got {tokens!r}")
    _check_pair(student_hidden, teacher_hidden, "hidden_mse_loss", same_last=False)
    t = _target(teacher_hidden)
    packed = student_hidden.dim() == 2
    if packed and mask is not None:
        raise ValueError("packed (T, d) hidden states have no padding: pass cu_seqlens, not mask")
    m = None if packed else _check_mask(mask, student_hidden.shape[:-1], student_hidden)
    if tokens == "cls":
        if packed and cu_seqlens is None:
            raise ValueError("tokens='cls' on packed (T, d) hidden states needs cu_seqlens")
        student_hidden = cls_rows(student_hidden, cu_seqlens=cu_seqlens, mask=m)
        t = cls_rows(t, cu_seqlens=cu_seqlens, mask=m)
        m = None if m is None else m.any(dim=1)
    p = student_hidden if projection is None else projection(student_hidden, index) \
        if isinstance(projection, HiddenProjection) else projection(student_hidden)
    if p.shape[-1] != t.shape[-1]:
        raise ValueError(f"projected student width {p.shape[-1]} != teacher width {t.shape[-1]}: pass a "
                         "HiddenProjection(student_dim, teacher_dim)")
    c = _compute_dtype(p)
    per_row = (p.to(c) - t.to(c)).pow(2).mean(-1)
    return _reduce_rows(per_row, m, reduction, weight)


def hidden_mse_loss_layers(student_hiddens: Sequence, teacher_hiddens: Sequence, layer_map, *, projection=None,
                           tokens: str = "all", mask=None, cu_seqlens=None, layer_reduction: str = "mean",
                           weight: float = 1.0):
    """Hidden-state MSE summed or averaged over a layer map (XtremeDistil stage 1: all layers + embeddings).

    Args:
        student_hiddens, teacher_hiddens: sequences of hidden states indexed by hidden-state index
            (0 = embeddings), each as in :func:`hidden_mse_loss`.
        layer_map: (student_index, teacher_index) pairs, e.g. :func:`top_down_layer_map`.
        projection: a HiddenProjection with one map per pair (map j for the j-th pair) or one shared map.
        tokens, mask, cu_seqlens: as in :func:`hidden_mse_loss` (mean over rows within each layer).
        layer_reduction: "mean" or "sum" over the pairs.
        weight: multiplies the result.
    Returns:
        A scalar.
    """
    if layer_reduction not in ("mean", "sum"):
        raise ValueError(f"layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}")
    pairs = list(layer_map)
    if not pairs:
        raise ValueError("layer_map is empty")
    if isinstance(projection, HiddenProjection) and len(projection.maps) not in (1, len(pairs)):
        raise ValueError(f"projection has {len(projection.maps)} maps; need 1 or one per pair ({len(pairs)})")
    total = sum(hidden_mse_loss(student_hiddens[s], teacher_hiddens[t], projection=projection, index=j,
                                tokens=tokens, mask=mask, cu_seqlens=cu_seqlens) for j, (s, t) in enumerate(pairs))
    return total * (weight / len(pairs) if layer_reduction == "mean" else weight)


# ---------------------------------------------------------------------------------------------- relations
def _infer_heads(num_relation_heads, *xs, lead: int):
    if num_relation_heads is not None:
        return int(num_relation_heads)
    heads = {x.shape[lead] for x in xs if x.dim() == lead + 2}
    if len(heads) == 1 and all(x.dim() == lead + 2 for x in xs):
        return heads.pop()
    raise ValueError("cannot infer the number of heads (flat inputs or differing head counts): pass "
                     "num_relation_heads")


def _reduce_relation(per_row, num_rows, reduction: str, weight: float):
    """per_row (R, N) -> mean over R x real rows / sum / per-row."""
    if reduction == "none":
        return per_row * weight
    total = per_row.sum()
    if reduction == "sum":
        return total * weight
    denom = num_rows * per_row.shape[0]
    if isinstance(denom, torch.Tensor):
        return total * weight / denom.clamp(min=1).to(total.dtype)
    return total * (weight / max(denom, 1))


def relation_kl_loss(a_s, b_s, a_t, b_t, *, num_relation_heads: int, cu_seqlens=None, max_seqlen=None,
                     attention_mask=None, scale_s=None, scale_t=None, reduction: str = "mean",
                     weight: float = 1.0):
    """General relation KL, the building block of the MiniLM objectives:

        R_x[r] = softmax(a_x[r] b_x[r]^T * scale_x) over real keys,  x in {student s, teacher t},
        loss = weight * mean_{r, real query i} KL(R_t[r, i, :] || R_s[r, i, :])

    where relation head r takes dims [r*d, (r+1)*d) of each side's concatenated head dims (d = width / R).
    Under the triton backend it runs the flash-style kernel: no L x L matrix is ever stored.

    Args:
        a_s, b_s: student features (not logits): packed (T, H, D) / (T, H*D) with cu_seqlens, or padded
            (B, L, H, D) / (B, L, H*D) token-major (transformers' (B, H, L, D): pass x.transpose(1, 2)).
        a_t, b_t: teacher features in the same layout (their width may differ); a constant target.
        num_relation_heads: R, dividing both widths.
        cu_seqlens, max_seqlen: packed sequence boundaries (B+1,) and the longest length (int).
        attention_mask: (B, L) real-token mask for padded inputs (nonzero = real), or None.
        scale_s, scale_t: relation-logit multipliers; default 1/sqrt(d_s), 1/sqrt(d_t).
        reduction: "mean" over relation heads and real query tokens, "sum", or "none" ((R, N) per row:
            N = T packed, B*L padded with zeros at padded rows).
        weight: multiplies the loss.
    Returns:
        A scalar (float32; float64 for float64 inputs), or (R, N) for reduction="none".
    """
    _check_reduction(reduction)
    per_row = ops.relation_kl_rows(a_s, b_s, _target(a_t), _target(b_t), num_relation_heads=num_relation_heads,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, attention_mask=attention_mask,
                                   scale_s=scale_s, scale_t=scale_t)
    if cu_seqlens is not None:
        rows = a_s.shape[0]
    elif attention_mask is not None:
        rows = (attention_mask != 0).sum()
    else:
        rows = a_s.shape[0] * a_s.shape[1]
    return _reduce_relation(per_row, rows, reduction, weight)


def attention_kl_loss(q_s, k_s, q_t, k_t, *, num_relation_heads=None, cu_seqlens=None, max_seqlen=None,
                      attention_mask=None, reduction: str = "mean", weight: float = 1.0):
    """MiniLM v1 self-attention distribution transfer (last layer):

        A_x[h] = softmax(q_x[h] k_x[h]^T / sqrt(d_x)),  loss = weight * mean_{h, real i} KL(A_t[h,i] || A_s[h,i])

    computed from q and k (the attention probabilities are never materialised by the fused kernel).

    Args:
        q_s, k_s: student queries and keys (T, H, D) packed or (B, L, H, D) padded (features, not logits).
        q_t, k_t: teacher queries and keys, same layout; a constant target.
        num_relation_heads: heads to compare; inferred when both sides are (..., H, D) with the same H
            (MiniLM v1 needs equal head counts); otherwise required (relation heads then split head dims).
        cu_seqlens, max_seqlen, attention_mask, reduction, weight: as in :func:`relation_kl_loss`.
    Returns:
        A scalar, or (R, N) for reduction="none".
    """
    lead = 1 if cu_seqlens is not None else 2
    r = _infer_heads(num_relation_heads, q_s, k_s, q_t, k_t, lead=lead)
    return relation_kl_loss(q_s, k_s, q_t, k_t, num_relation_heads=r, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                            attention_mask=attention_mask, reduction=reduction, weight=weight)


def value_relation_kl_loss(v_s, v_t, *, num_relation_heads=None, cu_seqlens=None, max_seqlen=None,
                           attention_mask=None, reduction: str = "mean", weight: float = 1.0):
    """MiniLM v1 value-relation transfer: VR_x[h] = softmax(v_x[h] v_x[h]^T / sqrt(d_x)),
    loss = weight * mean_{h, real i} KL(VR_t[h, i] || VR_s[h, i]).

    Args:
        v_s: student values (T, H, D) packed or (B, L, H, D) padded (features).
        v_t: teacher values, same layout; a constant target.
        num_relation_heads, cu_seqlens, max_seqlen, attention_mask, reduction, weight: as in
            :func:`attention_kl_loss`.
    Returns:
        A scalar, or (R, N) for reduction="none".
    """
    lead = 1 if cu_seqlens is not None else 2
    r = _infer_heads(num_relation_heads, v_s, v_t, lead=lead)
    return relation_kl_loss(v_s, v_s, v_t, v_t, num_relation_heads=r, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                            attention_mask=attention_mask, reduction=reduction, weight=weight)


def self_relation_kl_loss(x_s, x_t, *, num_relation_heads: int, cu_seqlens=None, max_seqlen=None,
                          attention_mask=None, reduction: str = "mean", weight: float = 1.0):
    """One MiniLMv2 self-attention relation (Q-Q, K-K or V-V): with x split into A_r relation heads of width
    d_x = width_x / A_r, R_x[r] = softmax(x[r] x[r]^T / sqrt(d_x)), loss = weight * mean KL(R_t || R_s).

    Args:
        x_s: student queries, keys or values (T, H, D) / (T, H*D) packed or (B, L, ...) padded (features).
        x_t: the teacher's same projection, same layout, any head count; a constant target.
        num_relation_heads: A_r, dividing both widths (teacher and student head counts may differ).
        cu_seqlens, max_seqlen, attention_mask, reduction, weight: as in :func:`relation_kl_loss`.
    Returns:
        A scalar, or (A_r, N) for reduction="none".
    """
    return relation_kl_loss(x_s, x_s, x_t, x_t, num_relation_heads=num_relation_heads, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, attention_mask=attention_mask, reduction=reduction, weight=weight)


def minilmv2_relation_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], *,
                           num_relation_heads: int, relations: Sequence[str] = ("qq", "kk", "vv"),
                           cu_seqlens=None, max_seqlen=None, attention_mask=None, reduction: str = "mean",
                           weight: float = 1.0):
    """MiniLMv2 multi-head self-attention relation distillation:

        loss = weight * sum_{rel in relations} mean_{r, real i} KL(R_t^rel[r, i] || R_s^rel[r, i])

    with the Q-Q, K-K and V-V relations of :func:`self_relation_kl_loss` (teacher: any layer, usually an upper
    middle one; student: its last layer). The three terms are summed, as in the paper.

    Args:
        student: {"q": ..., "k": ..., "v": ...} student projections (e.g. FastStudent's tapped layer).
        teacher: the teacher layer's {"q", "k", "v"}, same layout; a constant target.
        num_relation_heads: A_r (e.g. 12 for base-size teachers, 48 for large ones).
        relations: which of "qq", "kk", "vv" to include.
        cu_seqlens, max_seqlen, attention_mask, reduction, weight: as in :func:`relation_kl_loss`;
            reduction="none" returns {relation: (A_r, N)}.
    Returns:
        A scalar, or a dict of per-row tensors for reduction="none".
    """
    out = {}
    for rel in relations:
        if rel not in ("qq", "kk", "vv"):
            raise ValueError(f"relations must be among 'qq', 'kk', 'vv', got {rel!r}")
        key = rel[0]
        if key not in student or key not in teacher:
            raise ValueError(f"relation {rel!r} needs {key!r} in both student and teacher tensors")
        out[rel] = self_relation_kl_loss(student[key], teacher[key], num_relation_heads=num_relation_heads,
                                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, attention_mask=attention_mask,
                                         reduction=reduction, weight=weight)
    if not out:
        raise ValueError("relations is empty")
    return out if reduction == "none" else sum(out.values())


# ---------------------------------------------------------------------------------------------- embeddings
def mean_pool(hidden, *, cu_seqlens=None, mask=None):
    """Mean of the real tokens of each sequence (sentence-transformers' mean pooling): (B, d).

    Args:
        hidden: packed (T, d) with cu_seqlens, or padded (B, L, d) with an optional (B, L) mask.
    """
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int64)
        B = cu.shape[0] - 1
        seq = torch.searchsorted(cu[1:], torch.arange(hidden.shape[0], device=hidden.device), right=True)
        sums = hidden.new_zeros(B, hidden.shape[-1]).index_add(0, seq, hidden)
        return sums / (cu[1:] - cu[:-1]).clamp(min=1).to(hidden.dtype)[:, None]
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype)[..., None]  # (B, L, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def embedding_cosine_loss(student_emb, teacher_emb, *, mask=None, reduction: str = "mean", weight: float = 1.0,
                          eps: float = 1e-8):
    """Cosine distance: loss = weight * mean_{rows i} (1 - cos(s_i, t_i)), cos = s.t / (max(|s|,eps) max(|t|,eps)).

    Pooled sentence embeddings (sentence-transformers distillation) or hidden states of real tokens
    (DistilBERT's cosine term: pass (B, L, d) with mask, or packed (T, d)).

    Args:
        student_emb: (..., d) student embeddings (features, not logits).
        teacher_emb: (..., d) teacher embeddings, same shape; a constant target.
        mask: optional (...) over the leading dims, nonzero = real row.
        reduction: "mean" / "sum" over real rows or "none" (per row).
        weight: multiplies the loss.
        eps: floor of each norm.
    Returns:
        A scalar, or (...) per row for reduction="none".
    """
    m = _rows(student_emb, teacher_emb, mask, reduction, "embedding_cosine_loss")
    c = _compute_dtype(student_emb)
    s = student_emb.to(c)
    t = _target(teacher_emb).to(c)
    t_hat = t / t.norm(dim=-1, keepdim=True).clamp(min=eps)  # constant: nothing of the teacher is saved twice
    cos = (s * t_hat).sum(-1) / s.norm(dim=-1).clamp(min=eps)
    return _reduce_rows(1.0 - cos, m, reduction, weight)


def embedding_mse_loss(student_emb, teacher_emb, *, projection=None, mask=None, reduction: str = "mean",
                       weight: float = 1.0):
    """Embedding regression (sentence-transformers' MSELoss): loss = weight * mean_{rows i} mean_c (P(s_i) - t_i)_c^2.

    Args:
        student_emb: (..., d_s) student embeddings (features), e.g. pooled (B, d_s).
        teacher_emb: (..., d_t) teacher embeddings; a constant target.
        projection: optional module (..., d_s) -> (..., d_t) (a HiddenProjection) when the widths differ.
        mask: optional (...) over the leading dims, nonzero = real row.
        reduction: "mean" / "sum" over real rows or "none" (per row).
        weight: multiplies the loss.
    Returns:
        A scalar, or (...) per row for reduction="none".
    """
    m = _rows(student_emb, teacher_emb, mask, reduction, "embedding_mse_loss", same_last=False)
    p = student_emb if projection is None else projection(student_emb)
    if p.shape[-1] != teacher_emb.shape[-1]:
        raise ValueError(f"student width {p.shape[-1]} != teacher width {teacher_emb.shape[-1]}: pass a projection")
    c = _compute_dtype(p)
    per_row = (p.to(c) - _target(teacher_emb).to(c)).pow(2).mean(-1)
    return _reduce_rows(per_row, m, reduction, weight)


__all__ = ["REDUCTIONS", "kd_kl_loss", "logit_mse_loss", "HiddenProjection", "top_down_layer_map", "cls_rows",
           "hidden_mse_loss", "hidden_mse_loss_layers", "relation_kl_loss", "attention_kl_loss",
           "value_relation_kl_loss", "self_relation_kl_loss", "minilmv2_relation_loss", "mean_pool",
           "embedding_cosine_loss", "embedding_mse_loss"]
