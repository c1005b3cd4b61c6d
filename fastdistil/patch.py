"""Drop-in for existing code: run a transformers / sentence-transformers BERT model on fastdistil's fused ops.

    model = AutoModelForSequenceClassification.from_pretrained(...)
    fastdistil.patch(model)        # in place; returns the model
    ...                            # Trainer, save_pretrained, torch.compile, gradient checkpointing as before
    fastdistil.unpatch(model)      # back to the original classes

How: every supported submodule keeps its object, its Parameters and its state-dict keys; only its class is swapped
for a subclass (same ``__name__``) whose ``forward`` calls the same ops as FastStudent through the backend seam, so
whatever backend is selected (torch, triton, native) runs here unchanged:

- embeddings  -> ``ops.embed_layer_norm`` (word + position + type gather, sum, LayerNorm in one op);
- each layer  -> in inference on the packed route, the ``encoder_layer`` op as FastStudent calls it (native runs
  the whole layer in one C++ call); otherwise one QKV GEMM, ``ops.attention`` (padded, key mask) or
  ``ops.varlen_attention`` (packed), ``ops.linear_layer_norm`` (GEMM + bias + dropout + residual + LayerNorm)
  after attention and FFN, ``ops.linear_gelu`` (GEMM + bias + GELU) into the FFN, fused where the backend fuses;
- the encoder -> padding-free: unpad once at entry, every layer on the (T, d) real tokens, pad once at exit
  (fastdistil/padding.py). It takes the padded route instead (same ops, (B, L, d), key mask) under
  ``torch.compile`` (static shapes), when the batch has no mask, or when forward hooks on the layers (e.g.
  ``output_hidden_states``) must see (B, L, d) tensors;
- the base model's ``_create_attention_masks`` hands the encoder the 2D key mask instead of a (B, 1, L, L) one
  (transformers 5); on 4.x, where the base model builds the 4D mask inline, the encoder reads the key mask back
  from it (checked exactly; under ``torch.compile`` 4.x batches with a mask run transformers' layers).

A module is patched only when its class's ``forward`` has exactly the bytecode of transformers' BERT module
(RoBERTa, ELECTRA and other "Copied from Bert" classes qualify by that test, whatever their names) and its config
is supported: absolute positions, no decoder / cross-attention, a GELU activation (erf, or the tanh variants). Anything
else is left unpatched with a warning naming it. At run time, calls the fused path cannot serve exactly
(a cache, ``encoder_hidden_states``, a 4D attention mask, ``output_attentions``, a head mask) run the original forward.
The fused forwards follow the installed release's forward signatures (read with ``inspect`` at patch time, renamed
arguments mapped: 5.24's ``cache`` / ``cache_length`` and the older ``past_key_values`` / ``past_key_values_length``);
a keyword argument this module does not know runs the original forward for that call, with a warning naming it.
Linear layers that are not plain ``nn.Linear`` (PEFT LoRA wrappers, quantised layers) or carry hooks are called as
modules, so adapters keep working; plain ones go to the fused ``linear_*`` ops with their weight and bias.

Differences from the unpatched model, both by design: (1) positions that are padding hold zeros in
``last_hidden_state`` on the padding-free route (transformers computes values there from the pad tokens; no
correct consumer reads them), except position 0 of left-padded rows, which poolers and [CLS] heads read: it is
computed as transformers computes it (fastdistil/leftpad.py), and calls whose loss reads padded positions run the
padded route (see :func:`_loss_reads_padding`); (2) dropout draws other random numbers (same distribution).
Needs transformers >= 4.57 (``MIN_TRANSFORMERS``; on older releases ``patch`` warns and leaves the model as it is);
CI tests the newest 4.x and the pinned 5.x (constraints/).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import re
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops.checks import FLOAT_DTYPES
from .leftpad import LeftPad
from .layer_weights import LayerWeights, activation_name, attend, layer_ops
from .model import _plain
from .ops.dispatch import lookup
from .padding import Packing, gather, pad, unpad
from .weight_cache import fused_qkv

__all__ = ["patch", "unpatch", "patch_sentence_transformer", "is_patched", "MIN_TRANSFORMERS"]

MIN_TRANSFORMERS = (4, 57)  # the oldest transformers release the fused path follows (tested: newest 4.x, pinned 5.x)

_ORIGINAL = "_fastdistil_original_class"
_SUPPORTED_DEVICES = ("cpu", "cuda")
_GELU = {"GELUActivation": "none", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh", "NewGELUActivation": "tanh",
         "FastGELUActivation": "tanh"}
_INSTANCE_ATTRS = ("_fastdistil_gelu", "_fastdistil_padding_free", "_fastdistil_report")
_FUSED: dict[tuple[type, str], type] = {}  # (original class, role) -> fused subclass
_HF: dict = {}  # transformers objects, imported on the first patch (importing fastdistil never imports transformers)
# True while a head computes a loss that reads logits at padded positions (see _loss_reads_padding): the encoder then
# takes the padded route, whose padded positions hold transformers' values. Set per call by _head_forward.
_LOSS_READS_PADDING = contextvars.ContextVar("fastdistil_loss_reads_padding", default=False)
_HEAD_FORWARDS: dict[type, object] = {}  # head class -> its forward under _LOSS_READS_PADDING (see _head_forward)
_HEAD_ARGS = ("start_positions", "labels")  # heads whose loss may read padded positions take one of these


# ----------------------------------------------------------------------------------------------------------------
# The fused forwards. Each reads the HF module's own Parameters; none copies a weight.
# ----------------------------------------------------------------------------------------------------------------

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


def _original(module: nn.Module) -> type:
    return type(module).__dict__[_ORIGINAL]


def _capturing(key: str) -> bool:
    """Whether transformers' output capture (`output_attentions`, `output_hidden_states`) is collecting `key`."""
    collector = _HF.get("collector")
    if collector is None:
        return False
    active = collector.get()
    return bool(active) and key in active


# ----------------------------------------------------------------------------------------------------------------
# Calls, read by the names the installed transformers uses. Releases rename keyword arguments (5.24:
# past_key_values -> cache, past_key_values_length -> cache_length; 5.0 spelled input_embeds) and add new ones, so
# the fused forwards take (*args, **kwargs), bind them to the ORIGINAL forward's signature (read with inspect once
# per class) and read them by canonical names. A call the fused path cannot serve runs the original forward with
# exactly the arguments it was given, so it never raises a TypeError of ours.
# ----------------------------------------------------------------------------------------------------------------

_ALIASES = {"past_key_values": "cache", "past_key_value": "cache", "past_key_values_length": "cache_length",
            "input_embeds": "inputs_embeds"}
# Arguments transformers passes that change nothing on the fused path: positions are applied by the embeddings,
# hidden states are captured by hooks (5.x) or collected by the fused encoder (4.x), cross-attention masks mean
# nothing without encoder_hidden_states (which falls back), the rest is cache or loss bookkeeping.
_INERT = frozenset({"use_cache", "cache_position", "position_ids", "num_items_in_batch", "output_hidden_states",
                    "return_dict", "encoder_attention_mask", "output_router_logits"})
_READS = frozenset({"hidden_states", "attention_mask", "encoder_hidden_states", "cache", "output_attentions",
                    "head_mask"})
_KNOWN = {"embeddings": frozenset({"input_ids", "token_type_ids", "position_ids", "inputs_embeds", "cache_length"}),
          "layer": _READS | _INERT, "encoder": _READS | _INERT,
          "masks": frozenset({"attention_mask", "encoder_attention_mask", "embedding_output", "encoder_hidden_states",
                              "cache"}) | _INERT}
_PARAMS: dict = {}  # function -> (positional names, defaults, names, takes **kwargs); filled at patch time
_NO = object()  # "the fused path cannot serve this call"
_REPLACED_FORWARD = ("its forward is replaced on the instance (an accelerate hook or another wrapper), which would "
                     "run instead of the fused forward")


def _params(fn):
    """fn's parameters after self, from its signature (inspect follows transformers' deprecate_kwarg wrappers)."""
    if fn not in _PARAMS:
        P = inspect.Parameter
        ps = list(inspect.signature(fn).parameters.values())[1:]
        _PARAMS[fn] = (tuple(p.name for p in ps if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)),
                       {p.name: p.default for p in ps if p.default is not P.empty},
                       frozenset(p.name for p in ps if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)),
                       any(p.kind is P.VAR_KEYWORD for p in ps))
    return _PARAMS[fn]


def _read(fn, args, kwargs) -> dict | None:
    """The call fn(self, *args, **kwargs) as {canonical name: value}, defaults filled in; None when it does not bind
    to fn's signature (the original forward then runs and reports the mistake itself)."""
    positional, defaults, names, var_kw = _params(fn)
    if len(args) > len(positional) or any(k in positional[:len(args)] for k in kwargs):
        return None
    if not var_kw and any(k not in names for k in kwargs):
        return None
    given = dict(zip(positional, args), **kwargs)
    if any(n not in given and n not in defaults for n in names):
        return None
    call: dict = {}
    for name, value in itertools.chain(defaults.items(), given.items()):
        name = _ALIASES.get(name, name)
        if value is not None or call.get(name) is None:  # an old spelling fills the new one, never clears it
            call[name] = value
    return call


def _unknown(call: dict, role: str) -> list[str]:
    """Arguments set (not None / False) in `call` that the fused forward of `role` does not know."""
    return sorted(k for k, v in call.items() if k not in _KNOWN[role] and v is not None and v is not False)


def _fallback(self, fn, args, kwargs, call, unknown):
    """Run transformers' own `fn` on the call as given; a (B, L) key mask (what the patched base model hands the
    encoder) becomes the mask transformers would have built. Unknown arguments are named in a warning."""
    if unknown:
        import transformers
        _warn(f"{type(self).__name__}.{fn.__name__} got {', '.join(map(repr, unknown))}, which fastdistil's fused path "
              f"does not know (transformers {transformers.__version__}); this call runs transformers' own code")
    mask = call.get("attention_mask") if call is not None else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and "attention_mask" in _params(fn)[2]:
        mask = _hf_mask(self, mask, call["hidden_states"])
        positional = _params(fn)[0]
        i = positional.index("attention_mask") if "attention_mask" in positional else len(args)
        if i < len(args):
            args = (*args[:i], mask, *args[i + 1:])
        else:
            kwargs = {**kwargs, "attention_mask": mask}
    return fn(self, *args, **kwargs)


def _hf_mask(module: nn.Module, mask: torch.Tensor, x: torch.Tensor):
    """The attention mask transformers builds from a (B, L) key mask: 5.x's create_bidirectional_mask for the
    module's attention implementation; on 4.x the additive (B, 1, 1, L) mask every attention class takes."""
    config = getattr(module, "config", None) or getattr(getattr(getattr(module, "attention", None), "self", None),
                                                        "config", None)
    build = _HF.get("bidirectional_mask")
    if build is not None and config is not None:
        names = inspect.signature(build).parameters  # 5.0 spelled it input_embeds
        canonical = {"config": config, "inputs_embeds": x, "attention_mask": mask}
        return build(**{n: canonical[_ALIASES.get(n, n)] for n in names if _ALIASES.get(n, n) in canonical})
    return (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # (B, 1, 1, L)


def _key_mask_4d(mask: torch.Tensor):
    """4.x base models hand the encoder (B, 1, 1, L) or (B, 1, L, L) additive masks made from a (B, L) key mask
    (0 where attended, the dtype's minimum elsewhere). That key mask, or None for any other mask (a 3D user mask, a
    causal one) and under torch.compile (the check reads values: one host sync)."""
    if (mask.dim() != 4 or mask.shape[1] != 1 or not mask.is_floating_point()
            or torch.compiler.is_compiling()):
        return None
    row = mask[:, :, :1, :]  # (B, 1, 1, L)
    keep = row == 0
    if not bool((keep | (row == torch.finfo(mask.dtype).min)).all()):
        return None
    if mask.shape[2] > 1 and not torch.equal(mask, row.expand_as(mask)):
        return None
    return keep[:, 0, 0, :].long()  # (B, L)


def _served_mask(call: dict, role: str):
    """The key mask ((B, L) or None; a Packing from the patched encoder) the fused forward runs with, or _NO when
    the call needs transformers' own forward: caches, cross-attention, attention outputs, head masks, other masks."""
    head_mask = call.get("head_mask")
    if (call.get("encoder_hidden_states") is not None or call.get("cache") is not None
            or call.get("output_attentions") or _capturing("attentions")
            or not (head_mask is None or isinstance(head_mask, (list, tuple)) and all(h is None for h in head_mask))):
        return _NO
    mask = call.get("attention_mask")
    if mask is None or isinstance(mask, Packing) or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return mask
    if role == "encoder" and _HF["legacy"] and isinstance(mask, torch.Tensor):
        key = _key_mask_4d(mask)
        return _NO if key is None else key
    return _NO


def _embeddings_forward(self, *args, **kwargs):
    """BertEmbeddings.forward, whatever its signature in the installed transformers: the fused path, or the original
    forward for calls it does not know."""
    fn = _original(self).forward
    call = _read(fn, args, kwargs)
    unknown = _unknown(call, "embeddings") if call is not None else []
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
                                 ln.bias, ln.eps, padding_idx=word.padding_idx)  # (B, L, d)
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
    fn = _original(self).forward
    if len(args) == 2 and not kwargs and isinstance(args[1], Packing):  # the patched encoder's call: nothing to bind
        call, unknown = {"hidden_states": args[0], "attention_mask": args[1]}, []
    else:
        call = _read(fn, args, kwargs)
        unknown = _unknown(call, "layer") if call is not None else []
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


def _own_forward(m: nn.Module) -> bool:
    """Whether m's forward is its class's: no instance attribute, or one that is the class's forward bound to m
    (transformers 5.0's output capture restores `module.forward = original_forward` that way after each call)."""
    f = m.__dict__.get("forward")
    return f is None or (getattr(f, "__self__", None) is m and getattr(f, "__func__", None) is type(m).forward)


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
    fn = _original(self).forward
    call = _read(fn, args, kwargs)
    unknown = _unknown(call, "encoder") if call is not None else []
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


def _loss_reads_padding(call: dict) -> bool:
    """Whether a head call's loss reads logits at padded positions, which only the padded route computes as
    transformers does: its question-answering loss takes every position into the softmax over start (end)
    positions, and token-level labels (token classification, masked LM) count wherever they are not -100."""
    mask = call.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    if call.get("start_positions") is not None or call.get("end_positions") is not None:
        return True
    labels = call.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.shape != mask.shape or labels.is_floating_point():
        return False  # sequence-level labels read the pooler only
    return bool(((labels != -100) & ~mask.to(labels.device, torch.bool)).any())  # one host sync


def _takes_any(fn, names) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no readable signature: not a transformers head
        return False
    return any(n in params for n in names)


def _head_forward(cls: type):
    """cls.forward, run with the encoder's padded route for calls whose loss reads padded positions; bound per
    instance by :func:`patch` (the class stays as is), with the original's signature (Trainer reads it)."""
    if cls not in _HEAD_FORWARDS:
        orig = cls.forward
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def forward(self, *args, **kwargs):
            if torch.compiler.is_compiling():  # traced: the encoder is on the padded route anyway
                return orig(self, *args, **kwargs)
            try:
                call = sig.bind_partial(self, *args, **kwargs).arguments
            except TypeError:  # the original raises its own error
                return orig(self, *args, **kwargs)
            token = _LOSS_READS_PADDING.set(_loss_reads_padding(call))
            try:
                return orig(self, *args, **kwargs)
            finally:
                _LOSS_READS_PADDING.reset(token)

        _HEAD_FORWARDS[cls] = forward
    return _HEAD_FORWARDS[cls]


# ----------------------------------------------------------------------------------------------------------------
# Which modules qualify.
# ----------------------------------------------------------------------------------------------------------------

def _code_key(code: types.CodeType, doc=None, rename=None):
    consts = tuple(_code_key(c, None, rename) if isinstance(c, types.CodeType)
                   else c.replace(*rename) if rename and isinstance(c, str) else c
                   for c in code.co_consts if not (doc is not None and c == doc))
    return code.co_code, code.co_names, code.co_varnames, consts


def _same_code(a, b, rename: tuple[str, str] | None = None) -> bool:
    """Whether two functions compile to the same bytecode (transformers' "Copied from Bert" classes do). `rename`
    (old, new) is applied to a's string constants first: "Copied from Bert with Bert->Roberta" renames the model in
    messages too (4.x's RobertaSdpaSelfAttention warns "RobertaSdpaSelfAttention is used but ...")."""
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    if not (hasattr(a, "__code__") and hasattr(b, "__code__")):
        return False
    return _code_key(a.__code__, a.__doc__, rename) == _code_key(b.__code__, b.__doc__)


def _copied_as(cls: type, ref: type) -> tuple[str, str] | None:
    """(model prefix, "Bert") when cls is ref's class under another model's name (RobertaSdpaSelfAttention for
    BertSdpaSelfAttention), else None."""
    stem = ref.__name__[len("Bert"):]
    if ref.__name__.startswith("Bert") and cls.__name__.endswith(stem) and len(cls.__name__) > len(stem):
        return cls.__name__[:-len(stem)], "Bert"
    return None


def _transformers_version() -> tuple[int, int]:
    import transformers
    return tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])


def _load_transformers() -> bool:
    """Import what the fused forwards need from transformers; False on releases older than MIN_TRANSFORMERS."""
    if _HF:
        return True
    if _transformers_version() < MIN_TRANSFORMERS:
        return False
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    from transformers.models.bert import modeling_bert
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # capture machinery moved (or 4.x): treat nothing as captured
        _active_collector = None
    # 4.x ("legacy") layers take output_attentions and return tuples, and their base models hand the encoder 4D
    # masks (there is no _create_attention_masks to hook); 5.x layers return tensors and take **kwargs.
    legacy = "output_attentions" in inspect.signature(modeling_bert.BertLayer.forward).parameters
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        create_bidirectional_mask = None
    # 4.x picks the self-attention class by attention implementation (eager / sdpa): both are BERT's code.
    self_attention = (modeling_bert.BertSelfAttention,
                      *getattr(modeling_bert, "BERT_SELF_ATTENTION_CLASSES", {}).values())
    _HF.update(bert=modeling_bert, encoder_output=BaseModelOutputWithPastAndCrossAttentions,
               collector=_active_collector, legacy=legacy, self_attention=self_attention,
               bidirectional_mask=None if legacy else create_bidirectional_mask)
    return True


_ARCH_PREPARE: dict = {}  # role -> per-instance setup of another architecture's fused module (padding_free, GELU)


def _arch_patches() -> list:
    """The patch pieces of architectures whose classes are not BERT's code, named by the registry (Arch.patch in
    fastdistil/arch/): each module offers role(module) -> (role, why) | None, and FORWARDS / PREPARE by role."""
    import importlib

    from .arch import ARCHS
    mods = [importlib.import_module(f".arch.{n}", __package__)
            for n in dict.fromkeys(a.patch for a in ARCHS.values() if a.patch)]
    for mod in mods:
        _FORWARDS.update(mod.FORWARDS)
        _ARCH_PREPARE.update(mod.PREPARE)
    return mods


def _is_fused(m: nn.Module) -> bool:
    return _ORIGINAL in type(m).__dict__


def _looks_like_layer(m: nn.Module) -> bool:
    att = getattr(m, "attention", None)
    return (isinstance(m, nn.Module) and att is not None and hasattr(att, "self") and hasattr(att, "output")
            and hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(att.self, "query"))


def _gelu_mode(act) -> str | None:
    if isinstance(act, nn.GELU):
        return act.approximate
    if act is F.gelu:
        return "none"
    return _GELU.get(type(act).__name__)


def _layer_problem(layer: nn.Module) -> str | None:
    """Why this BERT-shaped layer cannot take the fused path (None when it can)."""
    bert = _HF["bert"]
    att, sa = layer.attention, layer.attention.self
    if hasattr(layer, "crossattention") or getattr(layer, "add_cross_attention", False):
        return "cross-attention is not supported"
    if getattr(layer, "is_decoder", False) or getattr(sa, "is_causal", False) or getattr(sa, "is_decoder", False):
        return "decoder (causal) self-attention is not supported"
    if getattr(sa, "position_embedding_type", "absolute") != "absolute" or hasattr(sa, "distance_embedding"):
        return "relative position embeddings are not supported"
    sa_ref = next((c for c in _HF["self_attention"]
                   if _same_code(getattr(type(sa), "forward", None), c.forward, _copied_as(type(sa), c))),
                  bert.BertSelfAttention)
    checks = ((layer, bert.BertLayer, ("forward", "feed_forward_chunk")), (att, bert.BertAttention, ("forward",)),
              (sa, sa_ref, ("forward",)), (att.output, bert.BertSelfOutput, ("forward",)),
              (layer.intermediate, bert.BertIntermediate, ("forward",)), (layer.output, bert.BertOutput, ("forward",)))
    for mod, ref, names in checks:
        for name in names:
            if not _same_code(getattr(type(mod), name, None), getattr(ref, name), _copied_as(type(mod), ref)):
                return f"{type(mod).__name__}.{name} differs from transformers' {ref.__name__}.{name}"
    if _gelu_mode(layer.intermediate.intermediate_act_fn) is None:
        return (f"activation {type(layer.intermediate.intermediate_act_fn).__name__} is not supported (GELU: erf, "
                f"or the tanh variants gelu_new / gelu_fast / gelu_pytorch_tanh)")
    for ln in (att.output.LayerNorm, layer.output.LayerNorm):
        if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None:
            return "its LayerNorms are not affine nn.LayerNorm modules"
    return None


def _embeddings_problem(emb: nn.Module) -> str | None:
    ref = _HF["bert"].BertEmbeddings
    if getattr(emb, "position_embedding_type", "absolute") != "absolute":
        return "relative position embeddings are not supported"
    if not _same_code(getattr(type(emb), "forward", None), ref.forward):
        return f"{type(emb).__name__}.forward differs from transformers' BertEmbeddings.forward"
    ln = emb.LayerNorm
    if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None:
        return "its LayerNorm is not an affine nn.LayerNorm"
    return None


def _check_device_dtype(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters():
        if p.device.type not in _SUPPORTED_DEVICES or p.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"fastdistil.patch supports models on {' or '.join(_SUPPORTED_DEVICES)} with float32, float16, "
                f"bfloat16 or float64 weights; {name or 'the model'}.{pname} is {p.dtype} on {p.device}. Move or cast "
                f"the model first (e.g. model.to('cpu', torch.float32)), then patch it.")


def _fused_class(cls: type, role: str) -> type:
    """A subclass of `cls` with the fused forward: same __name__ (so _no_split_modules, reprs and class-name
    checks still match); a unique __qualname__ registered in this module so instances pickle in this process."""
    key = (cls, role)
    if key not in _FUSED:
        qual = f"_Fused_{cls.__module__}_{cls.__qualname__}".replace(".", "_")
        fused = type(cls.__name__, (cls,), {"forward": _FORWARDS[role], _ORIGINAL: cls, "__module__": __name__,
                                            "__qualname__": qual,
                                            "__doc__": f"{cls.__name__} running on fastdistil's fused ops."})
        globals()[qual] = fused
        _FUSED[key] = fused
    return _FUSED[key]


def _warn(msg: str) -> None:
    warnings.warn(f"fastdistil.patch: {msg}", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    """Whether any submodule of `model` runs a fastdistil fused forward."""
    return any(_is_fused(m) for m in model.modules())


def patch(model: nn.Module, *, padding_free: bool = True, exact_padded_loss: bool = True) -> nn.Module:
    """Run a transformers BERT-family model (or a SentenceTransformer holding one) on fastdistil's fused ops, in place.

    Embeddings, layers and encoders whose code is transformers' BERT code are switched to fused forwards; their
    Parameters, state-dict keys, hooks, requires_grad flags and gradient checkpointing are untouched, so optimizers
    built before or after, ``save_pretrained``, ``Trainer`` and PEFT-style freezing keep working. Unsupported parts
    (decoders, cross-attention, relative positions, non-GELU activations, classes with other code) stay unpatched
    with a warning naming them.

    Args:
        model: any nn.Module; every BERT-shaped part inside it is considered (several encoders are fine).
        padding_free: run the encoder on the real tokens only (unpad once, pad once) when a batch carries an
            attention mask. False keeps the padded (B, L, d) layout everywhere (same ops, key-masked attention).
        exact_padded_loss: calls of heads whose loss reads logits at padded positions (question answering's start /
            end positions; token labels other than -100 at padding) run the padded route, so the loss equals
            transformers' (which scores the pad tokens' hidden states). False keeps them padding-free: faster
            (1.8-2.5x per QA training step at 41% padding, docs/patching.md), but the loss then ignores padded
            positions.
    Returns:
        `model` itself.
    Raises:
        ValueError: a part to be patched has weights on a device other than cpu / cuda or of a non-float dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdistil.patch expects a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        _warn(f"{type(model).__name__} is already patched; patch() again is a no-op (unpatch() first to re-patch)")
        return model
    if not _load_transformers():
        import transformers
        _warn(f"the fused path needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (installed: "
              f"{transformers.__version__}); the model is left unpatched")
        return model
    bert = _HF["bert"]
    archs = _arch_patches()

    plan: list[tuple[str, nn.Module, str]] = []  # (name, module, role)
    skipped: dict[str, str] = {}
    layers_ok: dict[int, bool] = {}
    for name, m in model.named_modules():
        hit = next((h for h in (a.role(m) for a in archs) if h is not None), None)
        if hit is not None:  # another architecture's own classes (fastdistil/arch/*_patch.py)
            role, why = hit
        elif hasattr(m, "word_embeddings") and hasattr(m, "LayerNorm") and hasattr(m, "position_embeddings"):
            why, role = _embeddings_problem(m), "embeddings"
        elif _looks_like_layer(m):
            why, role = _layer_problem(m), "layer"
            layers_ok[id(m)] = why is None
        else:
            continue
        if why is None and not _own_forward(m):
            why = _REPLACED_FORWARD
            layers_ok[id(m)] = False
        if why is None:
            plan.append((name, m, role))
        else:
            skipped[name] = why
    for name, m in model.named_modules():  # encoders: only when every layer is fused (the packed route needs it)
        stack = getattr(m, "layer", None)
        if isinstance(stack, nn.ModuleList) and len(stack) and all(id(x) in layers_ok for x in stack):
            if not all(layers_ok[id(x)] for x in stack):
                skipped.setdefault(name, "some of its layers are unsupported, so it stays padded and unfused")
            elif not _same_code(type(m).forward, bert.BertEncoder.forward):
                skipped.setdefault(name, f"{type(m).__name__}.forward differs from transformers' BertEncoder.forward")
            elif not _own_forward(m):
                skipped.setdefault(name, _REPLACED_FORWARD)
            else:
                plan.append((name, m, "encoder"))
    encoders = {id(m) for _, m, role in plan if role.endswith("encoder")}
    bases = [(n, m) for n, m in model.named_modules()
             if id(getattr(m, "encoder", None)) in encoders and hasattr(type(m), "_create_attention_masks")
             and _same_code(type(m)._create_attention_masks, bert.BertModel._create_attention_masks)
             and _same_code(type(m).forward, bert.BertModel.forward)]
    based, partial = {id(m.encoder) for _, m in bases}, {}
    for name, m, role in plan:
        if role == "encoder" and id(m) not in based and not _HF["legacy"]:  # 4.x: the encoder reads 4D key masks
            partial[name] = (
                "its base model's forward is not BertModel's, so batches with padding arrive as transformers' 4D "
                "masks and run the original layers; unpadded batches and the embeddings are fused")
    for name, m, _ in plan:
        _check_device_dtype(name, m)  # before anything changes: a failed patch leaves the model as it was

    for name, why in skipped.items():
        _warn(f"left {name or type(model).__name__} ({type(model.get_submodule(name)).__name__}) unpatched: {why}")
    for name, why in partial.items():
        _warn(f"{name or type(model).__name__} is only partly fused: {why}")
    if not plan:
        _warn(f"found no supported BERT embeddings or layers in {type(model).__name__}; nothing was patched")
        return model
    for name, m, role in plan:
        if role == "layer":
            m._fastdistil_gelu = _gelu_mode(m.intermediate.intermediate_act_fn)
        if role == "encoder":
            m._fastdistil_padding_free = bool(padding_free)
        if role in _ARCH_PREPARE:
            _ARCH_PREPARE[role](m, padding_free)
        _params(type(m).forward)  # read the signature now: never inside torch.compile's trace
        m.__dict__.pop("forward", None)  # only ever the class's own forward, bound (_own_forward): it would shadow ours
        m.__class__ = _fused_class(type(m), role)
    for _, m in bases:  # bound per instance: the base model's class (and transformers' registries) stays as is
        _params(type(m)._create_attention_masks)
        m.__dict__["_create_attention_masks"] = types.MethodType(_create_attention_masks, m)
    for name, m in model.named_modules():  # heads whose loss may read padded positions (question answering, ...)
        if (exact_padded_loss and _takes_any(type(m).forward, _HEAD_ARGS)
                and any(id(x) in encoders for x in m.modules())):
            if "forward" in m.__dict__:
                _warn(f"{name or type(m).__name__}.forward is replaced on the instance; its losses that read padded "
                      f"positions (question answering, token labels at padding) will differ from transformers'")
            else:
                m.__dict__["forward"] = types.MethodType(_head_forward(type(m)), m)
    model.__dict__["_fastdistil_report"] = {"patched": [n for n, _, _ in plan] + [f"{n}._create_attention_masks"
                                                                                  for n, _ in bases],
                                            "skipped": skipped, "partial": partial}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every fused module gets its original class back and the patch's caches are dropped.

    Args:
        model: a model given to :func:`patch` (unpatching an unpatched model warns and does nothing).
    Returns:
        `model` itself.
    """
    found = False
    for m in model.modules():
        if _is_fused(m):
            if _own_forward(m):  # a fused forward bound on the instance (5.0's capture) must not outlive the patch
                m.__dict__.pop("forward", None)
            m.__class__ = _original(m)
            found = True
        if isinstance(m.__dict__.get("_create_attention_masks"), types.MethodType):
            del m.__dict__["_create_attention_masks"]
            found = True
        if getattr(m.__dict__.get("forward"), "__func__", None) in _HEAD_FORWARDS.values():
            del m.__dict__["forward"]
        for attr in _INSTANCE_ATTRS:
            m.__dict__.pop(attr, None)
    if not found:
        _warn(f"{type(model).__name__} is not patched; unpatch() did nothing")
    return model


def patch_sentence_transformer(st_model: nn.Module, *, padding_free: bool = True) -> nn.Module:
    """:func:`patch` for a sentence_transformers.SentenceTransformer whose first module wraps a BERT model.

    Args:
        st_model: the SentenceTransformer; `encode` keeps its results (within float tolerance).
        padding_free: as in :func:`patch`.
    Returns:
        `st_model` itself.
    Raises:
        ValueError: the first module holds no transformers model (``auto_model``) or nothing in it could be patched.
    """
    try:
        first = st_model[0]
    except (TypeError, IndexError, KeyError):
        first = None
    inner = getattr(first, "auto_model", None)
    if inner is None:
        raise ValueError(f"expected a SentenceTransformer whose first module wraps a transformers model "
                         f"(`.auto_model`), got {type(st_model).__name__}")
    if not is_patched(inner):
        patch(inner, padding_free=padding_free)
        if not is_patched(inner):
            raise ValueError(f"nothing in {type(inner).__name__} could be patched (see the warnings above)")
    else:
        _warn(f"{type(inner).__name__} is already patched; patch() again is a no-op")
    return st_model
