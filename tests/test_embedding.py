"""Triton embeddings (gather + sum + LayerNorm) against the float64 reference in the interpreter: repeated ids,
awkward shapes, every dtype, table gradients (deterministic scatter), poisoned outputs, padding_idx."""
import pytest
import torch

import fastdistil
from fastdistil import ops, reference
from fastdistil.kernels import embedding as K
from fused_helpers import DTYPES, assert_close, grads, leaves, poisoned

pytestmark = pytest.mark.interpreter
EPS = 1e-12


@pytest.fixture(autouse=True)
def _triton():
    fastdistil.set_backend("triton")


def _case(tokens, width, vocab=13, n_pos=9, n_types=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (tokens,), generator=g)  # few ids: heavy repetition
    tt = torch.randint(0, n_types, (tokens,), generator=g)
    pos = torch.randint(0, n_pos, (tokens,), generator=g)
    tabs = [torch.randn(vocab, width, generator=g), torch.randn(n_pos, width, generator=g),
            torch.randn(n_types, width, generator=g), 1 + 0.3 * torch.randn(width, generator=g),
            0.3 * torch.randn(width, generator=g)]
    return tuple(t.to(device) for t in (ids, tt, pos)), [t.to(device) for t in tabs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,width,n_types", [(1, 250, 2), (7, 384, 2), (129, 768, 3), (40, 64, 20)])
def test_embed_layer_norm(dtype, tokens, width, n_types, device):
    idx, tabs = _case(tokens, width, n_types=n_types, device=device)
    dy = torch.randn(tokens, width).to(device)
    ours = leaves(tabs, dtype)
    with poisoned():
        y = ops.embed_layer_norm(*idx, *ours, EPS)
        g = grads(y, ours, dy)
    ref = leaves(tabs, torch.float64)
    y64 = reference.embed_layer_norm(*idx, *ref, EPS)
    g64 = grads(y64, ref, dy)
    low = leaves(tabs, dtype)
    yl = reference.embed_layer_norm(*idx, *low, EPS)
    gl = grads(yl, low, dy)
    assert y.dtype == dtype and y.shape == (tokens, width)
    assert_close("y", y, y64, yl, dtype)
    for name, a, a64, al in zip(("dword", "dposition", "dtype", "dln_w", "dln_b"), g, g64, gl):
        assert_close(name, a, a64, al, dtype)
    untouched = torch.ones(tabs[0].shape[0], dtype=torch.bool, device=device)
    untouched[idx[0]] = False
    assert (g[0][untouched] == 0).all()  # rows no token used get exactly zero


def test_repeated_ids_scatter_is_deterministic(device):
    idx, tabs = _case(65, 256, vocab=5, n_pos=3, device=device)
    dy = torch.randn(65, 256).to(device)
    runs = []
    for _ in range(2):
        t = leaves(tabs, torch.float32)
        runs.append(grads(ops.embed_layer_norm(*idx, *t, EPS), t, dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # bitwise: fixed summation order, no atomics


def test_padding_idx_gets_no_gradient_and_2d_ids(device):
    idx, tabs = _case(12, 64, device=device)
    ids = idx[0].clone()
    ids[:3] = 0
    t = leaves(tabs, torch.float32)
    y = ops.embed_layer_norm(ids.view(3, 4), idx[1].view(3, 4), idx[2].view(3, 4), *t, EPS, padding_idx=0)
    assert y.shape == (3, 4, 64)
    y.sum().backward()
    assert (t[0].grad[0] == 0).all() and t[0].grad[ids[3:]].abs().sum() > 0


def test_cost():
    f, b, s = K.cost(1000, 384, 2, backward=True)
    assert f.bytes == 1000 * 384 * 2 * 4 + 32 * 1000 + 2 * 384 * 2  # 3 rows read + 1 written, ids, stats
    assert b.launches == 1 and s.launches == 2


def test_kernel_bytes_match_cost():
    """Distinct bytes the forward loads and stores (interpreter) against cost(): equal up to the rows tokens
    share (here only the two token-type rows), never above."""
    from fastdistil.launches import count_bytes
    T, N = 64, 384
    ids, pos, tt = torch.randperm(100)[:T], torch.randperm(T), torch.randint(0, 2, (T,))
    tabs = [torch.randn(100, N).half(), torch.randn(T, N).half(), torch.randn(2, N).half(), torch.randn(N).half(),
            torch.randn(N).half()]
    with count_bytes() as c:
        K.embed_fwd(ids, tt, pos, tabs[0], tabs[2], tabs[1], tabs[3], tabs[4], EPS)
    (fwd,) = K.cost(T, N, 2)
    shared = (T - 2) * N * 2  # type rows read by many tokens count once
    assert c.total == fwd.bytes - shared
