"""RoBERTa and XLM-RoBERTa (model_type "roberta", "xlm-roberta"): BERT's keys and layer; positions differ.

Default position ids follow fairseq: a token's position is padding_idx + 1 + (its index among the row's non-pad
tokens), computed from the input ids (not the mask) as transformers does, and pad tokens sit at padding_idx, so left
and right padding give real tokens the same positions. Checkpoints usually have type_vocab_size 1. Heads keep the
base model under "roberta." without a pooler; the sequence classifier is RoBERTa's own (classifier.dense,
classifier.out_proj), built in fastdistil/heads.py.
Patch: RobertaLayer / RobertaEncoder / RobertaModel are BERT's code (fastdistil/patch/); RobertaEmbeddings and
XLMRobertaEmbeddings in roberta_patch.py.
"""
from __future__ import annotations

import torch

from .spec import Arch


def config_from_hf(d: dict) -> dict:
    return dict(d)


def _to_hf(name: str):
    def config_to_hf(d: dict) -> dict:
        d = dict(d)
        d.setdefault("architectures", [name + "Model"])
        return d
    return config_to_hf


def position_ids(input_ids: torch.Tensor, padding_idx: int, past: int = 0) -> torch.Tensor:
    """(B, L) int64 positions from (B, L) ids: cumulative count of non-pad tokens (+ `past` cached tokens) +
    padding_idx, pad tokens at padding_idx (transformers' create_position_ids_from_input_ids, which is a method in
    5.x and a module function in 4.x: computed here so that both majors behave alike)."""
    real = input_ids.ne(padding_idx).to(torch.int64)
    return (torch.cumsum(real, dim=1) + past) * real + padding_idx


def embeds_position_ids(inputs_embeds: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """(B, L) positions padding_idx + 1 .. padding_idx + L for inputs_embeds (pads cannot be told apart there)."""
    B, L = inputs_embeds.shape[:2]
    pos = torch.arange(padding_idx + 1, L + padding_idx + 1, dtype=torch.long, device=inputs_embeds.device)
    return pos.unsqueeze(0).expand(B, L)


def _arch(model_type: str, name: str) -> Arch:
    return Arch(model_type=model_type, hf_name=name, prefix="roberta.", roots=("embeddings.", "encoder.", "pooler."),
                buffers=("embeddings.position_ids", "embeddings.token_type_ids"), token_types=True, pooler=True,
                head_pooler=False, offset_positions=True, config_from_hf=config_from_hf,
                config_to_hf=_to_hf(name), hf_config=name + "Config", classifier="dense_tanh",
                patch="roberta_patch")


ARCH = _arch("roberta", "Roberta")
XLMR = _arch("xlm-roberta", "XLMRoberta")
