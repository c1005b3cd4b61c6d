"""One dropout-seed policy for every op and backend (layer_norm, linear_layer_norm, attention; triton and native).

A seed is a (1,) int64 tensor drawn with ``torch.randint`` on the tensor's own device, from that device's default
generator: no host round trip (no pageable copy, no sync), valid under CUDA-graph capture (the CUDA generator
advances its graph-safe Philox offset), traced by torch.compile as a tensor input, and reproducible with
``torch.manual_seed`` (which seeds every device's generator). The kernels derive every dropout decision from it
with counter-based Philox, so the backward regenerates the forward's mask from the saved seed tensor. The native
(C++) kernels take the same draw on the CPU generator as a Python int (:func:`host_seed`) and hash
it with their own counter-based generator, again in forward and backward.

A training forward needs three seeds per layer. Drawn one by one they are three launches per layer; under
:func:`seed_pool` (FastStudent's training forward on a seed-taking backend) they are drawn once per forward, and
each op takes the next (1,) slice of that draw: a view, no launch. A checkpointed layer takes its seeds from the
pool up front (:func:`take`) and runs, and later recomputes, under :func:`use_seeds` with that same slice, so both
passes make one mask. The pool belongs to the thread that opened it (one per nn.DataParallel replica thread) and
serves only its device; past its end, or outside it, each op draws its own.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()  # .pool: [seeds (n,) int64, next index] while a pool is open in this thread


def _draw(n: int, device) -> torch.Tensor:
    return torch.randint(0, 2 ** 62, (n,), dtype=torch.int64, device=device)


def take(k: int, device=None) -> torch.Tensor | None:
    """The next `k` seeds (k,) of the open pool (on `device` when given), or None when no pool can serve them."""
    pool = getattr(_local, "pool", None)
    if pool is None or k <= 0 or pool[1] + k > pool[0].shape[0] or (
            device is not None and pool[0].device != torch.device(device)):
        return None
    i = pool[1]
    pool[1] = i + k
    return pool[0][i:i + k]


def dropout_seed(device) -> torch.Tensor:
    """A (1,) int64 Philox seed drawn from torch's generator on `device` (the next slice of the open pool when it
    has one left on that device)."""
    s = take(1, device)
    return _draw(1, device) if s is None else s


@contextlib.contextmanager
def use_seeds(seeds: torch.Tensor | None):
    """Serve `seeds` (n,) int64 to :func:`dropout_seed` in order inside the block; None: no pool (each op draws)."""
    saved = getattr(_local, "pool", None)
    _local.pool = None if seeds is None else [seeds, 0]
    try:
        yield
    finally:
        _local.pool = saved


def seed_pool(n: int, device):
    """Draw `n` dropout seeds on `device` in one launch and serve them inside the block (n = 0: no pool). Not for
    regions torch.compile traces: there each op draws its own seed."""
    return use_seeds(_draw(n, device) if n > 0 else None)

def host_seed() -> int:
    """The same draw from torch's default CPU generator as a Python int, for the C++ kernels (a CPU tensor: no
    sync). ``torch.manual_seed`` makes it reproducible."""
    return int(dropout_seed("cpu"))
