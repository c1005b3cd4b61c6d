"""The attention masks of fastdistil.patch: which key mask a fused forward runs with, the 4D mask transformers
would have built from it (for calls that run transformers' own forward), and the (B, L) key mask read back from
4.x's 4D masks."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..padding import Packing
from .hf import _ALIASES, _HF, _capturing

_NO = object()  # "the fused path cannot serve this call"


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
