"""LayerWeights (fastdistil/layer_weights.py), the weight cache off the modules, and the whole inference encoder in
one call (native: csrc/layer.cpp's `encoder`): same numbers as the per-layer route, checks in one pass, one C++ call
per forward, the per-layer path kept wherever something must see each layer."""
import copy
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

import fastdistil
from fastdistil import FastStudent, FastStudentConfig, weight_cache
from fastdistil.layer_weights import TENSOR_FIELDS, LayerWeights, layer_ops, plan_shapes

NATIVE_OK, NATIVE_WHY = fastdistil.availability()["native"]
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"native extension not built: {NATIVE_WHY}")


def _model(layers=3, d=48, heads=4, f=80, act="gelu", seed=0):
    torch.manual_seed(seed)
    cfg = FastStudentConfig(vocab_size=97, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=f, max_position_embeddings=64, hidden_act=act)
    m = FastStudent(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for n, p in m.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def _batch(B=3, L=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 2:] = 0
    return ids, mask


def _packed_input(m, ids, mask):
    tids, tt, pos, p = m.prepare(ids, mask)
    return m.embeddings(tids, tt, pos), p


# ------------------------------------------------------------------------------------------------ LayerWeights
def test_layer_weights_reference_the_parameters_and_check_settings():
    m = _model()
    layer = m.layers[1]
    with torch.no_grad():
        w = layer.weights()
    assert w.w_o is layer.attention["output"]["dense"].weight and w.ln2_b is layer.output["LayerNorm"].bias
    assert (w.hidden, w.heads, w.intermediate, w.head_dim, w.activation, w.norm) == (48, 4, 80, 12, "gelu", "post")
    assert plan_shapes(w) == (48, 4, 80)
    assert torch.equal(w.w_qkv, torch.cat([layer.attention["self"][n].weight for n in ("query", "key", "value")]))
    assert [id(t) for t in w.tensors()] == [id(getattr(w, n)) for n in TENSOR_FIELDS]
    kw = {n: getattr(w, n) for n in TENSOR_FIELDS}
    with pytest.raises(ValueError, match="activation must be one of"):
        LayerWeights(**kw, eps1=1e-12, eps2=1e-12, heads=4, activation="relu")
    with pytest.raises(ValueError, match="norm must be one of"):
        LayerWeights(**kw, eps1=1e-12, eps2=1e-12, heads=4, norm="pre")
    with pytest.raises(ValueError, match="heads must be a positive int dividing the hidden size 48"):
        LayerWeights(**kw, eps1=1e-12, eps2=1e-12, heads=5)
    assert _model(act="gelu_new").layers[0].weights().activation == "gelu_tanh"


def test_weights_is_none_for_adapted_or_hooked_projections_and_the_module_path_runs():
    m = _model(layers=1)
    ids, mask = _batch()
    with torch.no_grad():
        ref = m(ids, mask).last_hidden_state
    lin = m.layers[0].intermediate["dense"]
    calls = []
    h = lin.register_forward_hook(lambda mod, i, o: calls.append(1))
    with torch.no_grad():
        assert m.layers[0].weights() is None
        out = m(ids, mask).last_hidden_state
    h.remove()
    assert calls == [1]  # the hook ran: the module path, not a fused op
    assert (out - ref).abs().max().item() <= 1e-5


def test_fused_qkv_cached_off_the_module_follows_updates_and_dies_with_its_parameter():
    m = _model(layers=1)
    layer = m.layers[0]
    with torch.no_grad():
        a = layer.weights().w_qkv
        assert layer.weights().w_qkv is a and not a.requires_grad  # cached, no graph to the parameters
        layer.attention["self"]["key"].weight.mul_(2.0)  # in place: version bump
        b = layer.weights().w_qkv
        assert b is not a and torch.equal(b[48:96], layer.attention["self"]["key"].weight)
        layer.attention["self"]["value"].weight.data = torch.randn(48, 48)  # a .data swap: new storage
        assert torch.equal(layer.weights().w_qkv[96:], layer.attention["self"]["value"].weight)
    assert not [k for k in vars(layer) if k.startswith("_fastdistil")]
    twin = copy.deepcopy(m)  # a copy builds its own from its own parameters
    with torch.no_grad():
        assert twin.layers[0].weights().w_qkv is not layer.weights().w_qkv
    key = ("qkv", id(layer.attention["self"]["query"].weight))
    assert key in weight_cache._CACHE
    del m, layer, twin
    gc.collect()
    assert key not in weight_cache._CACHE
    with torch.enable_grad():  # a gradient through the weights: concatenated per call, never cached
        m = _model(layers=1)
        assert m.layers[0].weights().w_qkv.requires_grad


def test_encoder_weights_list_is_cached_while_every_weight_is_unchanged():
    """The inference forward's LayerWeights list (and, on native, its prepacked weights) is built once and reused
    while every source tensor is the same object with the same storage, version and settings; an in-place update,
    a replaced parameter, a .data swap or a new LayerNorm eps rebuilds it; nothing keeps a dropped model alive."""
    m = _model(layers=2)
    x = torch.randn(5, 48)
    with torch.no_grad():
        ws = m._encoder_weights(x)
        assert ws is not None and m._encoder_weights(x) is ws
        lin = m.layers[1].attention["self"]["key"]
        lin.weight.mul_(2.0)  # in place: version bump
        ws2 = m._encoder_weights(x)
        assert ws2 is not ws and torch.equal(ws2[1].w_qkv[48:96], lin.weight)
        lin.bias = torch.nn.Parameter(torch.randn(48))  # a new parameter object
        ws3 = m._encoder_weights(x)
        assert ws3 is not ws2 and torch.equal(ws3[1].b_qkv[48:96], lin.bias)
        m.layers[0].output["dense"].weight.data = torch.randn_like(m.layers[0].output["dense"].weight)  # new storage
        ws4 = m._encoder_weights(x)
        assert ws4 is not ws3 and torch.equal(ws4[0].w_out, m.layers[0].output["dense"].weight)
        m.layers[0].output["LayerNorm"].eps = 1e-3
        ws5 = m._encoder_weights(x)
        assert ws5 is not ws4 and ws5[0].eps2 == 1e-3
        m.layers[0].intermediate["dense"].register_forward_hook(lambda *a: None)
        assert m._encoder_weights(x) is None  # a hooked projection: per layer, per op
    with torch.inference_mode():  # inference-tensor weights have no version counter: built per call
        frozen = _model(layers=1)
        for p in frozen.parameters():
            p.data = p.data.clone()
        assert frozen._encoder_weights(x) is not None
    probe = weakref.ref(ws5)
    del m, ws, ws2, ws3, ws4, ws5
    gc.collect()
    assert probe() is None


# ------------------------------------------------------------------------------------------------ whole encoder
@needs_native
@pytest.mark.parametrize("gemm", ["onednn", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_encoder_equals_layer_by_layer_bit_for_bit(gemm, dtype, monkeypatch):
    """One C++ call over every layer gives exactly the numbers of one C++ call per layer, on both GEMM routes."""
    monkeypatch.setenv("FASTDISTIL_NATIVE_GEMM", gemm)
    from fastdistil.ops.dispatch import lookup
    m = _model(layers=3, act="gelu_new").to(dtype)
    ids, mask = _batch()
    with fastdistil.use_backend("native"), torch.no_grad():
        x, p = _packed_input(m, ids, mask)
        ws = [layer.weights() for layer in m.layers]
        whole = lookup("encoder", x.device)(ws, x, p)
        y = x
        for w in ws:
            y = lookup("encoder_layer", x.device)(w, y, p)
        ref = x.double()
        for w in ws:
            w64 = LayerWeights(*(t.double() for t in w.tensors()), w.eps1, w.eps2, w.heads, w.activation)
            ref = layer_ops(w64, ref, p)
    assert whole.dtype == dtype and torch.equal(whole, y)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (whole.double() - ref).abs().max().item() <= tol


@needs_native
def test_model_inference_runs_one_encoder_call_and_per_layer_where_needed(monkeypatch):
    m = _model(layers=3)
    ids, mask = _batch()
    with torch.no_grad(), fastdistil.use_backend("torch"):
        ref = m(ids, mask).last_hidden_state
    from fastdistil import _C
    calls = {"encoder": 0, "encoder_layer": 0}
    for name in calls:
        real = getattr(_C, name)
        monkeypatch.setattr(_C, name, lambda *a, _r=real, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or
                            _r(*a, **k))
    with fastdistil.use_backend("native"):
        with torch.inference_mode():
            a = m(ids, mask).last_hidden_state
        assert calls == {"encoder": 1, "encoder_layer": 0}
        with torch.no_grad():  # a call under no_grad after one under inference_mode: the workspace is reused legally
            b = m(ids, mask, output_hidden_states=True)  # every layer's output is wanted: per layer
        assert calls == {"encoder": 1, "encoder_layer": 3}
        h = m.layers[1].register_forward_hook(lambda *args: None)
        with torch.no_grad():
            c = m(ids, mask).last_hidden_state
        h.remove()
        assert calls == {"encoder": 1, "encoder_layer": 6}
    real = mask.bool()
    for out in (a, b.last_hidden_state, c):
        assert (out - ref)[real].abs().max().item() <= 1e-5
    assert torch.equal(a, b.last_hidden_state) and torch.equal(a, c)


@needs_native
def test_workspace_reused_across_sizes_and_calls():
    """Larger then smaller batches through the same per-thread workspace: each equals its own fresh result."""
    from fastdistil.ops.dispatch import lookup
    m = _model(layers=2)
    outs = {}
    with torch.no_grad():
        for B, L in ((1, 5), (4, 30), (2, 7), (1, 5)):
            g = torch.Generator().manual_seed(B * L)
            ids = torch.randint(1, 97, (B, L), generator=g)
            mask = (torch.arange(L)[None] < torch.randint(1, L + 1, (B,), generator=g)[:, None]).long()
            x, p = _packed_input(m, ids, mask)
            ws = [layer.weights() for layer in m.layers]
            with fastdistil.use_backend("native"):
                y = lookup("encoder", x.device)(ws, x, p)
            ref = x
            for w in ws:
                ref = layer_ops(w, ref, p)
            assert (y - ref).abs().max().item() <= 1e-5, (B, L)
            outs.setdefault((B, L), []).append(y)
    assert torch.equal(*outs[(1, 5)])


@needs_native
def test_encoder_refuses_bad_arguments_with_clear_errors():
    from fastdistil import _C
    m = _model(layers=2)
    x = torch.randn(6, 48)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with torch.no_grad():
        ws = [layer.weights() for layer in m.layers]
    fields = {n: getattr(ws[1], n) for n in TENSOR_FIELDS}
    bad = SimpleNamespace(**{**fields, "w_in": torch.randn(80, 47)}, eps1=1e-12, eps2=1e-12, heads=4,
                          activation="gelu", norm="post")
    with pytest.raises(ValueError, match=r"layer 1: w_in must have shape \[80, 48\]"):
        _C.encoder(x, [ws[0], bad], cu, 4)
    with pytest.raises(TypeError, match="layer 1 must be a LayerWeights .*got list without .w_qkv"):
        _C.encoder(x, [ws[0], list(ws[0].tensors())], cu, 4)
    with pytest.raises(ValueError, match="layer 0: activation must be 'gelu' or 'gelu_tanh', got 'relu'"):
        _C.encoder(x, [SimpleNamespace(**fields, eps1=1e-12, eps2=1e-12, heads=4, activation="relu", norm="post")],
                   cu, 4)
    pk = [[torch.randn(1)] * 4, None]
    with pytest.raises(ValueError, match="either every layer has its four prepacked weights or none"):
        _C.encoder(x, ws, cu, 4, pk)
    with pytest.raises(ValueError, match="packed must hold one entry per layer"):
        _C.encoder(x, ws, cu, 4, [None])
    with pytest.raises(ValueError, match="max_seqlen must lie between"):
        _C.encoder(x, ws, cu, 3)
    with pytest.raises(TypeError, match="layer 0: w_qkv must have x's dtype"):
        _C.encoder(x.bfloat16(), ws, cu, 4)
    assert torch.equal(_C.encoder(x, [], cu, 4), x)  # no layers: a copy of x


@needs_native
def test_storage_only_bf16_computes_in_fp32_on_cached_fp32_weights(monkeypatch):
    """On a CPU without native bf16 dot products a bf16 model's layers run in fp32 on fp32 copies of the weights,
    made once (ATen's bf16 GEMMs there convert on every call); the result is bf16, close to the fp32 model's."""
    from fastdistil.ops import onednn
    from fastdistil.ops.dispatch import lookup
    monkeypatch.setattr(onednn, "native_bf16", lambda: False)
    m32 = _model(layers=2)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ids, mask = _batch()
    calls = []
    real = weight_cache.derived
    monkeypatch.setattr("fastdistil.ops.encoder.derived", lambda tag, ts, build: calls.append(tag) or real(tag, ts, build))
    with fastdistil.use_backend("native"), torch.no_grad(), pytest.warns(RuntimeWarning, match="storage format"):
        onednn._PROBES.pop("noted", None)
        x, p = _packed_input(m16, ids, mask)
        ws = [layer.weights() for layer in m16.layers]
        out = lookup("encoder", x.device)(ws, x, p)
        again = lookup("encoder", x.device)(ws, x, p)
        x32, _ = _packed_input(m32, ids, mask)
        ref = lookup("encoder", x32.device)([layer.weights() for layer in m32.layers], x32, p)
    assert out.dtype == torch.bfloat16 and torch.equal(out, again)
    assert calls.count("fp32") == 4  # per layer per call: the copies themselves are built once (cache hits)
    assert (out.float() - ref).abs().max().item() <= 0.1
    f32 = [weight_cache.derived("fp32", w.tensors(), lambda src: None) for w in ws]
    assert all(t.dtype == torch.float32 for ts in f32 for t in ts)
