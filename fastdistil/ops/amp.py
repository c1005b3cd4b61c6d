"""The autocast (mixed-precision) policy of fastdistil's ops, one place for every op and backend.

torch.library custom ops do not autocast by themselves, and ``torch.library.register_autocast`` (torch >= 2.5)
casts to one dtype fixed at registration, not to the dtype of the enclosing ``torch.autocast`` region. So each
public op applies the policy below in Python before it dispatches, and runs its implementation with autocast
disabled: every backend (torch, triton, native) then sees the same dtypes, and torch.compile, which traces the
Python, sees the same thing as eager. The policy mirrors what transformers' BERT gets from PyTorch's autocast:

| op | under autocast (dtype c = torch.get_autocast_dtype(device)) |
|---|---|
| linear_gelu | x, weight, bias cast to c (as F.linear); output in c |
| linear_layer_norm | x, weight, bias cast to c; residual and LayerNorm parameters as given; statistics fp32; output in the promoted dtype of c and the residual (an fp32 residual stream stays fp32, as in transformers) |
| attention, varlen_attention | q, k, v cast to c (as scaled_dot_product_attention); softmax statistics fp32 |
| layer_norm | no cast; x and residual may differ (a c GEMM output meets an fp32 residual); output in their promoted dtype |
| bias_gelu | bias cast to x's dtype; output in x's dtype |
| embed_layer_norm, kd_kl_rows, relation_kl_rows | no cast; statistics fp32 (as softmax/layer_norm under autocast) |
"""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for tensors on `device`, or None when autocast is off there."""
    if not _enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _enabled(dev: str) -> bool:
    try:
        return torch.is_autocast_enabled(dev)
    except RuntimeError:  # a device type autocast does not know (meta tensors under torch.compile's fakes)
        return False


def cast(dtype: torch.dtype, *ts):
    """Floating tensors of `ts` in `dtype` (None and non-floating tensors pass through)."""
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t for t in ts)


def disabled(device: torch.device):
    """A context with autocast off for `device`'s type (the implementations run under it)."""
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def _nothing():
    yield


def region(device: torch.device):
    """`disabled(device)` when autocast is on for that device, else a no-op context (no cost on the common path)."""
    return disabled(device) if _enabled(device.type) else _nothing()
