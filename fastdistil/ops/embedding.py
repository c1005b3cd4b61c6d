"""Embeddings: word + position + token-type gather, sum and LayerNorm in one op."""
from __future__ import annotations

import torch

from .. import reference
from .checks import check_float
from .dispatch import lookup, register


def embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                     ln_weight, ln_bias, eps: float = 1e-12, *, padding_idx: int | None = None):
    """LayerNorm(word[input_ids] + position[position_ids] + type[token_type_ids]).

    Args:
        input_ids, token_type_ids, position_ids: integer tensors of one shape (ids already range-checked by
            the model, which owns the vocabulary sizes).
        word_weight (V, N), position_weight (P, N), type_weight (Tt, N), ln_weight (N,), ln_bias (N,).
        padding_idx: a word row that receives no gradient (nn.Embedding's padding_idx; BERT's pad token).
    Returns:
        ids.shape + (N,) in the tables' dtype.
    """
    check_float("word_weight", word_weight)
    if input_ids.shape != token_type_ids.shape or input_ids.shape != position_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, token_type_ids {tuple(token_type_ids.shape)} and "
                         f"position_ids {tuple(position_ids.shape)} must have one shape")
    if padding_idx is not None and word_weight.requires_grad and torch.is_grad_enabled():
        word_weight = _NoGradRow.apply(word_weight, padding_idx)
    return lookup("embed_layer_norm", word_weight.device)(input_ids, token_type_ids, position_ids, word_weight,
                                                          position_weight, type_weight, ln_weight, ln_bias, eps)


@register("embed_layer_norm", "torch")
def _embed_torch(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight,
                 ln_bias, eps):
    return reference.embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                      type_weight, ln_weight, ln_bias, eps)


class _NoGradRow(torch.autograd.Function):
    """Identity forward; backward zeroes one row of the gradient (padding_idx), for every backend alike."""

    @staticmethod
    def forward(ctx, weight, row: int):
        ctx.row = row
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_fill(0, torch.tensor([ctx.row], device=grad.device), 0), None
