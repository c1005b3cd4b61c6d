"""Registry behind the backend seam: op name x backend -> implementation.

Each op file registers all of its backends: ``torch`` (the reference), ``triton`` and ``native``. An
implementation that needs a module which may be missing (the C++ kernels: ``needs="fastdistil._C"``) is held back
at registration and enters the registry the first time its backend is resolved, once that module imports (never
at ``import fastdistil``; if it does not import, the op runs the torch implementation). An op with no
implementation for the resolved backend runs the torch one.
"""
from __future__ import annotations

import functools
import importlib

from ..backend import resolve

_IMPLS: dict[tuple[str, str], object] = {}
# (op, backend) -> (module it needs, implementation): registered, waiting for the first use of that backend.
_HELD: dict[tuple[str, str], tuple[str, object]] = {}
_loaded: set[str] = set()


def register(op: str, backend: str, *, needs: str | None = None):
    """Decorator: make `fn` the implementation of `op` under `backend`; with `needs` (a module name), only once
    that module imports, tried the first time `backend` is resolved."""
    def deco(fn):
        if needs is None:
            _IMPLS[(op, backend)] = fn
        else:
            _HELD[(op, backend)] = (needs, fn)
            if backend in _loaded:
                _promote(backend)
        return fn
    return deco


def _load(backend: str) -> None:
    if backend not in _loaded:
        _loaded.add(backend)
        _promote(backend)


def _promote(backend: str) -> None:
    for key in [k for k in _HELD if k[1] == backend]:
        needs, fn = _HELD.pop(key)
        try:
            importlib.import_module(needs)
        except ImportError:  # resolve() never picks native without the extension; implemented() then says False
            continue
        _IMPLS[key] = fn


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
