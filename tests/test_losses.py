"""fastdistil.losses: every objective against an independent float64 formula (torch.nn.functional where one
exists), masks and reductions, inference-mode teachers, and the fused (triton, interpreter) path's values and
student gradients against the float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdistil
from fastdistil import losses as L


@pytest.fixture(autouse=True)
def _torch_backend():
    """The maths tests run the reference backend; the fused tests switch to triton explicitly."""
    with fastdistil.use_backend("torch"):
        yield


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def _pack(x, mask):
    """(B, L, ...) -> (T, ...) real tokens in order."""
    return x[mask]


# ------------------------------------------------------------------------------------------- logits
def test_kd_kl_loss_is_batchmean_kl_times_t2_over_real_rows():
    s, t = torch.randn(3, 5, 11, dtype=torch.float64), torch.randn(3, 5, 11, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    T = 3.0
    want = F.kl_div(F.log_softmax(s[mask] / T, -1), F.log_softmax(t[mask] / T, -1), log_target=True,
                    reduction="batchmean") * T * T
    torch.testing.assert_close(L.kd_kl_loss(s, t, temperature=T, mask=mask), want)
    per_row = L.kd_kl_loss(s, t, temperature=T, mask=mask, reduction="none", weight=0.5)
    assert per_row.shape == (3, 5) and (per_row[~mask] == 0).all()
    torch.testing.assert_close(per_row.sum() * 2, L.kd_kl_loss(s, t, temperature=T, mask=mask, reduction="sum"))


def test_logit_mse_loss():
    s, t = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(L.logit_mse_loss(s, t), F.mse_loss(s, t))
    mask = torch.tensor([True, False, True, True])
    torch.testing.assert_close(L.logit_mse_loss(s, t, mask=mask, weight=2.0), 2 * F.mse_loss(s[mask], t[mask]))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_kl_loss_fused_matches_float64(dtype):
    s = (torch.randn(2, 6, 301) * 3).to(dtype).requires_grad_()
    t = (torch.randn(2, 6, 301) * 3).to(dtype)
    mask = torch.rand(2, 6) > 0.4
    mask[0, 0] = True
    with fastdistil.use_backend("triton"):
        loss = L.kd_kl_loss(s, t, temperature=2.0, mask=mask, weight=0.7)
        loss.backward()
    s64 = s.detach().double().requires_grad_()
    ref = L.kd_kl_loss(s64, t.double(), temperature=2.0, mask=mask, weight=0.7)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    rtol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=rtol * s64.grad.abs().max().item(), rtol=0)


# ------------------------------------------------------------------------------------------- hidden states
def test_hidden_mse_all_and_cls_tokens_padded_and_packed_agree():
    B, Lq, ds, dt = 3, 6, 8, 12
    mask = torch.ones(B, Lq, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :2] = False  # left padding: the [CLS] row is the first real token
    hs = torch.randn(B, Lq, ds, dtype=torch.float64)
    ht = torch.randn(B, Lq, dt, dtype=torch.float64)
    proj = L.HiddenProjection(ds, dt).double()
    want_all = F.mse_loss(proj(hs)[mask], ht[mask])
    torch.testing.assert_close(L.hidden_mse_loss(hs, ht, projection=proj, mask=mask), want_all)
    lens = mask.sum(1).tolist()
    cu = _cu(lens)
    torch.testing.assert_close(L.hidden_mse_loss(_pack(hs, mask), _pack(ht, mask), projection=proj, cu_seqlens=cu),
                               want_all)
    first = torch.tensor([0, 0, 2])
    want_cls = F.mse_loss(proj(hs[torch.arange(B), first]), ht[torch.arange(B), first])
    torch.testing.assert_close(L.hidden_mse_loss(hs, ht, projection=proj, mask=mask, tokens="cls"), want_cls)
    torch.testing.assert_close(L.hidden_mse_loss(_pack(hs, mask), _pack(ht, mask), projection=proj, tokens="cls",
                                                 cu_seqlens=cu), want_cls)


def test_layer_map_and_multi_layer_hidden_loss():
    assert L.top_down_layer_map(6, 12) == [(0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    assert L.top_down_layer_map(4, 12, include_embeddings=False) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert L.top_down_layer_map(5, 12)[-1] == (5, 12)
    with pytest.raises(ValueError):
        L.top_down_layer_map(13, 12)
    pairs = L.top_down_layer_map(2, 4)
    hs = [torch.randn(9, 4, dtype=torch.float64) for _ in range(3)]
    ht = [torch.randn(9, 6, dtype=torch.float64) for _ in range(5)]
    proj = L.HiddenProjection(4, 6, num_maps=len(pairs)).double()
    want = sum(F.mse_loss(proj.maps[j](hs[a]), ht[b]) for j, (a, b) in enumerate(pairs)) / len(pairs)
    torch.testing.assert_close(L.hidden_mse_loss_layers(hs, ht, pairs, projection=proj), want)
    with pytest.raises(ValueError, match="maps"):
        L.hidden_mse_loss_layers(hs, ht, pairs, projection=L.HiddenProjection(4, 6, num_maps=2))


# ------------------------------------------------------------------------------------------- relations
def _explicit_relation_kl(a_s, b_s, a_t, b_t, heads, mask):
    """mean over heads and real query tokens of KL(softmax(a_t b_t^T/sqrt(d_t)) || softmax(a_s b_s^T/sqrt(d_s))),
    padded (B, L, width) inputs, written independently of fastdistil.reference."""
    total, count = 0.0, 0
    for b in range(a_s.shape[0]):
        idx = mask[b].nonzero().flatten()
        for r in range(heads):
            def rel(a, c):
                d = a.shape[-1] // heads
                x, y = a[b, idx, r * d:(r + 1) * d], c[b, idx, r * d:(r + 1) * d]
                return F.log_softmax(x @ y.T / math.sqrt(d), -1)
            lt, ls = rel(a_t, b_t), rel(a_s, b_s)
            total = total + F.kl_div(ls, lt, log_target=True, reduction="sum")
            count += len(idx)
    return total / count


def test_attention_and_value_relation_match_explicit_softmaxes():
    B, Lq, H, D = 2, 7, 3, 4
    mask = torch.ones(B, Lq, dtype=torch.bool)
    mask[1, 5:] = False
    q_s, k_s, v_s = (torch.randn(B, Lq, H, D, dtype=torch.float64) for _ in range(3))
    q_t, k_t, v_t = (torch.randn(B, Lq, H, 2 * D, dtype=torch.float64) for _ in range(3))
    flat = lambda x: x.reshape(B, Lq, -1)  # noqa: E731
    want = _explicit_relation_kl(flat(q_s), flat(k_s), flat(q_t), flat(k_t), H, mask)
    torch.testing.assert_close(L.attention_kl_loss(q_s, k_s, q_t, k_t, attention_mask=mask), want)
    lens = mask.sum(1).tolist()
    got = L.attention_kl_loss(_pack(q_s, mask), _pack(k_s, mask), _pack(q_t, mask), _pack(k_t, mask),
                              cu_seqlens=_cu(lens), max_seqlen=max(lens))
    torch.testing.assert_close(got, want)
    want_v = _explicit_relation_kl(flat(v_s), flat(v_s), flat(v_t), flat(v_t), H, mask)
    torch.testing.assert_close(L.value_relation_kl_loss(v_s, v_t, attention_mask=mask), want_v)
    with pytest.raises(ValueError, match="num_relation_heads"):
        L.attention_kl_loss(q_s, k_s, q_t[:, :, :2], k_t[:, :, :2], attention_mask=mask)


def test_minilmv2_relations_with_differing_head_counts():
    """Teacher 6 heads x 8 (48 wide), student 2 heads x 6 (12 wide), 4 relation heads of widths 12 and 3."""
    B, Lq = 2, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    st = {k: torch.randn(B, Lq, 2, 6, dtype=torch.float64) for k in "qkv"}
    te = {k: torch.randn(B, Lq, 6, 8, dtype=torch.float64) for k in "qkv"}
    got = L.minilmv2_relation_loss(st, te, num_relation_heads=4, attention_mask=mask)
    want = sum(_explicit_relation_kl(st[k].reshape(B, Lq, -1), st[k].reshape(B, Lq, -1), te[k].reshape(B, Lq, -1),
                                     te[k].reshape(B, Lq, -1), 4, mask) for k in "qkv")
    torch.testing.assert_close(got, want)
    per = L.minilmv2_relation_loss(st, te, num_relation_heads=4, attention_mask=mask, reduction="none",
                                   relations=("qq", "vv"))
    assert set(per) == {"qq", "vv"} and per["qq"].shape == (4, B * Lq)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_minilmv2_fused_packed_matches_float64(dtype):
    """FastStudent-style taps: q, k, v (T, H, D) views of one fused QKV output; teacher 4 x 16, student 4 x 8,
    8 relation heads; the fused kernels' loss and student gradients against the float64 reference."""
    lens = [3, 40, 1]
    cu, T = _cu(lens), sum(lens)
    qkv = torch.randn(T, 3, 4, 8).to(dtype).requires_grad_()
    st = dict(zip("qkv", qkv.unbind(1)))
    with torch.inference_mode():
        te = dict(zip("qkv", torch.randn(T, 3, 4, 16).to(dtype).unbind(1)))
    kw = dict(num_relation_heads=8, cu_seqlens=cu, max_seqlen=max(lens))
    with fastdistil.use_backend("triton"):
        loss = L.minilmv2_relation_loss(st, te, **kw)
        loss.backward()
    qkv64 = qkv.detach().double().requires_grad_()
    ref = L.minilmv2_relation_loss(dict(zip("qkv", qkv64.unbind(1))), {k: v.double() for k, v in te.items()}, **kw)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5 * ref.abs().item(), rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=tol * qkv64.grad.abs().max().item(), rtol=0)


# ------------------------------------------------------------------------------------------- embeddings
def test_embedding_losses_and_mean_pool():
    s, t = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(L.embedding_cosine_loss(s, t), (1 - F.cosine_similarity(s, t)).mean())
    torch.testing.assert_close(L.embedding_mse_loss(s, t), F.mse_loss(s, t))
    proj = L.HiddenProjection(8, 3).double()
    t3 = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(L.embedding_mse_loss(s, t3, projection=proj), F.mse_loss(proj(s), t3))
    h = torch.randn(2, 4, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pooled = L.mean_pool(h, mask=mask)
    torch.testing.assert_close(pooled[0], h[0, :3].mean(0))
    torch.testing.assert_close(L.mean_pool(h[mask], cu_seqlens=_cu([3, 4])), pooled)
    ht = torch.randn(2, 4, 8, dtype=torch.float64)  # DistilBERT's cosine on real tokens
    torch.testing.assert_close(L.embedding_cosine_loss(h, ht, mask=mask),
                               (1 - F.cosine_similarity(h[mask], ht[mask])).mean())


# ------------------------------------------------------------------------------------------- conventions
def _all_losses(student, teacher):
    """Every objective on (student tensors requiring grad, teacher tensors); returns {name: scalar}."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return {
        "kd": L.kd_kl_loss(student["logits"], teacher["logits"], temperature=2.0, mask=mask),
        "logit_mse": L.logit_mse_loss(student["logits"], teacher["logits"], mask=mask),
        "hidden": L.hidden_mse_loss(student["h"], teacher["h"], projection=student["proj"], mask=mask),
        "attention": L.attention_kl_loss(student["q"], student["k"], teacher["q"], teacher["k"],
                                         attention_mask=mask),
        "value": L.value_relation_kl_loss(student["v"], teacher["v"], attention_mask=mask),
        "v2": L.minilmv2_relation_loss(student, teacher, num_relation_heads=2, attention_mask=mask),
        "cos": L.embedding_cosine_loss(student["pooled"], teacher["pooled"]),
        "mse": L.embedding_mse_loss(student["h"][:, 0], teacher["h"][:, 0], projection=student["proj"]),
    }


def _make(dtype=torch.float64):
    B, Lq = 2, 4
    st = {"logits": torch.randn(B, Lq, 10), "h": torch.randn(B, Lq, 6), "q": torch.randn(B, Lq, 2, 3),
          "k": torch.randn(B, Lq, 2, 3), "v": torch.randn(B, Lq, 2, 3), "pooled": torch.randn(B, 6)}
    st = {k: v.to(dtype).requires_grad_() for k, v in st.items()}
    st["proj"] = L.HiddenProjection(6, 8).to(dtype)
    te = {"logits": torch.randn(B, Lq, 10), "h": torch.randn(B, Lq, 8), "q": torch.randn(B, Lq, 2, 5),
          "k": torch.randn(B, Lq, 2, 5), "v": torch.randn(B, Lq, 2, 5), "pooled": torch.randn(B, 6)}
    return st, {k: v.to(dtype) for k, v in te.items()}


def test_inference_mode_teachers_need_no_copy_and_get_no_gradient():
    st, te = _make()
    with torch.inference_mode():
        te_inf = {k: v.clone() for k, v in te.items()}
    te_grad = {k: v.clone().requires_grad_() for k, v in te.items()}
    a = _all_losses(st, te_inf)
    b = _all_losses(st, te_grad)
    for k in a:
        assert torch.isfinite(a[k]) and a[k].ndim == 0, k
        torch.testing.assert_close(a[k], b[k])
    sum(a.values()).backward()
    sum(b.values()).backward()
    assert all(v.grad is None for v in te_grad.values())  # the teacher is a constant target
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for k, v in st.items() if k != "proj")


def test_no_real_row_gives_zero_not_nan():
    s = torch.randn(2, 3, 5, requires_grad=True)
    none = torch.zeros(2, 3, dtype=torch.bool)
    for loss in (L.kd_kl_loss(s, torch.randn(2, 3, 5), temperature=1.0, mask=none),
                 L.logit_mse_loss(s, torch.randn(2, 3, 5), mask=none),
                 L.attention_kl_loss(s[..., None], s[..., None], torch.randn(2, 3, 5, 1), torch.randn(2, 3, 5, 1),
                                     num_relation_heads=5, attention_mask=none)):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(s.grad).all()


def test_argument_errors():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="reduction"):
        L.logit_mse_loss(s, s, reduction="batchmean")
    with pytest.raises(ValueError, match="mask"):
        L.kd_kl_loss(s, s, temperature=1.0, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes differ"):
        L.kd_kl_loss(s, s[:, :2], temperature=1.0)
    with pytest.raises(TypeError):
        L.kd_kl_loss(s, s)  # temperature has no default
    with pytest.raises(ValueError, match="HiddenProjection"):
        L.hidden_mse_loss(s, torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="cu_seqlens"):
        L.hidden_mse_loss(s[0], s[0], tokens="cls")
    with pytest.raises(ValueError, match="tokens"):
        L.hidden_mse_loss(s, s, tokens="first")
    with pytest.raises(ValueError, match="relations"):
        L.minilmv2_relation_loss({"q": s}, {"q": s}, num_relation_heads=1, relations=("qk",))


# ------------------------------------------------------------------------------------------- CPU (native) paths
def _native_or_direct(op_name):
    """The registered native implementation of an op (run directly: it needs no C++ build of its own)."""
    from fastdistil.ops import dispatch
    return dispatch._IMPLS[(op_name, "native")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_native_kd_blocks_match_reference(dtype, monkeypatch):
    from fastdistil.ops import kd as op
    monkeypatch.setattr(op, "_CPU_BLOCK_ELEMS", 3 * 257)  # several row blocks, the last one partial
    s = (torch.randn(7, 257) * 3).to(dtype).requires_grad_()
    t = (torch.randn(7, 257) * 3).to(dtype)
    t[1] = float("inf")  # a masked padding row may hold anything
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    g = torch.randn(7)
    kl = _native_or_direct("kd_kl")(s, t, 2.0, mask)
    (kl * g.to(kl.dtype)).sum().backward()
    s64 = s.detach().double().requires_grad_()
    ref = fastdistil.reference.kd_kl_rows(s64, torch.where(mask[:, None], t.double(), 0.0), 2.0, mask)
    (ref * g.double()).sum().backward()
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(kl.double(), ref, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=tol * s64.grad.abs().max().item(), rtol=0)
    assert (s.grad[~mask] == 0).all()


@pytest.mark.parametrize("packed", [True, False])
def test_native_relation_by_sequence_matches_reference(packed):
    impl = _native_or_direct("relation_kl")
    if packed:
        lens = [5, 0, 70, 1]
        cu, mask, lead = _cu(lens), None, (sum(lens),)
    else:
        mask = torch.rand(3, 21) > 0.3
        mask[1] = False
        cu, lead = None, (3, 21)
    a_s, b_s = (torch.randn(*lead, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a_t, b_t = (torch.randn(*lead, 2, 12, dtype=torch.float64) for _ in range(2))
    out = impl(a_s, b_s, a_t, b_t, 0.3, 0.2, cu, None if cu is None else 70, mask)
    g = torch.randn_like(out)
    da, db = torch.autograd.grad((out * g).sum(), (a_s, b_s))
    ref = fastdistil.reference.relation_kl_rows(a_s, b_s, a_t, b_t, 0.3, 0.2, cu, None if cu is None else 70, mask)
    rda, rdb = torch.autograd.grad((ref * g).sum(), (a_s, b_s))
    for x, y in ((out, ref), (da, rda), (db, rdb)):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)


def test_native_relation_memory_is_a_small_fraction_of_the_reference():
    """Peak bytes of live tensors allocated by forward + backward of one relation loss (32 x 128 tokens, 12
    relation heads, teacher 768 / student 384 wide): the CPU per-sequence path vs the materialised reference.
    Tensors live on the meta device (shapes, autograd graph and allocations are real, no arithmetic runs); the
    per-sequence path reads its sequence boundaries from a CPU cu_seqlens, as on a real CPU run."""
    import weakref

    class Peak(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0

        def _free(self, n):
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not any(r.alias_info is not None for r in func._schema.returns):
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor):
                        n = t.untyped_storage().nbytes()
                        self.live += n
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(t, self._free, n)
            return out

    from fastdistil.ops import dispatch, relation as op
    cu = _cu([128] * 32)
    peaks = {}
    for name, impl, cu_dev in (("native", op._relation_native_cpu, cu), ("torch", op._relation_torch, cu.to("meta"))):
        x_s = torch.empty(32 * 128, 12, 32, device="meta", requires_grad=True)
        x_t = torch.empty(32 * 128, 12, 64, device="meta")
        with Peak() as p:
            impl(x_s, x_s, x_t, x_t, 32 ** -0.5, 64 ** -0.5, cu_dev, 128, None).mean().backward()
        peaks[name] = p.peak
    assert dispatch._IMPLS[("relation_kl", "native")] is op._relation_native
    assert 10 * peaks["native"] <= peaks["torch"], peaks


@pytest.mark.interpreter
def test_teacher_in_another_dtype_is_cast_to_the_students():
    """A bf16 student (autocast) against fp32 teacher outputs: the fused losses equal those on a bf16 teacher."""
    s = torch.randn(3, 40).bfloat16().requires_grad_()
    t = torch.randn(3, 40)
    x_s = torch.randn(2, 6, 2, 8).bfloat16().requires_grad_()
    x_t = torch.randn(2, 6, 2, 16)
    with fastdistil.use_backend("triton"):
        for f in (lambda tt: L.kd_kl_loss(s, tt, temperature=2.0),
                  lambda tt: L.self_relation_kl_loss(x_s, x_t.to(tt.dtype), num_relation_heads=2)):
            torch.testing.assert_close(f(t), f(t.bfloat16()))


def test_native_paths_accept_inference_mode_teachers():
    with torch.inference_mode():
        t = torch.randn(3, 20)
        x_t = torch.randn(9, 2, 8)
    s = torch.randn(3, 20, requires_grad=True)
    x_s = torch.randn(9, 2, 4, requires_grad=True)
    _native_or_direct("kd_kl")(s, t, 1.5, None).sum().backward()
    _native_or_direct("relation_kl")(x_s, x_s, x_t, x_t, 0.5, 0.35, _cu([4, 5]), 5, None).sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(x_s.grad).all()
