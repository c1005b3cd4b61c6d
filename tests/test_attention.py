"""Triton attention (kernels/attention.py) in the interpreter: forward and every gradient against the float64
reference, padded and varlen forms, masks with a one-token row and an all-padding row, dropout, torch.compile, and
the cost function. Every output buffer the launchers allocate is filled with NaN first (fixture), so an element the
kernels forget to write fails the comparison."""
import math

import pytest
import torch

import fastdistil
from fastdistil import ops, reference
from fastdistil.kernels import attention as K
from fastdistil.kernels.spec import Cost
from fastdistil.ops.attention import attention_dropout_seed

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def triton_backend_nan_outputs(monkeypatch):
    """Backend 'triton' (conftest restores the previous one) and NaN-poisoned kernel outputs."""
    fastdistil.set_backend("triton")
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device))


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (NaN anywhere in `actual` gives inf)."""
    actual = actual.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def key_mask(B, L, g, device="cpu"):
    """(B, L) 0/1 mask: row 0 random holes (left and middle padding), row 1 a single real token, row 2 all
    padding, further rows right-padded to random lengths."""
    m = torch.ones(B, L, dtype=torch.int64)
    if B >= 1 and L > 1:
        m[0] = (torch.rand(L, generator=g) < 0.7).long()
        m[0, torch.randint(L, (1,), generator=g)] = 1
    if B >= 2:
        m[1] = 0
        m[1, torch.randint(L, (1,), generator=g)] = 1
    if B >= 3:
        m[2] = 0
    for b in range(3, B):
        m[b, torch.randint(1, L + 1, (1,), generator=g).item():] = 0
    return m.to(device)


def qkv(shape, dtype, g, device="cpu"):
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]


def fwd_bwd(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn(q, k, v, **kw) for output gradient do."""
    for t in (q, k, v):
        t.grad = None
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), [t.grad.clone() for t in (q, k, v)]


def as64(ts):
    return [t.detach().double().requires_grad_() for t in ts]


PADDED = [  # (B, H, L, D)
    (1, 1, 1, 32), (3, 5, 7, 32), (3, 12, 37, 32), (1, 1, 129, 32), (3, 1, 257, 32),
    (3, 2, 37, 16), (1, 2, 37, 64), (3, 1, 37, 128),
]


@pytest.mark.parametrize("shape", PADDED, ids=lambda s: "x".join(map(str, s)))
def test_padded_fp32_matches_float64_reference(shape, device):
    B, H, L, D = shape
    g = torch.Generator().manual_seed(hash(shape) % 2 ** 31)
    q, k, v = qkv(shape, torch.float32, g, device)
    mask = key_mask(B, L, g, device) if L > 1 else None
    do = torch.randn(shape, generator=g).to(device)
    o, grads = fwd_bwd(ops.attention, q, k, v, do, attention_mask=mask)
    o_ref, grads_ref = fwd_bwd(reference.attention, *as64((q, k, v)), do.double(), attention_mask=mask)
    assert rel_err(o, o_ref) < 1e-5
    for name, a, e in zip("qkv", grads, grads_ref):
        assert rel_err(a, e) < 1e-5, f"d{name}"


def test_padded_scale_and_no_mask(device):
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv((2, 3, 19, 32), torch.float32, g, device)
    do = torch.randn(2, 3, 19, 32, generator=g).to(device)
    o, grads = fwd_bwd(ops.attention, q, k, v, do, softmax_scale=0.3)
    o_ref, grads_ref = fwd_bwd(reference.attention, *as64((q, k, v)), do.double(), softmax_scale=0.3)
    assert rel_err(o, o_ref) < 1e-5
    assert all(rel_err(a, e) < 1e-5 for a, e in zip(grads, grads_ref))


def test_all_padding_row_is_zero_with_zero_grads(device):
    g = torch.Generator().manual_seed(2)
    q, k, v = qkv((3, 2, 37, 32), torch.float32, g, device)
    mask = key_mask(3, 37, g, device)  # row 2: no real token
    do = torch.randn(3, 2, 37, 32, generator=g).to(device)
    o, (dq, dk, dv) = fwd_bwd(ops.attention, q, k, v, do, attention_mask=mask)
    assert torch.isfinite(o).all() and (o[2] == 0).all()
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all() and (grad[2] == 0).all()
    pad = mask == 0  # padded keys never receive a gradient
    assert (dk.transpose(1, 2)[pad] == 0).all() and (dv.transpose(1, 2)[pad] == 0).all()


def torch_lowp_attention(q, k, v, attention_mask=None):
    """What plain PyTorch computes in q's dtype (GEMMs in the dtype, softmax rounded to it): the yardstick of the
    low-precision tolerance, never a reference."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    keep = attention_mask.bool()[:, None, None, :]
    has_key = keep.any(-1, keepdim=True)
    s = torch.where(has_key, s.masked_fill(~keep, float("-inf")), torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * has_key
    return p @ v


@pytest.mark.parametrize("dtype,shape,atol", [
    (torch.float16, (3, 4, 37, 32), 2e-4), (torch.bfloat16, (3, 4, 37, 32), 2e-3),
    (torch.float16, (1, 2, 129, 64), 2e-4), (torch.bfloat16, (3, 1, 70, 16), 2e-3),
    (torch.float16, (3, 1, 33, 128), 2e-4),
], ids=["fp16-hd32", "bf16-hd32", "fp16-hd64", "bf16-hd16", "fp16-hd128"])
def test_padded_low_precision_within_twice_torch_error(dtype, shape, atol, device):
    """err(ours) <= 2 err(torch in the dtype) + atol * max|ref|, errors against the float64 reference; bf16 runs
    the interpreter's DOT_F32 upcast (kernels/attention.py header), fp16 the GPU code path as is."""
    B, H, L, D = shape
    g = torch.Generator().manual_seed(3)
    q, k, v = qkv(shape, dtype, g, device)
    mask = key_mask(B, L, g, device)
    do = torch.randn(shape, generator=g).to(device, dtype)
    o, grads = fwd_bwd(ops.attention, q, k, v, do, attention_mask=mask)
    o_lp, grads_lp = fwd_bwd(torch_lowp_attention, q, k, v, do, attention_mask=mask)
    o_ref, grads_ref = fwd_bwd(reference.attention, *as64((q, k, v)), do.double(), attention_mask=mask)
    assert o.dtype == dtype
    for name, a, lp, e in zip(["o", "dq", "dk", "dv"], [o, *grads], [o_lp, *grads_lp], [o_ref, *grads_ref]):
        err, err_lp = (a.double() - e).abs().max().item(), (lp.double() - e).abs().max().item()
        assert err <= 2 * err_lp + atol * e.abs().max().item(), f"{name}: {err} vs torch {err_lp}"


def packed(lengths, H, D, dtype, g, device="cpu"):
    """(qkv (T, 3, H, D) leaf, q, k, v strided views as the model makes them, cu_seqlens int32, max_seqlen)."""
    T = sum(lengths)
    buf = torch.randn(T, 3, H, D, generator=g).to(device, dtype).requires_grad_()
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return buf, cu, max(lengths, default=0)


def varlen_grads(fn, buf, cu, max_seqlen, do, **kw):
    buf.grad = None
    q, k, v = buf.unbind(1)  # (T, H, D) each, strides (3HD, D, 1)
    o = fn(q, k, v, cu, max_seqlen, **kw)
    o.backward(do)
    return o.detach(), buf.grad.clone()


@pytest.mark.parametrize("lengths,H,D", [([1, 7, 37, 0, 129], 3, 32), ([257], 1, 32), ([5, 0, 12], 2, 64),
                                         ([3, 20], 5, 16), ([9, 1], 1, 128)])
def test_varlen_strided_matches_float64_reference(lengths, H, D, device):
    g = torch.Generator().manual_seed(4)
    buf, cu, ml = packed(lengths, H, D, torch.float32, g, device)
    do = torch.randn(sum(lengths), H, D, generator=g).to(device)
    o, dbuf = varlen_grads(ops.varlen_attention, buf, cu, ml, do)
    buf64 = buf.detach().double().requires_grad_()
    o_ref, dbuf_ref = varlen_grads(reference.varlen_attention, buf64, cu, ml, do.double())
    assert o.is_contiguous() and o.shape == (sum(lengths), H, D)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(dbuf, dbuf_ref) < 1e-5


def test_varlen_low_precision(device):
    g = torch.Generator().manual_seed(5)
    for dtype, atol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        buf, cu, ml = packed([13, 64, 2], 2, 32, dtype, g, device)
        do = torch.randn(79, 2, 32, generator=g).to(device, dtype)
        o, dbuf = varlen_grads(ops.varlen_attention, buf, cu, ml, do)
        o_ref, dbuf_ref = varlen_grads(reference.varlen_attention, buf.detach().double().requires_grad_(), cu, ml,
                                       do.double())
        assert rel_err(o, o_ref) < atol and rel_err(dbuf, dbuf_ref) < atol


def test_padded_and_varlen_agree(device):
    lengths, H, D, L = [5, 37, 1], 2, 32, 37
    g = torch.Generator().manual_seed(6)
    buf, cu, ml = packed(lengths, H, D, torch.float32, g, device)
    do = torch.randn(sum(lengths), H, D, generator=g).to(device)
    o_v, dbuf_v = varlen_grads(ops.varlen_attention, buf, cu, ml, do)
    mask = torch.zeros(len(lengths), L, dtype=torch.bool, device=device)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    seq, pos = reference.seq_ids(cu, sum(lengths))

    def pad(x):  # (T, H, D) -> (B, H, L, D)
        out = x.new_zeros(len(lengths), L, H, D)
        out[seq, pos] = x
        return out.transpose(1, 2)

    bufp = buf.detach().clone().requires_grad_()
    o_p = ops.attention(*(pad(t) for t in bufp.unbind(1)), mask)  # (B, H, L, D)
    o_p.transpose(1, 2)[seq, pos].backward(do)
    assert rel_err(o_p.transpose(1, 2)[seq, pos].detach(), o_v.double()) < 1e-6
    assert rel_err(bufp.grad, dbuf_v.double()) < 1e-6


def test_empty_batch_and_empty_sequences(device):
    buf = torch.zeros(0, 3, 2, 32, device=device, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32, device=device)
    o = ops.varlen_attention(*buf.unbind(1), cu, 0)
    o.sum().backward()
    assert o.shape == (0, 2, 32) and buf.grad.shape == buf.shape


def test_dropout_is_deterministic_per_torch_seed(device):
    g = torch.Generator().manual_seed(7)
    q, k, v = (t.detach() for t in qkv((2, 3, 37, 32), torch.float32, g, device))
    runs = []
    for s in (11, 11, 12):
        torch.manual_seed(s)
        runs.append(ops.attention(q, k, v, dropout_p=0.3))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.isfinite(runs[0]).all()


def test_dropout_keep_rate_within_statistical_bounds(device):
    p = 0.2
    seed = torch.tensor([20261124], dtype=torch.int64, device=device)
    keep = K.dropout_keep_mask(seed, 2, 4, 128, p)  # 131072 draws
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    per_head = keep.float().mean(dim=(2, 3)).flatten()  # 16384 draws each
    assert (per_head - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / 16384)
    # heads and rows draw independent numbers: agreement of two heads ~ p^2 + (1-p)^2
    agree = (keep[0, 0] == keep[0, 1]).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * math.sqrt(0.25 / 16384)
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_dropout_matches_reference_with_kernel_mask(dtype, device):
    B, H, L, D, p = 3, 2, 37, 32, 0.3
    g = torch.Generator().manual_seed(8)
    q, k, v = qkv((B, H, L, D), dtype, g, device)
    mask = key_mask(B, L, g, device)
    do = torch.randn(B, H, L, D, generator=g).to(device, dtype)
    torch.manual_seed(99)
    o, grads = fwd_bwd(ops.attention, q, k, v, do, attention_mask=mask, dropout_p=p)
    torch.manual_seed(99)
    keep = K.dropout_keep_mask(attention_dropout_seed(device), B, H, L, p)
    o_ref, grads_ref = fwd_bwd(reference.attention, *as64((q, k, v)), do.double(), attention_mask=mask,
                               dropout_p=p, dropout_mask=keep)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert rel_err(o, o_ref) < tol
    for name, a, e in zip("qkv", grads, grads_ref):
        assert rel_err(a, e) < tol, f"d{name}"


def test_varlen_dropout_matches_reference_with_kernel_mask(device):
    lengths, H, D, p = [7, 37, 0, 20], 2, 32, 0.25
    g = torch.Generator().manual_seed(9)
    buf, cu, ml = packed(lengths, H, D, torch.float32, g, device)
    do = torch.randn(sum(lengths), H, D, generator=g).to(device)
    torch.manual_seed(5)
    o, dbuf = varlen_grads(ops.varlen_attention, buf, cu, ml, do, dropout_p=p)
    torch.manual_seed(5)
    keep = K.dropout_keep_mask(attention_dropout_seed(device), len(lengths), H, ml, p)  # (B, H, ml, ml)
    seq, pos = reference.seq_ids(cu, sum(lengths))
    mask = torch.zeros(len(lengths), ml, dtype=torch.bool, device=device)
    mask[seq, pos] = True

    def ref(q, k, v, cu_seqlens, max_seqlen, dropout_p):
        def pad(x):
            out = x.new_zeros(len(lengths), ml, H, D)
            out[seq, pos] = x
            return out.transpose(1, 2)
        o = reference.attention(pad(q), pad(k), pad(v), mask, dropout_p=dropout_p, dropout_mask=keep)
        return o.transpose(1, 2)[seq, pos]

    o_ref, dbuf_ref = varlen_grads(ref, buf.detach().double().requires_grad_(), cu, ml, do.double(), dropout_p=p)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(dbuf, dbuf_ref) < 1e-5


def test_torch_compile_fullgraph_traces_both_ops(device):
    g = torch.Generator().manual_seed(10)
    q, k, v = qkv((2, 2, 9, 16), torch.float32, g, device)
    mask = torch.ones(2, 9, device=device)
    mask[1, 4:] = 0
    buf, cu, ml = packed([4, 9], 2, 16, torch.float32, g, device)

    def f(q, k, v, mask, buf):
        a = ops.attention(q, k, v, mask)
        b = ops.varlen_attention(*buf.unbind(1), cu, ml)
        return a.square().sum() + b.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ys = []
    for fn in (compiled, f):
        for t in (q, k, v, buf):
            t.grad = None
        y = fn(q, k, v, mask, buf)
        y.backward()
        ys.append((y.detach(), [t.grad.clone() for t in (q, k, v, buf)]))
    assert torch.allclose(ys[0][0], ys[1][0], rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(ys[0][1], ys[1][1]))


def test_torch_compile_inductor_with_dropout_matches_eager(device):
    """Inductor lowers the seed's torch.randint with its own RNG unless fallback_random: with it, the compiled
    graph draws the same seed as eager, so the gradients are bit-identical (the same keep mask, the same kernels);
    the scalar loss is allowed its summation order (inductor's reduction on a GPU is not eager's)."""
    import torch._inductor.config as inductor_config

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2, 9, 16, generator=g).to(device).requires_grad_()
    mask = torch.ones(2, 9, device=device)
    mask[1, 4:] = 0

    def f(q, mask):
        return ops.attention(q, q, q, mask, dropout_p=0.2).square().sum()

    runs = []
    with inductor_config.patch(fallback_random=True):
        for fn in (torch.compile(f, fullgraph=True), f):
            q.grad = None
            torch.manual_seed(3)
            y = fn(q, mask)
            y.backward()
            runs.append((y.detach(), q.grad.clone()))
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-6) and torch.equal(runs[0][1], runs[1][1])


def test_unsupported_head_dim_falls_back_to_torch(device):
    q = torch.randn(1, 2, 5, 48, device=device)
    with pytest.warns(UserWarning, match="head_dim 48"):
        o = ops.attention(q, q, q)
    assert torch.allclose(o, reference.attention(q, q, q))


def test_cost_by_hand():
    # seqlens [2, 3]: T = 5, sum n^2 = 13; H = 2, D = 4, fp16 (2 bytes)
    c = {x.name: x for x in K.cost([2, 3], heads=2, head_dim=4, elem_bytes=2, backward=True, dropout=True)}
    assert c["attention.fwd"] == Cost("attention.fwd", 4 * 13 * 2 * 4, 2 * 4 * 5 * 2 * 4 + 4 * 5 * 2, 1, True)
    assert (c["attention.fwd"].flops, c["attention.fwd"].bytes) == (416, 360)
    assert (c["attention.bwd.delta"].flops, c["attention.bwd.delta"].bytes) == (80, 200)
    assert (c["attention.bwd"].flops, c["attention.bwd"].bytes) == (1456, 640)
    assert c["attention.fwd.rng"].launches == 0 and c["attention.fwd.rng"].flops == 60 * 13 * 2
    assert c["attention.bwd.rng"].flops == 2 * 60 * 13 * 2
    assert [x.name for x in K.cost([2, 3], 2, 4, 4)] == ["attention.fwd"]
    assert not K.cost([2, 3], 2, 4, 4)[0].tensor_core  # fp32 runs ieee FMA dots


def test_launcher_accepts_bool_and_strided_key_mask(device):
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 1, 7, 16, generator=g).to(device) for _ in range(3))
    mask = key_mask(2, 7, g, device).bool().t().contiguous().t()  # (2, 7) with strides (1, 2)
    o, lse = K.attention_fwd(q, k, v, mask)
    assert rel_err(o, reference.attention(q.double(), k.double(), v.double(), mask)) < 1e-5
    assert torch.isfinite(lse[0]).all()
