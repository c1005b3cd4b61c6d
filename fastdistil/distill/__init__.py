"""Knowledge distillation on fastdistil's runtime: teacher under inference mode, padding-free, with taps.

Parts: `Distiller` (one batch -> loss dict, or a whole loop), objectives (objectives.py; maths in
fastdistil.losses), recipes (xtremedistil, minilm, minilmv2, distilbert, embedding), the teacher cache
(memory-mapped per-example targets), data (files, the default corpus, a resumable order), students built from a
checkpoint or a subset of teacher layers, `DistillationTrainer` for transformers.Trainer, and `run` (the loop of
`fastdistil distill`: checkpoints, exact resume, metrics, DDP).
"""
from .cache import TeacherCache
from .corpus import default_corpus
from .data import Batch, Examples, StepOrder, align_labels, collate, encode, read_examples
from .distiller import ConstantPlan, Distiller, NonFiniteError, Phase
from .models import (FastStudentForMaskedLM, Side, check_pair, forward_side, freeze_teacher, load_model,
                     student_from_teacher)
from .objectives import (AttentionKL, HiddenCosine, HiddenMSE, LabelCE, LogitKD, LogitMSE, Objective,
                         PooledEmbedding, RelationKL, top_down_mapping)
from .recipes import RECIPES, Recipe, XtremeDistilPlan
from .recipes import build as build_recipe


def __getattr__(name):  # transformers is imported only when the Trainer subclass is asked for
    if name == "DistillationTrainer":
        from .trainer import DistillationTrainer
        return DistillationTrainer
    raise AttributeError(name)


__all__ = ["Distiller", "Phase", "ConstantPlan", "TeacherCache", "default_corpus", "Batch", "Examples", "StepOrder",
           "align_labels", "collate", "encode", "read_examples", "FastStudentForMaskedLM", "Side", "check_pair",
           "forward_side", "freeze_teacher", "load_model", "student_from_teacher", "Objective", "NonFiniteError",
           "AttentionKL", "HiddenCosine", "HiddenMSE", "LabelCE", "LogitKD", "LogitMSE", "PooledEmbedding",
           "RelationKL", "top_down_mapping", "RECIPES", "Recipe", "XtremeDistilPlan", "build_recipe",
           "DistillationTrainer"]
