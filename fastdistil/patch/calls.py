"""Calls to the fused forwards of fastdistil.patch, read by the names the installed transformers uses.

Releases rename keyword arguments (hf._ALIASES) and add new ones, so the fused forwards take (*args, **kwargs), bind
them to the ORIGINAL forward's signature (read with inspect once per class) and read them by canonical names. A call
the fused path cannot serve runs the original forward with exactly the arguments it was given, so it never raises
a TypeError of ours.
"""
from __future__ import annotations

import inspect
import itertools

import torch
import torch.nn as nn

from .hf import _ALIASES, _original, _warn
from .masks import _hf_mask

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


def _bind(self, role: str, args, kwargs):
    """(fn, call, unknown): transformers' forward of self's original class, the call read against its signature
    (None when it does not bind) and the arguments set in it that the fused forward of `role` does not know."""
    fn = _original(self).forward
    call = _read(fn, args, kwargs)
    return fn, call, (_unknown(call, role) if call is not None else [])


def _own_forward(m: nn.Module) -> bool:
    """Whether m's forward is its class's: no instance attribute, or one that is the class's forward bound to m
    (transformers 5.0's output capture restores `module.forward = original_forward` that way after each call)."""
    f = m.__dict__.get("forward")
    return f is None or (getattr(f, "__self__", None) is m and getattr(f, "__func__", None) is type(m).forward)
