"""Argument checks shared by the public ops: clear errors at the boundary, no device sync (values are read
only from CPU tensors)."""
from __future__ import annotations

import contextlib
import contextvars
import operator

import torch

# Set while FastStudent runs on a Packing it built itself (fastdistil/padding.py): its cu_seqlens are valid by
# construction, and in the capacity layout cu_seqlens[-1] (the real-token count) is below the row count on purpose.
_TRUSTED = contextvars.ContextVar("fastdistil_trusted_packing", default=False)


def trusted_packing():
    """Skip the value checks of check_cu_seqlens inside the block (the model's own packings only). A no-op while
    torch.compile traces (which skips the checks anyway and cannot trace ContextVar.set)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _trusted()


@contextlib.contextmanager
def _trusted():
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)

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
    got = t.shape
    if got == shape:  # the common case, one comparison (ops run this per call: it is on the host's hot path)
        return
    if len(got) != len(shape) or any(s is not None and s != d for s, d in zip(shape, got)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")


def check_cu_seqlens(cu_seqlens, total: int, max_seqlen, device) -> int:
    """Check packed-sequence boundaries; returns max_seqlen as an int.

    cu_seqlens must be a 1-D int32/int64 tensor on `device` with cu_seqlens[0] = 0, non-decreasing values and
    cu_seqlens[-1] = total (the token count), and max_seqlen an integer with longest length <= max_seqlen <= total.
    The values are checked only for CPU tensors, outside torch.compile and outside `trusted_packing` (FastStudent's
    own packings): reading a CUDA tensor's values costs a host sync on every call, so CUDA callers (the model
    builds them once per batch, fastdistil/padding.py) must pass valid ones.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an integer tensor (int32 or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be (batch + 1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        try:
            max_seqlen = operator.index(max_seqlen)  # numpy and 0-d tensor integers; not floats
        except TypeError:
            raise TypeError(f"max_seqlen must be an integer, got {type(max_seqlen).__name__}") from None
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling() or _TRUSTED.get():
        return max_seqlen
    cu = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if cu[0] != 0 or cu[-1] != total or min(lens, default=0) < 0:
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the token count {total}, got "
                         f"{_clip(cu)}")
    if not max(lens, default=0) <= max_seqlen <= total:
        raise ValueError(f"max_seqlen must lie between the longest sequence ({max(lens, default=0)}) and the token "
                         f"count ({total}), got {max_seqlen}")
    return max_seqlen


def _clip(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:10]))}, ...] ({len(values)} values)"
