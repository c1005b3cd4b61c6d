"""The eager fast path (fastdistil/ops/eager.py) computes what the registered torch.library ops compute: same
outputs and gradients bit for bit, and it hands over to the registered op under dispatch modes."""
import importlib

import pytest
import torch

import fastdistil
from fastdistil import ops
from fastdistil.ops import eager

pytestmark = pytest.mark.interpreter


def _step(fn, *leaves):
    """fn's output and the gradients of sum(out * w) w.r.t. `leaves` (fresh copies each call)."""
    ins = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*ins)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    grads = torch.autograd.grad((out * w).sum(), ins)
    return out.detach(), grads


def _cases():
    T, H, D, d, f = 7, 2, 16, 32, 48
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    x, r = torch.randn(T, d), torch.randn(T, d)
    w, b, g, beta = torch.randn(d, d) / 6, torch.randn(d), 1 + torch.randn(d) / 4, torch.randn(d) / 4
    w1, b1 = torch.randn(f, d) / 6, torch.randn(f)
    qkv = torch.randn(T, 3, H, D)
    return {
        "layer_norm": (lambda x, r, g, beta, b: ops.layer_norm(x, g, beta, 1e-5, r, input_bias=b), (x, r, g, beta, b)),
        "linear_layer_norm": (lambda x, w, b, r, g, beta: ops.linear_layer_norm(x, w, b, r, g, beta, 1e-5),
                              (x, w, b, r, g, beta)),
        "linear_gelu": (lambda x, w1, b1: ops.linear_gelu(x, w1, b1), (x, w1, b1)),
        "bias_gelu": (lambda x, b1: ops.bias_gelu(x @ w1.t(), b1), (x, b1)),
        "varlen_attention": (lambda qkv: ops.varlen_attention(*qkv.unbind(1), cu, 4), (qkv,)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_fast_path_equals_registered_op(name, monkeypatch):
    fastdistil.set_backend("triton")
    fn, args = _cases()[name]
    fast_out, fast_grads = _step(fn, *args)
    monkeypatch.setattr(eager, "_dispatcher_needed", lambda: True)  # force the registered custom op
    op_out, op_grads = _step(fn, *args)
    assert torch.equal(fast_out, op_out)
    for a, b in zip(fast_grads, op_grads):
        assert torch.equal(a, b)


def test_fast_path_defers_to_dispatch_modes():
    """Under a TorchDispatchMode the registered op runs, so mode-based tools (launch counting, FLOP counters)
    still see fastdistil's ops as single ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    fastdistil.set_backend("triton")
    x = torch.randn(5, 32)
    with torch.inference_mode(), Record():
        ops.layer_norm(x, torch.ones(32), torch.zeros(32), 1e-5, x)
    assert any("fastdistil.layer_norm_fwd" in s for s in seen), seen


def test_fast_path_skips_the_dispatcher_in_eager(monkeypatch):
    """Eagerly, without a mode, no registered custom op is called (that is the point of the fast path); with
    the fast path forced off, it is."""
    L = importlib.import_module("fastdistil.ops.layer_norm")  # the module (ops.layer_norm is the function)
    fastdistil.set_backend("triton")
    cls, calls = type(L._ln_fwd_op), []
    real_call = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(self._name) or real_call(self, *a, **k))
    x = torch.randn(5, 32, requires_grad=True)
    y = ops.layer_norm(x, torch.ones(32), torch.zeros(32), 1e-5)
    y.sum().backward()
    assert calls == []
    monkeypatch.setattr(eager, "_dispatcher_needed", lambda: True)
    ops.layer_norm(x, torch.ones(32), torch.zeros(32), 1e-5).sum().backward()
    assert calls == ["layer_norm_fwd", "layer_norm_bwd"]
