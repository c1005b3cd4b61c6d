"""Embeddings: word + position + token-type gather, sum and LayerNorm in one op."""
from __future__ import annotations

from .. import reference
from .checks import check_float
from .dispatch import lookup, register


def embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                     ln_weight, ln_bias, eps: float = 1e-12):
    """LayerNorm(word[input_ids] + position[position_ids] + type[token_type_ids]).

    Args:
        input_ids, token_type_ids, position_ids: integer tensors of one shape (ids already range-checked by
            the model, which owns the vocabulary sizes).
        word_weight (V, N), position_weight (P, N), type_weight (Tt, N), ln_weight (N,), ln_bias (N,).
    Returns:
        ids.shape + (N,) in the tables' dtype.
    """
    check_float("word_weight", word_weight)
    if input_ids.shape != token_type_ids.shape or input_ids.shape != position_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, token_type_ids {tuple(token_type_ids.shape)} and "
                         f"position_ids {tuple(position_ids.shape)} must have one shape")
    return lookup("embed_layer_norm", word_weight.device)(input_ids, token_type_ids, position_ids, word_weight,
                                                          position_weight, type_weight, ln_weight, ln_bias, eps)


@register("embed_layer_norm", "torch")
def _embed_torch(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight,
                 ln_bias, eps):
    return reference.embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                      type_weight, ln_weight, ln_bias, eps)
