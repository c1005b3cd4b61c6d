"""One dropout-seed policy for every op and backend (layer_norm, linear_layer_norm, attention; triton and native).

A seed is a (1,) int64 tensor drawn with ``torch.randint`` on the tensor's own device, from that device's default
generator: no host round trip (no pageable copy, no sync), valid under CUDA-graph capture (the CUDA generator
advances its graph-safe Philox offset), traced by torch.compile as a tensor input, and reproducible with
``torch.manual_seed`` (which seeds every device's generator). The kernels derive every dropout decision from it
with counter-based Philox, so the backward regenerates the forward's mask from the saved seed tensor. The native
(C++) kernels take the same draw on the CPU generator as a Python int (:func:`host_seed`) and hash
it with their own counter-based generator, again in forward and backward.
"""
from __future__ import annotations

import torch


def dropout_seed(device) -> torch.Tensor:
    """A (1,) int64 Philox seed drawn from torch's generator on `device`."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def host_seed() -> int:
    """The same draw from torch's default CPU generator as a Python int, for the C++ kernels (a CPU tensor: no
    sync). ``torch.manual_seed`` makes it reproducible."""
    return int(dropout_seed("cpu"))
