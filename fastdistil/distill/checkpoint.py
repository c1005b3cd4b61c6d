"""Atomic training checkpoints: a kill at any moment leaves the previous complete checkpoint readable.

A checkpoint is one file written as `<name>.tmp-<pid>` in the same directory, flushed and fsync'ed, then renamed
over the final name with os.replace (atomic on POSIX), and the directory is fsync'ed so the rename survives a
crash. Readers only ever see a complete old file or a complete new one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path) -> None:
    """torch.save `obj` to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
