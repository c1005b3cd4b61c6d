"""The native CPU backend (csrc/, fastdistil._C): every C++ op against the float64 reference, every kernel build
this CPU runs (AVX-512, AVX2, baseline x86-64), gradients, the whole model against transformers on the real
all-MiniLM-L6-v2 weights (fp32 and bf16), and the fallback when the extension is missing."""
import os
import subprocess
import sys

import pytest
import torch

import fastdistil
from fastdistil import reference as R

NATIVE_OK, NATIVE_WHY = fastdistil.availability()["native"]
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"native extension not built: {NATIVE_WHY}")


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request):
    """Run the test on each kernel build this CPU supports."""
    from fastdistil import _C
    if request.param not in _C.supported_isas():
        pytest.skip(f"this CPU has no {request.param}")
    _C.set_isa(request.param)
    fastdistil.set_backend("native")
    yield request.param
    _C.set_isa("auto")


def err_vs(ref64, ours, torch_lowp=None):
    """Max error of ours against the float64 reference, and the bound it must meet: fp32 within 2e-5 (relative to
    the output's scale); bf16 within 2x the error of the reference run in bf16 plus a rounding allowance."""
    e = (ours.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    if torch_lowp is None:
        return e, 2e-5 * scale
    e_t = (torch_lowp.double() - ref64).abs().max().item()
    return e, 2 * e_t + 1e-2 * scale


def packed(lens, H, D, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, H, D, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, max(lens)


# ------------------------------------------------------------------------------------------------ attention
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,H,D", [([1], 12, 32), ([7, 0, 129, 1], 3, 32), ([512], 2, 32), ([33, 5], 2, 64),
                                      ([17, 3], 2, 24)])
def test_varlen_attention_forward(isa, lens, H, D, dtype):
    q, k, v, cu, L = packed(lens, H, D, dtype, seed=len(lens) + D)
    ref = R.varlen_attention(q.double(), k.double(), v.double(), cu, L)
    ours = fastdistil.ops.varlen_attention(q, k, v, cu, L)
    lowp = R.varlen_attention(q, k, v, cu, L) if dtype == torch.bfloat16 else None
    e, bound = err_vs(ref, ours, lowp)
    assert ours.dtype == dtype and ours.shape == q.shape and e <= bound, (e, bound)


@needs_native
def test_varlen_attention_strided_qkv_views():
    """q, k, v as unbind views of one fused (T, 3, H, D) QKV output, as the model passes them."""
    fastdistil.set_backend("native")
    T, H, D = 40, 4, 32
    qkv = torch.randn(T, 3, H, D)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    q, k, v = qkv.unbind(1)
    ref = R.varlen_attention(q.double(), k.double(), v.double(), cu, 25)
    e, bound = err_vs(ref, fastdistil.ops.varlen_attention(q, k, v, cu, 25))
    assert e <= bound


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention_backward(isa, dtype):
    lens, H, D = [7, 1, 40, 0, 19], 2, 32
    q, k, v, cu, L = packed(lens, H, D, dtype, seed=3, requires_grad=True)
    do = torch.randn(q.shape).to(dtype)
    fastdistil.ops.varlen_attention(q, k, v, cu, L, softmax_scale=0.3).backward(do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    R.varlen_attention(*leaves, cu, L, softmax_scale=0.3).backward(do.double())
    for name, ours, ref in zip("qkv", (q.grad, k.grad, v.grad), leaves):
        e = (ours.double() - ref.grad).abs().max().item()
        tol = 2e-5 if dtype == torch.float32 else 5e-2 * max(1.0, ref.grad.abs().max().item())
        assert e <= tol, f"d{name}: {e}"


@needs_native
def test_varlen_attention_dropout_mask_and_gradients():
    """Dropout regenerates the forward's mask in the backward: both match the reference run with that mask."""
    from fastdistil import _C
    fastdistil.set_backend("native")
    lens, H, D, p = [9, 21], 2, 32, 0.3
    q, k, v, cu, L = packed(lens, H, D, torch.float32, seed=5, requires_grad=True)
    do = torch.randn(q.shape)
    torch.manual_seed(11)
    out = fastdistil.ops.varlen_attention(q, k, v, cu, L, dropout_p=p)
    out.backward(do)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # the draw of ops/rng.host_seed
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kept = 0
    for b, (s0, s1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        n = s1 - s0
        mask = torch.stack([_C.dropout_keep_mask(seed, b * H + h, n, n, p) > 0 for h in range(H)])[None]
        kept += mask.float().mean().item() / len(lens)
        qs, ks, vs = (x[s0:s1].transpose(0, 1)[None] for x in leaves)
        ref = R.attention(qs, ks, vs, dropout_p=p, dropout_mask=mask)[0].transpose(0, 1)
        assert (out[s0:s1].double() - ref).abs().max().item() <= 2e-5
        ref.backward(do[s0:s1].double())
    assert abs(kept - (1 - p)) < 0.1
    for ours, ref in zip((q.grad, k.grad, v.grad), leaves):
        assert (ours.double() - ref.grad).abs().max().item() <= 5e-5


@needs_native
def test_padded_attention_with_left_padding_and_all_padding_row(isa):
    B, H, L, D = 4, 3, 9, 32
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2] = 0      # all padding: zeros, never NaN
    mask[3, 5:] = 0
    ours = fastdistil.ops.attention(q, k, v, mask)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = R.attention(*leaves, mask)
    assert torch.isfinite(ours).all() and (ours[2] == 0).all()
    assert (ours.double() - ref).abs().max().item() <= 2e-5
    do = torch.randn(B, H, L, D)
    ours.backward(do)
    ref.backward(do.double())
    for t, r in zip((q, k, v), leaves):
        assert (t.grad.double() - r.grad).abs().max().item() <= 2e-5
    no_mask = fastdistil.ops.attention(q.detach(), k.detach(), v.detach())
    assert (no_mask.double() - R.attention(*(t.detach() for t in leaves))).abs().max().item() <= 2e-5


# ---------------------------------------------------------------------------------------- layer norm, gelu
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,N,res,ib", [(1, 384, True, True), (7, 129, False, True), (129, 64, True, False),
                                           (5, 1, False, False)])
def test_layer_norm(isa, rows, N, res, ib, dtype):
    g = torch.Generator().manual_seed(rows * N)
    mk = lambda *s: (3 * torch.randn(*s, generator=g) + 1).to(dtype).requires_grad_()  # noqa: E731
    x, w, b = mk(rows, N), mk(N), mk(N)
    r, bias = (mk(rows, N) if res else None), (mk(N) if ib else None)
    y = fastdistil.ops.layer_norm(x, w, b, 1e-12, r, input_bias=bias)
    dbl = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r, bias)]
    ref = R.layer_norm(dbl[0], dbl[1], dbl[2], 1e-12, dbl[3], input_bias=dbl[4])
    lowp = R.layer_norm(x, w, b, 1e-12, r, input_bias=bias) if dtype == torch.bfloat16 else None
    e, bound = err_vs(ref, y, lowp)
    assert e <= bound, (e, bound)
    dy = torch.randn(rows, N, generator=g).to(dtype)
    y.backward(dy)
    ref.backward(dy.double())
    for t, d in zip((x, w, b, r, bias), dbl):
        if t is not None:
            tol = 1e-4 if dtype == torch.float32 else 0.1
            assert (t.grad.double() - d.grad).abs().max().item() <= tol * max(1.0, d.grad.abs().max().item())


@needs_native
def test_layer_norm_dropout_matches_its_mask():
    from fastdistil import _C
    fastdistil.set_backend("native")
    rows, N, p = 33, 96, 0.25
    x, r = torch.randn(rows, N, requires_grad=True), torch.randn(rows, N, requires_grad=True)
    w, b, ib = torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True)
    torch.manual_seed(4)
    y = fastdistil.ops.layer_norm(x, w, b, 1e-12, r, input_bias=ib, dropout_p=p)
    torch.manual_seed(4)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = _C.dropout_keep_mask(seed, 0, rows, N, p).double()
    dbl = [t.detach().double().requires_grad_() for t in (x, w, b, r, ib)]
    ref = R.layer_norm((dbl[0] + dbl[4]) * keep, dbl[1], dbl[2], 1e-12, dbl[3])
    assert (y.double() - ref).abs().max().item() <= 2e-5
    dy = torch.randn(rows, N)
    y.backward(dy)
    ref.backward(dy.double())
    for t, d in zip((x, w, b, r, ib), dbl):
        assert (t.grad.double() - d.grad).abs().max().item() <= 1e-4 * max(1.0, d.grad.abs().max().item())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 1536), (7, 129), (3, 2, 5)])
def test_bias_gelu(isa, shape, approximate, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    x = (4 * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()
    b = torch.randn(shape[-1], generator=g).to(dtype).requires_grad_()
    y = fastdistil.ops.bias_gelu(x, b, approximate=approximate)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = R.bias_gelu(xd, bd, approximate)
    lowp = R.bias_gelu(x, b, approximate) if dtype == torch.bfloat16 else None
    e, bound = err_vs(ref, y, lowp)
    assert e <= bound, (e, bound)
    dy = torch.randn(*shape, generator=g).to(dtype)
    y.backward(dy)
    ref.backward(dy.double())
    tol = 2e-5 if dtype == torch.float32 else 0.05
    assert (x.grad.double() - xd.grad).abs().max().item() <= tol * 4
    assert (b.grad.double() - bd.grad).abs().max().item() <= tol * max(1.0, bd.grad.abs().max().item()) * 4


@needs_native
@pytest.mark.parametrize("T", [1, 7, 129])
def test_embed_layer_norm(isa, T):
    g = torch.Generator().manual_seed(T)
    V, P, N = 50, 130, 48
    tabs = [torch.randn(n, N, generator=g).requires_grad_() for n in (V, P, 2)]
    lw, lb = (torch.randn(N, generator=g).requires_grad_() for _ in range(2))
    ids, pos, tt = torch.randint(0, V, (T,), generator=g), torch.arange(T), torch.randint(0, 2, (T,), generator=g)
    y = fastdistil.ops.embed_layer_norm(ids, tt, pos, *tabs, lw, lb, 1e-12)
    dbl = [t.detach().double().requires_grad_() for t in (*tabs, lw, lb)]
    ref = R.embed_layer_norm(ids, tt, pos, *dbl, 1e-12)
    assert (y.double() - ref).abs().max().item() <= 2e-5 * max(1.0, ref.abs().max().item())
    dy = torch.randn(T, N, generator=g)
    y.backward(dy)
    ref.backward(dy.double())
    for t, d in zip((*tabs, lw, lb), dbl):
        assert (t.grad.double() - d.grad).abs().max().item() <= 1e-4 * max(1.0, d.grad.abs().max().item())


@needs_native
def test_boundary_checks_have_clear_messages():
    from fastdistil import _C
    q = torch.randn(5, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _C.varlen_attention_fwd(q, q, q, cu, 5, 1.0, 0.0, 0, False)
    q = q.float()
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        _C.varlen_attention_fwd(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 5, 1.0, 0.0, 0, False)
    with pytest.raises(ValueError, match="max_seqlen"):
        _C.varlen_attention_fwd(q, q, q, cu, 3, 1.0, 0.0, 0, False)
    with pytest.raises(ValueError, match="contiguous in its last"):
        _C.varlen_attention_fwd(q.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :4], q[:, :, :4], q[:, :, :4],
                                cu, 5, 1.0, 0.0, 0, False)
    with pytest.raises(ValueError, match="weight must have shape"):
        _C.layer_norm_fwd(torch.randn(3, 4), torch.randn(5), torch.randn(4), 1e-5, None, None, 0.0, 0, False)
    with pytest.raises(ValueError, match="out of range"):
        t = torch.randn(4, 3)
        _C.embed_layer_norm_fwd(torch.tensor([4]), torch.tensor([0]), torch.tensor([0]), t, t, t, torch.ones(3),
                                torch.zeros(3), 1e-12)


# ----------------------------------------------------------------------------------------------- whole model
def _batch(B, L, seed, pad_row=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (B, L), generator=g)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    if pad_row is not None:
        mask[pad_row] = 0
    return ids, mask


@pytest.fixture(scope="module")
def minilm_models(minilm_dir):
    import transformers
    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    return hf, fastdistil.FastStudent.from_pretrained(minilm_dir).eval()


@needs_native
@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_model_native_matches_transformers_on_real_weights(minilm_models, gemm, isa, monkeypatch):
    """Both inference routes: GEMMs on oneDNN (default) and the one-C++-call layer on ATen's addmm, on every kernel
    table (below AVX-512 the oneDNN route applies GELU with fastdistil's kernel instead of oneDNN's post-op)."""
    monkeypatch.setenv("FASTDISTIL_NATIVE_GEMM", gemm)
    hf, ours = minilm_models
    fastdistil.set_backend("native")
    for B, L, pad_row in ((1, 1, None), (1, 32, None), (5, 7, 3), (6, 129, 4), (1, 512, None)):
        ids, mask = _batch(B, L, seed=B * L, pad_row=pad_row)
        with torch.inference_mode():
            a = ours(ids, mask)
            b = hf(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        d = (a.last_hidden_state - b.last_hidden_state)[real].abs().max().item()
        assert d <= 1e-5, f"B={B} L={L}: last_hidden_state differs by {d}"
        assert (a.pooler_output - b.pooler_output)[real[:, 0]].abs().max().item() <= 1e-5
        assert torch.isfinite(a.last_hidden_state).all()
        if pad_row is not None:
            assert (a.last_hidden_state[pad_row] == 0).all()


@needs_native
def test_inference_sees_in_place_weight_updates():
    """The cached fused / prepacked weights follow in-place updates (e.g. load_state_dict after a forward)."""
    import transformers
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=96, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg).eval()
    ours = fastdistil.FastStudent.from_hf(hf).eval()
    fastdistil.set_backend("native")
    ids, mask = torch.randint(0, 99, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        ours(ids, mask)
        for m in (hf, ours):
            m.encoder.layer[1].output.dense.weight.mul_(1.5) if m is hf else \
                m.layers[1].output["dense"].weight.mul_(1.5)
            m.encoder.layer[0].attention.self.key.bias.add_(0.3) if m is hf else \
                m.layers[0].attention["self"]["key"].bias.add_(0.3)
        d = (ours(ids, mask).last_hidden_state - hf(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert d.abs().max().item() <= 1e-5


def _mean_pool(out, mask):
    m = mask[..., None].to(out.last_hidden_state.dtype)
    return ((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)).float()


@needs_native
def test_model_bf16_cosine_to_fp32(minilm_dir, minilm_models):
    """bf16 GEMMs (oneDNN, avx512_bf16 where present), fused ops accumulating in fp32: every sequence's pooled
    embedding within cosine 0.9999 of fp32."""
    _, fp32 = minilm_models
    bf16 = fastdistil.FastStudent.from_pretrained(minilm_dir, dtype=torch.bfloat16).eval()
    fastdistil.set_backend("native")
    ids, mask = _batch(16, 128, seed=7)
    with torch.inference_mode():
        a, b = _mean_pool(fp32(ids, mask), mask), _mean_pool(bf16(ids, mask), mask)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert bf16.layers[0].intermediate["dense"].weight.dtype == torch.bfloat16
    assert cos.min().item() >= 0.9999, f"worst-sequence cosine {cos.min().item():.6f}"


@needs_native
def test_model_training_gradients_native_vs_torch(minilm_dir):
    """A training step on the native backend (autograd through the fused ops) gives the torch backend's grads."""
    model = fastdistil.FastStudent.from_pretrained(minilm_dir).eval()  # eval: no dropout, gradients still flow
    model.encoder["layer"] = model.layers[:2]
    ids, mask = _batch(3, 21, seed=2, pad_row=None)
    grads = {}
    for backend in ("native", "torch"):
        fastdistil.set_backend(backend)
        model.zero_grad()
        out = model(ids, mask)
        loss = (_mean_pool(out, mask) ** 2).sum() + out.pooler_output.sum()
        loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["native"].keys() == grads["torch"].keys() and len(grads["torch"]) > 20
    for n, g in grads["torch"].items():
        e = (grads["native"][n] - g).abs().max().item()
        assert e <= 1e-4 * max(1.0, g.abs().max().item()), f"grad of {n} differs by {e}"


@needs_native
def test_model_training_with_dropout_runs_and_is_seeded(minilm_dir):
    model = fastdistil.FastStudent.from_pretrained(minilm_dir).train()
    model.encoder["layer"] = model.layers[:1]
    fastdistil.set_backend("native")
    ids, mask = _batch(2, 9, seed=1)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        out = model(ids, mask).last_hidden_state
        out.sum().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------ fallback
FALLBACK = r"""
import io, contextlib, sys, warnings
sys.modules["fastdistil._C"] = None  # as if the extension had not been built: importing it raises ImportError
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import fastdistil, torch
    from fastdistil.backend import resolve
    backends = [resolve("cpu"), resolve("cpu")]
    m = fastdistil.FastStudent(fastdistil.FastStudentConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64))
    y = m(torch.randint(0, 50, (2, 5))).last_hidden_state
out = io.StringIO()
with contextlib.redirect_stdout(out):
    from fastdistil.commands import info
    info.run(None)
msgs = [str(x.message) for x in w if "fastdistil._C" in str(x.message)]
print("BACKENDS", backends, "WARNINGS", len(msgs), msgs[:1], "SHAPE", tuple(y.shape))
print(out.getvalue())
"""


def test_fallback_when_extension_is_missing():
    env = {**os.environ, "FASTDISTIL_BACKEND": "auto"}
    r = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "BACKENDS ['torch', 'torch'] WARNINGS 1" in r.stdout, r.stdout
    assert "SHAPE (2, 5, 32)" in r.stdout
    assert "C++ extension fastdistil._C is not built" in r.stdout  # the warning and `fastdistil info` say why
    assert "ops on cpu tensors run on: torch" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['fastdistil._C'] = None; import fastdistil; "
                        "fastdistil.set_backend('native')"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "backend 'native' is not available" in r.stderr


@needs_native
def test_info_reports_native_and_isa(capsys):
    from fastdistil import _C
    from fastdistil.commands import info
    info.run(None)
    out = capsys.readouterr().out
    assert f"C++ extension fastdistil._C built ({_C.isa()} kernels" in out
    assert "ops on cpu tensors run on: native" in out or fastdistil.get_backend() != "auto"
