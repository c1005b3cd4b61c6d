"""DistilBERT (model_type "distilbert"): BERT's post-LayerNorm layer under other names, no token types, no pooler.

Checkpoint keys: embeddings.{word,position}_embeddings, embeddings.LayerNorm, and per layer
transformer.layer.N.attention.{q_lin,k_lin,v_lin,out_lin}, sa_layer_norm, ffn.{lin1,lin2}, output_layer_norm;
heads under "distilbert.". The layer math is BERT's (LayerNorm eps fixed at 1e-12 by transformers), so
FastStudent's Layer runs it; only names and the config's spelling differ. `sinusoidal_pos_embds` only decides how
a fresh model's position table is initialised (transformers trains and saves it like a learned one).
Patch: Embeddings, TransformerBlock and Transformer of modeling_distilbert (distilbert_patch.py). Known difference in
training with dropout: transformers applies none after the attention output projection, and neither does
FastStudent's Layer for this architecture (Arch.attn_output_dropout=False -> LayerWeights.attn_out_dropout=0).
"""
from __future__ import annotations

import torch

from .spec import Arch, rename

# config.json name -> FastStudentConfig field
_CONFIG = (("dim", "hidden_size"), ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
           ("hidden_dim", "intermediate_size"), ("activation", "hidden_act"), ("dropout", "hidden_dropout_prob"),
           ("attention_dropout", "attention_probs_dropout_prob"))
EPS = 1e-12  # transformers' DistilBERT hard-codes its LayerNorm epsilon
# per-layer key tails: transformers' DistilBERT name -> FastStudent's (BERT's) name
_LAYER = (("attention.q_lin.", "attention.self.query."), ("attention.k_lin.", "attention.self.key."),
          ("attention.v_lin.", "attention.self.value."), ("attention.out_lin.", "attention.output.dense."),
          ("sa_layer_norm.", "attention.output.LayerNorm."), ("ffn.lin1.", "intermediate.dense."),
          ("ffn.lin2.", "output.dense."), ("output_layer_norm.", "output.LayerNorm."))


def config_from_hf(d: dict) -> dict:
    d = rename(d, _CONFIG)
    d.setdefault("layer_norm_eps", EPS)  # another value is refused by FastStudentConfig (Arch.fixed)
    d["type_vocab_size"] = 1  # one (zero) token type: the embeddings add none
    return d


def config_to_hf(d: dict) -> dict:
    d = rename(d, [(new, old) for old, new in _CONFIG])
    for k in ("type_vocab_size", "layer_norm_eps", "position_embedding_type"):  # not DistilBERT settings
        d.pop(k, None)
    d.setdefault("sinusoidal_pos_embds", False)
    d.setdefault("architectures", ["DistilBertModel"])
    return d


def _swap(key: str, src: str, dst: str, table) -> str:
    """key under layer stack `src` -> under `dst`, its tail renamed by `table` (unknown tails unchanged)."""
    if not key.startswith(src):
        return key
    n, tail = key[len(src):].split(".", 1) if "." in key[len(src):] else (key[len(src):], "")
    for a, b in table:
        if tail.startswith(a):
            return f"{dst}{n}.{b}{tail[len(a):]}"
    return f"{dst}{n}.{tail}"


def key_to_internal(key: str) -> str:
    return _swap(key, "transformer.layer.", "encoder.layer.", _LAYER)


def key_to_hf(key: str) -> str:
    return _swap(key, "encoder.layer.", "transformer.layer.", [(b, a) for a, b in _LAYER])


def sinusoidal(n_pos: int, dim: int) -> torch.Tensor:
    """transformers' create_sinusoidal_embeddings: (n_pos, dim), sin on even columns, cos on odd ones, with
    frequency 10000^(-2*(j//2)/dim); computed in float64 as transformers does with numpy."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (n_pos, dim)
    out = torch.empty(n_pos, dim, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])
    return out.float()


ARCH = Arch(model_type="distilbert", hf_name="DistilBert", prefix="distilbert.", roots=("embeddings.", "transformer."),
            buffers=("embeddings.position_ids",), token_types=False, pooler=False, head_pooler=False,
            offset_positions=False, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
            key_to_internal=key_to_internal, key_to_hf=key_to_hf, hf_config="DistilBertConfig",
            classifier="pre_classifier", fixed=(("layer_norm_eps", EPS),), patch="distilbert_patch",
            attn_output_dropout=False)
