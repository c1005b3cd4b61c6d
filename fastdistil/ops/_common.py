"""Helpers shared by the op files' backends (argument checks live in ops/checks.py, dropout seeds in ops/rng.py).

``_C`` is the C++ extension (fastdistil._C) imported on first use: the op files define their ``native``
implementations at import, which must work where the extension is not built; those implementations register only
once the extension imports (ops/dispatch.py), so nothing reads ``_C`` before then.
"""
from __future__ import annotations

import importlib

import torch

from . import onednn

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
EXT = "fastdistil._C"  # what a native implementation needs: register(op, "native", needs=EXT)


class _Extension:
    """fastdistil._C, imported on the first attribute read; every read goes to the module itself (a test that
    monkeypatches a function of fastdistil._C is seen). __getattribute__, not __getattr__: no failed lookup per
    kernel call."""

    def __getattribute__(self, name):
        if _EXT_MODULE[0] is None:
            _EXT_MODULE[0] = importlib.import_module(EXT)
        return getattr(_EXT_MODULE[0], name)


_EXT_MODULE = [None]
_C = _Extension()


def needs_grad(*ts) -> bool:
    """Whether autograd will ask for a backward through an op taking `ts` (no host sync)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def rows(t, n):
    """(..., N) -> (M, N) view with unit column stride (copies only when the last dimension is strided)."""
    if t.dim() != 2:
        t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def native_ok(*ts) -> bool:
    """True when every tensor can go to the C++ kernels (float32/bfloat16 on CPU, one dtype); any other dtype
    (float16, float64) runs the torch reference, so a native op never fails where the reference works."""
    d = ts[0].dtype
    if d is torch.bfloat16:
        onednn.note_bf16()
    return d in NATIVE_DTYPES and all(t.device.type == "cpu" and t.dtype == d for t in ts)


def key_packing(mask: torch.Tensor):
    """(indices, cu_seqlens, max_seqlen) of the real keys of a (B, L) mask (1 = real): the flat positions in B*L
    of the real tokens (row order kept), int32 prefix sums of the row lengths, and the longest row (a host int:
    one sync, CPU tensors here). The padding-free layout of fastdistil/padding.py, which ops may not import."""
    m = mask.to(torch.bool)
    lens = m.sum(dim=1, dtype=torch.int32)  # (B,)
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(m.flatten(), as_tuple=False).flatten()
    return indices, cu, int(lens.max()) if m.shape[0] > 0 else 0


_ZEROS: dict = {}


def zeros(n: int, dtype) -> torch.Tensor:
    """A cached (n,) zero vector (a bias for a GEMM whose own bias was already added)."""
    key = (n, dtype)
    if key not in _ZEROS:  # a normal tensor even when first made under inference_mode (a teacher's forward)
        with torch.inference_mode(False):
            _ZEROS[key] = torch.zeros(n, dtype=dtype)
    return _ZEROS[key]
