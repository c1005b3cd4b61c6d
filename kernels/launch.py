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
import os

import torch

MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1). Kept here, not imported
    from the package, so that kernels never import fastdistil's __init__."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes on the host. `triton.cdiv` is a ConstexprFunction since Triton 3.6: called from
    Python it costs 7-9 us (an import and constexpr unwrapping per call, measured with Triton 3.6 and 3.9 on this
    project's CPU), paid several times per launch; this costs 0.1 us and gives the same integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n <= 0), as `triton.next_power_of_2` but without its per-call cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


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
