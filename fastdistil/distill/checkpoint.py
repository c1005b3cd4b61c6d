"""Atomic training checkpoints: a kill at any moment leaves the previous complete checkpoint readable.

A checkpoint is one file written as `<name>.tmp-<pid>` in the same directory, flushed and fsync'ed, then renamed
over the final name with os.replace (atomic on POSIX), and the directory is fsync'ed so the rename survives a
crash. Readers only ever see a complete old file or a complete new one; temporaries of a failed write are removed at
once, those of a killed process before the next write to the directory.
"""
from __future__ import annotations

import random

import torch

from ..atomic import atomic_write


def atomic_save(obj, path) -> None:
    """torch.save `obj` to `path` atomically (fastdistil.atomic: temp file + fsync + rename). A failed write (a
    full disk) removes the temporary and raises OSError naming `path`; the previous checkpoint stays readable."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def load(path) -> dict:
    """Read a checkpoint written by atomic_save. Only tensors and plain containers are unpickled
    (weights_only=True); RNG states are stored as tensors / lists for that reason."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise OSError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def rng_state() -> dict:
    """Python, torch CPU (and CUDA) RNG states, in a weights_only-loadable form."""
    py = random.getstate()
    st = {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
