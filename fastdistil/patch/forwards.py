"""The fused forwards of fastdistil.patch (embeddings, layer, encoder, the 5.x base model's mask hook). Each reads
the HF module's own Parameters; none copies a weight."""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..layer_weights import LayerWeights, activation_name, attend, layer_ops
from ..leftpad import LeftPad
from ..model import _plain
from ..backend import resolve
from ..ops.dispatch import lookup
from ..ops.rng import seed_pool
from ..padding import Packing, gather, pad, unpad
from ..weight_cache import fused_qkv
from .calls import _bind, _fallback, _own_forward, _read, _unknown
from .heads import _LOSS_READS_PADDING
from .hf import _HF, _capturing, _original
from .masks import _NO, _served_mask


def _drop(dropout: nn.Module) -> float:
    """The probability an HF nn.Dropout module would apply now (0 in eval mode)."""
    return dropout.p if dropout.training else 0.0


def _fused_qkv(sa: nn.Module):
    """W_qkv (3d, d), b_qkv (3d,) when the three projections are plain linears, else None (weight_cache.fused_qkv:
    concatenated per call when a gradient is needed, otherwise cached in the weight cache, not on the module)."""
    if not (_plain(sa.query) and _plain(sa.key) and _plain(sa.value)):
        return None
    return fused_qkv((sa.query.weight, sa.key.weight, sa.value.weight, sa.query.bias, sa.key.bias, sa.value.bias))


def _weights(layer: nn.Module) -> LayerWeights | None:
    """The HF layer's own parameters as a LayerWeights (nothing copied; the fused QKV is the cached one), or None
    when a linear is not plain (PEFT, quantised, hooked) or its two hidden dropouts differ: the module path runs.
    The dropout fields hold the probabilities the HF dropout modules apply now (0 in eval mode)."""
    sa, ao, out = layer.attention.self, layer.attention.output, layer.output
    h_drop = _drop(ao.dropout)
    if not (_plain(ao.dense) and _plain(layer.intermediate.dense) and _plain(out.dense)) \
            or _drop(out.dropout) != h_drop:
        return None
    qkv = _fused_qkv(sa)
    if qkv is None:
        return None
    return LayerWeights(*qkv, ao.dense.weight, ao.dense.bias, ao.LayerNorm.weight, ao.LayerNorm.bias,
                        layer.intermediate.dense.weight, layer.intermediate.dense.bias, out.dense.weight,
                        out.dense.bias, out.LayerNorm.weight, out.LayerNorm.bias, ao.LayerNorm.eps, out.LayerNorm.eps,
                        sa.num_attention_heads, activation_name(layer._fastdistil_gelu), "post", _drop(sa.dropout),
                        h_drop)


def _qkv(sa: nn.Module, x: torch.Tensor):
    """q, k, v each (..., H, D) from x (..., d): one GEMM when the three projections are plain linears."""
    H, D = sa.num_attention_heads, sa.attention_head_size
    qkv = _fused_qkv(sa)
    if qkv is not None:
        return F.linear(x, *qkv).unflatten(-1, (3, H, D)).unbind(-3)  # 3 x (..., H, D)
    return tuple(lin(x).unflatten(-1, (H, D)) for lin in (sa.query, sa.key, sa.value))


def _dense_layer_norm(block: nn.Module, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """BertSelfOutput / BertOutput: LayerNorm(dropout(h W^T + b) + residual) as FastStudent computes it."""
    ln, p = block.LayerNorm, _drop(block.dropout)
    if _plain(block.dense):
        return ops.linear_layer_norm(h, block.dense.weight, block.dense.bias, residual, ln.weight, ln.bias, ln.eps,
                                     dropout_p=p)
    return ops.layer_norm(block.dense(h), ln.weight, ln.bias, ln.eps, residual=residual, dropout_p=p)


def _dense_gelu(block: nn.Module, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """BertIntermediate: GELU(x W^T + b) as FastStudent computes it."""
    if _plain(block.dense):
        return ops.linear_gelu(x, block.dense.weight, block.dense.bias, approximate=approximate)
    return block.intermediate_act_fn(block.dense(x))


def _layer_compute(layer: nn.Module, x: torch.Tensor, where) -> torch.Tensor:
    """One post-LN BERT layer on the fused ops. x: (T, d) with a Packing, or (B, L, d) with a key mask / None."""
    w = _weights(layer)
    if w is not None:  # the plain layer, as FastStudent's (dropout: the probabilities _weights read)
        return layer_ops(w, x, where, training=True)
    sa = layer.attention.self  # adapters or hooks on a linear: call the modules where they are
    q, k, v = _qkv(sa, x)  # (..., H, D) each
    ctx = attend(q, k, v, where, _drop(sa.dropout)).flatten(-2)  # (..., d)
    x = _dense_layer_norm(layer.attention.output, ctx, x)  # (..., d)
    h = _dense_gelu(layer.intermediate, x, layer._fastdistil_gelu)  # (..., 4d)
    return _dense_layer_norm(layer.output, h, x)  # (..., d)


def _side_step(layer: nn.Module, side: LeftPad, x: torch.Tensor) -> None:
    """Advance the query-only side rows (position 0 of left-padded rows, fastdistil/leftpad.py) through `layer`,
    whose input is x (T, d): k, v of their rows' real tokens are recomputed for those tokens only."""
    sa = layer.attention.self
    H, D = sa.num_attention_heads, sa.attention_head_size
    xs = x.index_select(0, side.tokens)  # (N, d)
    qkv = _fused_qkv(sa)
    if qkv is not None:
        w, b = qkv
        d = w.shape[1]
        k, v = F.linear(xs, w[d:], b[d:]).unflatten(-1, (2, H, D)).unbind(-3)  # (N, H, D) each
    else:
        k, v = (lin(xs).unflatten(-1, (H, D)) for lin in (sa.key, sa.value))
    side.keys(k, v, packed=False)
    side.state = _layer_compute(layer, side.state, side)  # (E, d)


def _embeddings_forward(self, *args, **kwargs):
    """BertEmbeddings.forward, whatever its signature in the installed transformers: the fused path, or the original
    forward for calls it does not know."""
    fn, call, unknown = _bind(self, "embeddings", args, kwargs)
    if call is None or unknown:
        return _fallback(self, fn, args, kwargs, call, unknown)
    return _embed(self, call.get("input_ids"), call.get("token_type_ids"), call.get("position_ids"),
                  call.get("inputs_embeds"), call.get("cache_length") or 0)


def _embed(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, cache_length: int = 0):
    """BertEmbeddings.forward on ops.embed_layer_norm (same defaults for token types and positions)."""
    B, L = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
    if position_ids is None:
        position_ids = self.position_ids[:, cache_length:L + cache_length]  # (1, L)
    if token_type_ids is None:
        if hasattr(self, "token_type_ids"):  # transformers' zero buffer (helps tracing), gathered like it does
            buffered = self.token_type_ids.expand(position_ids.shape[0], -1)
            token_type_ids = torch.gather(buffered, dim=1, index=position_ids)
        else:
            token_type_ids = torch.zeros(B, L, dtype=torch.long, device=position_ids.device)
    position_ids, token_type_ids = position_ids.expand(B, L), token_type_ids.expand(B, L)
    word, ln = self.word_embeddings, self.LayerNorm
    plain = all(type(e) is nn.Embedding and not (e._forward_hooks or e._forward_pre_hooks)
                for e in (word, self.position_embeddings, self.token_type_embeddings))
    if inputs_embeds is None and plain:
        x = ops.embed_layer_norm(input_ids, token_type_ids, position_ids, word.weight,
                                 self.position_embeddings.weight, self.token_type_embeddings.weight, ln.weight,
                                 ln.bias, ln.eps, padding_idx=word.padding_idx,
                                 position_padding_idx=self.position_embeddings.padding_idx)  # (B, L, d)
    else:  # caller's embeddings, or embedding modules that are not plain lookups: the op fuses the rest
        if inputs_embeds is None:
            inputs_embeds = word(input_ids)
        rest = self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        x = ops.layer_norm(inputs_embeds, ln.weight, ln.bias, ln.eps, residual=rest)  # (B, L, d)
    return self.dropout(x)


def _layer_forward(self, *args, **kwargs):
    """BertLayer.forward on the fused ops. The mask is a Packing (packed route, from the patched encoder), a (B, L)
    key mask or None; anything else (transformers' 4D masks, caches, attention outputs, arguments fastdistil does
    not know) runs the original forward. Returns what the original returns: a tensor, or (tensor,) on 4.x."""
    if len(args) == 2 and not kwargs and isinstance(args[1], Packing):  # the patched encoder's call: nothing to bind
        fn, call, unknown = _original(self).forward, {"hidden_states": args[0], "attention_mask": args[1]}, []
    else:
        fn, call, unknown = _bind(self, "layer", args, kwargs)
    attention_mask = _NO if call is None or unknown else _served_mask(call, "layer")
    if attention_mask is _NO:
        return _fallback(self, fn, args, kwargs, call, unknown)
    hidden_states = call["hidden_states"]
    w = (_weights(self) if isinstance(attention_mask, Packing) and not self.training and not torch.is_grad_enabled()
         else None)
    if w is not None:  # inference on the packed route, as FastStudent: one encoder_layer op
        out = lookup("encoder_layer", hidden_states.device)(w, hidden_states, attention_mask)
    else:
        out = _layer_compute(self, hidden_states, attention_mask)
    return (out,) if _HF["legacy"] else out


def _hooks_need_padded(layers) -> bool:
    """Forward hooks on the layers expect (B, L, d) tensors: keep the padded route while any could fire.
    transformers' own capture hooks count only while a capture is active. A forward replaced on the instance
    (5.0's output capture wraps each layer's forward while it runs) counts as a hook."""
    capture = False
    for layer in layers:
        if not _own_forward(layer):
            return True
        for h in itertools.chain(layer._forward_hooks.values(), layer._forward_pre_hooks.values()):
            if getattr(h, "__name__", "") != "output_capturing_hook":
                return True
            capture = True
    return capture and _capturing("hidden_states")


def _encoder_forward(self, *args, **kwargs):
    """BertEncoder.forward, padding-free: unpad once, N fused layers on (T, d), pad once. Calls it cannot serve
    (see _served_mask, and arguments fastdistil does not know) run the original forward."""
    fn, call, unknown = _bind(self, "encoder", args, kwargs)
    attention_mask = _NO if call is None or unknown else _served_mask(call, "encoder")
    if attention_mask is _NO:
        return _fallback(self, fn, args, kwargs, call, unknown)
    hidden_states = call["hidden_states"]
    collect = [] if _HF["legacy"] and call.get("output_hidden_states") else None  # 4.x: the encoder collects them
    packed = (attention_mask is not None and self._fastdistil_padding_free and not torch.compiler.is_compiling()
              and collect is None and not _hooks_need_padded(self.layer) and not _LOSS_READS_PADDING.get())
    if packed:
        B, L, _ = hidden_states.shape
        p = unpad(attention_mask, B, L, hidden_states.device)  # one host sync per batch
        x = gather(hidden_states, p)  # (T, d)
        side = LeftPad.build(attention_mask, p)  # rows whose position 0 ([CLS], read by poolers) is padding
        if side is not None:
            side.state = hidden_states[side.rows, 0]  # (E, d): the pad token's embedding at position 0
        with seed_pool(_dropout_seeds(self, x, side), x.device):  # a training forward's seeds: one draw
            for layer in self.layer:
                if side is not None:
                    _side_step(layer, side, x)
                x = _layer_output(layer(x, p))  # positional: gradient checkpointing replays it
        hidden_states = pad(x, p)  # (B, L, d), zeros at padding but position 0 of left-padded rows
        if side is not None:
            hidden_states = hidden_states.index_put((side.rows, torch.zeros_like(side.rows)), side.state)
    else:
        for layer in self.layer:
            if collect is not None:
                collect.append(hidden_states)
            hidden_states = _layer_output(layer(hidden_states, attention_mask))  # (B, L, d)
    return _encoder_output(call, hidden_states, collect)


def _dropout_seeds(encoder, x, side) -> int:
    """Seeds the packed layers' dropout takes in one training forward (three per training layer, twice with side
    rows), drawn as one pool (ops/rng.py) on a seed-taking backend; 0, each op drawing its own, when a layer is
    checkpointed (its recompute must make the same draw: transformers' checkpoint restores the RNG state) or on the
    torch backend."""
    layers = [m for m in encoder.layer if m.training]
    if (not layers or resolve(x.device) == "torch" or getattr(encoder, "gradient_checkpointing", False)
            or any(getattr(m, "gradient_checkpointing", False) for m in encoder.layer)):
        return 0
    return 3 * len(layers) * (1 if side is None else 2)


def _layer_output(out):
    """The hidden states a layer returned: 4.x layers return (hidden_states, *attentions)."""
    return out[0] if isinstance(out, tuple) else out


def _encoder_output(call: dict, hidden_states: torch.Tensor, collected: list | None):
    """What the original encoder returns: its output class (fields left at None; 5.24 renamed past_key_values to
    cache there too), or on 4.x a tuple when return_dict=False."""
    all_hidden = None if collected is None else (*collected, hidden_states)
    if _HF["legacy"] and call.get("return_dict") is False:
        return (hidden_states,) if all_hidden is None else (hidden_states, all_hidden)
    return _HF["encoder_output"](last_hidden_state=hidden_states, hidden_states=all_hidden)


def _create_attention_masks(self, *args, **kwargs):
    """Bound onto a patched 5.x base model: the fused encoder takes the (B, L) key mask itself, so the (B, 1, L, L)
    mask is never built. Calls the fused path cannot serve get transformers' masks (and the original forwards)."""
    fn = type(self)._create_attention_masks
    call = _read(fn, args, kwargs)
    unknown = _unknown(call, "masks") if call is not None else []
    if call is None or unknown:
        return _fallback(self, fn, args, kwargs, None, unknown)
    attention_mask = call.get("attention_mask")
    if ((attention_mask is None or attention_mask.dim() == 2) and call.get("encoder_attention_mask") is None
            and call.get("encoder_hidden_states") is None and call.get("cache") is None
            and not _capturing("attentions")):
        return attention_mask, None
    return fn(self, *args, **kwargs)


_FORWARDS = {"embeddings": _embeddings_forward, "layer": _layer_forward, "encoder": _encoder_forward}
