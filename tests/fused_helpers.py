"""Shared helpers of the fused-op interpreter tests (layer_norm, gelu, embedding, model): NaN-poisoned
allocations, the float64 comparison rule and per-dtype tolerances."""
from __future__ import annotations

import contextlib

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# absolute slack on top of 2 x PyTorch's own error in the same dtype (a few ulps of 1 in each dtype)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@contextlib.contextmanager
def poisoned():
    """Every torch.empty / empty_like float allocation comes back filled with NaN (integers with -1), so an
    output element a kernel forgets to write shows up as NaN in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype not in (torch.bool,) and t.numel():
            t.fill_(-1)
        return t

    def p_empty(*a, **k):
        return fill(empty(*a, **k))

    def p_empty_like(*a, **k):
        return fill(empty_like(*a, **k))

    torch.empty, torch.empty_like = p_empty, p_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def err(a, ref) -> float:
    """max |a - ref| in float64 (NaN anywhere makes it inf)."""
    d = (a.detach().double() - ref.detach().double()).abs()
    return float("inf") if not torch.isfinite(d).all() else float(d.max()) if d.numel() else 0.0


def assert_close(name, ours, ref64, lowp, dtype):
    """err(ours) <= 2 * err(PyTorch in the same dtype) + atol, both against the float64 reference."""
    e, e_torch = err(ours, ref64), err(lowp, ref64)
    bound = 2 * e_torch + ATOL[dtype]
    assert e <= bound, f"{name}: error {e:.3g} > 2 x torch's {e_torch:.3g} + {ATOL[dtype]:g} ({dtype})"


def leaves(tensors, dtype):
    """Fresh leaf copies in `dtype` requiring grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def grads(out, inputs, dout):
    live = [t for t in inputs if t is not None]
    g = torch.autograd.grad(out, live, dout.to(out.dtype))
    it = iter(g)
    return [None if t is None else next(it) for t in inputs]


class PoisonedTorch:
    """Stands in for `torch` inside a launcher module (monkeypatch K.torch): every empty buffer comes back filled
    with NaN (floats) or -77 (integers)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*a, **k):
        out = torch.empty(*a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-77)

    @staticmethod
    def empty_like(x, **k):
        out = torch.empty_like(x, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-77)


def grad_drift(a: dict, b: dict) -> float:
    """Largest |a[n] - b[n]| over named gradients, relative to each a[n]'s scale floored at 1 (a gradient that is
    ~0 by symmetry, such as the key bias's under softmax, is not divided by its own noise)."""
    return max(((a[n] - b[n]).abs().max() / a[n].abs().max().clamp(min=1.0)).item() for n in a)
