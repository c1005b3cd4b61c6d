"""Arch: what one architecture needs from fastdistil, filled in by fastdistil/arch/<name>.py.

FastStudent always holds BERT-shaped modules (embeddings -> encoder.layer.N.{attention,intermediate,output} -> pooler),
so its internal state-dict keys are BERT's; an Arch translates transformers' checkpoint keys and config.json of its
model type to and from those, and says which embeddings variant and transformers classes belong to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def identity(key: str) -> str:
    return key


def rename(d: dict, pairs) -> dict:
    """`d` with keys renamed by (old, new) pairs, where present (a new name already in `d` wins)."""
    d = dict(d)
    for old, new in pairs:
        if old in d:
            v = d.pop(old)
            d.setdefault(new, v)
    return d


@dataclass(frozen=True)
class Arch:
    """One architecture, keyed by transformers' `model_type`.

    Attributes:
        model_type: config.json's model_type.
        hf_name: transformers' class stem ("Bert" -> BertModel, BertForSequenceClassification, ...).
        prefix: the base model's attribute in transformers' heads, with a dot ("bert.", "distilbert.", ...).
            FastStudent's heads always call it `bert`: the key maps translate the prefix.
        roots: first components of the base model's checkpoint keys (transformers' names).
        buffers: checkpoint keys (relative to the base model) that are buffers, not weights: ignored.
        token_types: the embeddings add a token-type table (BERT, RoBERTa; not DistilBERT).
        pooler: the base model has BERT's tanh pooler (not DistilBERT).
        head_pooler: transformers' task heads keep the pooler (BERT; RoBERTa's heads drop it).
        offset_positions: default position ids count from padding_idx + 1, padding tokens at padding_idx, from the
            input ids (RoBERTa's fairseq convention), instead of 0..L-1.
        config_from_hf: config.json dict -> FastStudentConfig.from_dict's dict (fastdistil's field names).
        config_to_hf: FastStudentConfig's dict -> config.json dict in transformers' names for this model type.
        key_to_internal / key_to_hf: one base-model key (no head prefix) between transformers' and FastStudent's
            names.
        hf_config: transformers' config class name.
        classifier: the sequence-classification head (fastdistil/heads.py): "pooler" (BERT: pooled [CLS] ->
            dropout -> classifier), "pre_classifier" (DistilBERT: [CLS] -> pre_classifier -> ReLU -> dropout ->
            classifier), "dense_tanh" (RoBERTa: [CLS] -> dropout -> classifier.dense -> tanh -> dropout ->
            classifier.out_proj).
        fixed: FastStudentConfig fields transformers hard-codes for this architecture (DistilBERT's LayerNorm eps);
            another value could not be saved, so it is refused.
        patch: the module under fastdistil/arch/ with the patch's pieces for the transformers classes that are not
            BERT's code (role(m), FORWARDS, PREPARE; see fastdistil/patch/ `_arch_patches`), or "" when BERT's
            suffice (fastdistil/patch/ accepts any class whose code is BERT's, whatever its name).
    """

    model_type: str
    hf_name: str
    prefix: str
    roots: tuple[str, ...]
    buffers: tuple[str, ...]
    token_types: bool
    pooler: bool
    head_pooler: bool
    offset_positions: bool
    config_from_hf: Callable[[dict], dict]
    config_to_hf: Callable[[dict], dict]
    key_to_internal: Callable[[str], str] = identity
    key_to_hf: Callable[[str], str] = identity
    hf_config: str = "BertConfig"
    classifier: str = "pooler"
    fixed: tuple[tuple[str, object], ...] = ()  # (field, value) the architecture hard-codes (config.json lacks it)
    patch: str = ""
    attn_output_dropout: bool = True  # hidden dropout after the attention output projection (DistilBERT: none)

    def hf_class(self, head: str = "Model") -> str:
        """transformers' class name for this architecture and head ("Model", "ForSequenceClassification", ...)."""
        return self.hf_name + head
