"""Triton residual + bias + dropout + LayerNorm (standalone and as the GEMM epilogue) against the float64
reference, in the interpreter: awkward shapes, every dtype, gradients, NaN-poisoned outputs, dropout."""
import pytest
import torch
import torch.nn.functional as F

import fastdistil
from fastdistil import ops, reference
from fastdistil.kernels import layer_norm as K
from fused_helpers import DTYPES, assert_close, grads, leaves, poisoned

pytestmark = pytest.mark.interpreter
EPS = 1e-12


@pytest.fixture(autouse=True)
def _triton():
    fastdistil.set_backend("triton")


def _inputs(rows, width, k=None, device="cpu"):
    x = torch.randn(rows, k or width)
    d = dict(x=x, w=1 + 0.3 * torch.randn(width), b=0.3 * torch.randn(width), r=torch.randn(rows, width),
             ib=0.3 * torch.randn(width))
    return {n: t.to(device) for n, t in d.items()}  # drawn on the CPU: the same numbers on every device


def _run_ln(t, fused, backend):
    x, w, b, r, ib = t
    with fastdistil.use_backend(backend):
        fn = reference.layer_norm if backend == "ref" else ops.layer_norm
        return fn(x, w, b, EPS, r if fused else None, input_bias=ib if fused else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(1, 250), (7, 384), (129, 768), (5, 1)])
def test_layer_norm(dtype, rows, width, device):
    d = _inputs(rows, width, device=device)
    for fused in (False, True):
        src = [d["x"], d["w"], d["b"], d["r"] if fused else None, d["ib"] if fused else None]
        dy = torch.randn(rows, width).to(device)
        ours = leaves(src, dtype)
        with poisoned():
            x, w, b, r, ib = ours
            y = ops.layer_norm(x, w, b, EPS, r, input_bias=ib)
            g = grads(y, ours, dy)
        ref = leaves(src, torch.float64)
        y64 = reference.layer_norm(ref[0], ref[1], ref[2], EPS, ref[3], input_bias=ref[4])
        g64 = grads(y64, ref, dy)
        low = leaves(src, dtype)
        with fastdistil.use_backend("torch"):
            yl = ops.layer_norm(low[0], low[1], low[2], EPS, low[3], input_bias=low[4])
        gl = grads(yl, low, dy)
        assert y.dtype == dtype and y.shape == (rows, width)
        assert_close(f"y fused={fused}", y, y64, yl, dtype)
        for name, a, a64, al in zip(("dx", "dw", "db", "dres", "dinput_bias"), g, g64, gl):
            if a is not None:
                assert_close(f"{name} fused={fused}", a, a64, al, dtype)


def test_layer_norm_3d_and_strided_rows(device):
    x = torch.randn(2, 3, 40).to(device)[:, :, :33]  # row stride 40, not contiguous
    w, b = torch.randn(33).to(device), torch.randn(33).to(device)
    r = torch.randn(2, 3, 33).to(device)
    with poisoned():
        y = ops.layer_norm(x, w, b, 1e-5, r)
    y64 = reference.layer_norm(x.double(), w.double(), b.double(), 1e-5, r.double())
    assert y.shape == (2, 3, 33) and (y.double() - y64).abs().max() < 1e-5


def _dropout_ref(x, w, b, r, ib, keep, p):
    z = torch.where(keep, (x + ib) / (1 - p), torch.zeros_like(x)) + r
    return reference.layer_norm(z, w, b, EPS)


@pytest.mark.parametrize("rows,width,p", [(7, 250, 0.1), (33, 384, 0.5)])
def test_dropout_matches_reference_with_regenerated_mask(rows, width, p, device):
    d = _inputs(rows, width, device=device)
    seed = torch.tensor([1234567], dtype=torch.int64, device=device)
    keep = K.dropout_keep_mask(seed, rows, width, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    src = [d["x"], d["w"], d["b"], d["r"], d["ib"]]
    ours = leaves(src, torch.float32)
    with poisoned():
        y = torch.ops.fastdistil.layer_norm_fwd(ours[0], ours[1], ours[2], EPS, ours[3], ours[4], p, seed, True)[0]
    dy = torch.randn(rows, width).to(device)
    g = grads(y, ours, dy)
    ref = leaves(src, torch.float64)
    y64 = _dropout_ref(*ref, keep, p)
    g64 = grads(y64, ref, dy)
    assert (y.double() - y64).abs().max() < 1e-5
    for name, a, a64 in zip(("dx", "dw", "db", "dres", "dinput_bias"), g, g64):
        assert (a.double() - a64).abs().max() < 2e-5, name
    assert (g[0][~keep] == 0).all()  # dropped elements get no gradient: the backward regenerated the mask


def test_dropout_determinism(device):
    d = _inputs(9, 384, device=device)
    args = (d["x"], d["w"], d["b"], EPS, d["r"])

    def run(seed):
        torch.manual_seed(seed)
        return ops.layer_norm(*args, input_bias=d["ib"], dropout_p=0.1)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)                      # same torch seed -> same Philox seed -> same mask
    assert not torch.equal(a, c)
    no_drop = ops.layer_norm(*args, input_bias=d["ib"], dropout_p=0.0)
    assert not torch.equal(a, no_drop)
    s = torch.tensor([7], dtype=torch.int64, device=device)
    m1, m2 = K.dropout_keep_mask(s, 9, 384, 0.1), K.dropout_keep_mask(s, 9, 384, 0.1)
    assert torch.equal(m1, m2)


def test_weight_grads_are_deterministic(device):
    d = _inputs(129, 384, device=device)
    src = [d["x"], d["w"], d["b"], d["r"], d["ib"]]
    dy = torch.randn(129, 384).to(device)
    runs = []
    for _ in range(2):
        t = leaves(src, torch.float32)
        y = ops.layer_norm(t[0], t[1], t[2], EPS, t[3], input_bias=t[4])
        runs.append(grads(y, t, dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- GEMM + LayerNorm epilogue
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k,width", [(1, 32, 250), (7, 64, 384), (129, 96, 384)])
def test_linear_layer_norm(dtype, rows, k, width, device):
    d = _inputs(rows, width, k, device)
    W = (torch.randn(width, k) / k ** 0.5).to(device)
    src = [d["x"], W, d["ib"], d["r"], d["w"], d["b"]]
    dy = torch.randn(rows, width).to(device)
    ours = leaves(src, dtype)
    with poisoned():
        y = ops.linear_layer_norm(*ours, EPS)
        g = grads(y, ours, dy)
    ref = leaves(src, torch.float64)
    y64 = reference.layer_norm(F.linear(ref[0], ref[1]), ref[4], ref[5], EPS, ref[3], input_bias=ref[2])
    g64 = grads(y64, ref, dy)
    low = leaves(src, dtype)
    with fastdistil.use_backend("torch"):
        yl = ops.linear_layer_norm(*low, EPS)
    gl = grads(yl, low, dy)
    assert_close("y", y, y64, yl, dtype)
    for name, a, a64, al in zip(("dx", "dW", "dbias", "dres", "dln_w", "dln_b"), g, g64, gl):
        assert_close(name, a, a64, al, dtype)


def test_linear_layer_norm_dropout(device):
    rows, k, width, p = 19, 48, 384, 0.2
    d = _inputs(rows, width, k, device)
    W = (torch.randn(width, k) / k ** 0.5).to(device)
    src = [d["x"], W, d["ib"], d["r"], d["w"], d["b"]]
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    t = leaves(src, torch.float32)
    with poisoned():
        y = torch.ops.fastdistil.linear_layer_norm_fwd(t[0], t[1], t[2], t[3], t[4], t[5], EPS, p, seed, True)[0]
    dy = torch.randn(rows, width).to(device)
    g = grads(y, t, dy)
    keep = K.dropout_keep_mask(seed, rows, width, p)
    ref = leaves(src, torch.float64)
    y64 = _dropout_ref(F.linear(ref[0], ref[1]), ref[4], ref[5], ref[3], ref[2], keep, p)
    g64 = grads(y64, ref, dy)
    assert (y.double() - y64).abs().max() < 1e-5
    for name, a, a64 in zip(("dx", "dW", "dbias", "dres", "dln_w", "dln_b"), g, g64):
        assert (a.double() - a64).abs().max() < 5e-5, name


def test_linear_layer_norm_wide_rows_take_unfused_path(device):
    x, W, bias = (t.to(device) for t in (torch.randn(3, 16), torch.randn(768, 16), torch.randn(768)))
    r, w, b = (t.to(device) for t in (torch.randn(3, 768), torch.randn(768), torch.randn(768)))
    y = ops.linear_layer_norm(x, W, bias, r, w, b, EPS)
    y64 = reference.layer_norm(F.linear(x.double(), W.double(), bias.double()), w.double(), b.double(), EPS,
                               r.double())
    assert (y.double() - y64).abs().max() < 1e-5


def test_cost_bytes_are_minimal():
    (f,) = K.cost(1000, 384, 2, residual=True, input_bias=True, dropout=False, backward=False)
    assert f.bytes == 1000 * 384 * 2 * 3 + 384 * 2 * 3  # read x, residual; write y; three vectors
    f, b = K.cost(1000, 384, 2, residual=True, input_bias=True, dropout=True, backward=True)
    assert f.bytes == 1000 * 384 * 2 * 4 + 384 * 2 * 3 + 8 * 1000 + 8  # + z, the stats, the seed
    assert b.bytes > 0 and f.launches == b.launches == 1


def test_kernel_bytes_match_cost():
    """Distinct bytes the kernels load and store (counted in the interpreter) against cost()'s minimum."""
    from fastdistil.kernels import matmul as MM
    from fastdistil.launches import count_bytes
    M, N, Kd = 256, 128, 32
    h = lambda *s: torch.randn(*s, dtype=torch.float16)  # noqa: E731
    x, r, w, b, ib = h(M, N), h(M, N), h(N), h(N), h(N)
    seed = torch.tensor([3], dtype=torch.int64)
    with count_bytes() as c:
        y, z, mean, rstd = K.layer_norm_fwd(x, w, b, EPS, r, ib, 0.1, seed, store_z=True)
    fwd, bwd = K.cost(M, N, 2, residual=True, input_bias=True, dropout=True, backward=True)
    assert c.total == fwd.bytes
    with count_bytes() as c:
        K.layer_norm_bwd(h(M, N), z, mean, rstd, w, True, 0.1, seed)
    assert 0.8 * bwd.bytes <= c.total <= bwd.bytes  # the partials' re-read by the reduction is torch's
    a, W = h(M, Kd), h(N, Kd)
    with count_bytes() as c:
        MM.linear_layer_norm_fwd(a, W, ib, r, w, b, EPS)
    (lin,) = MM.cost(M, N, Kd, 2, epilogue="layer_norm")
    assert c.total == lin.bytes
