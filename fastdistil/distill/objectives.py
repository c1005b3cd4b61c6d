"""Distillation objectives: which outputs of teacher and student each loss compares, with its weight.

An objective is an nn.Module (projections are its parameters, trained and checkpointed with the student) with
- `name` and `weight` (no hidden defaults: every recipe states its weights),
- `needs(n_student, n_teacher) -> (Needs, Needs)`: the student's and the teacher's outputs it reads,
- `cache_fields`: teacher targets it can read from the teacher cache (logits, pooled, cls) instead of running
  the teacher, or () when it needs per-token teacher states,
- `forward(student: Side, teacher: Side, batch) -> scalar loss` (unweighted; the Distiller applies `weight`).

The maths lives in `fastdistil.losses` (fused kernels where they exist); this file only routes tensors. Layer
numbers follow fastdistil.distill.models: hidden state 0 = embeddings, i = output of layer i; attention layers
1..N; negatives count from the end.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .. import losses as L
from .models import Needs, normalise_layer


class Objective(nn.Module):
    name: str = "objective"
    cache_fields: tuple[str, ...] = ()

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)

    def bind(self, n_student: int, n_teacher: int) -> "Objective":
        """Record the two models' layer counts (negative layer numbers resolve against them)."""
        self._n = (int(n_student), int(n_teacher))
        self.needs(n_student, n_teacher)  # validates the layer numbers now, not at the first batch
        return self

    def needs(self, n_student: int, n_teacher: int) -> tuple[Needs, Needs]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class LogitKD(Objective):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean over real rows (classifier logits (B, C),
    or MLM logits at the masked positions (M, V)). Inputs are logits (not log-probs)."""
    name = "logit_kd"
    cache_fields = ("logits",)

    def __init__(self, weight: float, temperature: float):
        super().__init__(weight)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def needs(self, ns, nt):
        return Needs(logits=True), Needs(logits=True)

    def forward(self, s, t, batch):
        return L.kd_kl_loss(s.logits, t.logits, temperature=self.temperature)


class LogitMSE(Objective):
    """mean((student_logits - teacher_logits)^2) over rows and classes (XtremeDistil stage 2)."""
    name = "logit_mse"
    cache_fields = ("logits",)

    def needs(self, ns, nt):
        return Needs(logits=True), Needs(logits=True)

    def forward(self, s, t, batch):
        return L.logit_mse_loss(s.logits, t.logits)


class LabelCE(Objective):
    """Cross-entropy of the student's logits against the data's labels (XtremeDistil stage 3; DistilBERT's MLM
    loss when the batch carries MLM labels in batch.extra['mlm_labels'])."""
    name = "label_ce"

    def needs(self, ns, nt):
        return Needs(logits=True), Needs()

    def forward(self, s, t, batch):
        labels = batch.extra.get("mlm_labels", batch.labels)
        if labels is None:
            raise ValueError("the label_ce objective needs labels: use .jsonl/.tsv data with a label column")
        return F.cross_entropy(s.logits.float(), labels)


class HiddenMSE(Objective):
    """Mean over the mapped pairs of MSE(W_j h_student + b_j, h_teacher), each a mean over real tokens (or the
    [CLS] rows when cls_only) and dimensions; W_j: a learned (d_teacher x d_student) projection per pair (identity
    is not assumed even when the widths agree).

    Args:
        mapping: [(student hidden state, teacher hidden state), ...]; see `top_down_mapping`.
    """
    name = "hidden_mse"

    def __init__(self, weight: float, mapping, d_student: int, d_teacher: int, cls_only: bool = False):
        super().__init__(weight)
        self.mapping = [(int(a), int(b)) for a, b in mapping]
        if not self.mapping:
            raise ValueError("hidden_mse needs at least one (student, teacher) layer pair")
        self.cls_only = cls_only
        self.proj = L.HiddenProjection(d_student, d_teacher, num_maps=len(self.mapping))

    def _norm(self, ns, nt):
        return [(normalise_layer(a, ns, hidden=True), normalise_layer(b, nt, hidden=True)) for a, b in self.mapping]

    def needs(self, ns, nt):
        m = self._norm(ns, nt)
        return Needs(hidden={a for a, _ in m}), Needs(hidden={b for _, b in m})

    def forward(self, s, t, batch):
        ns, nt = self._n
        cu = batch.packing.cu_seqlens
        total = 0.0
        for j, (a, b) in enumerate(self._norm(ns, nt)):
            total = total + L.hidden_mse_loss(s.hidden[a], t.hidden[b], projection=self.proj, index=j,
                                              tokens="cls" if self.cls_only else "all", cu_seqlens=cu)
        return total / len(self.mapping)


class HiddenCosine(Objective):
    """mean over real tokens of 1 - cos(student_hidden, teacher_hidden) of the last layers (DistilBERT); a learned
    projection when the widths differ."""
    name = "hidden_cosine"

    def __init__(self, weight: float, d_student: int, d_teacher: int, student_layer: int = -1,
                 teacher_layer: int = -1):
        super().__init__(weight)
        self.layers = (student_layer, teacher_layer)
        self.proj = L.HiddenProjection(d_student, d_teacher) if d_student != d_teacher else None

    def needs(self, ns, nt):
        a, b = normalise_layer(self.layers[0], ns, hidden=True), normalise_layer(self.layers[1], nt, hidden=True)
        return Needs(hidden={a}), Needs(hidden={b})

    def forward(self, s, t, batch):
        ns, nt = self._n
        hs = s.hidden[normalise_layer(self.layers[0], ns, hidden=True)]
        ht = t.hidden[normalise_layer(self.layers[1], nt, hidden=True)]
        if self.proj is not None:
            hs = self.proj(hs)
        return L.embedding_cosine_loss(hs, ht)


class _QKVObjective(Objective):
    """An objective on the q/k/v taps of one student layer and one teacher layer (negative = from the top)."""

    def _norm(self, ns, nt):
        return normalise_layer(self.layers[0], ns, hidden=False), normalise_layer(self.layers[1], nt, hidden=False)

    def needs(self, ns, nt):
        a, b = self._norm(ns, nt)
        return Needs(qkv={a}), Needs(qkv={b})


class AttentionKL(_QKVObjective):
    """MiniLM (v1): KL(A_teacher || A_student) of the attention distributions softmax(q k^T / sqrt(d_head)) of one
    teacher layer and one student layer, mean over heads and real query rows. Equal head counts are required (the
    relation-head split of MiniLMv2 lifts that); computed by the flash-style relation kernel: no L x L matrix."""
    name = "attention_kl"

    def __init__(self, weight: float, student_layer: int = -1, teacher_layer: int = -1):
        super().__init__(weight)
        self.layers = (student_layer, teacher_layer)

    def forward(self, s, t, batch):
        a, b = self._norm(*self._n)
        sq, tq = s.qkv[a], t.qkv[b]
        if sq["q"].shape[1] != tq["q"].shape[1]:
            raise ValueError(f"attention_kl (MiniLM v1) needs equal head counts, got student {sq['q'].shape[1]} vs "
                             f"teacher {tq['q'].shape[1]}; use the minilmv2 recipe")
        p = batch.packing
        return L.attention_kl_loss(sq["q"], sq["k"], tq["q"], tq["k"], cu_seqlens=p.cu_seqlens,
                                   max_seqlen=p.max_seqlen)


class RelationKL(_QKVObjective):
    """Self-attention relation KL: for each relation r in `relations` (e.g. "qq", "kk", "vv"; MiniLM v1's value
    relation is "vv" with one relation head per attention head), split the concatenated head dims of both models
    into `relation_heads` heads and compare softmax(x_a x_b^T / sqrt(d_r)) of teacher and student by KL, mean over
    relation heads and real rows; the relations' losses are summed (MiniLMv2: L = L_QQ + L_KK + L_VV).
    relation_heads=None keeps each model's own heads (equal head counts needed). Head counts and head dims of
    teacher and student may differ otherwise."""
    name = "relation_kl"

    def __init__(self, weight: float, relations=("qq", "kk", "vv"), relation_heads: int | None = None,
                 student_layer: int = -1, teacher_layer: int = -1, name: str | None = None):
        super().__init__(weight)
        self.relations = tuple(relations)
        for r in self.relations:
            if len(r) != 2 or set(r) - set("qkv"):
                raise ValueError(f"relation {r!r} must be two of q, k, v (e.g. 'qq', 'vv')")
        self.relation_heads = relation_heads
        self.layers = (student_layer, teacher_layer)
        if name:
            self.name = name

    def forward(self, s, t, batch):
        a, b = self._norm(*self._n)
        p = batch.packing
        heads = self.relation_heads
        if heads is None:
            hs, ht = s.qkv[a]["q"].shape[1], t.qkv[b]["q"].shape[1]
            if hs != ht:
                raise ValueError(f"{self.name}: relation_heads=None compares head by head and needs equal head "
                                 f"counts (student {hs}, teacher {ht}); set relation_heads")
            heads = hs
        total = 0.0
        for r in self.relations:
            x, y = r[0], r[1]
            total = total + L.relation_kl_loss(s.qkv[a][x], s.qkv[a][y], t.qkv[b][x], t.qkv[b][y],
                                               num_relation_heads=heads, cu_seqlens=p.cu_seqlens,
                                               max_seqlen=p.max_seqlen)
        return total


class PooledEmbedding(Objective):
    """Sentence-embedding distillation: MSE (mean over batch and dims) or 1 - cosine (batch mean) between the
    student's and the teacher's pooled embeddings (mean over real tokens, or the [CLS] row); a learned
    projection when the widths differ (or always, with project=True). Cacheable: the teacher side is one (d,)
    vector per example."""
    name = "pooled"

    def __init__(self, weight: float, kind: str, d_student: int, d_teacher: int, pooling: str = "mean",
                 project: bool | None = None):
        super().__init__(weight)
        if kind not in ("mse", "cosine"):
            raise ValueError(f"pooled embedding loss must be 'mse' or 'cosine', got {kind!r}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.kind, self.pooling = kind, pooling
        self.name = f"pooled_{kind}"
        self.cache_fields = ("mean",) if pooling == "mean" else ("cls",)
        project = d_student != d_teacher if project is None else project
        self.proj = L.HiddenProjection(d_student, d_teacher) if project else None

    def needs(self, ns, nt):
        n = Needs(mean=self.pooling == "mean", cls=self.pooling == "cls")
        return n, n

    def forward(self, s, t, batch):
        es, et = (s.mean, t.mean) if self.pooling == "mean" else (s.cls, t.cls)
        if self.proj is not None:
            es = self.proj(es)
        return L.embedding_mse_loss(es, et) if self.kind == "mse" else L.embedding_cosine_loss(es, et)


def top_down_mapping(n_student: int, n_teacher: int, embeddings: bool = True) -> list[tuple[int, int]]:
    """XtremeDistil's top-down layer map (fastdistil.losses.top_down_layer_map): student hidden state i <- teacher
    hidden state n_t - (n_s - i) * (n_t // n_s), embeddings to embeddings."""
    return L.top_down_layer_map(n_student, n_teacher, include_embeddings=embeddings)
