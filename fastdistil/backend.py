"""The backend seam: which implementation of the ops runs.

Names: ``torch`` (plain PyTorch, the reference, any device), ``triton`` (fused Triton kernels: CUDA tensors, or
CPU tensors when ``TRITON_INTERPRET=1``), ``native`` (the C++ extension in csrc/, CPU tensors) and ``auto``
(triton on CUDA, native on CPU when built, torch otherwise). Chosen by :func:`set_backend` or the environment
variable ``FASTDISTIL_BACKEND``. Nothing here touches a GPU at import; availability is probed lazily, once.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "native")

_state = {"name": None}


def _constant_under_compile(fn):
    """What torch.compiler.assume_constant_result does (dynamo calls `fn` once while tracing and bakes in the
    result), without importing torch._dynamo here: that import costs over a second and pulls in triton."""
    fn._dynamo_marked_constant = True
    return fn


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for all fastdistil ops: one of 'auto', 'torch', 'triton', 'native'."""
    name = _check(str(name).lower())
    if name not in ("auto", "torch"):
        ok, why = availability()[name]
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
    _state["name"] = name


def get_backend() -> str:
    """The selected backend name (may be 'auto'); defaults to $FASTDISTIL_BACKEND, else 'auto'."""
    if _state["name"] is None:
        _state["name"] = _check(os.environ.get("FASTDISTIL_BACKEND", "auto").lower())
    return _state["name"]


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed code with backend `name`, then restore the previous one."""
    prev = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["name"] = prev


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; it ships with CUDA builds of torch on Linux)"
    if interpreting():
        return True, "triton installed; TRITON_INTERPRET=1, kernels run on CPU tensors in the interpreter"
    return True, "triton installed; runs on CUDA tensors (set TRITON_INTERPRET=1 to run them on CPU tensors)"


@functools.lru_cache(maxsize=None)
def _native_status() -> tuple[bool, str]:
    try:
        from . import _C  # noqa: F401
    except ImportError as e:  # the extension was not built (no compiler) or does not match this torch
        return False, f"the C++ extension fastdistil._C is not built ({e}); reinstall with a C++ compiler present"
    return True, f"C++ extension fastdistil._C built ({_C.isa()} kernels)"


@functools.lru_cache(maxsize=None)
def _warn_no_native() -> None:
    """Once per process: CPU ops fall back to torch because the extension is missing."""
    import warnings
    warnings.warn(f"fastdistil: {_native_status()[1]}; CPU ops run on the slower torch backend", RuntimeWarning,
                  stacklevel=4)


@_constant_under_compile
def _triton_ok() -> bool:
    """`_triton_status()[0]`, a constant to torch.compile (dynamo cannot trace the import probe behind it)."""
    return _triton_status()[0]


@_constant_under_compile
def _native_ok() -> bool:
    """`_native_status()[0]`, a constant to torch.compile (dynamo cannot trace the import probe behind it);
    warns once when the CPU falls back to torch."""
    if not _native_status()[0]:
        _warn_no_native()
    return _native_status()[0]


def availability() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} for every concrete backend."""
    return {"torch": (True, "plain PyTorch, always available"), "triton": _triton_status(),
            "native": _native_status()}


def resolve(device: torch.device | str) -> str:
    """The concrete backend ('torch', 'triton' or 'native') that runs ops on tensors of `device`.

    While torch.compile traces, 'native' resolves to 'torch': the C++ ops are not torch.library ops yet, so the
    compiler gets the reference ops (which it fuses itself) instead of a graph break.
    """
    name = get_backend()
    # every op call lands here: read the type of a torch.device as it is (building a new one costs ~1 us)
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    if name == "auto":
        if dev == "cuda" and _triton_ok():
            return "triton"
        if dev == "cpu" and _native_ok() and not torch.compiler.is_compiling():
            return "native"
        return "torch"
    if name == "native" and torch.compiler.is_compiling():
        return "torch"
    if name == "triton" and dev == "cpu" and not interpreting():
        raise RuntimeError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run on CPU tensors")
    if name == "native" and dev != "cpu":
        raise RuntimeError(f"backend 'native' runs on CPU tensors only, got a tensor on {dev}")
    return name
