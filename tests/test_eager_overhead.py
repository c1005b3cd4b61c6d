"""Per-call host overhead of the eager path (issue 14): no import statement runs inside an op call on any backend,
the launchers size their grids without Triton's ConstexprFunction helpers (7-9 us a call from Python), and the
direct path taken under torch.inference_mode gives what the registered torch.library op gives, without calling
it. The kernels' numerics are the op tests' business; here the Triton launches themselves are stubbed where only
the Python around them is watched."""
import builtins
import importlib
import sys

import pytest
import torch

import fastdistil
from fastdistil import ops
from fastdistil.backend import availability

pytestmark = pytest.mark.interpreter

T, H, D, d, f = 7, 2, 16, 32, 48


def _calls():
    """Each public op of an encoder forward, on tiny inputs (T tokens of two sequences)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, res, w, b = r(T, d), r(T, d), r(d, d) / 6, r(d)
    w1, b1, gamma, beta = r(f, d) / 6, r(f), 1 + r(d) / 4, r(d) / 4
    q, k, v = r(T, H, D), r(T, H, D), r(T, H, D)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    ids, tt, pos = torch.randint(0, 50, (T,), generator=g), torch.zeros(T, dtype=torch.int64), torch.arange(T)
    word, posw, typew = r(50, d), r(16, d), r(2, d)
    return {
        "layer_norm": lambda: ops.layer_norm(x, gamma, beta, 1e-12, res),
        "bias_gelu": lambda: ops.bias_gelu(r(T, f), b1),
        "linear_gelu": lambda: ops.linear_gelu(x, w1, b1),
        "linear_layer_norm": lambda: ops.linear_layer_norm(x, w, b, res, gamma, beta, 1e-12),
        "varlen_attention": lambda: ops.varlen_attention(q, k, v, cu, 4),
        "embed_layer_norm": lambda: ops.embed_layer_norm(ids, tt, pos, word, posw, typew, gamma, beta, 1e-12),
    }


class _Imports:
    """Records every import statement executed while active (builtins.__import__ runs for each one, also for
    modules already imported)."""

    def __init__(self):
        self.seen = []

    def __enter__(self):
        self.real = builtins.__import__

        def imp(name, *args, **kwargs):
            frame = sys._getframe(1)
            self.seen.append(f"{name} from {frame.f_code.co_filename}:{frame.f_lineno}")
            return self.real(name, *args, **kwargs)
        builtins.__import__ = imp
        return self

    def __exit__(self, *exc):
        builtins.__import__ = self.real


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_no_import_in_an_op_call(backend, monkeypatch):
    ok, why = availability()[backend]
    if not ok:
        pytest.skip(why)
    fastdistil.set_backend(backend)
    try:
        calls = _calls()
        with torch.inference_mode():
            for fn in calls.values():  # first calls import the kernel modules (once, by design)
                fn()
            if backend == "triton":  # watch the Python around the launches, not the interpreter's own imports
                from triton.runtime.interpreter import InterpretedFunction
                monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: None)
            for name, fn in calls.items():
                with _Imports() as watch:
                    fn()
                assert watch.seen == [], f"{name} on {backend}: {watch.seen}"
    finally:
        fastdistil.set_backend("auto")


def test_the_watch_sees_a_function_level_import():
    """The check above can fail: an import statement inside a function is recorded even when the module is
    loaded already."""
    def op():
        import math  # noqa: F401
    with _Imports() as watch:
        op()
    assert len(watch.seen) == 1 and watch.seen[0].startswith("math from")


def test_launchers_size_grids_without_triton_constexpr_helpers(monkeypatch):
    """triton.cdiv and triton.next_power_of_2 are ConstexprFunctions (an import and constexpr unwrapping per call
    from Python); the launchers use kernels/launch.py's integer helpers, which agree with them."""
    import triton

    from fastdistil.kernels import launch
    for n in list(range(0, 2100)) + [4095, 4096, 4097, 65535, 2**31 - 1]:
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 3, 16, 64, 128):
            assert launch.cdiv(n, b) == triton.cdiv(n, b)

    def refuse(*a, **k):
        raise AssertionError("a launcher called a Triton ConstexprFunction from Python")
    fastdistil.set_backend("triton")
    try:
        calls = _calls()
        with torch.inference_mode():
            for fn in calls.values():
                fn()
            from triton.runtime.interpreter import InterpretedFunction
            monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: None)  # kernels may use them
            monkeypatch.setattr(type(triton.cdiv), "__call__", refuse)
            for fn in calls.values():
                fn()
    finally:
        fastdistil.set_backend("auto")


@pytest.mark.parametrize("name", ["layer_norm", "linear_gelu", "linear_layer_norm", "varlen_attention"])
def test_direct_path_under_inference_mode_equals_the_registered_op(name, monkeypatch):
    """Under inference_mode the public op runs the op's raw function (ops/eager.py): no registered custom op is
    called, and the result is bit-identical to the one the registered op (the dispatcher path) gives."""
    from fastdistil.ops import eager
    fastdistil.set_backend("triton")
    try:
        fn = _calls()[name]
        cls = type(importlib.import_module("fastdistil.ops.layer_norm")._ln_fwd_op)
        called, real_call = [], cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: called.append(self._name) or real_call(self, *a,
                                                                                                          **k))
        with torch.inference_mode():
            direct = fn()
            assert called == []
            monkeypatch.setattr(eager, "_dispatcher_needed", lambda: True)
            registered = fn()
        assert called, "the registered op was not called with the fast path off"
        assert torch.equal(direct, registered)
    finally:
        fastdistil.set_backend("auto")


@pytest.mark.compile
def test_fused_linear_ops_still_compile_fullgraph():
    """The eager path reads the kernel module from a cache (no import per call); while dynamo traces, the ops take
    an import statement instead, which it can trace (importlib cannot be traced: a graph break)."""
    fastdistil.set_backend("triton")
    calls = _calls()
    fn = lambda: calls["linear_layer_norm"]() + calls["linear_gelu"]()[:, :d]  # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True, backend="eager")()
        assert torch.equal(compiled, fn())
