"""Embeddings: word + position + token-type gather, sum and LayerNorm in one op."""
from __future__ import annotations

import torch

from .. import reference
from .checks import check_float
from .dispatch import kernel_module, lookup, register
from .eager import fast


def embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                     ln_weight, ln_bias, eps: float = 1e-12, *, padding_idx: int | None = None,
                     position_padding_idx: int | None = None):
    """LayerNorm(word[input_ids] + position[position_ids] + type[token_type_ids]).

    Args:
        input_ids, token_type_ids, position_ids: integer tensors of one shape (ids already range-checked by
            the model, which owns the vocabulary sizes).
        word_weight (V, N), position_weight (P, N), type_weight (Tt, N), ln_weight (N,), ln_bias (N,).
        padding_idx: a word row that receives no gradient (nn.Embedding's padding_idx; BERT's pad token).
        position_padding_idx: the same for the position table (RoBERTa's, whose padding_idx is the pad token).
    Returns:
        ids.shape + (N,) in the tables' dtype.
    """
    check_float("word_weight", word_weight)
    if input_ids.shape != token_type_ids.shape or input_ids.shape != position_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, token_type_ids {tuple(token_type_ids.shape)} and "
                         f"position_ids {tuple(position_ids.shape)} must have one shape")
    if padding_idx is not None and word_weight.requires_grad and torch.is_grad_enabled():
        word_weight = _NoGradRow.apply(word_weight, padding_idx)
    if position_padding_idx is not None and position_weight.requires_grad and torch.is_grad_enabled():
        position_weight = _NoGradRow.apply(position_weight, position_padding_idx)
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
        # a copy with one row zeroed in place: no index tensor built from a Python int (that was a host-to-device
        # copy, a sync, every step)
        out = grad.clone()
        out.select(0, ctx.row).zero_()
        return out, None


# ------------------------------------------------------------------------------------------------ triton
# torch.library registration (compiles with fullgraph=True); kernels/embedding.py is imported on first call.
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ._common import needs_grad  # noqa: E402


@torch.library.custom_op("fastdistil::embed_layer_norm_fwd", mutates_args=())
def _embed_fwd_op(ids: Tensor, tt: Tensor, pos: Tensor, word: Tensor, type_w: Tensor, pos_w: Tensor, ln_w: Tensor,
                  ln_b: Tensor, eps: float, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y (T, N), mean, rstd) for (T,) ids; statistics are empty unless `save`."""
    K = kernel_module("embedding")
    return K.embed_fwd(ids, tt, pos, word, type_w, pos_w, ln_w, ln_b, eps, store_stats=save)


@_embed_fwd_op.register_fake
def _(ids, tt, pos, word, type_w, pos_w, ln_w, ln_b, eps, save):
    t = ids.shape[0]
    stats = word.new_empty(t if save else 0, dtype=torch.float32)
    return word.new_empty(t, word.shape[1]), stats, torch.empty_like(stats)


@torch.library.custom_op("fastdistil::embed_layer_norm_bwd", mutates_args=())
def _embed_bwd_op(dy: Tensor, ids: Tensor, tt: Tensor, pos: Tensor, word: Tensor, type_w: Tensor, pos_w: Tensor,
                  ln_w: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dword, dtype, dposition, dln_w, dln_b)."""
    K = kernel_module("embedding")
    return K.embed_bwd(dy, ids, tt, pos, word, type_w, pos_w, ln_w, mean, rstd)


@_embed_bwd_op.register_fake
def _(dy, ids, tt, pos, word, type_w, pos_w, ln_w, mean, rstd):
    return (torch.empty_like(word), torch.empty_like(type_w), torch.empty_like(pos_w), torch.empty_like(ln_w),
            torch.empty_like(ln_w))


def _embed_setup(ctx, inputs, output):
    ids, tt, pos, word, type_w, pos_w, ln_w, ln_b, eps, save = inputs
    ctx.save_for_backward(ids, tt, pos, word, type_w, pos_w, ln_w, output[1], output[2])


def _embed_backward(ctx, dy, _dmean, _drstd):
    ids, tt, pos, word, type_w, pos_w, ln_w, mean, rstd = ctx.saved_tensors
    dword, dtype, dpos, dw, db = _embed_bwd(dy, ids, tt, pos, word, type_w, pos_w, ln_w, mean, rstd)
    return None, None, None, dword, dtype, dpos, dw, db, None, None


_embed_fwd_op.register_autograd(_embed_backward, setup_context=_embed_setup)
_embed_fwd = fast(_embed_fwd_op, _embed_setup, _embed_backward)  # eager fast path (ops/eager.py)
_embed_bwd = fast(_embed_bwd_op)


@register("embed_layer_norm", "triton")
def _embed_triton(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight,
                  ln_bias, eps):
    if word_weight.dtype == torch.float64:  # the kernels compute in fp32: float64 stays exact on the reference
        return _embed_torch(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                            ln_weight, ln_bias, eps)
    shape = input_ids.shape
    save = needs_grad(word_weight, position_weight, type_weight, ln_weight, ln_bias)
    y = _embed_fwd(input_ids.reshape(-1).contiguous(), token_type_ids.reshape(-1).contiguous(),
                      position_ids.reshape(-1).contiguous(), word_weight.contiguous(), type_weight.contiguous(),
                      position_weight.contiguous(), ln_weight, ln_bias, float(eps), save)[0]
    return y.view(*shape, word_weight.shape[1])


# ------------------------------------------------------------------------------------------------ native (CPU)
# C++ forward (csrc/, fastdistil._C) for float32/bfloat16 CPU tables; the backward recomputes the reference on the
# same rows (it runs once per step, on gathered rows). Registered only once the extension imports.
from ._common import EXT, _C, native_ok  # noqa: E402


class _EmbedLayerNorm(torch.autograd.Function):
    """C++ forward; the backward recomputes the reference on the same rows (autograd of gather + LN)."""

    @staticmethod
    def forward(ctx, ids, tt, pos, word, posw, typew, ln_w, ln_b, eps):
        ctx.save_for_backward(ids, tt, pos, word, posw, typew, ln_w, ln_b)
        ctx.eps = eps
        return _C.embed_layer_norm_fwd(ids, tt, pos, word, posw, typew, ln_w, ln_b, eps)

    @staticmethod
    def backward(ctx, dy):
        ids, tt, pos, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(need) for p, need in zip(params, ctx.needs_input_grad[3:8])]
            y = reference.embed_layer_norm(ids, tt, pos, *leaves, ctx.eps)
            wanted = [p for p in leaves if p.requires_grad]
            got = iter(torch.autograd.grad(y, wanted, dy)) if wanted else iter(())
        return (None, None, None, *[next(got) if p.requires_grad else None for p in leaves], None)


@register("embed_layer_norm", "native", needs=EXT)
def _embed_native(ids, tt, pos, word, posw, typew, ln_w, ln_b, eps):
    if not native_ok(word, posw, typew):
        return _embed_torch(ids, tt, pos, word, posw, typew, ln_w, ln_b, eps)
    if needs_grad(word, posw, typew, ln_w, ln_b):
        return _EmbedLayerNorm.apply(ids, tt, pos, word, posw, typew, ln_w, ln_b, float(eps))
    return _C.embed_layer_norm_fwd(ids, tt, pos, word, posw, typew, ln_w, ln_b, float(eps))
