"""Argument checks shared by the public ops: clear errors at the boundary, no host sync."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")


def check_same(names: str, *ts: torch.Tensor) -> None:
    """All tensors share dtype and device."""
    d0, v0 = ts[0].dtype, ts[0].device
    for t in ts[1:]:
        if t.dtype != d0:
            raise TypeError(f"{names} must share one dtype, got {[x.dtype for x in ts]}")
        if t.device != v0:
            raise ValueError(f"{names} must be on one device, got {[str(x.device) for x in ts]}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` may hold None for a free dimension."""
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
