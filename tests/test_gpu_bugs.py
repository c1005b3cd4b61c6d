"""The GPU bugs of issue 12 section 1, each proven on CPU (the Triton ones in the interpreter):

1. mixed-precision training (torch.autocast with fp32 weights) on every backend, FastStudent and patched models,
   transformers.Trainer(bf16=True) and the Distiller, against transformers under the same autocast;
2. attention grids that launch above 65,535 sequences x heads;
3. the device guard (a model on cuda:1 while cuda:0 is current);
4. dropout seeds from the device generator, no host round trip, reproducible with torch.manual_seed;
5. the launched kernel configuration is the one check-kernels builds (one config table per kernel).
"""
from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

import fastdistil
from fastdistil import FastStudent
from test_model import batch, hf_bert

BACKENDS = ["torch", "triton", "native"]


def _backend(name):
    ok, why = fastdistil.backend.availability()[name]
    if not ok:
        pytest.skip(f"backend {name} unavailable: {why}")
    fastdistil.set_backend(name)


# ------------------------------------------------------------------------------------------------ 1. autocast
def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1).double() for _, p in sorted(model.named_parameters()) if p.grad is not None])


def _step(model, ids, mask, tt, w, autocast: bool):
    """One forward + loss + backward; returns (real-token hidden states fp64, loss, flat gradients)."""
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        h = out.last_hidden_state
        # padded positions excluded: ours returns zeros there, transformers values nobody should read
        loss = (h.float() * w * mask[..., None]).sum() / mask.sum() + out.pooler_output.float().pow(2).mean()
    loss.backward()
    return h[mask.bool()].double().detach(), loss.double().detach(), _flat_grads(model)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_within_autocast_error(ours, hf, ref, what):
    """err(ours vs fp64) <= 2 * err(transformers autocast vs fp64) + atol, for hidden states, loss and gradients."""
    for name, a, b, r in zip(("hidden", "loss", "grads"), ours, hf, ref):
        e_ours, e_hf = _rel(a, r), _rel(b, r)
        assert e_ours <= 2 * e_hf + 1e-3, f"{what}: {name} error {e_ours:.3g} vs transformers' autocast {e_hf:.3g}"


def _hf_reference(hf, ids, mask, tt, w):
    """(transformers under bf16 autocast, transformers in float64) steps, parameters kept fp32 for the first."""
    import copy
    hf_ac = _step(hf, ids, mask, tt, w, autocast=True)
    h64 = copy.deepcopy(hf).double()
    ref = _step(h64, ids, mask, tt, w.double(), autocast=False)
    return hf_ac, ref


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_faststudent_trains_under_bf16_autocast_like_transformers(backend):
    """Before: triton raised 'x, residual must share one dtype', torch 'value cannot be converted to type
    c10::BFloat16 without overflow' (a masked_fill with fp32's min into a bf16 score matrix)."""
    _backend(backend)
    hf = hf_bert(hidden=32, heads=2, layers=2, inter=64, dropout=0.0)
    ours = FastStudent.from_hf(hf).train()
    ids, mask, tt = batch(2, 9, 211, pad_rows=())
    w = torch.randn(2, 9, 32)
    got = _step(ours, ids, mask, tt, w, autocast=True)
    assert all(p.dtype == torch.float32 for p in ours.parameters())  # autocast never touches the weights
    hf_ac, ref = _hf_reference(hf.train(), ids, mask, tt, w)
    _assert_within_autocast_error(got, hf_ac, ref, backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_bert_trains_under_bf16_autocast(backend):
    _backend(backend)
    hf = hf_bert(hidden=32, heads=2, layers=1, inter=64)
    import copy
    patched = fastdistil.patch(copy.deepcopy(hf)).train()
    ids, mask, tt = batch(2, 7, 211)
    w = torch.randn(2, 7, 32)
    got = _step(patched, ids, mask, tt, w, autocast=True)
    hf_ac, ref = _hf_reference(hf.train(), ids, mask, tt, w)
    _assert_within_autocast_error(got, hf_ac, ref, f"patched {backend}")


@pytest.mark.interpreter
def test_ops_autocast_policy():
    """The policy of ops/amp.py on the torch and triton backends alike: GEMM ops compute in the autocast dtype,
    LayerNorm outputs follow the fp32 residual stream, bias_gelu stays in x's dtype."""
    from fastdistil import ops
    x = torch.randn(5, 16)
    W, b = torch.randn(24, 16) * 0.2, torch.randn(24)
    W2, b2 = torch.randn(16, 24) * 0.2, torch.randn(16)
    g, beta = torch.rand(16) + 0.5, torch.randn(16)
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    outs = {}
    for name in ("torch", "triton"):
        fastdistil.set_backend(name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = ops.linear_gelu(x, W, b)
            y = ops.linear_layer_norm(h, W2, b2, x, g, beta)
            y2 = ops.layer_norm(h[:, :16], g, beta, residual=x)
            a = ops.varlen_attention(q, q, q, cu, 3)
            bg = ops.bias_gelu(h, b)
        assert (h.dtype, y.dtype, y2.dtype, a.dtype, bg.dtype) == (torch.bfloat16, torch.float32, torch.float32,
                                                                   torch.bfloat16, torch.bfloat16), name
        outs[name] = (h, y, y2, a, bg)
    for t, r in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(t.float(), r.float(), atol=0.05, rtol=0.02)


def test_reference_attention_masks_under_autocast():
    """The torch backend's bug itself: a masked attention whose scores autocast to bf16."""
    from fastdistil import reference
    q = torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = reference.attention(q, q, q, mask)
    ref = reference.attention(q.double(), q.double(), q.double(), mask)
    assert torch.isfinite(o).all() and (o.double() - ref).abs().max() < 0.1


def test_trainer_bf16_with_a_patched_model_matches_the_unpatched_one(tmp_path):
    """transformers.Trainer(bf16=True, use_cpu=True): its autocast around our ops, a few optimizer steps."""
    pytest.importorskip("accelerate")
    import copy

    import transformers
    cfg = transformers.BertConfig(vocab_size=211, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 211, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(16)]
    losses = {}
    for name in ("plain", "patched", "fp64"):
        model = copy.deepcopy(base)
        if name == "patched":
            fastdistil.set_backend("torch")
            fastdistil.patch(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
            bf16=name != "fp64", use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
            dataloader_num_workers=0)
        if name == "fp64":
            model.double()
        tr = transformers.Trainer(model=model, args=args, train_dataset=data)
        tr.train()
        losses[name] = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses["patched"]) == 3
    for got, hf, ref in zip(losses["patched"], losses["plain"], losses["fp64"]):
        assert math.isfinite(got)
        assert abs(got - ref) <= 2 * abs(hf - ref) + 2e-3, (losses, "patched vs fp64 beyond transformers' bf16 error")


def test_distiller_with_a_bf16_autocast_student(tmp_path):
    from _distill_fixtures import SENTENCES, save_tiny
    from transformers import AutoTokenizer

    from fastdistil.distill import Distiller, Examples, build_recipe, collate, encode, load_model, student_from_teacher
    d = save_tiny(tmp_path / "t", "base", layers=2)
    enc = encode(Examples(SENTENCES), AutoTokenizer.from_pretrained(d), 24)
    t = load_model(d, role="teacher")
    s = student_from_teacher(t, [1])
    r = build_recipe("minilmv2", t, s, max_steps=2)
    dist = Distiller(t, s, r.objectives, plan=r.plan, max_steps=2, lr=1e-3)
    b = collate(enc, [0, 3, 5])
    plain = dist(b)["loss"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dist(b)
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and abs(out["loss"].item() - plain) <= 0.05 * abs(plain) + 1e-3
    assert all(torch.isfinite(p.grad).all() for p in dist.student.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------ 2. grid
def test_attention_grid_puts_batch_x_heads_on_axis_0():
    from fastdistil.kernels import attention as K
    from fastdistil.kernels.launch import check_grid
    assert K.grid(5462 * 12, 128, 64) == (65544, 2)  # the H100 failure: 65,544 on axis 1 did not launch
    assert K.grid(1, 1, 64) == (1, 1)
    with pytest.raises(ValueError, match="axis 1 has 65536 blocks"):
        K.grid(1, 65536 * 64, 64)
    with pytest.raises(ValueError, match="axis 0"):
        check_grid((2 ** 31, 1))


@pytest.mark.interpreter
def test_attention_launches_through_the_grid_function(monkeypatch):
    """A tiny launch goes through `grid`, and the kernels read batch x head from axis 0 (the outputs stay right)."""
    from fastdistil import reference
    from fastdistil.kernels import attention as K
    seen = []
    real = K.grid
    monkeypatch.setattr(K, "grid", lambda bh, L, blk: seen.append((bh, L)) or real(bh, L, blk))
    q = torch.randn(7, 3, 16, requires_grad=True)
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    fastdistil.set_backend("triton")
    o = fastdistil.ops.varlen_attention(q, q, q, cu, 5)
    o.sum().backward()
    assert seen and all(bh == 2 * 3 for bh, _ in seen)  # forward, delta and backward
    torch.testing.assert_close(o, reference.varlen_attention(q, q, q, cu, 5), atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
def test_relation_grid_puts_sequences_on_axis_0(monkeypatch):
    from fastdistil.kernels import relation as R
    grids = []
    orig = R.check_grid
    monkeypatch.setattr(R, "check_grid", lambda g: grids.append(g) or orig(g))
    x = torch.randn(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    R.relation_forward(x, x, x, x, 0.25, 0.25, cu, 5)
    assert grids and grids[0][0] == 2 and grids[0][2] == 2  # (sequences, row blocks, relation heads)


# ------------------------------------------------------------------------------------------------ 3. device guard
class _FakeCudaTensor:
    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_device_to_enter_decision():
    from fastdistil.kernels.launch import device_to_enter
    assert device_to_enter(torch.device("cuda", 1), current=0) == 1
    assert device_to_enter(torch.device("cuda", 0), current=0) is None
    assert device_to_enter(torch.device("cuda"), current=1) is None
    assert device_to_enter(torch.device("cpu"), current=0) is None


def test_launchers_run_under_the_tensor_device(monkeypatch):
    from fastdistil.kernels import launch
    entered = []

    @contextlib.contextmanager
    def fake_device(i):
        entered.append(i)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    inside = []

    @launch.on_tensor_device
    def launcher(t, x):
        inside.append(list(entered))
        return x

    assert launcher(_FakeCudaTensor(1), 5) == 5 and entered == [1] and inside == [[1]]
    assert launcher(_FakeCudaTensor(0), 6) == 6 and entered == [1]  # already current: no switch
    assert launcher(torch.zeros(1), 7) == 7 and entered == [1]     # CPU (interpreter): nothing to do


def test_every_public_launcher_is_device_guarded():
    import importlib

    from fastdistil import kernels
    names = {"layer_norm": ("layer_norm_fwd", "layer_norm_bwd", "dropout_keep_mask"),
             "gelu": ("bias_gelu_fwd", "bias_gelu_bwd"), "embedding": ("embed_fwd", "embed_bwd"),
             "attention": ("attention_fwd", "attention_bwd", "dropout_keep_mask"),
             "kd": ("kd_forward", "kd_backward"), "relation": ("relation_forward", "relation_backward"),
             "matmul": ("linear_gelu_fwd", "linear_tanh_fwd", "linear_layer_norm_fwd"), "padding": ("pad_rows",)}
    assert set(names) == set(kernels.KERNEL_MODULES)
    for mod, fns in names.items():
        m = importlib.import_module(f"fastdistil.kernels.{mod}")
        for fn in fns:
            assert getattr(getattr(m, fn), "device_guarded", False), f"{mod}.{fn} launches without a device guard"


# ------------------------------------------------------------------------------------------------ 4. seeds
def test_one_seed_helper_on_the_tensor_device(monkeypatch):
    import importlib
    attention, layer_norm, rng = (importlib.import_module(f"fastdistil.ops.{m}") for m in ("attention", "layer_norm",
                                                                                           "rng"))
    assert attention.dropout_seed is rng.dropout_seed and layer_norm.dropout_seed is rng.dropout_seed
    calls = []
    real = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: calls.append(k.get("device")) or real(*a, **k))
    s = rng.dropout_seed(torch.device("cpu"))
    assert s.shape == (1,) and s.dtype == torch.int64 and calls == [torch.device("cpu")]  # drawn on the device


@pytest.mark.interpreter
def test_dropout_of_every_triton_op_follows_torch_manual_seed():
    from fastdistil import ops
    fastdistil.set_backend("triton")
    x = torch.randn(6, 16)
    W, b, g, beta = torch.randn(16, 16) * 0.3, torch.randn(16), torch.ones(16), torch.zeros(16)
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    runs = {
        "layer_norm": lambda: ops.layer_norm(x, g, beta, residual=x, input_bias=b, dropout_p=0.3),
        "linear_layer_norm": lambda: ops.linear_layer_norm(x, W, b, x, g, beta, dropout_p=0.3),
        "varlen_attention": lambda: ops.varlen_attention(q, q, q, cu, 4, dropout_p=0.3),
    }
    for name, f in runs.items():
        out = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            out.append(f())
        assert torch.equal(out[0], out[1]), f"{name}: same seed, different dropout"
        assert not torch.equal(out[0], out[2]), f"{name}: different seeds, same dropout"


def test_embedding_padding_row_gradient_builds_no_host_tensor(monkeypatch):
    """The backward zeroes the padding row without torch.tensor([row], device=...) (a host-to-device copy)."""
    from fastdistil.ops.embedding import _NoGradRow
    w = torch.randn(5, 3, requires_grad=True)
    y = _NoGradRow.apply(w, 2)

    def no_host_tensors(*a, **k):
        raise AssertionError("torch.tensor called in the backward")

    monkeypatch.setattr(torch, "tensor", no_host_tensors)
    y.sum().backward()
    assert torch.equal(w.grad[2], torch.zeros(3)) and torch.equal(w.grad[0], torch.ones(3))


# ------------------------------------------------------------------------------------------------ 5. what runs is built
def _jit_type(v, annotation: str) -> str | None:
    """The signature entry Triton's JIT gives an argument value (None: specialised away as a constant)."""
    if annotation in ("i64", "i32", "fp32"):
        return annotation
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
        return None
    if isinstance(v, bool):
        return "u1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64",
                  torch.int32: "i32", torch.int8: "i8"}[v.dtype]


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments instead of running it."""

    def __init__(self, fn, log):
        self.fn, self.log, self.__name__ = fn, log, _py(fn).__name__

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, args, kwargs))


def _as_on_gpu(monkeypatch):
    """Launchers choose as on a GPU: no interpreter-only bf16 upcast before tl.dot (FACTS.md)."""
    from fastdistil.kernels import attention, matmul, relation
    monkeypatch.setattr(attention, "interpreting", lambda: False)
    monkeypatch.setattr(matmul, "interpreting", lambda: False)
    monkeypatch.setattr(relation, "_dot_f32", lambda dtype: False)


def _launches(module, monkeypatch, run):
    """Every (kernel, bound arguments, options) that `run()` launches from `module`, without running any."""
    _as_on_gpu(monkeypatch)
    log = []
    for name, obj in list(vars(module).items()):
        if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
            monkeypatch.setattr(module, name, _Recorder(obj, log))
    run()
    return [(fn, *_bind(fn, args, kwargs)) for fn, args, kwargs in log]


def _bind(fn, args, kwargs):
    """(arguments by parameter name, parameter annotations as strings, num_warps, num_stages) of a launch."""
    params = inspect.signature(_py(fn)).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    ann = {n: str(p.annotation) for n, p in params.items()}
    return bound, ann, kwargs.get("num_warps"), kwargs.get("num_stages")


def _py(f):
    """The Python function under a JITFunction / InterpretedFunction / _Recorder."""
    while hasattr(f, "fn"):
        f = f.fn
    return f


def _matching_spec(module, fn, bound, ann, warps, stages):
    """The compile spec that builds this launch: same kernel, constexprs, argument types, warps and stages."""
    consts = {n: v for n, v in bound.items() if "constexpr" in ann[n]}
    types = {}
    for n, v in bound.items():
        if "constexpr" in ann[n]:
            continue
        a = ann[n].replace("triton.language.", "").replace("tl.", "")
        t = _jit_type(v, {"int64": "i64", "int32": "i32", "float32": "fp32"}.get(a, ""))
        types[n] = t
    for sp in module.compile_specs():
        if _py(sp.fn) is not _py(fn) or (sp.num_warps, sp.num_stages) != (warps, stages):
            continue
        if any(sp.constexprs.get(n, "missing") != v for n, v in consts.items()):
            continue
        if all(t is None or sp.signature.get(n) == t for n, t in types.items()):
            return sp
    raise AssertionError(f"no compile spec builds {fn} with {consts}, {types}, warps={warps}, stages={stages}")


def _model_launches(dtype):
    """The training and inference launches of a one-layer MiniLM-shaped FastStudent (d=384, 12 heads, f=1536: the
    widths the specs cover) on the triton backend, in `dtype` (kernels are recorded, not run: no interpreter cost)."""
    hf = hf_bert(hidden=384, heads=12, layers=1, inter=1536, dropout=0.1)
    m = FastStudent.from_hf(hf).to(dtype).train()
    ids, mask, tt = batch(2, 8, 211)
    out = m(ids, mask, tt)
    (out.last_hidden_state.float().sum() + out.pooler_output.float().sum()).backward()
    with torch.no_grad():
        m.eval()(ids, mask, tt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast"])
def test_every_model_launch_is_a_built_configuration(dtype, monkeypatch):
    """Record every kernel launch of a training step and an inference forward (all kernel modules the model uses)
    and find, for each, the compile spec check-kernels builds: same constexprs, num_warps, num_stages, types."""
    import importlib
    fastdistil.set_backend("triton")
    _as_on_gpu(monkeypatch)
    mods = [importlib.import_module(f"fastdistil.kernels.{m}") for m in ("attention", "layer_norm", "gelu",
                                                                          "embedding", "matmul")]
    log = []
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                monkeypatch.setattr(mod, name, _Recorder(obj, log))
    # the recorder writes nothing: outputs are garbage but every launcher still runs its Python
    with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "autocast" else contextlib.nullcontext():
        _model_launches(torch.float32 if dtype == "autocast" else dtype)
    seen = set()
    for fn, args, kwargs in log:
        mod = next(m for m in mods if getattr(m, _py(fn).__name__, None) is not None)
        sp = _matching_spec(mod, fn, *_bind(fn, args, kwargs))
        seen.add(sp.name)
    assert {"attention_fwd", "attention_bwd", "_ln_bwd", "_embed_fwd", "_linear_fwd"} <= seen, seen


@pytest.mark.parametrize("V", [70, 30522])
def test_kd_and_relation_launches_are_built_configurations(V, monkeypatch):
    from fastdistil.kernels import kd as KD
    from fastdistil.kernels import relation as R
    s = torch.randn(4, V)
    for mod, run in ((KD, lambda: (KD.kd_forward(s, s, 2.0), KD.kd_backward(torch.ones(4), s, s, torch.zeros(4),
                                                                             torch.zeros(4), 2.0))),
                     (R, lambda: (R.relation_forward(q := torch.randn(9, 2, 32), q, q, q, 0.2, 0.2,
                                                     torch.tensor([0, 4, 9], dtype=torch.int32), 5),))):
        for fn, bound, ann, warps, stages in _launches(mod, monkeypatch, run):
            _matching_spec(mod, fn, bound, ann, warps, stages)


def test_check_kernels_builds_both_divisibility_variants():
    from fastdistil import compile_check as cc
    from fastdistil.kernels import layer_norm as K
    sp = K.compile_specs()[0]
    hinted = cc.hinted_args(sp, "aligned")
    assert "X" in hinted and "stride_x" in hinted and "M" in hinted and "p" not in hinted and "ROWS" not in hinted
    assert cc.hinted_args(sp, "unaligned") == []
