"""fastdistil.patch / unpatch on transformers and sentence-transformers models: parity (fp32, 1e-5), training under
transformers.Trainer, torch.compile(fullgraph=True), gradient checkpointing, and the unsupported / bad inputs."""
import copy
import importlib
import re
import warnings

import pytest
import torch
import torch.nn as nn
import transformers

import fastdistil
from fastdistil import ops
from fastdistil.patch import is_patched, patch, patch_sentence_transformer, unpatch

from _hf_models import build, tiny_config
from fused_helpers import grad_drift

ATOL = 1e-5
HF_MODULE = "transformers.models"
TF4 = int(transformers.__version__.split(".")[0]) < 5  # CI also runs this file on the newest 4.x (make test-tf4)


@pytest.fixture(autouse=True)
def _torch_backend():
    """Behaviour tests run on the torch backend (the reference); test_backends_flow_through runs the others."""
    with fastdistil.use_backend("torch"):
        yield


def batch(B=4, L=11, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    lens = torch.tensor([L, 7, 1, 5][:B])
    mask = (torch.arange(L)[None] < lens[:, None]).long()  # right padding, one full row, one single token
    tt = torch.randint(0, 2, (B, L), generator=g)
    return ids, mask, tt


def maxdiff(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


def classes(model):
    return [type(m) for m in model.modules()]


def patched_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model patches without a single warning
        return patch(model, **kw)


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("padding_free", [True, False])
def test_bert_model_parity_and_sharing(padding_free):
    m = build()
    ids, mask, tt = batch()
    params = {n: p for n, p in m.named_parameters()}
    keys = list(m.state_dict())
    with torch.no_grad():
        ref = m(ids, attention_mask=mask, token_type_ids=tt)
        ref_nomask = m(ids)
        ref_hs = m(ids, attention_mask=mask, output_hidden_states=True)
    assert patched_quietly(m, padding_free=padding_free) is m and is_patched(m)
    fused = type(m.encoder.layer[0])
    assert fused.__name__ == "BertLayer" and fused.__module__ == "fastdistil.patch"
    assert isinstance(m.encoder.layer[0], transformers.models.bert.modeling_bert.BertLayer)
    assert list(m.state_dict()) == keys  # same keys, same Parameter objects: nothing copied
    assert all(p is params[n] for n, p in m.named_parameters())
    with torch.no_grad():
        out = m(ids, attention_mask=mask, token_type_ids=tt)
        out_nomask = m(ids)
        hs = m(ids, attention_mask=mask, output_hidden_states=True)
    assert maxdiff(out.last_hidden_state, ref.last_hidden_state, mask) <= ATOL
    assert maxdiff(out.pooler_output, ref.pooler_output) <= ATOL
    assert maxdiff(out_nomask.last_hidden_state, ref_nomask.last_hidden_state) <= ATOL
    assert len(hs.hidden_states) == len(ref_hs.hidden_states) == 3
    for a, b in zip(hs.hidden_states, ref_hs.hidden_states):
        assert a.shape == b.shape and maxdiff(a, b, mask) <= ATOL
    if padding_free:  # padding positions are zeros on the padding-free route
        assert out.last_hidden_state[~mask.bool()].abs().max() == 0


def test_route_goes_through_the_ops(monkeypatch):
    """Padding-free by default (varlen attention, once per layer); padded with the key mask under
    padding_free=False; embeddings through embed_layer_norm; dense blocks through linear_layer_norm / linear_gelu."""
    calls = {}

    def spy(name):
        real = getattr(ops, name)

        def f(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)
        monkeypatch.setattr(ops, name, f)
    for name in ("attention", "varlen_attention", "embed_layer_norm", "linear_layer_norm", "linear_gelu"):
        spy(name)
    patch_module = importlib.import_module("fastdistil.patch.forwards")  # where the fused forwards look it up
    real_lookup = patch_module.lookup
    monkeypatch.setattr(patch_module, "lookup", lambda op, dev: spy_count(op) or real_lookup(op, dev))

    def spy_count(op):
        calls[op] = calls.get(op, 0) + 1
    m = patched_quietly(build())
    ids, mask, _ = batch()
    with torch.no_grad():
        m(ids, attention_mask=mask, output_hidden_states=True)  # capture hooks want (B, L, d): padded route
        assert calls == {"attention": 2, "embed_layer_norm": 1, "linear_layer_norm": 4, "linear_gelu": 2}
        calls.clear()
        m(ids, attention_mask=mask)  # the (now idle) capture hooks do not keep it padded
    # inference: each layer is one encoder_layer op, as in FastStudent (torch's runs the ops below)
    assert calls == {"encoder_layer": 2, "varlen_attention": 2, "embed_layer_norm": 1, "linear_layer_norm": 4,
                     "linear_gelu": 2}
    calls.clear()
    m2 = patched_quietly(build(), padding_free=False)
    with torch.no_grad():
        m2(ids, attention_mask=mask)
    assert calls.get("attention") == 2 and "varlen_attention" not in calls


def test_inputs_embeds_position_ids_and_empty_row():
    m = build()
    ids, mask, tt = batch()
    emb = torch.randn(*ids.shape, 32)
    pos = torch.randint(0, 32, ids.shape)
    mask_empty = mask.clone()
    mask_empty[2] = 0  # a row with no real token must not break the packed route
    with torch.no_grad():
        ref_e = m(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        ref_p = m(ids, attention_mask=mask, position_ids=pos, token_type_ids=tt).last_hidden_state
        ref_0 = m(ids, attention_mask=mask_empty).last_hidden_state
    patched_quietly(m)
    with torch.no_grad():
        assert maxdiff(m(inputs_embeds=emb, attention_mask=mask).last_hidden_state, ref_e, mask) <= ATOL
        assert maxdiff(m(ids, attention_mask=mask, position_ids=pos, token_type_ids=tt).last_hidden_state,
                       ref_p, mask) <= ATOL
        out_0 = m(ids, attention_mask=mask_empty).last_hidden_state
    assert maxdiff(out_0, ref_0, mask_empty) <= ATOL and torch.isfinite(out_0).all()


def test_sequence_classification_loss_and_gradients():
    ref_m = build(transformers.BertForSequenceClassification).train()  # dropout 0: train mode is deterministic
    m = copy.deepcopy(ref_m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # built before the patch: must keep working
    patched_quietly(m)
    ids, mask, tt = batch()
    labels = torch.tensor([0, 2, 1, 1])
    ref = ref_m(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    out = m(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL and maxdiff(out.logits, ref.logits) <= ATOL
    ref.loss.backward()
    out.loss.backward()
    ref_grads = dict(ref_m.named_parameters())
    for n, p in m.named_parameters():
        g_ref = ref_grads[n].grad
        assert (p.grad is None) == (g_ref is None), n
        if p.grad is not None:
            assert maxdiff(p.grad, g_ref) <= ATOL * max(1.0, g_ref.abs().max().item()), n
    before = m.classifier.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m.classifier.weight)


def test_token_classification_and_roberta_layers():
    m = build(transformers.BertForTokenClassification)
    ids, mask, _ = batch()
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = m(ids, attention_mask=mask, labels=labels)
    patched_quietly(m)
    with torch.no_grad():
        out = m(ids, attention_mask=mask, labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL and maxdiff(out.logits, ref.logits, mask) <= ATOL

    # Same architecture under other class names: RoBERTa's layers/encoder are BERT's code and get fused; its
    # embeddings (padding-offset positions) are fused through the registry (fastdistil/arch/roberta_patch.py).
    torch.manual_seed(0)
    rcfg = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
    r = transformers.RobertaModel(rcfg).eval()
    with torch.no_grad():
        ref_r = r(ids + 2, attention_mask=mask).last_hidden_state
    patched_quietly(r)
    assert type(r.encoder.layer[0]).__module__ == "fastdistil.patch"
    assert type(r.embeddings).__module__ == "fastdistil.patch"
    with torch.no_grad():
        assert maxdiff(r(ids + 2, attention_mask=mask).last_hidden_state, ref_r, mask) <= ATOL


def test_electra_partly_fused_warns_and_stays_exact():
    """ELECTRA's layers are BERT's code but its model forward is not: padded batches reach the encoder as 4D masks
    and run the original layers (said once, at patch time), unpadded ones are fused; both stay exact. On 4.x every
    base model hands the encoder 4D key masks, which it reads back, so ELECTRA is fully fused there, quietly."""
    cfg = transformers.ElectraConfig(vocab_size=97, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = transformers.ElectraModel(cfg).eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        ref, ref_full = m(ids, attention_mask=mask).last_hidden_state, m(ids).last_hidden_state
    if TF4:
        patched_quietly(m)
    else:
        with pytest.warns(UserWarning, match="encoder is only partly fused"):
            patch(m)
    assert type(m.embeddings).__module__ == "fastdistil.patch"
    with torch.no_grad():
        assert maxdiff(m(ids, attention_mask=mask).last_hidden_state, ref, mask) <= ATOL
        assert maxdiff(m(ids).last_hidden_state, ref_full) <= ATOL


def test_runtime_fallbacks_output_attentions_and_4d_mask():
    """Calls the fused path cannot serve exactly run transformers' own forwards: never silently wrong."""
    m = build(attn_implementation="eager")
    ids, mask, _ = batch()
    mask4 = torch.zeros(4, 1, 11, 11).masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    if TF4:  # 4.x's BertModel takes (B, L, L) masks, not 4D ones: a causal one is no key mask, so it falls back
        mask4 = mask[:, None, :] * torch.ones(11, 11).tril().long()  # (B, L, L)
    with torch.no_grad():
        ref = m(ids, attention_mask=mask, output_attentions=True)
        ref4 = m(ids, attention_mask=mask4).last_hidden_state
    patched_quietly(m)
    with torch.no_grad():
        out = m(ids, attention_mask=mask, output_attentions=True)
        out4 = m(ids, attention_mask=mask4).last_hidden_state
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        assert maxdiff(a, b) <= ATOL
    assert maxdiff(out.last_hidden_state, ref.last_hidden_state, mask) <= ATOL
    assert maxdiff(out4, ref4, mask) <= ATOL


def test_adapters_freezing_and_save_pretrained(tmp_path):
    """A LoRA-style wrapper around a projection is called as a module (its delta counts); frozen parameters stay
    without gradients; save_pretrained writes transformers' keys that an unpatched model loads."""
    class Lora(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.a, self.b = base, nn.Linear(32, 2, bias=False), nn.Linear(2, 32, bias=False)
            nn.init.normal_(self.b.weight)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    m = build(transformers.BertForSequenceClassification).train()
    for layer in m.bert.encoder.layer:
        layer.attention.self.value = Lora(layer.attention.self.value)
    for p in m.bert.embeddings.parameters():
        p.requires_grad_(False)
    ref_m = copy.deepcopy(m)
    patched_quietly(m)
    ids, mask, _ = batch()
    labels = torch.tensor([0, 1, 2, 0])
    ref, out = ref_m(ids, attention_mask=mask, labels=labels), m(ids, attention_mask=mask, labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    out.loss.backward()
    assert all(p.grad is None for p in m.bert.embeddings.parameters())
    assert m.bert.encoder.layer[0].attention.self.value.b.weight.grad is not None

    plain = build(transformers.BertForSequenceClassification)
    patched_quietly(plain)
    plain.save_pretrained(tmp_path)
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not any(t.__module__ == "fastdistil.patch" for t in classes(loaded))
    with torch.no_grad():
        assert maxdiff(loaded(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits) <= ATOL


@pytest.mark.parametrize("padding_free", [True, False])
def test_gradient_checkpointing(padding_free):
    ref_m = build(transformers.BertForSequenceClassification).train()
    m = copy.deepcopy(ref_m)
    for x in (ref_m, m):  # transformers 5 renamed it; the old name warns
        (getattr(x, "activation_checkpointing_enable", None) or x.gradient_checkpointing_enable)()
    patch(m, padding_free=padding_free)
    calls = []
    for layer in m.bert.encoder.layer:  # count the checkpointed calls: the fused layers must go through them
        assert layer.gradient_checkpointing
        f = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=f, **k: calls.append(1) or _f(*a, **k)
    ids, mask, _ = batch()
    labels = torch.tensor([0, 1, 2, 0])
    ref, out = ref_m(ids, attention_mask=mask, labels=labels), m(ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    assert len(calls) == 2  # one checkpointed call per layer
    g, g_ref = m.bert.encoder.layer[0].attention.self.query.weight.grad, \
        ref_m.bert.encoder.layer[0].attention.self.query.weight.grad
    assert maxdiff(g, g_ref) <= ATOL * max(1.0, g_ref.abs().max().item())


@pytest.mark.parametrize("backend, padding_free", [("native", True), ("native", False),
                                                    pytest.param("triton", True, marks=pytest.mark.interpreter)])
def test_backends_flow_through(backend, padding_free):
    """The patched modules call the same ops as FastStudent, so each backend runs them unchanged: logits, loss and
    every gradient match the unpatched model (fp32; triton runs in Triton's interpreter on CPU; its padded route is
    covered by test_torch_compile_fullgraph[triton], which compiles the padded route)."""
    ok, why = fastdistil.availability()[backend]
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    if backend == "triton" and not fastdistil.backend.interpreting():
        pytest.skip("the triton backend needs CUDA, or TRITON_INTERPRET=1 on CPU")
    ref_m = build(transformers.BertForSequenceClassification).train()
    m = copy.deepcopy(ref_m)
    patched_quietly(m, padding_free=padding_free)
    ids, mask, tt = batch()
    labels = torch.tensor([0, 2, 1, 1])
    ref = ref_m(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    with fastdistil.use_backend(backend):
        out = m(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
        out.loss.backward()
    ref.loss.backward()
    assert maxdiff(out.logits, ref.logits) <= ATOL and abs(out.loss.item() - ref.loss.item()) <= ATOL
    ref_grads = dict(ref_m.named_parameters())
    for n, p in m.named_parameters():
        g_ref = ref_grads[n].grad
        assert maxdiff(p.grad, g_ref) <= ATOL * max(1.0, g_ref.abs().max().item()), n
    m.eval(), ref_m.eval()
    with torch.no_grad(), fastdistil.use_backend(backend):  # inference: the whole-layer encoder_layer op
        out = m(ids, attention_mask=mask, token_type_ids=tt)
    with torch.no_grad():
        ref = ref_m(ids, attention_mask=mask, token_type_ids=tt)
    assert maxdiff(out.logits, ref.logits) <= ATOL


# ---------------------------------------------------------------------------------------------------- Trainer
def test_trainer_losses_identical(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

    class Recording(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
            return loss

    g = torch.Generator().manual_seed(3)
    data = []
    for i in range(16):
        n = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(1, 97, (12,), generator=g)
        data.append({"input_ids": ids, "attention_mask": (torch.arange(12) < n).long(), "labels": torch.tensor(i % 3)})

    def train(model, sub):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / sub), per_device_train_batch_size=4,
                                              max_steps=4, learning_rate=3e-3, logging_steps=1, report_to=[],
                                              use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                                              dataloader_num_workers=0)
        t = Recording(model=model, args=args, train_dataset=data)
        t.losses = []
        t.train()
        return t.losses

    base = build(transformers.BertForSequenceClassification)
    ours = copy.deepcopy(base)
    patched_quietly(ours)
    ref_losses, losses = train(base, "ref"), train(ours, "patched")
    assert len(losses) == 4 and len(set(losses)) > 1  # it trained
    assert losses == pytest.approx(ref_losses, abs=ATOL)
    ref_params = dict(base.named_parameters())
    for n, p in ours.named_parameters():
        assert maxdiff(p, ref_params[n]) <= 1e-4, n


# ---------------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_torch_compile_fullgraph(backend):
    """fullgraph=True: no graph break anywhere (mask creation, fused layers, ops, backend dispatch; triton's ops are
    torch.library custom ops); the padded route runs under compile. aot_eager traces forward and backward without
    inductor's C++ build time."""
    if backend == "triton" and not fastdistil.backend.interpreting():
        pytest.skip("the triton backend needs CUDA, or TRITON_INTERPRET=1 on CPU")
    torch._dynamo.reset()
    ref_m = build(transformers.BertForSequenceClassification).train()
    m = copy.deepcopy(ref_m)
    patched_quietly(m)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    ids, mask, _ = batch()
    labels = torch.tensor([0, 1, 2, 0])
    ref = ref_m(ids, attention_mask=mask, labels=labels)
    with fastdistil.use_backend(backend):
        out = cm(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL and maxdiff(out.logits, ref.logits) <= ATOL
    ref.loss.backward()
    g, g_ref = m.bert.encoder.layer[1].intermediate.dense.weight.grad, \
        ref_m.bert.encoder.layer[1].intermediate.dense.weight.grad
    assert maxdiff(g, g_ref) <= ATOL * max(1.0, g_ref.abs().max().item())
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ sentence-transformers
def test_sentence_transformer_encode_unchanged(minilm_dir):
    st_mod = pytest.importorskip("sentence_transformers", reason="sentence-transformers is an optional peer")
    st = st_mod.SentenceTransformer(str(minilm_dir), device="cpu")
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank today.",
             "Hi", "fastdistil patches BERT in place"]
    ref = st.encode(texts, convert_to_tensor=True, batch_size=4)
    assert patch_sentence_transformer(st) is st and is_patched(st[0].auto_model)
    out = st.encode(texts, convert_to_tensor=True, batch_size=4)
    assert maxdiff(out, ref) <= ATOL
    unpatch(st)
    assert not is_patched(st)
    with pytest.raises(ValueError, match="first module wraps a transformers model"):
        patch_sentence_transformer(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------------- bad input
def test_double_patch_and_unpatch_restore():
    m = build(transformers.BertForSequenceClassification)
    original = classes(m)
    ids, mask, _ = batch()
    with torch.no_grad():
        ref = m(ids, attention_mask=mask).logits
    patched_quietly(m)
    patched_types = classes(m)
    twin = copy.deepcopy(m)  # a copy of a patched model is patched, and bound to itself
    assert is_patched(twin) and (TF4 or twin.bert.__dict__["_create_attention_masks"].__self__ is twin.bert)
    with torch.no_grad():
        assert maxdiff(twin(ids, attention_mask=mask).logits, ref) <= ATOL
    with pytest.warns(UserWarning, match="already patched"):
        assert patch(m) is m
    assert classes(m) == patched_types  # no-op
    assert unpatch(m) is m
    assert classes(m) == original and all(t.__module__.split(".")[0] in ("transformers", "torch")
                                          for t in classes(m))
    assert "_create_attention_masks" not in m.bert.__dict__ and not is_patched(m)
    assert not any(k.startswith("_fastdistil") for x in m.modules() for k in vars(x))
    with torch.no_grad():
        assert torch.equal(m(ids, attention_mask=mask).logits, ref)  # bit-identical: the original code runs
    with pytest.warns(UserWarning, match="not patched"):
        unpatch(m)
    patched_quietly(m)  # and it patches again
    assert is_patched(m)


@pytest.mark.parametrize("variant, match", [
    (dict(hidden_act="relu"), "activation ReLU is not supported"),
    (dict(is_decoder=True), "decoder"),
    (dict(is_decoder=True, add_cross_attention=True), "cross-attention"),
])
def test_unsupported_variants_warn_and_stay_unpatched(variant, match):
    m = build(**variant)
    ids, mask, _ = batch()
    with torch.no_grad():
        ref = m(ids, attention_mask=mask).last_hidden_state
    with pytest.warns(UserWarning) as rec:
        patch(m)
    text = "\n".join(str(w.message) for w in rec)
    for i in range(2):
        assert re.search(rf"left encoder\.layer\.{i} \(BertLayer\) unpatched: .*{match}", text), text
    assert "left encoder (BertEncoder) unpatched: some of its layers are unsupported" in text
    assert all(type(x).__module__.startswith(HF_MODULE) for x in m.encoder.layer)
    assert type(m.encoder).__module__.startswith(HF_MODULE)  # no padding-free encoder over unfused layers
    with torch.no_grad():
        assert maxdiff(m(ids, attention_mask=mask).last_hidden_state, ref, mask) <= ATOL


def test_relative_positions_and_foreign_code_warn():
    m = build()
    m.encoder.layer[1].attention.self.position_embedding_type = "relative_key"  # a 4.x-style relative model

    class Custom(type(m.encoder.layer[0].intermediate)):
        def forward(self, hidden_states):  # not BERT's code: must not be fused
            return super().forward(hidden_states) * 2
    m.encoder.layer[0].intermediate.__class__ = Custom
    with pytest.warns(UserWarning) as rec:
        patch(m)
    text = "\n".join(str(w.message) for w in rec)
    assert "encoder.layer.1 (BertLayer) unpatched: relative position embeddings" in text
    assert "encoder.layer.0 (BertLayer) unpatched: Custom.forward differs" in text
    assert type(m.embeddings).__module__ == "fastdistil.patch"  # the supported part is still patched


def test_unsupported_device_dtype_and_non_bert():
    m = build()
    m.embeddings.LayerNorm.weight = nn.Parameter(torch.ones(32, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match=r"cpu or cuda with float32, float16, bfloat16 or float64.*torch.int32"):
        patch(m)
    assert not is_patched(m)  # a failed patch changes nothing
    with torch.device("meta"):
        meta = transformers.BertModel(tiny_config())
    with pytest.raises(ValueError, match="is torch.float32 on meta"):
        patch(meta)
    with pytest.warns(UserWarning, match="found no supported BERT"):
        patch(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError):
        patch("bert-base-uncased")


def test_inference_weights_cached_off_the_module_and_follow_a_swap():
    """Inference layers reach encoder_layer with a LayerWeights of the HF layer's own parameters; derived tensors
    (fused QKV, native's prepacked weights) live in fastdistil.weight_cache, keyed on the parameters, not on the
    layer: they survive between calls, and a swapped submodule is used at once."""
    from fastdistil import weight_cache
    ref = build()
    m = patched_quietly(copy.deepcopy(ref))
    ids, mask, tt = batch()
    layer = m.encoder.layer[0]
    sa = layer.attention.self
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        fused = weight_cache._CACHE[("qkv", id(sa.query.weight))][2][0]
        m(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        assert weight_cache._CACHE[("qkv", id(sa.query.weight))][2][0] is fused
        new = nn.Linear(layer.intermediate.dense.in_features, layer.intermediate.dense.out_features)
        new.load_state_dict(layer.intermediate.dense.state_dict())
        new.weight.mul_(1.5)
        layer.intermediate.dense = new
        ref.encoder.layer[0].intermediate.dense.weight.mul_(1.5)
        out = m(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        assert maxdiff(out, ref(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state, mask) <= 1e-5
    assert not [k for k in vars(layer) if k.startswith("_fastdistil_") and k != "_fastdistil_gelu"]
    unpatch(m)
    assert not [k for k in vars(layer) if k.startswith("_fastdistil_")]


def _patched_bert(layers, dropout=0.1):
    from test_model import hf_bert
    m = hf_bert(hidden=32, heads=2, layers=layers, inter=64, dropout=dropout)
    patch(m)
    return m.train()


@pytest.mark.interpreter
def test_patched_training_forward_draws_its_seeds_once():
    """The patched encoder's packed training forward on the triton backend: 6 launches per layer and one seed draw
    per forward (ops/rng.py seed_pool), counted as the difference between a 3-layer and a 1-layer model."""
    from fastdistil.launches import count_launches
    from test_model import batch
    ids, mask, tt = batch(3, 9, 211)
    counts = []
    for layers in (1, 3):
        m = _patched_bert(layers)
        with fastdistil.use_backend("triton"):
            m(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            with count_launches(host=(ids, mask, tt)) as c:
                m(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        counts.append(c)
    assert (counts[1].total - counts[0].total) / 2 <= 6, counts
    assert counts[0].other.get("randint") == counts[1].other.get("randint") == 1, counts


@pytest.mark.interpreter
def test_patched_checkpointed_layers_draw_per_op_and_replay(monkeypatch):
    """With transformers' gradient checkpointing the patched layers take no pool (their recompute replays the RNG
    state, not a pool): the gradients equal those of the same model run without checkpointing and without the pool,
    whose ops draw in the same order, up to summation order; another seed moves them by far more."""
    fw = importlib.import_module("fastdistil.patch.forwards")
    from test_model import batch
    ids, mask, tt = batch(2, 7, 211)
    m = _patched_bert(2, dropout=0.2)

    def grads(seed):
        m.zero_grad()
        torch.manual_seed(seed)
        with fastdistil.use_backend("triton"):
            m(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state.square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    with monkeypatch.context() as mp:
        mp.setattr(fw, "_dropout_seeds", lambda *a: 0)
        plain, other = grads(11), grads(12)
    m.gradient_checkpointing_enable()
    ckpt = grads(11)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    assert grad_drift(plain, ckpt) <= 1e-5 and grad_drift(plain, other) >= 1e-2
