"""kernels/relation.py in Triton's interpreter against the materialised float64 reference: per-row KL and
student gradients for packed (varlen) and padded+mask inputs, attention (q, k) and self (x, x) relations, differing
teacher/student widths, strided views, poisoned outputs, inference-mode teachers, torch.compile, the check-kernels
specs, and the memory claim (batch 32 x 128, 12 relation heads: <= 1/10 of the materialised reference)."""
import math

import pytest
import torch

import fastdistil
from fastdistil import reference
from fastdistil.ops import relation_kl_rows
from fused_helpers import PoisonedTorch

pytestmark = pytest.mark.interpreter

# (value tolerance relative to max |KL|, gradient tolerance relative to max |grad|): fp16 rounds p_s - p_t to
# fp16 before the tensor-core dot of the backward; bf16 is upcast in the interpreter (DOT_F32) but keeps the
# bf16 tolerance it has on a GPU.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 3e-3), torch.bfloat16: (1e-5, 1e-2)}


def _cu(lens, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


def _run(a_s, b_s, a_t, b_t, g, backend, self_rel=False, **kw):
    """Per-row KL and the student gradients of sum(g * KL) (float64 copies on the torch backend)."""
    if backend == "torch":
        a_s, b_s, a_t, b_t = (x.detach().double() for x in (a_s, b_s, a_t, b_t))
    a_s = a_s.detach().clone().requires_grad_()
    b_s = a_s if self_rel else b_s.detach().clone().requires_grad_()
    with fastdistil.use_backend(backend):
        kl = relation_kl_rows(a_s, b_s, a_t, b_t, **kw)
    (kl * g.to(kl.dtype)).sum().backward()
    return kl.detach(), a_s.grad, (None if self_rel else b_s.grad)


def _close(ours, ref, dtype, grad=False):
    tol = TOL[dtype][1 if grad else 0]
    scale = max(ref.abs().max().item(), 1e-3)
    torch.testing.assert_close(ours.double(), ref, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_varlen_attention_kl_differing_heads(dtype, device):
    """Packed sequences (1, 7, 70 > one key block, 33), student 4 heads x 8, teacher 6 heads x 8 -> R = 4
    relation heads of widths 8 and 12 (neither a power of two for the teacher)."""
    lens = [1, 7, 70, 33]
    cu, T = _cu(lens, device), sum(lens)
    q_s, k_s = (torch.randn(T, 4, 8) * 1.5).to(device, dtype), (torch.randn(T, 4, 8) * 1.5).to(device, dtype)
    q_t, k_t = (torch.randn(T, 6, 8) * 1.5).to(device, dtype), (torch.randn(T, 6, 8) * 1.5).to(device, dtype)
    kw = dict(num_relation_heads=4, cu_seqlens=cu, max_seqlen=max(lens))
    g = torch.rand(4, T).to(device)
    kl, da, db = _run(q_s, k_s, q_t, k_t, g, "triton", **kw)
    kl64, da64, db64 = _run(q_s, k_s, q_t, k_t, g, "torch", **kw)
    assert kl.shape == (4, T) and kl.dtype == torch.float32 and da.dtype == dtype
    _close(kl, kl64, dtype)
    _close(da, da64, dtype, grad=True)
    _close(db, db64, dtype, grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_mask_self_relation(dtype, device):
    """Padded (B, L, H*D) with right and left padding and one fully padded row; self-relation a = b = x, so
    the gradient is the sum of both kernel paths; padded rows get KL 0 and zero gradient."""
    B, L = 4, 37
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 20:] = False          # right padding
    mask[1, :9] = False           # left padding
    mask[2] = False               # nothing real
    mask = mask.to(device)
    x_s = torch.randn(B, L, 24).to(device, dtype)
    x_t = torch.randn(B, L, 2, 48).to(device, dtype)
    kw = dict(num_relation_heads=3, attention_mask=mask)
    g = torch.randn(3, B * L).to(device)
    kl, dx, _ = _run(x_s, x_s, x_t, x_t, g, "triton", self_rel=True, **kw)
    kl64, dx64, _ = _run(x_s, x_s, x_t, x_t, g, "torch", self_rel=True, **kw)
    _close(kl, kl64, dtype)
    _close(dx, dx64, dtype, grad=True)
    pad = ~mask.reshape(-1)
    assert (kl[:, pad] == 0).all() and (dx.reshape(B * L, -1)[pad] == 0).all()


def test_padded_without_mask_and_wide_heads(device):
    """No mask; relation-head widths 128 and 96 (the widest tier: 16 x 16 tiles in fp32)."""
    B, L = 2, 40
    a_s, b_s = torch.randn(B, L, 128).to(device), torch.randn(B, L, 128).to(device)
    a_t, b_t = torch.randn(B, L, 2, 48).to(device), torch.randn(B, L, 2, 48).to(device)
    g = torch.randn(1, B * L).to(device)
    kl, da, db = _run(a_s, b_s, a_t, b_t, g, "triton", num_relation_heads=1)
    kl64, da64, db64 = _run(a_s, b_s, a_t, b_t, g, "torch", num_relation_heads=1)
    _close(kl, kl64, torch.float32)
    _close(da, da64, torch.float32, grad=True)
    _close(db, db64, torch.float32, grad=True)


def test_fused_qkv_views_and_inference_teacher(device):
    """q, k, v as strided views of one (T, 3, H, D) GEMM output (FastStudent's taps), teacher made under
    inference mode: no copies needed, no gradient reaches the teacher, results equal contiguous inputs."""
    lens = [5, 66]
    cu, T = _cu(lens, device), sum(lens)
    qkv = torch.randn(T, 3, 4, 8).to(device).requires_grad_()
    q_s, k_s, _ = qkv.unbind(1)  # (T, 4, 8), row stride 96
    with torch.inference_mode():
        tq = torch.randn(T, 3, 2, 16).to(device)
        q_t, k_t, _ = tq.unbind(1)
    kw = dict(num_relation_heads=2, cu_seqlens=cu, max_seqlen=max(lens))
    with fastdistil.use_backend("triton"):
        kl = relation_kl_rows(q_s, k_s, q_t, k_t, **kw)
        kl.sum().backward()
    g_views = qkv.grad[:, :2].clone()
    assert (qkv.grad[:, 2] == 0).all()
    kl64, dq64, dk64 = _run(q_s.detach(), k_s.detach(), q_t.clone(), k_t.clone(), torch.ones(2, T, device=device),
                            "torch", **kw)
    _close(kl, kl64, torch.float32)
    _close(g_views[:, 0], dq64, torch.float32, grad=True)
    _close(g_views[:, 1], dk64, torch.float32, grad=True)


@pytest.mark.parametrize("packed", [True, False])
def test_writes_every_output(monkeypatch, packed, device):
    from fastdistil.kernels import relation as K
    monkeypatch.setattr(K, "torch", PoisonedTorch())
    if packed:
        lens = [3, 0, 65, 1]  # an empty sequence too
        kw = dict(num_relation_heads=2, cu_seqlens=_cu(lens, device), max_seqlen=max(lens))
        lead = (sum(lens),)
    else:
        mask = torch.rand(3, 30) > 0.4
        mask[0] = False
        kw = dict(num_relation_heads=2, attention_mask=mask.to(device))
        lead = (3, 30)
    a_s, b_s, a_t, b_t = (torch.randn(*lead, 16).to(device) for _ in range(4))
    n = math.prod(lead)
    g = torch.randn(2, n).to(device)
    kl, da, db = _run(a_s, b_s, a_t, b_t, g, "triton", **kw)
    assert torch.isfinite(kl).all() and torch.isfinite(da).all() and torch.isfinite(db).all()
    kl64, da64, db64 = _run(a_s, b_s, a_t, b_t, g, "torch", **kw)
    _close(kl, kl64, torch.float32)
    _close(da, da64, torch.float32, grad=True)
    _close(db, db64, torch.float32, grad=True)


def test_expanded_gradient_and_only_one_input_needing_grad(device):
    """A mean's gradient arrives as a stride-0 expanded tensor; only a_s requiring grad runs only dA."""
    lens = [9, 4]
    kw = dict(num_relation_heads=1, cu_seqlens=_cu(lens, device), max_seqlen=9)
    a_s = torch.randn(13, 16).to(device).requires_grad_()
    b_s, a_t, b_t = (torch.randn(13, 16).to(device) for _ in range(3))
    with fastdistil.use_backend("triton"):
        relation_kl_rows(a_s, b_s, a_t, b_t, **kw).mean().backward()
    a64 = a_s.detach().double().requires_grad_()
    reference.relation_kl_rows(a64[:, None], b_s.double()[:, None], a_t.double()[:, None], b_t.double()[:, None],
                               0.25, 0.25, kw["cu_seqlens"], 9).mean().backward()
    _close(a_s.grad, a64.grad, torch.float32, grad=True)


def test_float64_and_argument_errors():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with fastdistil.use_backend("triton"):
        kl = relation_kl_rows(x, x, x, x, num_relation_heads=2)
    assert kl.dtype == torch.float64 and kl.abs().max() < 1e-12  # identical relations: KL 0
    y = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="divisible"):
        relation_kl_rows(y, y, y, y, num_relation_heads=3)
    with pytest.raises(ValueError, match="max_seqlen"):
        relation_kl_rows(y[0], y[0], y[0], y[0], num_relation_heads=2, cu_seqlens=_cu([5]))
    with pytest.raises(ValueError, match="attention_mask"):
        relation_kl_rows(y, y, y, y, num_relation_heads=2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="widths differ"):
        relation_kl_rows(y, torch.randn(2, 5, 4), y, y, num_relation_heads=2)
    with pytest.raises(TypeError):
        relation_kl_rows(y, y, y, y.half(), num_relation_heads=2)


def test_compiles_fullgraph(device):
    lens = [6, 17]
    cu = _cu(lens, device)
    a_s = torch.randn(23, 2, 8).to(device).requires_grad_()
    a_t = torch.randn(23, 2, 16).to(device)
    with fastdistil.use_backend("triton"):
        f = torch.compile(lambda a, t: relation_kl_rows(a, a, t, t, num_relation_heads=2, cu_seqlens=cu,
                                                        max_seqlen=17).sum(), fullgraph=True, backend="eager")
        f(a_s, a_t).backward()
    _, d64, _ = _run(a_s, a_s, a_t, a_t, torch.ones(2, 23, device=device), "torch", self_rel=True,
                     num_relation_heads=2, cu_seqlens=cu, max_seqlen=17)
    _close(a_s.grad, d64, torch.float32, grad=True)


def test_specs_cover_every_launcher_choice_and_cost():
    from fastdistil.kernels import relation as K
    specs = K.compile_specs()
    names = {sp.name for sp in specs}
    assert names == {"_relation_fwd_kernel", "_relation_bwd_kernel"}
    for sp in specs:  # every signature names exactly the kernel's parameters
        assert list(sp.signature) == list(sp.fn.arg_names), sp.config
    built = {(sp.name, sp.signature["AS"], sp.constexprs["BLOCK_M"], sp.constexprs["BLOCK_N"], sp.num_warps,
              sp.constexprs["VARLEN"], sp.constexprs["HAS_MASK"]) for sp in specs}
    kinds = {"_relation_fwd_kernel": "fwd", "_relation_bwd_kernel": "bwd"}
    for dt in range(1, K.MAX_HEAD_DIM + 1, 7):
        for ds in range(1, K.MAX_HEAD_DIM + 1, 5):
            for ty in ("*fp16", "*bf16", "*fp32"):
                for name, kind in kinds.items():
                    cfg = K._config(dt, ds, "fp32" if ty == "*fp32" else "16bit", kind)
                    for mode in ((True, False), (False, True), (False, False)):
                        assert (name, ty, *cfg, *mode) in built, (dt, ds, ty, name, mode)
    x = torch.randn(4, 2 * 129)
    with fastdistil.use_backend("triton"), pytest.raises(ValueError, match="up to 128"):
        relation_kl_rows(x, x, x, x, num_relation_heads=2, cu_seqlens=_cu([4]), max_seqlen=4)
    c = K.cost([128] * 32, 12, 64, 32)
    fwd = next(x for x in c if x.name == "relation.fwd")
    assert fwd.flops == 2.0 * 32 * 12 * 128 * 128 * (64 + 32)
    assert fwd.bytes < 32 * 12 * 128 * 128 * 4  # less than ONE fp32 L x L relation tensor: nothing L x L moves


class _Allocs(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every new tensor an op returns (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def _memory(backend):
    """(bytes allocated by the forward, bytes autograd keeps for backward that are not the inputs) for MiniLMv2's
    Q-Q relation at batch 32 x 128: teacher 768 wide, student 384 wide, 12 relation heads. Runs on the meta
    device: the shapes and the autograd graph are real, no arithmetic is done (the fused op's fake kernel
    allocates exactly what the launcher allocates)."""
    B, L, R = 32, 128, 12
    cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device="meta")
    x_s = torch.empty(B * L, 384, device="meta", requires_grad=True)
    x_t = torch.empty(B * L, 768, device="meta")
    inputs = {t.untyped_storage()._cdata for t in (x_s, x_t, cu)}
    saved = []

    def pack(t):  # count what autograd keeps, except (views of) the inputs themselves
        if t.untyped_storage()._cdata not in inputs:
            saved.append(t.numel() * t.element_size())
        return t

    with fastdistil.use_backend(backend), _Allocs() as allocs, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        relation_kl_rows(x_s, x_s, x_t, x_t, num_relation_heads=R, cu_seqlens=cu, max_seqlen=L)
    return allocs.bytes, sum(saved)


def test_memory_at_batch_32x128_is_under_a_tenth_of_the_materialised_reference():
    """The fused op allocates only 3 x (R, T) float32 rows (kl, lse_t, lse_s) and saves only those and its
    inputs; the reference keeps (B, R, L, L) matrices. Compare the fused op's TOTAL forward allocation (an
    upper bound of its extra memory) with what the reference merely SAVES for backward (a lower bound of its)."""
    fused_alloc, fused_saved = _memory("triton")
    ref_alloc, ref_saved = _memory("torch")
    R, T, LL = 12, 32 * 128, 32 * 12 * 128 * 128
    assert fused_alloc == 3 * R * T * 4  # kl, lse_t, lse_s: nothing else
    assert fused_saved <= 2 * R * T * 4
    assert ref_saved >= 2 * LL * 4  # at least two fp32 (B, R, L, L) tensors
    assert 10 * (fused_alloc + fused_saved) <= ref_saved, (fused_alloc, fused_saved, ref_alloc, ref_saved)


@pytest.mark.parametrize("packed", [True, False])
def test_custom_op_registration(packed, device):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    from fastdistil.ops import relation as op

    def r(*shape):
        return torch.randn(*shape).to(device)
    if packed:
        a, b = r(20, 2, 8).requires_grad_(), r(20, 2, 8).requires_grad_()
        args = (a, b, r(20, 2, 16), r(20, 2, 16), 0.3, 0.25,
                torch.tensor([0, 3, 20], dtype=torch.int32, device=device), 17, None)
    else:
        a = r(2, 9, 2, 8).requires_grad_()
        mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4], dtype=torch.int8, device=device)
        args = (a, a, r(2, 9, 2, 16), r(2, 9, 2, 16), 0.3, 0.25, None, 9, mask)
    torch.library.opcheck(op._rel_fwd_op, args)


def test_launchers_allocate_only_the_row_statistics_and_the_gradients(monkeypatch, device):
    """What the meta-device measurement above assumes, checked on a real interpreter run: the forward launcher
    allocates kl, lse_t, lse_s ((R, T) float32 each) plus 1-element pointer stand-ins, the backward one only the
    two input gradients; nothing L x L."""
    from fastdistil.kernels import relation as K
    allocs = []

    class Counting:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*a, **k):
            out = torch.empty(*a, **k)
            allocs.append(out.numel() * out.element_size())
            return out

        @staticmethod
        def empty_like(x, **k):
            out = torch.empty_like(x, **k)
            allocs.append(out.numel() * out.element_size())
            return out

    monkeypatch.setattr(K, "torch", Counting())
    R, T = 2, 45
    a_s, b_s = torch.randn(T, R, 8).to(device).requires_grad_(), torch.randn(T, R, 8).to(device).requires_grad_()
    x_t = torch.randn(T, R, 16).to(device)
    with fastdistil.use_backend("triton"):
        kl = relation_kl_rows(a_s, b_s, x_t, x_t, num_relation_heads=R, cu_seqlens=_cu([5, 40], device),
                              max_seqlen=40)
        fwd = sum(allocs)
        kl.sum().backward()
    assert 3 * R * T * 4 <= fwd <= 3 * R * T * 4 + 8  # + the int8 mask stand-in
    assert sum(allocs) - fwd <= 2 * a_s.numel() * 4 + 8  # dA, dB (+ stand-ins)


@pytest.mark.compile
def test_main_configuration_builds_spill_free_with_tensor_cores(capsys):
    """MiniLM v1/v2 on a base teacher and a 384-wide student (relation heads 64 / 32 wide), bf16 packed: real
    sm_80 and sm_90 builds of the three kernels (the full matrix runs through `fastdistil check-kernels`)."""
    import json

    from fastdistil import cli
    rc = cli.main(["check-kernels", "--kernel", "relation", "--arch", "80,90", "--json",
                   "--match", r"^bf16 Dt=64 Ds=32 varlen (fwd|da|db)$"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)
    assert len(rows) == 6
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0, r
        assert r["tensor_cores"] in ("mma", "wgmma"), r
