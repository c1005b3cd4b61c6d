"""Registry behind the backend seam: op name x backend -> implementation.

The op files register their ``torch`` implementation (the reference) and, where they own it, their ``triton``
one; backend packages that span several ops (``native``) register from their own module, imported lazily the
first time that backend is resolved. An op with no implementation for the resolved backend runs the torch one.
"""
from __future__ import annotations

import functools
import importlib

from ..backend import resolve

_IMPLS: dict[tuple[str, str], object] = {}
# Modules that register implementations for a backend, imported on first use of that backend.
_LAZY = {"native": ("fastdistil.ops.native",), "triton": ()}
_loaded: set[str] = set()


def register(op: str, backend: str):
    """Decorator: make `fn` the implementation of `op` under `backend`."""
    def deco(fn):
        _IMPLS[(op, backend)] = fn
        return fn
    return deco


def _load(backend: str) -> None:
    if backend in _loaded:
        return
    _loaded.add(backend)
    for mod in _LAZY.get(backend, ()):
        importlib.import_module(mod)


def lookup(op: str, device) -> object:
    """The implementation of `op` for tensors on `device` under the selected backend."""
    backend = resolve(device)
    _load(backend)
    return _IMPLS.get((op, backend)) or _IMPLS[(op, "torch")]


def implemented(op: str, backend: str) -> bool:
    """Whether `op` has its own implementation under `backend` (otherwise it falls back to torch)."""
    _load(backend)
    return (op, backend) in _IMPLS


@functools.lru_cache(maxsize=None)
def kernel_module(name: str):
    """fastdistil.kernels.<name>, imported on first use (never at import: it imports triton) and then a dict hit,
    not an import statement per op call."""
    return importlib.import_module(f"fastdistil.kernels.{name}")
