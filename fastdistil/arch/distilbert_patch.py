"""fastdistil.patch for transformers' DistilBERT (DistilBertModel and its heads): its Embeddings, TransformerBlock and
Transformer classes get fused forwards, found through the registry (Arch.patch; fastdistil/patch/
`_arch_patches`). Imported by the patch only, after transformers.

- Embeddings -> ops.embed_layer_norm with no token types (one zero type row).
- TransformerBlock -> BERT's post-LN layer on the fused ops (its weights as a LayerWeights for the backends'
  encoder_layer op in inference). DistilBERT applies no dropout after the attention output projection, only after
  the FFN, so training runs the op sequence below rather than layer_ops (one hidden dropout for both).
- Transformer -> padding-free: DistilBertModel hands it transformers' 4D mask (it has no _create_attention_masks
  to hook), from which the (B, L) key mask is read back (one host sync, as the patch does on transformers 4.x);
  then unpad once, N layers on (T, d), pad once; position 0 of left-padded rows (read by the [CLS] heads) is
  computed as transformers computes it (fastdistil/leftpad.py). Other masks, attention outputs and unknown
  arguments run transformers' own forward.
Only the forward signatures of transformers 5 are served (checked at patch time); other releases stay unpatched
with a warning.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..patch.checks import _gelu_mode, _same_code
from ..patch.forwards import _drop, _hooks_need_padded
from ..patch.heads import _LOSS_READS_PADDING
from ..patch.hf import _capturing, _original
from ..patch.masks import _NO, _key_mask_4d
from ..layer_weights import LayerWeights, activation_name, attend
from ..leftpad import LeftPad
from ..model import _plain
from ..ops.dispatch import lookup
from ..padding import Packing, gather, pad, unpad
from ..weight_cache import fused_qkv

EMB, LAYER, ENC = "distilbert.embeddings", "distilbert.layer", "distilbert.encoder"
_SIGNATURES = {"Embeddings": ("input_ids", "inputs_embeds", "position_ids"),
               "TransformerBlock": ("hidden_states", "attention_mask"),
               "Transformer": ("hidden_states", "attention_mask")}


def _hf():
    from transformers.models.distilbert import modeling_distilbert
    return modeling_distilbert


def _signature_ok(ref: type) -> bool:
    """The forwards replaced here take the arguments of transformers 5 (the others are only compared by code)."""
    if ref.__name__ not in _SIGNATURES:
        return True
    names = [p.name for p in inspect.signature(ref.forward).parameters.values()][1:]
    return tuple(n for n in names if n != "kwargs") == _SIGNATURES[ref.__name__]


def _code_problem(m: nn.Module, ref: type, names=("forward",)) -> str | None:
    if not _signature_ok(ref):
        return f"transformers' {ref.__name__}.forward has a signature fastdistil does not serve"
    for name in names:
        if not _same_code(getattr(type(m), name, None), getattr(ref, name)):
            return f"{type(m).__name__}.{name} differs from transformers' DistilBERT {ref.__name__}.{name}"
    return None


def _ln_ok(*lns) -> bool:
    return all(type(ln) is nn.LayerNorm and ln.weight is not None and ln.bias is not None for ln in lns)


def _layer_problem(block: nn.Module) -> str | None:
    M = _hf()
    why = (_code_problem(block, M.TransformerBlock) or _code_problem(block.attention, M.DistilBertSelfAttention)
           or _code_problem(block.ffn, M.FFN, ("forward", "ff_chunk")))
    if why:
        return why
    if _gelu_mode(block.ffn.activation) is None:
        return f"activation {type(block.ffn.activation).__name__} is not supported (GELU: erf or tanh variants)"
    if not _ln_ok(block.sa_layer_norm, block.output_layer_norm):
        return "its LayerNorms are not affine nn.LayerNorm modules"
    return None


def role(m: nn.Module) -> tuple[str, str | None] | None:
    """(role, why it cannot be patched or None) for DistilBERT's modules; None for any other module."""
    M = _hf()
    if isinstance(m, M.Embeddings):
        return EMB, _code_problem(m, M.Embeddings) or (None if _ln_ok(m.LayerNorm) else
                                                       "its LayerNorm is not an affine nn.LayerNorm")
    if isinstance(m, M.TransformerBlock):
        return LAYER, _layer_problem(m)
    if isinstance(m, M.Transformer):
        bad = next((why for why in map(_layer_problem, m.layer) if why), None)
        return ENC, _code_problem(m, M.Transformer) or (bad and "some of its layers are unsupported, so it stays "
                                                               "padded and unfused")
    return None


def _prepare_layer(block: nn.Module, padding_free: bool) -> None:
    block._fastdistil_gelu = _gelu_mode(block.ffn.activation)


def _prepare_encoder(enc: nn.Module, padding_free: bool) -> None:
    enc._fastdistil_padding_free = bool(padding_free)


# ------------------------------------------------------------------------------------------------ forwards

def _embeddings_forward(self, input_ids=None, inputs_embeds=None, position_ids=None):
    """Embeddings.forward: LayerNorm(word + position), dropout, on the fused embedding op."""
    B, L = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
    if position_ids is None:
        position_ids = self.position_ids[:, :L]  # (1, L), transformers' buffer
    position_ids = position_ids.expand(B, L)
    word, pos, ln = self.word_embeddings, self.position_embeddings, self.LayerNorm
    plain = all(type(e) is nn.Embedding and not (e._forward_hooks or e._forward_pre_hooks) for e in (word, pos))
    if inputs_embeds is None and plain:  # no token types: type id 0 of a zero row adds exactly 0
        x = ops.embed_layer_norm(input_ids, torch.zeros_like(input_ids), position_ids, word.weight, pos.weight,
                                 word.weight.new_zeros(1, word.weight.shape[1]), ln.weight, ln.bias, ln.eps,
                                 padding_idx=word.padding_idx, position_padding_idx=pos.padding_idx)  # (B, L, d)
    else:
        if inputs_embeds is None:
            inputs_embeds = word(input_ids)
        x = ops.layer_norm(inputs_embeds, ln.weight, ln.bias, ln.eps, residual=pos(position_ids))  # (B, L, d)
    return self.dropout(x)


def _qkv_params(sa: nn.Module):
    if not (_plain(sa.q_lin) and _plain(sa.k_lin) and _plain(sa.v_lin)):
        return None
    return fused_qkv((sa.q_lin.weight, sa.k_lin.weight, sa.v_lin.weight, sa.q_lin.bias, sa.k_lin.bias, sa.v_lin.bias))


def weights(block: nn.Module) -> LayerWeights | None:
    """A TransformerBlock's parameters as a LayerWeights (nothing copied), or None when a linear is not plain."""
    sa, ffn, ln1, ln2 = block.attention, block.ffn, block.sa_layer_norm, block.output_layer_norm
    qkv = _qkv_params(sa)
    if qkv is None or not all(_plain(lin) for lin in (sa.out_lin, ffn.lin1, ffn.lin2)):
        return None
    return LayerWeights(*qkv, sa.out_lin.weight, sa.out_lin.bias, ln1.weight, ln1.bias, ffn.lin1.weight,
                        ffn.lin1.bias, ffn.lin2.weight, ffn.lin2.bias, ln2.weight, ln2.bias, ln1.eps, ln2.eps,
                        sa.n_heads, activation_name(block._fastdistil_gelu), "post", _drop(sa.dropout), 0.0)


def _linear_ln(lin: nn.Module, h, residual, ln: nn.LayerNorm, p: float):
    """LayerNorm(dropout(lin(h)) + residual), one fused op when lin is plain."""
    if _plain(lin):
        return ops.linear_layer_norm(h, lin.weight, lin.bias, residual, ln.weight, ln.bias, ln.eps, dropout_p=p)
    return ops.layer_norm(lin(h), ln.weight, ln.bias, ln.eps, residual=residual, dropout_p=p)


def _qkv(sa: nn.Module, x):
    H, D = sa.n_heads, sa.attention_head_size
    qkv = _qkv_params(sa)
    if qkv is not None:
        return F.linear(x, *qkv).unflatten(-1, (3, H, D)).unbind(-3)  # 3 x (..., H, D)
    return tuple(lin(x).unflatten(-1, (H, D)) for lin in (sa.q_lin, sa.k_lin, sa.v_lin))


def _compute(block: nn.Module, x, where):
    """TransformerBlock on the fused ops. x: (T, d) with a Packing / LeftPad, or (B, L, d) with a key mask / None."""
    sa, ffn = block.attention, block.ffn
    q, k, v = _qkv(sa, x)  # (..., H, D) each
    ctx = attend(q, k, v, where, _drop(sa.dropout)).flatten(-2)  # (..., d)
    x = _linear_ln(sa.out_lin, ctx, x, block.sa_layer_norm, 0.0)  # no dropout after out_lin in DistilBERT
    lin1 = ffn.lin1
    h = (ops.linear_gelu(x, lin1.weight, lin1.bias, approximate=block._fastdistil_gelu) if _plain(lin1)
         else ffn.activation(lin1(x)))  # (..., f)
    return _linear_ln(ffn.lin2, h, x, block.output_layer_norm, _drop(ffn.dropout))


def _live(kwargs: dict) -> bool:
    return any(v is not None and v is not False for v in kwargs.values())


def _layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """TransformerBlock.forward: fused for a Packing (the patched encoder), a (B, L) key mask or None; transformers'
    own forward for its 4D masks, attention outputs and any other argument."""
    m = attention_mask
    if _live(kwargs) or _capturing("attentions") or not (
            m is None or isinstance(m, Packing) or isinstance(m, torch.Tensor) and m.dim() == 2):
        return _original(self).forward(self, hidden_states, attention_mask, **kwargs)
    if isinstance(m, Packing) and not self.training and not torch.is_grad_enabled():
        w = weights(self)
        if w is not None:  # inference on the packed route: one encoder_layer op (native: one C++ call)
            return lookup("encoder_layer", hidden_states.device)(w, hidden_states, m)
    return _compute(self, hidden_states, m)


def _key_mask(mask):
    """The (B, L) key mask behind the encoder's mask: None, a 2D mask, or transformers' 4D bidirectional mask
    (bool, or additive float) whose query rows all equal one key row; _NO for anything else."""
    if mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or torch.compiler.is_compiling():
        return _NO
    if mask.is_floating_point():
        key = _key_mask_4d(mask)
        return _NO if key is None else key
    if mask.dtype != torch.bool:
        return _NO
    row = mask[:, :, :1, :]  # (B, 1, 1, L)
    if mask.shape[2] > 1 and not torch.equal(mask, row.expand_as(mask)):  # one host sync
        return _NO
    return row[:, 0, 0, :].long()  # (B, L)


def _side_step(block: nn.Module, side: LeftPad, x) -> None:
    """Advance the side rows (position 0 of left-padded rows) through `block`, whose input is x (T, d)."""
    _, k, v = _qkv(block.attention, x.index_select(0, side.tokens))  # (N, H, D) each
    side.keys(k, v, packed=False)
    side.state = _compute(block, side.state, side)  # (E, d)


def _encoder_forward(self, hidden_states, attention_mask=None, **kwargs):
    """Transformer.forward, padding-free where it can be (see the module docstring)."""
    from transformers.modeling_outputs import BaseModelOutput
    key = _NO if _live(kwargs) or _capturing("attentions") else _key_mask(attention_mask)
    if key is _NO:
        return _original(self).forward(self, hidden_states, attention_mask, **kwargs)
    packed = (key is not None and self._fastdistil_padding_free and not torch.compiler.is_compiling()
              and not _hooks_need_padded(self.layer) and not _LOSS_READS_PADDING.get())
    if not packed:
        for layer in self.layer:
            hidden_states = layer(hidden_states, key)  # (B, L, d)
        return BaseModelOutput(last_hidden_state=hidden_states)
    B, L, _ = hidden_states.shape
    p = unpad(key, B, L, hidden_states.device)  # one host sync per batch
    x = gather(hidden_states, p)  # (T, d)
    side = LeftPad.build(key, p)
    if side is not None:
        side.state = hidden_states[side.rows, 0]  # (E, d): the pad token's embedding at position 0
    for layer in self.layer:
        if side is not None:
            _side_step(layer, side, x)
        x = layer(x, p)  # positional: gradient checkpointing replays it
    out = pad(x, p)  # (B, L, d)
    if side is not None:
        out = out.index_put((side.rows, torch.zeros_like(side.rows)), side.state)
    return BaseModelOutput(last_hidden_state=out)


FORWARDS = {EMB: _embeddings_forward, LAYER: _layer_forward, ENC: _encoder_forward}
PREPARE = {LAYER: _prepare_layer, ENC: _prepare_encoder}
