"""The sync-free padding-free forward (issue 14): packing without host syncs, in the exact layout (host masks,
packed on the host) and the capacity layout (device masks, torch.compile, CUDA graphs); no data-dependent op and
no host sync in the inference forward on the triton backend (interpreter, CPU tensors standing in for CUDA ones);
launches per forward; parity with the host-sync path and the torch reference; torch.compile without capture_*."""
import numpy as np
import pytest
import torch

import fastdistil
from fastdistil import FastStudent, reference
from fastdistil.graphs import GraphRunner
from fastdistil.launches import count_launches
from fastdistil.padding import gather, pack_host, pad, unpad, unpad_static
from test_model import hf_bert

pytestmark = pytest.mark.interpreter


def _model(layers=1, max_pos=128):
    return FastStudent.from_hf(hf_bert(hidden=32, heads=2, layers=layers, inter=64, max_pos=max_pos)).eval()


def _batch(B, lo, hi, L, seed=0, left=()):
    """ids, mask, tt (B, L) with lengths U[lo, hi]; rows in `left` padded on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 211, (B, L), generator=g)
    lens = torch.randint(lo, hi + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    for r in left:
        mask[r] = mask[r].flip(0)
    return ids, mask, torch.randint(0, 2, (B, L), generator=g)


def _masks():
    g = torch.Generator().manual_seed(3)
    yield torch.ones(1, 5, dtype=torch.long)
    yield (torch.rand(4, 7, generator=g) < 0.6).long()                     # holes anywhere (left padding too)
    yield torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]])           # an all-padding row
    yield torch.zeros(3, 2, dtype=torch.long)                                # no real token
    yield torch.ones(0, 4, dtype=torch.long)                                 # empty batch


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: str(tuple(m.shape)))
def test_three_packings_agree(mask):
    """unpad (host sync), unpad_static (capacity) and pack_host (numpy) give one packing: same real-token order,
    cu_seqlens, and pad() puts every row back bit for bit with zeros at padding."""
    B, L = mask.shape
    ref = unpad(mask, B, L)
    st = unpad_static(mask, B, L)
    x = torch.arange(B * L * 3, dtype=torch.float32).view(B, L, 3) + 1
    ids = torch.arange(B * L).view(B, L)
    hid, _, hpos, hp = pack_host(ids.numpy(), mask.numpy() != 0, None, None, "cpu")
    T = ref.indices.shape[0]
    assert torch.equal(st.cu_seqlens, ref.cu_seqlens) and torch.equal(hp.cu_seqlens, ref.cu_seqlens)
    assert hp.cu_seqlens.dtype == ref.cu_seqlens.dtype == st.cu_seqlens.dtype == torch.int32
    if mask.all():  # every token real (or none at all): pack_host gives the identity packing (pad is a reshape)
        assert hp.indices is None and hp.dest is None
    else:
        assert torch.equal(hp.indices, ref.indices)
    assert torch.equal(st.indices[:T], ref.indices)
    assert torch.equal(hid, ref.indices) and torch.equal(hpos, ref.indices % max(L, 1))
    assert st.total == B * L and hp.total == T and hp.max_seqlen == ref.max_seqlen
    assert torch.equal(torch.sort(st.indices).values, torch.arange(B * L))  # a permutation
    want = x * mask[..., None]
    for p in (ref, st, hp):
        assert torch.equal(pad(gather(x, p), p), want)
        with fastdistil.use_backend("triton"):
            assert torch.equal(pad(gather(x, p).view(p.total, 3), p), want)


@pytest.mark.parametrize("mask", list(_masks())[1:3], ids=lambda m: str(tuple(m.shape)))
def test_pad_gradient_on_both_layouts(mask):
    """pad() with autograd recording is the one pad_rows launch on the triton backend, and its backward gives the
    torch form's gradient bit for bit, in the exact layout (host packing) and the capacity layout (rows past the
    real count get zero gradient even where the output's padding positions have one)."""
    B, L = mask.shape
    hp = pack_host(torch.zeros(B, L, dtype=torch.long).numpy(), mask.numpy() != 0, None, None, "cpu")[3]
    for p in (hp, unpad_static(mask, B, L)):
        x0 = torch.randn(p.total, 5, dtype=torch.float32)
        dy = torch.randn(B, L, 5)
        got = {}
        for backend in ("torch", "triton"):
            x = x0.clone().requires_grad_()
            with fastdistil.use_backend(backend), count_launches() as c:
                y = pad(x, p)
            y.backward(dy)
            got[backend] = (y.detach(), x.grad)
            if backend == "triton":
                assert c.total == 1 and c.triton, c
        assert torch.equal(got["torch"][0], got["triton"][0]) and torch.equal(got["torch"][1], got["triton"][1])
        real = int(p.cu_seqlens[-1])
        assert torch.equal(got["triton"][1][real:], torch.zeros_like(got["triton"][1][real:]))


def test_reference_varlen_ignores_capacity_rows():
    """The torch reference on the capacity layout: the real rows equal the exact layout's, the spare rows are
    finite, and its autograd graph gives the real rows' gradients."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ex, st = unpad(mask, 2, 4), unpad_static(mask, 2, 4)
    q, k, v = (torch.randn(8, 2, 16, dtype=torch.float64) for _ in range(3))
    a = reference.varlen_attention(*(t[:5] for t in (q, k, v)), ex.cu_seqlens, ex.max_seqlen)
    b = reference.varlen_attention(q, k, v, st.cu_seqlens, st.max_seqlen)
    assert torch.equal(a, b[:5]) and torch.isfinite(b).all()


_SHAPES = {"1x32": (1, 32, 32, 32), "32xU16-128": (32, 16, 128, 128), "128x128": (128, 128, 128, 128)}


@pytest.mark.parametrize("shape", [s if s != "128x128" else pytest.param(s, marks=pytest.mark.slow)
                                   for s in _SHAPES])  # 128x128: ~3 min of interpreted attention on 2 cores
def test_inference_forward_has_no_host_sync(shape):
    """On the triton backend the inference forward issues no host sync and no data-dependent op (nonzero,
    .item(), .tolist(), device->host copies, unique, masked_select: count_launches records them all) in both
    layouts: host inputs (read only as the caller's host tensors, with numpy) and the static buffers a CUDA graph
    captures (GraphRunner, run eagerly here). Both equal each other bit for bit and the torch reference within
    fp32 noise."""
    B, lo, hi, L = _SHAPES[shape]
    m = _model()
    ids, mask, tt = _batch(B, lo, hi, L)
    runner = GraphRunner(m, length_multiple=16)
    with fastdistil.use_backend("triton"), torch.inference_mode():
        if B <= 32:
            with count_launches(host=(ids, mask, tt)) as c:
                host = m(ids, mask, tt)
            assert not c.syncs, c
        with count_launches(host=(ids, mask, tt)) as c:
            static = runner(ids, mask, tt)
        assert not c.syncs, c
    with fastdistil.use_backend("torch"), torch.inference_mode():
        ref = m(ids, mask, tt)
    real = mask.bool()
    assert torch.equal(static.last_hidden_state[~real], torch.zeros_like(static.last_hidden_state[~real]))
    assert (static.last_hidden_state - ref.last_hidden_state)[real].abs().max() <= 2e-5
    assert (static.pooler_output - ref.pooler_output).abs().max() <= 2e-5
    if B <= 32:
        assert torch.equal(host.last_hidden_state, static.last_hidden_state)  # same op order in both layouts


@pytest.mark.parametrize("masked", [False, True])
def test_launches_per_forward_at_batch_one(masked):
    """Batch 1 x 32 on the triton backend: at most 5 launches per layer + 4 (embeddings, pad-back, pooler)."""
    m = _model(layers=2)
    ids, mask, tt = _batch(1, 20, 20, 32)
    args = (ids, mask, tt) if masked else (ids,)
    with fastdistil.use_backend("triton"), torch.inference_mode():
        m(*args)
        with count_launches(host=args) as c:
            m(*args)
    assert c.total <= 5 * 2 + 4, c
    assert not c.syncs, c


def test_left_padding_on_the_capacity_layout():
    """Left-padded rows (transformers' pooler reads their padding position 0) through the static buffers: the
    side rows run on every row of the capacity layout, as under torch.compile; equal to the host path."""
    m = _model()
    ids, mask, tt = _batch(4, 3, 9, 9, left=(1, 2))
    with fastdistil.use_backend("torch"), torch.inference_mode():
        a = m(ids, mask, tt)
        b = GraphRunner(m)(ids, mask, tt)
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-6  # torch's GEMMs: rounding may depend on M
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-6
    assert torch.equal(b.last_hidden_state[~mask.bool()], torch.zeros_like(b.last_hidden_state[~mask.bool()]))


def test_input_checks_hold_on_every_path():
    """Bad input is still refused by name: host inputs on the host (numpy), static/device inputs with the fused
    check, the runner before it copies; check_inputs=False is a keyword of forward."""
    m = _model()
    ids, mask, tt = _batch(2, 3, 5, 5)
    bad = ids.clone()
    bad[1, 2] = 211
    bad_mask = mask.clone()
    bad_mask[0, 1] = 2
    with fastdistil.use_backend("triton"), torch.inference_mode():
        for call in (lambda i, k: m(i, k, tt), lambda i, k: m._forward(i, k, tt, None, static=True),
                     lambda i, k: GraphRunner(m)(i, k, tt)):
            with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=211\); got values in "
                                                 r"\[\d+, 211\]"):
                call(bad, mask)
            with pytest.raises(ValueError, match="attention_mask must hold only 0 .* got 2"):
                call(ids, bad_mask)
        out = m(ids, mask, tt, check_inputs=False)
        assert torch.equal(out.last_hidden_state, m(ids, mask, tt).last_hidden_state)


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_compile_fullgraph_static_without_capture_flags(backend, masked):
    """torch.compile(fullgraph=True, dynamic=False) traces the inference forward with no capture_scalar_outputs
    / capture_dynamic_output_shape_ops (the capacity layout has static shapes); backend "eager" (the tracing is
    what is tested; inductor would only add CPU compile time)."""
    m = _model()
    ids, mask, tt = _batch(3, 2, 9, 9, left=(2,))
    args = (ids, mask, tt) if masked else (ids, None, tt)
    torch._dynamo.reset()
    with fastdistil.use_backend(backend), torch.no_grad(), \
            torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        eager = m(*args)
        out = torch.compile(m, fullgraph=True, dynamic=False, backend="eager")(*args)
    assert (out.last_hidden_state - eager.last_hidden_state).abs().max() <= 1e-6
    assert (out.pooler_output - eager.pooler_output).abs().max() <= 1e-6


def test_host_checks_read_no_device_tensor():
    """pack_host's copy is the one transfer: numpy arrays in, one buffer out (no per-tensor copies)."""
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
    i, t, p, pk = pack_host(ids, mask, None, None, "cpu")
    assert i.untyped_storage().data_ptr() == pk.cu_seqlens.untyped_storage().data_ptr() == \
        pk.dest.untyped_storage().data_ptr()
    assert i.tolist() == [0, 1, 3] and t.tolist() == [0, 0, 0] and p.tolist() == [0, 1, 0]
    assert pk.cu_seqlens.tolist() == [0, 2, 3] and pk.dest.tolist() == [0, 1, 3, 2, 4, 5]


@pytest.mark.parametrize("mask_dtype", [torch.int8, torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_device_check_refuses_every_bad_value(mask_dtype):
    """The device-input check (one stacked min/max reduction, one m * (1 - m) test, one read): every bad value
    named, every good batch passed, for the mask dtypes tokenizers and users pass."""
    from fastdistil.inputs import check_inputs
    cfg = _model().config
    ids, mask, tt = _batch(2, 2, 4, 4)
    mask = mask.to(mask_dtype)
    assert check_inputs(cfg, ids, mask, tt, None, "cpu")[0] is not None
    n = 2 if mask_dtype == torch.uint8 else 5 if mask_dtype.is_floating_point else 3
    for value in (2, 255 if mask_dtype != torch.int8 else 127, -1, 0.5, float("nan"))[:n]:
        bad = mask.clone()
        bad[1, 1] = value
        with pytest.raises(ValueError, match="attention_mask must hold only 0"):
            check_inputs(cfg, ids, bad, tt, None, "cpu")
    for name, kw, top in (("input_ids", 0, 211), ("token_type_ids", 2, 2), ("position_ids", 3, 128)):
        for v in (-1, top):
            args = [ids, mask, tt, torch.zeros_like(ids)]
            args[kw] = args[kw].clone()
            args[kw][0, 1] = v
            with pytest.raises(ValueError, match=fr"{name} must lie in \[0, \w+={top}\); got values in \[-?\d+, "
                                                 fr"-?\d+\]"):
                check_inputs(cfg, *args, "cpu")
