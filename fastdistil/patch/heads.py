"""Heads whose loss reads logits at padded positions (question answering, token labels at padding): fastdistil.patch
binds them a forward that sends those calls down the encoder's padded route, whose padded positions hold
transformers' values."""
from __future__ import annotations

import contextvars
import functools
import inspect

import torch

# True while a head computes a loss that reads logits at padded positions (see _loss_reads_padding): the encoder then
# takes the padded route, whose padded positions hold transformers' values. Set per call by _head_forward.
_LOSS_READS_PADDING = contextvars.ContextVar("fastdistil_loss_reads_padding", default=False)
_HEAD_FORWARDS: dict[type, object] = {}  # head class -> its forward under _LOSS_READS_PADDING (see _head_forward)
_HEAD_ARGS = ("start_positions", "labels")  # heads whose loss may read padded positions take one of these


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
