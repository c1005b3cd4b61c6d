"""Triton bias + GELU (standalone and as the GEMM epilogue) against the float64 reference in the interpreter:
exact erf by default (tanh only on request, never substituted), every dtype, gradients, poisoned outputs."""
import pytest
import torch
import torch.nn.functional as F

import fastdistil
from fastdistil import ops, reference
from fastdistil.kernels import gelu as K
from fused_helpers import DTYPES, assert_close, grads, leaves, poisoned

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _triton():
    fastdistil.set_backend("triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(1, 250), (7, 384), (129, 1536), (3, 1)])
def test_bias_gelu(dtype, rows, width, device):
    src = [(2 * torch.randn(rows, width)).to(device), torch.randn(width).to(device)]
    dy = torch.randn(rows, width).to(device)
    for approximate in ("none", "tanh"):
        ours = leaves(src, dtype)
        with poisoned():
            h = ops.bias_gelu(*ours, approximate=approximate)
            g = grads(h, ours, dy)
        ref = leaves(src, torch.float64)
        h64 = reference.bias_gelu(*ref, approximate)
        g64 = grads(h64, ref, dy)
        low = leaves(src, dtype)
        hl = reference.bias_gelu(*low, approximate)
        gl = grads(hl, low, dy)
        assert h.dtype == dtype and h.shape == (rows, width)
        assert_close(f"h {approximate}", h, h64, hl, dtype)
        assert_close(f"dx {approximate}", g[0], g64[0], gl[0], dtype)
        assert_close(f"dbias {approximate}", g[1], g64[1], gl[1], dtype)


def test_exact_erf_is_never_replaced_by_tanh(device):
    x, b = torch.linspace(-4, 4, 512, device=device).reshape(2, 256), torch.zeros(256, device=device)
    exact = reference.gelu(x.double())
    tanh = reference.gelu(x.double(), "tanh")
    assert (exact - tanh).abs().max() > 1e-4  # the two forms are distinguishable at fp32
    h = ops.bias_gelu(x, b)
    assert (h.double() - exact).abs().max() < 1e-6
    assert (ops.bias_gelu(x, b, approximate="tanh").double() - tanh).abs().max() < 1e-6
    with pytest.raises(ValueError):
        ops.bias_gelu(x, b, approximate="sigmoid")


def test_bias_gelu_3d_input(device):
    x, b = torch.randn(2, 5, 64).to(device), torch.randn(64).to(device)
    with poisoned():
        h = ops.bias_gelu(x, b)
    assert h.shape == (2, 5, 64)
    assert (h.double() - reference.bias_gelu(x.double(), b.double())).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k,width", [(1, 32, 250), (7, 64, 384), (129, 96, 200)])
def test_linear_gelu(dtype, rows, k, width, device):
    src = [t.to(device) for t in (torch.randn(rows, k), torch.randn(width, k) / k ** 0.5, torch.randn(width))]
    dy = torch.randn(rows, width).to(device)
    ours = leaves(src, dtype)
    with poisoned():
        h = ops.linear_gelu(*ours)
        g = grads(h, ours, dy)
    ref = leaves(src, torch.float64)
    h64 = reference.gelu(F.linear(*ref))
    g64 = grads(h64, ref, dy)
    low = leaves(src, dtype)
    with fastdistil.use_backend("torch"):
        hl = ops.linear_gelu(*low)
    gl = grads(hl, low, dy)
    assert_close("h", h, h64, hl, dtype)
    for name, a, a64, al in zip(("dx", "dW", "dbias"), g, g64, gl):
        assert_close(name, a, a64, al, dtype)


def test_linear_gelu_inference_stores_no_pre_activation(device):
    x, W, b = (t.to(device) for t in (torch.randn(5, 16), torch.randn(32, 16), torch.randn(32)))
    with torch.no_grad():
        h, pre = torch.ops.fastdistil.linear_gelu_fwd(x, W, b, "none", False)
    assert pre.numel() == 0 and h.shape == (5, 32)


def test_cost_bytes_are_minimal():
    f, b = K.cost(1000, 1536, 2, backward=True)
    assert f.bytes == 2 * 1000 * 1536 * 2 + 1536 * 2  # read x, write h, bias once
    p = 132 // 6  # programs along rows: one per SM across the 6 column strips of 256
    assert b.bytes == 3 * 1000 * 1536 * 2 + 1536 * 2 + 1536 * 4 * (2 * p + 1)  # + fp32 partials, written and read


def test_kernel_bytes_match_cost():
    """Distinct bytes the kernels load and store (counted in the interpreter) against cost()'s minimum."""
    from fastdistil.kernels import matmul as MM
    from fastdistil.launches import count_bytes
    M, N, Kd = 128, 768, 32
    x, b, dh = torch.randn(M, N).half(), torch.randn(N).half(), torch.randn(M, N).half()
    fwd, bwd = K.cost(M, N, 2, backward=True)
    with count_bytes() as c:
        K.bias_gelu_fwd(x, b)
    assert c.total == fwd.bytes
    with count_bytes() as c:
        K.bias_gelu_bwd(dh, x, b)
    assert bwd.bytes / 1.25 <= c.total <= bwd.bytes  # cost counts the partials for 132 SMs
    a, W = torch.randn(M, Kd).half(), torch.randn(N, Kd).half()
    for save in (False, True):
        with count_bytes() as c:
            MM.linear_gelu_fwd(a, W, b, True, store_pre=save)
        (lin,) = MM.cost(M, N, Kd, 2, epilogue="gelu", backward=save)[:1]
        assert c.total == lin.bytes
