"""The native backend under hostile inputs and across a model's life: every `_C` entry point refuses each bad
tensor argument with a clear error (run in subprocesses: a crash shows as the exit code), sizes derived from
max_seqlen cannot overflow, the BLAS route's workspace across inference_mode / no_grad, bfloat16 where oneDNN cannot
prepack it (AVX2-only CPUs), caches invisible to deepcopy / pickle / state_dict, weights loaded under
inference_mode, and bit-identical reruns of a 2-thread training run."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdistil
from fastdistil import FastStudent, FastStudentConfig

NATIVE_OK, NATIVE_WHY = fastdistil.availability()["native"]
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"native extension not built: {NATIVE_WHY}")


def _python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the repository on its path); a crash is its return code."""
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), e.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True,
                          timeout=timeout)


def _tiny_cfg(**kw) -> FastStudentConfig:
    d = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    d.update(kw)
    return FastStudentConfig(**d)


def _batch(B=3, L=11, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


# --------------------------------------------------------------------------------------------- bad arguments
# Each case calls one entry point of fastdistil._C with one bad argument (a meta tensor has no CPU memory: reading
# its data pointer segfaulted); every one must raise ValueError / TypeError / RuntimeError naming the problem.
_CASES = r'''
import sys, torch
from fastdistil import _C
M = lambda *s: torch.empty(*s, device="meta")
T, H, D = 6, 2, 8
q, k, v = (torch.randn(T, H, D) for _ in range(3))
cu = torch.tensor([0, 2, 6], dtype=torch.int32)
o, lse = _C.varlen_attention_fwd(q, k, v, cu, 4, 0.3, 0.0, 0, True)
x, w, b = torch.randn(T, 16), torch.randn(16), torch.randn(16)
y, s, mean, rstd = _C.layer_norm_fwd(x, w, b, 1e-5, x, None, 0.0, 0, True)
ids = torch.tensor([1, 2, 3]); zeros = torch.zeros(3, dtype=torch.long)
word, posw, typew = torch.randn(10, 16), torch.randn(8, 16), torch.randn(2, 16)
d, f = 16, 32
lw = [torch.randn(3 * d, d), torch.randn(3 * d), torch.randn(d, d), torch.randn(d), torch.ones(d), torch.zeros(d),
      torch.randn(f, d), torch.randn(f), torch.randn(d, f), torch.randn(d), torch.ones(d), torch.zeros(d)]
lx = torch.randn(T, d)

def fwd(q=q, k=k, v=v, cu=cu, mx=4, p=0.0, cu_k=None, mx_k=0):
    return _C.varlen_attention_fwd(q, k, v, cu, mx, 0.3, p, 0, True, cu_k, mx_k)
def bwd(do=o, q=q, k=k, v=v, o=o, lse=lse, cu=cu, mx=4, cu_k=None, mx_k=0):
    return _C.varlen_attention_bwd(do, q, k, v, o, lse, cu, mx, 0.3, 0.0, 0, cu_k, mx_k)
def lnf(x=x, w=w, b=b, r=x, ib=None):
    return _C.layer_norm_fwd(x, w, b, 1e-5, r, ib, 0.0, 0, True)
def lnb(dy=y, s=s, mean=mean, rstd=rstd, w=w):
    return _C.layer_norm_bwd(dy, s, mean, rstd, w, 0.0, 0)
def gf(x=x, b=b):
    return _C.bias_gelu_fwd(x, b, False)
def gb(dy=x, x=x, b=b):
    return _C.bias_gelu_bwd(dy, x, b, False)
def emb(i=ids, t=zeros, p=zeros, word=word, posw=posw, typew=typew, g=torch.ones(16), bb=torch.zeros(16)):
    return _C.embed_layer_norm_fwd(i, t, p, word, posw, typew, g, bb, 1e-12)
def layer(x=lx, ws=lw, cu=cu, mx=4, heads=2, **swap):  # a duck-typed LayerWeights: C++ checks every field
    from types import SimpleNamespace
    from fastdistil.layer_weights import TENSOR_FIELDS
    ws = list(ws)
    for i, t in swap.items():
        ws[int(i[1:])] = t
    fields = dict(zip(TENSOR_FIELDS, ws), eps1=1e-12, eps2=1e-12, heads=heads, activation="gelu", norm="post")
    return _C.encoder_layer(x, SimpleNamespace(**fields), cu, mx)

cases = {
    "fwd q meta": lambda: fwd(q=M(T, H, D)), "fwd k meta": lambda: fwd(k=M(T, H, D)),
    "fwd v meta": lambda: fwd(v=M(T, H, D)), "fwd cu meta": lambda: fwd(cu=M(3).int()),
    "fwd q sparse": lambda: fwd(q=q.to_sparse()), "fwd q float64": lambda: fwd(q=q.double()),
    "fwd k float64": lambda: fwd(k=k.double()), "fwd v bf16": lambda: fwd(v=v.bfloat16()),
    "fwd k shape": lambda: fwd(k=torch.randn(T, H, D + 1)), "fwd v tokens": lambda: fwd(v=torch.randn(T - 1, H, D)),
    "fwd q 2-d": lambda: fwd(q=torch.randn(T, H * D)), "fwd D = 0": lambda: fwd(*(torch.randn(T, H, 0),) * 3),
    "fwd last-dim stride": lambda: fwd(*(t[..., ::2] for t in (q, k, v))),
    "fwd cu float": lambda: fwd(cu=cu.float()), "fwd cu 2-d": lambda: fwd(cu=cu[None]),
    "fwd cu start": lambda: fwd(cu=torch.tensor([1, 2, 6])),
    "fwd cu decreasing": lambda: fwd(cu=torch.tensor([0, 4, 2, 6])),
    "fwd cu end": lambda: fwd(cu=torch.tensor([0, 2, 5])), "fwd max 2**62": lambda: fwd(mx=2**62),
    "fwd max < longest": lambda: fwd(mx=3), "fwd max < 0": lambda: fwd(mx=-1), "fwd max > T": lambda: fwd(mx=7),
    "fwd dropout 1": lambda: fwd(p=1.0), "fwd dropout nan": lambda: fwd(p=float("nan")),
    "fwd cross cu_k meta": lambda: fwd(cu_k=M(3).int(), mx_k=4),
    "fwd cross max_k 2**62": lambda: fwd(cu_k=cu, mx_k=2**62),
    "fwd cross batch mismatch": lambda: fwd(cu_k=torch.tensor([0, 6]), mx_k=6),
    "bwd dout meta": lambda: bwd(do=M(T, H, D)), "bwd q meta": lambda: bwd(q=M(T, H, D)),
    "bwd k meta": lambda: bwd(k=M(T, H, D)), "bwd v meta": lambda: bwd(v=M(T, H, D)),
    "bwd o meta": lambda: bwd(o=M(T, H, D)), "bwd lse meta": lambda: bwd(lse=M(T, H)),
    "bwd o float64": lambda: bwd(o=o.double()), "bwd dout shape": lambda: bwd(do=torch.randn(T, H, D + 1)),
    "bwd lse float64": lambda: bwd(lse=lse.double()), "bwd lse shape": lambda: bwd(lse=lse[:-1]),
    "bwd lse strided": lambda: bwd(lse=torch.randn(H, T).t()), "bwd max 2**62": lambda: bwd(mx=2**62),
    "bwd cross max_k 2**62": lambda: bwd(cu_k=cu, mx_k=2**62),
    "mask rows < 0": lambda: _C.dropout_keep_mask(0, 0, -1, 4, 0.5),
    "mask size overflow": lambda: _C.dropout_keep_mask(0, 0, 2**40, 2**40, 0.5),
    "mask p = 1": lambda: _C.dropout_keep_mask(0, 0, 4, 4, 1.0),
    "lnf x meta": lambda: lnf(x=M(T, 16)), "lnf w meta": lambda: lnf(w=M(16)), "lnf b meta": lambda: lnf(b=M(16)),
    "lnf residual meta": lambda: lnf(r=M(T, 16)), "lnf input_bias meta": lambda: lnf(ib=M(16)),
    "lnf x int": lambda: lnf(x=x.long()), "lnf x 0-d": lambda: lnf(x=torch.tensor(1.0)),
    "lnf w shape": lambda: lnf(w=torch.randn(15)), "lnf w int": lambda: lnf(w=w.long()),
    "lnf residual shape": lambda: lnf(r=x[:-1]), "lnf residual dtype": lambda: lnf(r=x.double()),
    "lnf input_bias shape": lambda: lnf(ib=torch.randn(3)),
    "lnb dy meta": lambda: lnb(dy=M(T, 16)), "lnb sum meta": lambda: lnb(s=M(T, 16)),
    "lnb mean meta": lambda: lnb(mean=M(T)), "lnb rstd meta": lambda: lnb(rstd=M(T)),
    "lnb w meta": lambda: lnb(w=M(16)),
    "lnb mean numel": lambda: lnb(mean=mean[:-1]), "lnb rstd float64": lambda: lnb(rstd=rstd.double()),
    "lnb sum 0-d": lambda: lnb(dy=torch.tensor(1.0), s=torch.tensor(1.0)), "lnb dy shape": lambda: lnb(dy=y[:-1]),
    "gf x meta": lambda: gf(x=M(T, 16)), "gf bias meta": lambda: gf(b=M(16)), "gf x float64": lambda: gf(x=x.double()),
    "gf bias shape": lambda: gf(b=torch.randn(3)), "gf x 0-d": lambda: gf(x=torch.tensor(1.0)),
    "gb dy meta": lambda: gb(dy=M(T, 16)), "gb x meta": lambda: gb(x=M(T, 16)), "gb bias meta": lambda: gb(b=M(16)),
    "gb dy shape": lambda: gb(dy=x[:-1]), "gb dy dtype": lambda: gb(dy=x.double()),
    "gb x 0-d": lambda: gb(dy=torch.tensor(1.0), x=torch.tensor(1.0)),
    "emb ids meta": lambda: emb(i=M(3).long()), "emb type ids meta": lambda: emb(t=M(3).long()),
    "emb pos ids meta": lambda: emb(p=M(3).long()), "emb ids float": lambda: emb(i=ids.float()),
    "emb ids bool": lambda: emb(i=ids > 1), "emb ids complex": lambda: emb(i=ids.to(torch.complex64)),
    "emb ids range": lambda: emb(i=torch.tensor([1, 10, 3])),
    "emb ids negative": lambda: emb(i=torch.tensor([1, -1, 3])),
    "emb type range": lambda: emb(t=torch.tensor([0, 2, 0])), "emb pos range": lambda: emb(p=torch.tensor([0, 8, 0])),
    "emb ids shape": lambda: emb(i=ids[:2]),
    "emb word meta": lambda: emb(word=M(10, 16)), "emb position table meta": lambda: emb(posw=M(8, 16)),
    "emb type table meta": lambda: emb(typew=M(2, 16)), "emb word float64": lambda: emb(word=word.double()),
    "emb tables dtype": lambda: emb(posw=posw.double()), "emb table 1-d": lambda: emb(typew=torch.randn(16)),
    "emb table width": lambda: emb(posw=torch.randn(8, 15)), "emb ln weight meta": lambda: emb(g=M(16)),
    "emb ln bias shape": lambda: emb(bb=torch.zeros(3)),
    "layer x meta": lambda: layer(x=M(T, d)), "layer x float64": lambda: layer(x=lx.double()),
    "layer x strided": lambda: layer(x=torch.randn(d, T).t()), "layer x 1-d": lambda: layer(x=torch.randn(d)),
    "layer 11 weights": lambda: layer(ws=lw[:11]), "layer n_head 0": lambda: layer(heads=0),
    "layer n_head 3": lambda: layer(heads=3), "layer cu meta": lambda: layer(cu=M(3).int()),
    "layer max 2**62": lambda: layer(mx=2**62), "layer cu end": lambda: layer(cu=torch.tensor([0, 2, 5])),
    "layer w_1 0-d": lambda: layer(w6=torch.tensor(1.0)),
    **{f"layer weight {i} meta": (lambda i=i: layer(**{f"w{i}": M(lw[i].shape)})) for i in range(12)},
    **{f"layer weight {i} shape": (lambda i=i: layer(**{f"w{i}": torch.randn(lw[i].shape[0] + 1)})) for i in range(12)},
    **{f"layer weight {i} dtype": (lambda i=i: layer(**{f"w{i}": lw[i].double()})) for i in range(12)},
    "layer weight 0 strided": lambda: layer(w0=torch.randn(d, 3 * d).t()),
}
names = sys.argv[1:] or list(cases)
for name in names:
    print("CASE", name, flush=True)
    try:
        cases[name]()
    except (ValueError, TypeError, RuntimeError) as e:
        print("RAISED", type(e).__name__, str(e).splitlines()[0], flush=True)
    else:
        print("NO ERROR", flush=True)
'''


@needs_native
def test_every_entry_point_refuses_every_bad_argument_without_crashing():
    r = _python(_CASES)
    assert r.returncode == 0, f"crashed (exit {r.returncode}) in:\n{r.stdout[-600:]}\n{r.stderr[-2000:]}"
    results, name = {}, None
    for line in r.stdout.splitlines():
        if line.startswith("CASE "):
            name = line[5:]
        elif name is not None:
            results[name] = line
    assert len(results) > 120, r.stdout[-2000:]
    bad = {n: out for n, out in results.items()
           if not (out.startswith("RAISED ValueError") or out.startswith("RAISED TypeError"))
           or "fastdistil native" not in out}
    assert not bad, "\n".join(f"{n}: {out}" for n, out in bad.items())
    assert "max_seqlen must lie between the longest sequence (4) and the token count (6), got " \
           "4611686018427387904" in results["fwd max 2**62"]
    assert "must be a CPU tensor" in results["fwd k meta"] and "must be a CPU tensor" in results["gb dy meta"]


@needs_native
@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_huge_max_seqlen_through_public_op_and_crafted_packing(gemm):
    """The reproducers of issue 11: max_seqlen = 2**62 wrapped the attention scratch size under -fwrapv (heap
    corruption, abort). Now a ValueError from the public op, from forward_packed with a crafted Packing (oneDNN
    and BLAS routes) and from the autograd path."""
    r = _python("""
        import torch, fastdistil
        from fastdistil import FastStudent, FastStudentConfig, ops
        from fastdistil.padding import Packing
        fastdistil.set_backend("native")
        q = torch.randn(64, 2, 16)
        cu = torch.tensor([0, 64], dtype=torch.int32)
        def expect(fn, what):
            try:
                fn()
            except ValueError as e:
                assert "max_seqlen" in str(e), e
                print("OK", what, flush=True)
            else:
                print("NO ERROR", what, flush=True)
        expect(lambda: ops.varlen_attention(q, q, q, cu, 2**62), "op")
        qg = q.clone().requires_grad_()
        expect(lambda: ops.varlen_attention(qg, qg, qg, cu, 2**62), "op with grad")
        cfg = FastStudentConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=80)
        m = FastStudent(cfg).eval()
        ids = torch.randint(0, 50, (64,)); z = torch.zeros(64, dtype=torch.long)
        with torch.no_grad():
            expect(lambda: m.forward_packed(ids, z, torch.arange(64), Packing(None, cu, 2**62, 1, 64)), "packing")
        """, env={"FASTDISTIL_NATIVE_GEMM": gemm})
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    assert r.stdout.split() == ["OK", "op", "OK", "op", "with", "grad", "OK", "packing"], r.stdout


# ------------------------------------------------------------------------------------- BLAS route workspace
@needs_native
def test_blas_route_inference_mode_then_no_grad():
    """The per-thread workspace of csrc/layer.cpp, first made under inference_mode, was then written under no_grad
    ("Inplace update to inference tensor outside InferenceMode"). A fresh process: the workspace is made here."""
    r = _python("""
        import torch, fastdistil
        from fastdistil import FastStudent, FastStudentConfig
        torch.manual_seed(0)
        cfg = FastStudentConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16)
        m = FastStudent(cfg).eval()
        ids = torch.randint(0, 50, (2, 9)); mask = torch.ones(2, 9, dtype=torch.long); mask[1, 5:] = 0
        fastdistil.set_backend("torch")
        with torch.no_grad():
            ref = m(ids, mask).last_hidden_state
        fastdistil.set_backend("native")
        with torch.inference_mode():
            a = m(ids, mask).last_hidden_state
        with torch.no_grad():
            b = m(ids, mask).last_hidden_state
        with torch.inference_mode():
            c = m(ids, mask).last_hidden_state
        b.add_(0)  # the output is a normal tensor outside inference_mode
        print(max((t - ref).abs().max().item() for t in (a, b, c)))
        """, env={"FASTDISTIL_NATIVE_GEMM": "blas"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) <= 1e-5


# --------------------------------------------------------------------------------- bf16 without oneDNN's bf16
def _reorder_like_avx2(real):
    def reorder(w, *args):
        if w.dtype == torch.bfloat16:  # what oneDNN says on an AVX2-only CPU
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                               "avx512bw, avx512vl and avx512dq")
        return real(w, *args)
    return reorder


@needs_native
def test_bf16_takes_the_blas_route_where_onednn_cannot_prepack_it(monkeypatch):
    from fastdistil.ops import onednn
    monkeypatch.setattr(onednn, "bf16_ok", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight",
                        _reorder_like_avx2(torch.ops.mkldnn._reorder_linear_weight))
    torch.manual_seed(0)
    m32 = FastStudent(_tiny_cfg()).eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ids, mask = _batch()
    real = mask.bool()
    with torch.inference_mode():
        fastdistil.set_backend("torch")
        ref32 = m32(ids, mask).last_hidden_state[real]
        ref16 = m16(ids, mask).last_hidden_state[real].float()
        fastdistil.set_backend("native")
        ours32 = m32(ids, mask).last_hidden_state[real]
        ours16 = m16(ids, mask).last_hidden_state[real].float()
    assert (ours32 - ref32).abs().max().item() <= 1e-5
    e_ours, e_torch = (ours16 - ref32).abs().max().item(), (ref16 - ref32).abs().max().item()
    assert e_ours <= 2 * e_torch + 1e-2, (e_ours, e_torch)
    # the real predicate answers without raising, and says True on this machine's AVX-512 unless told otherwise
    monkeypatch.undo()
    assert isinstance(onednn.bf16_ok(), bool)


@needs_native
def test_avx2_machine_emulated_native_matches_torch():
    """ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 make this AVX-512 machine behave as an AVX2-only one:
    the avx2 kernel table, and oneDNN refusing bf16 prepacking. fp32 and bf16 inference and a bf16 training step
    run and match the torch backend."""
    r = _python("""
        import copy, torch, fastdistil
        from fastdistil import FastStudent, FastStudentConfig, _C
        from fastdistil.ops import onednn
        torch.manual_seed(0)
        cfg = FastStudentConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
        m32 = FastStudent(cfg).eval()
        m16 = copy.deepcopy(m32).to(torch.bfloat16)
        ids = torch.randint(1, 120, (4, 33)); mask = torch.ones(4, 33, dtype=torch.long); mask[1, 20:] = 0
        real = mask.bool()
        def run(backend, m):
            fastdistil.set_backend(backend)
            with torch.inference_mode():
                return m(ids, mask).last_hidden_state[real].float()
        ref32, ref16 = run("torch", m32), run("torch", m16)
        n32, n16 = run("native", m32), run("native", m16)
        m16.train()
        fastdistil.set_backend("native")
        loss = m16(ids, mask).last_hidden_state.float().square().mean()
        loss.backward()
        print(_C.isa(), onednn.bf16_ok(), (n32 - ref32).abs().max().item(), (n16 - ref32).abs().max().item(),
              (ref16 - ref32).abs().max().item(), bool(torch.isfinite(loss)))
        """, env={"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert r.returncode == 0, r.stderr[-3000:]
    isa, bf16_ok, e32, e16, e16_torch, finite = r.stdout.split()
    assert isa == "avx2" and bf16_ok == "False" and finite == "True"
    assert float(e32) <= 1e-5 and float(e16) <= 2 * float(e16_torch) + 1e-2, r.stdout


# ------------------------------------------------------------------------------ caches: copy, pickle, state_dict
def _patched_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return fastdistil.patch(transformers.BertModel(cfg).eval())


def _out(m, ids, mask):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask).last_hidden_state


@needs_native
@pytest.mark.parametrize("kind", ["faststudent", "patched_bert"])
@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_copy_pickle_state_dict_after_an_eval_forward(kind, gemm, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDISTIL_NATIVE_GEMM", gemm)
    fastdistil.set_backend("native")
    torch.manual_seed(0)
    m = FastStudent(_tiny_cfg()).eval() if kind == "faststudent" else _patched_bert()
    ids, mask = _batch()
    keys = list(m.state_dict())
    before = _out(m, ids, mask)  # fills the caches (fused QKV; oneDNN-packed weights on the onednn route)
    sd = m.state_dict()
    assert list(sd) == keys and all(isinstance(t, torch.Tensor) and not t.is_mkldnn for t in sd.values())
    twin = copy.deepcopy(m)
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    real = mask.bool()  # (a patched model back from pickle may take its padded route: compare real tokens)
    for other in (twin, loaded):
        assert (_out(other, ids, mask)[real] - before[real]).abs().max().item() <= 1e-6
    # the copy rebuilds its own caches: changing its weights leaves the original alone, and the reverse
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "value.bias" in n).add_(0.5)  # part of the fused QKV
    assert torch.equal(_out(m, ids, mask), before)
    assert (_out(twin, ids, mask)[real] - before[real]).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------ loading in inference_mode
@needs_native
@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_faststudent_loaded_in_inference_mode(gemm, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDISTIL_NATIVE_GEMM", gemm)
    torch.manual_seed(0)
    FastStudent(_tiny_cfg()).save_pretrained(tmp_path / "a")
    torch.manual_seed(1)
    other = FastStudent(_tiny_cfg()).state_dict()
    ids, mask = _batch()
    real = mask.bool()
    fastdistil.set_backend("torch")
    ref = FastStudent.from_pretrained(tmp_path / "a").eval()
    want = _out(ref, ids, mask)[real]
    with torch.inference_mode():
        m = FastStudent.from_pretrained(tmp_path / "a").eval()
        fastdistil.set_backend("native")
        inside = m(ids, mask).last_hidden_state[real]
    outside = _out(m, ids, mask)[real]
    assert (inside - want).abs().max().item() <= 1e-5 and (outside - want).abs().max().item() <= 1e-5
    # weights replaced in place under inference_mode (no version bump on inference tensors): never a stale cache
    with torch.inference_mode():
        m.load_state_dict(other)
        again = m(ids, mask).last_hidden_state[real]
    ref.load_state_dict(other)
    fastdistil.set_backend("torch")
    assert (again - _out(ref, ids, mask)[real]).abs().max().item() <= 1e-5


@needs_native
def test_patched_bert_loaded_in_inference_mode(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = _patched_bert()
    fastdistil.unpatch(src)
    src.save_pretrained(tmp_path / "bert")
    ids, mask = _batch()
    real = mask.bool()
    want = _out(src, ids, mask)[real]  # transformers itself
    fastdistil.set_backend("native")
    with torch.inference_mode():
        m = fastdistil.patch(transformers.BertModel.from_pretrained(tmp_path / "bert", attn_implementation="eager"))
        inside = m(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    outside = _out(m.eval(), ids, mask)[real]
    assert (inside - want).abs().max().item() <= 1e-5 and (outside - want).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_two_thread_training_reruns_are_bit_identical(backend):
    """Two short distillation runs in one process at 2 threads: the same losses and weights bit for bit. (The
    embeddings' backward through advanced indexing added rows with parallel float atomics: runs differed.)"""
    from fastdistil.distill import Distiller
    from fastdistil.distill.objectives import HiddenMSE
    fastdistil.set_backend(backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)

    def run():
        torch.manual_seed(0)
        teacher = FastStudent(_tiny_cfg(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
        student = FastStudent(_tiny_cfg(hidden_size=64, intermediate_size=128, num_hidden_layers=1))
        d = Distiller(teacher, student, [HiddenMSE(1.0, [(1, 2), (0, 0)], 64, 64)], lr=1e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            ids = torch.randint(1, 120, (16, 60), generator=g)  # ~800 tokens x 64: torch's parallel paths engage
            mask = (torch.arange(60)[None] < torch.randint(30, 61, (16, 1), generator=g)).long()
            losses.append(d.step({"input_ids": ids, "attention_mask": mask})["loss"])
        return losses, [p.detach().clone() for p in student.parameters()]

    try:
        (la, wa), (lb, wb) = run(), run()
    finally:
        torch.set_num_threads(threads)
    assert la == lb
    assert all(torch.equal(a, b) for a, b in zip(wa, wb))
