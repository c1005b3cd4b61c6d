"""Per-op benchmarks: each fused op on each provider, forward / backward / full, at the shapes of workload A
(2,135 real tokens, hidden 384, FFN 1536, 12 heads of 32).

Providers: `torch` is the plain-PyTorch composition (the reference module behind the torch backend); `native` is
the C++ backend (CPU, when built and when it implements the op: otherwise skipped); `triton` runs on CUDA only.
extra_info holds bytes/s and FLOP/s derived from the kernels' cost functions: the minimum bytes and the FLOPs of
the op at this shape, the same numbers for every provider, so the rates compare providers on equal work.
"""
import pytest
import torch

from fastdistil import ops
from fastdistil.backend import availability, use_backend
from fastdistil.bench.workloads import get_workload
from fastdistil.ops.dispatch import implemented

SEQLENS = get_workload("A").lengths()
T, D_MODEL, FFN, HEADS = sum(SEQLENS), 384, 1536, 12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _p(*shape, dtype, device, grad=True, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _case(op: str, dtype, device):
    """(call, differentiable inputs, cost rows (forward first), ops whose native/triton implementation it uses)."""
    from fastdistil.kernels import attention, embedding, gelu, layer_norm, matmul
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    eb = torch.tensor([], dtype=dtype).element_size()
    kw = dict(dtype=dtype, device=device)
    if op == "layer_norm":
        x, r, ib = _p(T, D_MODEL, **kw), _p(T, D_MODEL, **kw), _p(D_MODEL, **kw)
        w, b = _p(D_MODEL, **kw), _p(D_MODEL, **kw)
        return (lambda: ops.layer_norm(x, w, b, 1e-12, r, input_bias=ib), [x, r, ib, w, b],
                lambda bw: layer_norm.cost(T, D_MODEL, eb, residual=True, input_bias=True, backward=bw),
                ("layer_norm",))
    if op == "bias_gelu":
        x, b = _p(T, FFN, **kw), _p(FFN, **kw)
        return lambda: ops.bias_gelu(x, b), [x, b], lambda bw: gelu.cost(T, FFN, eb, backward=bw), ("bias_gelu",)
    if op == "embed_layer_norm":
        ids = torch.randint(0, 30522, (T,), generator=g).to(device)
        pos = torch.cat([torch.arange(n) for n in SEQLENS]).to(device)
        tt = torch.zeros(T, dtype=torch.int64, device=device)
        ww, pw, tw = _p(30522, D_MODEL, **kw), _p(512, D_MODEL, **kw), _p(2, D_MODEL, **kw)
        lw, lb = _p(D_MODEL, **kw), _p(D_MODEL, **kw)
        return (lambda: ops.embed_layer_norm(ids, tt, pos, ww, pw, tw, lw, lb, 1e-12), [ww, pw, tw, lw, lb],
                lambda bw: embedding.cost(T, D_MODEL, eb, backward=bw), ("embed_layer_norm",))
    if op == "varlen_attention":
        q, k, v = (_p(T, HEADS, D_MODEL // HEADS, **kw) for _ in range(3))
        cu = torch.tensor([0] + SEQLENS, device=device).cumsum(0).to(torch.int32)
        mx = max(SEQLENS)
        return (lambda: ops.varlen_attention(q, k, v, cu, mx), [q, k, v],
                lambda bw: attention.cost(SEQLENS, HEADS, D_MODEL // HEADS, eb, backward=bw), ("varlen_attention",))
    if op == "linear_gelu":
        x, w, b = _p(T, D_MODEL, **kw), _p(FFN, D_MODEL, scale=0.05, **kw), _p(FFN, **kw)
        return (lambda: ops.linear_gelu(x, w, b), [x, w, b],
                lambda bw: matmul.cost(T, FFN, D_MODEL, eb, epilogue="gelu", backward=bw), ("linear_gelu", "bias_gelu"))
    if op == "linear_layer_norm":
        x, w, b = _p(T, FFN, **kw), _p(D_MODEL, FFN, scale=0.03, **kw), _p(D_MODEL, **kw)
        r, lw, lb = _p(T, D_MODEL, **kw), _p(D_MODEL, **kw), _p(D_MODEL, **kw)
        return (lambda: ops.linear_layer_norm(x, w, b, r, lw, lb, 1e-12), [x, w, b, r, lw, lb],
                lambda bw: matmul.cost(T, D_MODEL, FFN, eb, epilogue="layer_norm", backward=bw),
                ("linear_layer_norm", "layer_norm"))
    raise ValueError(op)


OPS = ("layer_norm", "bias_gelu", "embed_layer_norm", "varlen_attention", "linear_gelu", "linear_layer_norm")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("provider", ["torch", "native", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, bench_device, bench_threads, bench_rounds, op, provider, dtype, mode):
    if provider == "triton" and bench_device.type != "cuda":
        pytest.skip("triton is timed on CUDA only (its CPU interpreter is for tests)")
    if provider == "native" and bench_device.type != "cpu":
        pytest.skip("native is the CPU backend")
    ok, why = availability()[provider]
    if not ok:
        pytest.skip(why)
    call, inputs, cost, uses = _case(op, DTYPES[dtype], bench_device)
    if provider != "torch":
        try:
            own = any(implemented(u, provider) for u in uses)
        except ImportError as e:
            pytest.skip(f"{provider} backend not importable: {e}")
        if not own:
            pytest.skip(f"{provider} has no implementation of {op} yet (it would time the torch one)")
    benchmark.group = f"{op} {dtype} {mode}"
    with use_backend(provider):
        if mode == "forward":
            def fn():
                with torch.no_grad():
                    call()
                _sync(bench_device)
            rows = cost(False)[:1]
        elif mode == "backward":
            y = call()
            gy = torch.randn_like(y)

            def fn():
                torch.autograd.grad(y, inputs, gy, retain_graph=True)
                _sync(bench_device)
            rows = cost(True)[1:]
        else:
            gy = None

            def fn():
                y = call()
                torch.autograd.grad(y, inputs, torch.ones_like(y))
                _sync(bench_device)
            rows = cost(True)
        benchmark.pedantic(fn, rounds=bench_rounds, iterations=1, warmup_rounds=1)
    nbytes, flops = sum(c.bytes for c in rows), sum(c.flops for c in rows)
    benchmark.extra_info.update(provider=provider, threads=bench_threads, min_bytes=nbytes, flops=flops,
                                shape=f"T={T} d={D_MODEL} f={FFN} H={HEADS}")
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run: the calls only)
        med = benchmark.stats.stats.median
        benchmark.extra_info.update(GB_per_s=nbytes / med / 1e9, GFLOP_per_s=flops / med / 1e9)
