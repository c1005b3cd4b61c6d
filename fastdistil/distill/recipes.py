"""Recipes: published distillation methods as objectives + weights + a plan.

| recipe | objectives (weights) | notes |
|---|---|---|
| xtremedistil | stage 1: hidden_mse over all layers + embeddings, top-down mapping (1); stage 2: logit_mse (1) with
  frozen layers and gradual unfreezing (for a headless teacher: pooled_mse of a learned projection of the student's
  mean-pooled embedding against the teacher's, the projection playing the classifier's part);
  stage 3: label_ce (1) when the data has labels | Mukherjee & Awadallah 2020 |
| minilm | attention_kl (1) + value relation relation_kl "vv" per head (1), last layers | Wang et al. 2020; equal head
  counts |
| minilmv2 | relation_kl qq + kk + vv over A_r relation heads (1), teacher layer -> student's last | Wang et al. 2021 |
| distilbert | logit_kd at T=2 (5) + label_ce (2, MLM labels or data labels) + hidden_cosine (1) | Sanh et al. 2019;
  needs teacher logits (MLM or classifier head) |
| embedding | pooled_mse (1) + pooled_cosine (1), pooling from the teacher's sentence-transformers config | sentence
  embedding models |

XtremeDistil's schedule (`XtremeDistilPlan`) is a pure function of (step, max_steps): the stages split the run
0.4 / 0.4 / 0.2 (0.5 / 0.5 without labels); stage 2 is cut into n + 2 equal phases: only the head (classifier and
pooler, or the pooled projection) trains first, then one more layer from the top is unfrozen per phase, and the
embeddings last.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..heads import FastStudentForSequenceClassification
from .distiller import ConstantPlan, Phase
from .models import FastStudentForMaskedLM, body, has_logits
from .objectives import (AttentionKL, HiddenCosine, HiddenMSE, LabelCE, LogitKD, LogitMSE, PooledEmbedding,
                         RelationKL, top_down_mapping)

log = logging.getLogger("fastdistil")

RECIPES = ("xtremedistil", "minilm", "minilmv2", "distilbert", "embedding")


@dataclass
class Recipe:
    name: str
    objectives: list
    plan: object


def _prefix(student) -> str:
    return "student.bert." if hasattr(student, "bert") else "student."


class XtremeDistilPlan:
    """Stages and gradual unfreezing of XtremeDistil as a pure function of the step.

    Args:
        student: the student (its layer count and parameter names decide what is frozen).
        max_steps: length of the run; stage boundaries are fractions of it.
        stage2: name of the stage-2 objective ("logit_mse", or "pooled_mse" for a headless teacher).
        labels: whether stage 3 (label_ce) runs.
        fractions: stage lengths as fractions of max_steps (default 0.4/0.4/0.2, or 0.5/0.5 without labels).
    """

    def __init__(self, student, max_steps: int, stage2: str, labels: bool, fractions=None):
        if max_steps is None or max_steps < 1:
            raise ValueError("the xtremedistil recipe needs max_steps (its stages are fractions of the run)")
        self.n = body(student).config.num_hidden_layers
        self.max_steps, self.stage2, self.labels = int(max_steps), stage2, labels
        fr = fractions or ((0.4, 0.4, 0.2) if labels else (0.5, 0.5))
        if len(fr) != (3 if labels else 2):
            raise ValueError(f"xtremedistil needs {3 if labels else 2} stage fractions, got {fr}")
        b1 = int(round(fr[0] * self.max_steps))
        b2 = b1 + int(round(fr[1] * self.max_steps)) if labels else self.max_steps
        self.bounds = (b1, b2)
        p = _prefix(student)
        self.emb = p + "embeddings."
        self.layer = [f"{p}encoder.layer.{i}." for i in range(self.n)]
        self.head = (p + "pooler.", "student.classifier.")
        self.proj1 = "objectives.hidden_mse."
        self.proj2 = f"objectives.{stage2}."

    def stage(self, step: int) -> int:
        """1, 2 or 3 (3 only with labels; steps past max_steps stay in the last stage)."""
        if step < self.bounds[0]:
            return 1
        return 2 if step < self.bounds[1] or not self.labels else 3

    def phase(self, step: int) -> Phase:
        s = self.stage(step)
        if s == 1:
            return Phase("stage1", {"hidden_mse": 1.0}, frozen=self.head + (self.proj2,))
        if s == 3:
            return Phase("stage3", {"label_ce": 1.0}, frozen=(self.proj1, self.proj2))
        length = max(1, self.bounds[1] - self.bounds[0])
        k = min(self.n + 1, (min(step, self.bounds[1] - 1) - self.bounds[0]) * (self.n + 2) // length)  # 0..n+1
        frozen = [self.proj1] + self.layer[:max(0, self.n - k)] + ([self.emb] if k <= self.n else [])
        return Phase(f"stage2.{k}", {self.stage2: 1.0}, frozen=tuple(frozen))


def build(name: str, teacher, student, *, has_labels: bool = False, max_steps: int | None = None, **options):
    """Objectives and plan of recipe `name` for this teacher / student pair.

    Args:
        has_labels: the data carries labels (enables XtremeDistil's stage 3; DistilBERT's label term for a
            classifier teacher).
        max_steps: the run length (XtremeDistil's stage boundaries).
        options: per-recipe overrides: temperature (distilbert, default 2.0), relation_heads and teacher_layer
            (minilmv2), pooling and loss ("mse", "cosine" or "both") for embedding, fractions (xtremedistil).
    Raises:
        ValueError: unknown recipe, or a teacher / student that cannot run it (the message says why).
    """
    ts, ss = body(teacher).config, body(student).config
    dt, ds = ts.hidden_size, ss.hidden_size
    if name == "xtremedistil":
        objs = [HiddenMSE(1.0, top_down_mapping(ss.num_hidden_layers, ts.num_hidden_layers), ds, dt)]
        if isinstance(teacher, FastStudentForSequenceClassification):
            if not isinstance(student, FastStudentForSequenceClassification):
                raise ValueError("xtremedistil with a classifier teacher needs a classifier student (build it "
                                 "with --student-layers, or give a BertForSequenceClassification checkpoint)")
            objs.append(LogitMSE(1.0))
            stage2 = "logit_mse"
        else:
            objs.append(PooledEmbedding(1.0, "mse", ds, dt, pooling=options.get("pooling", "mean"), project=True))
            stage2 = "pooled_mse"
        labels = has_labels and isinstance(student, FastStudentForSequenceClassification)
        if has_labels and not labels:
            log.warning("xtremedistil: the data has labels but the student has no classifier head: stage 3 (labels) "
                        "is skipped; use a BertForSequenceClassification teacher or student for task distillation")
        if labels:
            objs.append(LabelCE(1.0))
        return Recipe(name, objs, XtremeDistilPlan(student, max_steps, stage2, labels, options.get("fractions")))
    if name == "minilm":
        if ts.num_attention_heads != ss.num_attention_heads:
            raise ValueError(f"minilm (v1) transfers attention distributions head by head and needs equal head "
                             f"counts (teacher {ts.num_attention_heads}, student {ss.num_attention_heads}); use "
                             "minilmv2")
        objs = [AttentionKL(1.0), RelationKL(1.0, relations=("vv",), relation_heads=None, name="value_relation_kl")]
        return Recipe(name, objs, ConstantPlan(objs))
    if name == "minilmv2":
        heads = int(options.get("relation_heads") or ts.num_attention_heads)
        for who, c in (("teacher", ts), ("student", ss)):
            if c.hidden_size % heads:
                raise ValueError(f"{who} hidden size {c.hidden_size} does not split into {heads} relation heads")
        objs = [RelationKL(1.0, ("qq", "kk", "vv"), heads, teacher_layer=int(options.get("teacher_layer", -1)))]
        return Recipe(name, objs, ConstantPlan(objs))
    if name == "distilbert":
        if not has_logits(teacher):
            raise ValueError("recipe distilbert needs teacher logits: a teacher with an MLM head (BertForMaskedLM) "
                             "or a classifier head (BertForSequenceClassification); this teacher is a bare encoder "
                             "(try the embedding or minilmv2 recipe)")
        if type(student) is not type(teacher):
            raise ValueError(f"recipe distilbert needs a student with the teacher's head "
                             f"({type(teacher).__name__}); got {type(student).__name__}")
        objs = [LogitKD(5.0, float(options.get("temperature", 2.0)))]
        if isinstance(teacher, FastStudentForMaskedLM) or has_labels:
            objs.append(LabelCE(2.0))
        objs.append(HiddenCosine(1.0, ds, dt))
        return Recipe(name, objs, ConstantPlan(objs))
    if name == "embedding":
        pooling = options.get("pooling")
        if pooling is None:
            from ..embed import sentence_settings
            pooling = sentence_settings(teacher)["pooling"]
        kind = options.get("loss", "both")
        kinds = ("mse", "cosine") if kind == "both" else (kind,)
        objs = [PooledEmbedding(1.0, k, ds, dt, pooling=pooling) for k in kinds]
        return Recipe(name, objs, ConstantPlan(objs))
    raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
