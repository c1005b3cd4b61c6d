"""kernels/kd.py in Triton's interpreter against the float64 reference: values, student gradients, masks,
awkward shapes (V = 1, primes, one chunk + 1, the 30522 vocabulary), poisoned output buffers, compile tracing."""
import pytest
import torch

import fastdistil
from fastdistil import reference
from fastdistil.ops import kd_kl_rows
from fused_helpers import PoisonedTorch

pytestmark = pytest.mark.interpreter

# (values atol, gradient rtol in units of the output dtype): the kernel computes in fp32 on inputs the
# reference sees rounded identically, so only fp32 arithmetic and the gradient's final rounding remain.
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-5, 1e-3), torch.bfloat16: (2e-5, 8e-3)}


def _ref(s, t, temperature, mask=None, g=None):
    """float64 per-row KL and the gradient of sum(g * KL) w.r.t. s."""
    s64 = s.detach().double().requires_grad_()
    kl = reference.kd_kl_rows(s64, t.double(), temperature, mask)
    if g is None:
        g = torch.ones_like(kl)
    (kl * g.double()).sum().backward()
    return kl.detach(), s64.grad


def _ours(s, t, temperature, mask=None, g=None):
    s = s.detach().clone().requires_grad_()
    with fastdistil.use_backend("triton"):
        kl = kd_kl_rows(s, t, temperature, mask)
    if g is None:
        g = torch.ones_like(kl)
    (kl * g).sum().backward()
    return kl.detach(), s.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,temperature", [((1, 1), 1.0), ((7, 13), 2.0), ((3, 1025), 0.5), ((2, 4097), 4.0)])
def test_kd_matches_float64(dtype, shape, temperature, device):
    s = (torch.randn(shape) * 4).to(device, dtype)
    t = (torch.randn(shape) * 4).to(device, dtype)
    g = torch.randn(shape[0]).to(device)
    kl, ds = _ours(s, t, temperature, g=g)
    kl64, ds64 = _ref(s, t, temperature, g=g)
    atol, rtol = TOL[dtype]
    assert kl.dtype == torch.float32 and ds.dtype == dtype
    torch.testing.assert_close(kl.double(), kl64, atol=atol * max(1.0, kl64.abs().max().item()), rtol=1e-5)
    torch.testing.assert_close(ds.double(), ds64, atol=rtol * ds64.abs().max().item() + 1e-7, rtol=rtol)


def test_kd_vocab_30522_with_mask_and_3d_rows(device):
    """An MLM head: (B, L, V) bf16 logits with padded positions; masked rows give 0 and a zero gradient."""
    B, L, V = 2, 3, 30522
    s = (torch.randn(B, L, V) * 3).to(device, torch.bfloat16)
    t = (torch.randn(B, L, V) * 3).to(device, torch.bfloat16)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool, device=device)
    kl, ds = _ours(s, t, 2.0, mask)
    kl64, ds64 = _ref(s.reshape(-1, V), t.reshape(-1, V), 2.0, mask.reshape(-1))
    torch.testing.assert_close(kl.reshape(-1).double(), kl64, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ds.reshape(-1, V).double(), ds64, atol=1e-8, rtol=8e-3)
    assert (kl[~mask] == 0).all() and (ds[~mask] == 0).all()


def test_kd_identical_and_strided_inputs(device):
    """KL of a distribution with itself is 0; non-contiguous row strides (a slice of wider logits) work."""
    wide = torch.randn(5, 40).to(device)
    s = wide[:, :33]  # row stride 40
    kl, _ = _ours(s, s.clone(), 1.5)
    assert kl.abs().max() < 1e-5
    t = torch.randn(5, 40).to(device)[:, 7:]
    kl, ds = _ours(s, t, 1.5)
    kl64, ds64 = _ref(s, t, 1.5)
    torch.testing.assert_close(kl.double(), kl64, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ds.double(), ds64, atol=1e-7, rtol=1e-5)


def test_kd_writes_every_output(monkeypatch, device):
    from fastdistil.kernels import kd as K
    monkeypatch.setattr(K, "torch", PoisonedTorch())
    s, t = torch.randn(6, 200).to(device), torch.randn(6, 200).to(device)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=device)
    kl, ds = _ours(s, t, 2.0, mask)
    assert torch.isfinite(kl).all() and torch.isfinite(ds).all()
    kl64, ds64 = _ref(s, t, 2.0, mask)
    torch.testing.assert_close(kl.double(), kl64, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ds.double(), ds64, atol=1e-7, rtol=1e-5)


def test_kd_teacher_is_constant_and_inference_tensors_work(device):
    s = torch.randn(4, 50).to(device).requires_grad_()
    with torch.inference_mode():
        t_inf = torch.randn(4, 50).to(device)
    t = t_inf.clone().requires_grad_()
    with fastdistil.use_backend("triton"):
        kd_kl_rows(s, t_inf, 2.0).sum().backward()  # inference-mode teacher: no copy, no error
        g1 = s.grad.clone()
        s.grad = None
        kd_kl_rows(s, t, 2.0).sum().backward()
    assert t.grad is None  # detached: no gradient reaches the teacher
    torch.testing.assert_close(s.grad, g1)


def test_kd_float64_runs_the_reference(device):
    s, t = torch.randn(3, 9, dtype=torch.float64).to(device), torch.randn(3, 9, dtype=torch.float64).to(device)
    with fastdistil.use_backend("triton"):
        kl = kd_kl_rows(s, t, 1.0)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, reference.kd_kl_rows(s, t, 1.0))


def test_kd_argument_errors():
    s = torch.randn(3, 9)
    with pytest.raises(ValueError, match="same shape"):
        kd_kl_rows(s, torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_kl_rows(s, s, 0.0)
    with pytest.raises(ValueError, match="row_mask"):
        kd_kl_rows(s, s, 1.0, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError):
        kd_kl_rows(s.long(), s.long(), 1.0)


def test_kd_compiles_fullgraph(device):
    s = torch.randn(4, 70).to(device).requires_grad_()
    t = torch.randn(4, 70).to(device)
    with fastdistil.use_backend("triton"):
        f = torch.compile(lambda s, t: kd_kl_rows(s, t, 2.0).mean(), fullgraph=True, backend="eager")
        f(s, t).backward()
    _, ds64 = _ref(s, t, 2.0, g=torch.full((4,), 0.25, device=device))
    torch.testing.assert_close(s.grad.double(), ds64, atol=1e-7, rtol=1e-5)


def test_kd_cost_and_specs_cover_launcher_choices():
    from fastdistil.kernels import kd as K
    built = {(sp.name, sp.constexprs["BLOCK_V"], sp.constexprs["HAS_MASK"], sp.signature["S"])
             for sp in K.compile_specs()}
    for V in (1, 2, 128, 129, 1024, 1025, 30522):
        for ty in ("fp16", "bf16", "fp32"):
            for m in (False, True):
                for name in ("_kd_fwd_kernel", "_kd_bwd_kernel"):
                    assert (name, K._block_v(V), m, f"*{ty}") in built
    c = K.cost(4096, 30522, 2)
    assert [x.name for x in c] == ["kd.fwd", "kd.bwd"]
    assert c[0].bytes >= 2 * 2 * 4096 * 30522 and c[1].bytes >= 3 * 2 * 4096 * 30522


def test_kd_custom_op_registration(device):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    from fastdistil.ops import kd as op
    s, t = torch.randn(4, 50).to(device).requires_grad_(), torch.randn(4, 50).to(device)
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.int8, device=device)
    torch.library.opcheck(op._kd_fwd_op, (s, t, 2.0, mask))


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_kd_teacher_minus_inf_logits_contribute_nothing(backend):
    """A teacher logit of -inf (a masked vocabulary entry) has p_t = 0: its term is 0, not nan."""
    from fastdistil.ops import dispatch
    s = torch.randn(3, 300, requires_grad=True)
    t = torch.randn(3, 300)
    t[:, ::7] = float("-inf")
    kl = dispatch._IMPLS[("kd_kl", backend)](s, t, 1.5, None)
    kl.sum().backward()
    keep = torch.isfinite(t[0])
    log_ps = torch.log_softmax(s.detach().double() / 1.5, -1)[:, keep]  # the student normalises over all V
    log_pt = torch.log_softmax(t[:, keep].double() / 1.5, -1)
    ref = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    torch.testing.assert_close(kl.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(s.grad).all()
