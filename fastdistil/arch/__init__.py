"""Architectures fastdistil runs, keyed by transformers' `model_type`: one file each (bert.py, distilbert.py,
roberta.py), each an `Arch` (spec.py): config adapter, checkpoint key map, embeddings variant, transformers classes.

Loading, saving, the heads, the distiller's student builder and the drop-in patch ask this registry instead of
assuming BERT. A new architecture whose layer is BERT's post-LayerNorm layer needs one file and one entry here.
"""
from __future__ import annotations

from . import bert, distilbert, roberta
from .spec import Arch

ARCHS: dict[str, Arch] = {a.model_type: a for a in (bert.ARCH, distilbert.ARCH, roberta.ARCH, roberta.XLMR)}


def is_known(model_type) -> bool:
    """Whether `model_type` has its own entry (other BERT derivatives load as BERT, see loading.read_config)."""
    return isinstance(model_type, str) and model_type in ARCHS


def get(model_type) -> Arch:
    """The Arch of `model_type`; None or an unregistered type falls back to BERT (the layout fastdistil assumed
    before the registry: BERT derivatives with BERT's keys keep loading)."""
    return ARCHS.get(model_type, bert.ARCH) if isinstance(model_type, str) else bert.ARCH


__all__ = ["ARCHS", "Arch", "get", "is_known"]
