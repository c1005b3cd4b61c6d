"""BERT's pooler op, tanh(x W^T + b) (ops/pooler.py): the triton kernel (Triton interpreter on CPU) forward and the
gradients of x (strided rows, as the [CLS] rows of a padded output), W and b against float64, in every dtype it
claims, with err(ours) <= 2 err(torch same dtype) + atol; one launch in a training forward."""
import pytest
import torch

import fastdistil
from fastdistil import ops, reference
from fastdistil.launches import count_launches
from fused_helpers import DTYPES, assert_close, grads, leaves, poisoned

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _triton():
    fastdistil.set_backend("triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k,n", [(1, 32, 32), (7, 48, 40), (13, 64, 96)])
def test_linear_tanh_forward_and_gradients(dtype, rows, k, n, device):
    g = torch.Generator().manual_seed(rows * k + n)
    src = [torch.randn(rows, 3, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5,
           torch.randn(n, generator=g)]
    dy = torch.randn(rows, n, generator=g).to(device)

    def run(dtype_, backend=None):
        x, w, b = leaves([t.to(device) for t in src], dtype_)
        with fastdistil.use_backend(backend or fastdistil.get_backend()):
            y = ops.linear_tanh(x[:, 0], w, b)  # rows 3k apart: the strided [CLS] rows
        return y, grads(y, [x, w, b], dy)

    with poisoned():
        y, gr = run(dtype)
    y64, g64 = run(torch.float64)
    yl, gl = run(dtype, "torch")
    assert_close("y", y, y64, yl, dtype)
    for name, a, a64, al in zip(("dx", "dW", "db"), gr, g64, gl):
        assert_close(name, a, a64, al, dtype)
    assert torch.equal(gr[0][:, 1:], torch.zeros_like(gr[0][:, 1:]))  # only the rows it read get a gradient


def test_linear_tanh_is_one_launch_with_autograd_recording():
    x, w, b = (t.requires_grad_() for t in (torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)))
    with count_launches() as c:
        y = ops.linear_tanh(x, w, b)
    assert c.total == 1 and c.triton, c
    assert torch.allclose(y, reference.linear_tanh(x, w, b), atol=1e-5)
