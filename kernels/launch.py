"""What every launcher shares: the CUDA device guard and grid limits. No triton import here.

Device guard: Triton launches on the *current* CUDA device (and its current stream), not on the device of the
tensors it is given, so a model on cuda:1 while cuda:0 is current would fault. Every launcher is wrapped in
:func:`on_tensor_device`, which makes the first tensor argument's device current for the launch, and only when
it is not current already (one ``torch.cuda.current_device()`` call, ~1 us; no context manager on the common path).

Grid limits: CUDA caps grid axes 1 and 2 at 65,535 blocks (axis 0 at 2^31 - 1), so the axis that scales with the
batch (sequences x heads) goes on axis 0; :func:`check_grid` turns a violation into a clear error instead of
"Triton Error [CUDA]: invalid argument".
"""
from __future__ import annotations

import functools

import torch

MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def check_grid(grid: tuple) -> tuple:
    """`grid` itself, after checking each axis against CUDA's limits (ValueError naming the axis)."""
    for axis, (n, cap) in enumerate(zip(grid, MAX_GRID)):
        if n > cap:
            raise ValueError(f"grid axis {axis} has {n} blocks; CUDA allows at most {cap}")
    return grid


def device_to_enter(device: torch.device, current: int) -> int | None:
    """The CUDA device index a launch on `device` must make current, or None when nothing needs switching
    (a CPU tensor under the interpreter, an index-less device, or the device already current)."""
    if device.type != "cuda" or device.index is None or device.index == current:
        return None
    return device.index


def on_tensor_device(fn):
    """Decorator for launchers whose first argument is a tensor: run under that tensor's CUDA device."""
    @functools.wraps(fn)
    def launcher(t, *args, **kwargs):
        dev = t.device
        if dev.type == "cuda":
            idx = device_to_enter(dev, torch.cuda.current_device())
            if idx is not None:
                with torch.cuda.device(idx):
                    return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)
    launcher.device_guarded = True
    return launcher
