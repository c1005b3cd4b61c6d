"""BERT (model_type "bert"): FastStudent's own layout, so the key maps are the identity.

Checkpoint keys: embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm,
encoder.layer.N.attention.self.{query,key,value}, attention.output.{dense,LayerNorm}, intermediate.dense,
output.{dense,LayerNorm}, pooler.dense; heads under "bert.".
Patch: BertEmbeddings, BertLayer, BertEncoder and BertModel's masks, and any class with their code under another
name (fastdistil/patch/).
"""
from __future__ import annotations

from .spec import Arch


def config_from_hf(d: dict) -> dict:
    return dict(d)


def config_to_hf(d: dict) -> dict:
    d = dict(d)
    d.setdefault("architectures", ["BertModel"])
    return d


ARCH = Arch(model_type="bert", hf_name="Bert", prefix="bert.", roots=("embeddings.", "encoder.", "pooler."),
            buffers=("embeddings.position_ids", "embeddings.token_type_ids"), token_types=True, pooler=True,
            head_pooler=True, offset_positions=False, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
            hf_config="BertConfig")
