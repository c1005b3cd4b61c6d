"""Drop-in fidelity against transformers (fp32, 1e-5): left padding (pooler / [CLS] heads), patched losses that
read padded positions, and the PreTrainedModel surface (embeddings, resizing, checkpointing, counting, PEFT)."""
import copy
import importlib
import warnings

import pytest
import torch
import transformers

import _hf_models
import fastdistil
from fastdistil import (FastStudent, FastStudentForQuestionAnswering, FastStudentForSequenceClassification,
                        FastStudentForTokenClassification)

ATOL = 1e-5
patching = importlib.import_module("fastdistil.patch")
# the attention whose all-padding rows get a zero context, as fastdistil's: transformers 5's sdpa (4.x's sdpa and
# every eager average the row's padded values instead, which fastdistil does not reproduce; docs/patching.md)
ZERO_CONTEXT = "sdpa" if int(transformers.__version__.split(".")[0]) >= 5 else None


@pytest.fixture
def torch_backend():
    with fastdistil.use_backend("torch"):
        yield


def backends():
    out = ["torch"]
    if fastdistil.availability()["native"][0]:
        out.append("native")
    return out


def tiny_config(attn="sdpa", **kw):
    return _hf_models.tiny_config(attn_implementation=attn, **kw)


def build(cls=transformers.BertModel, seed=1, attn="sdpa", **kw):
    """A tiny BERT whose pad-token embedding row counts (left padding reads it)."""
    return _hf_models.build(cls, seed, pad_row=True, attn_implementation=attn, **kw)


def left_padded(L=9, seed=0):
    """Rows: left-padded, all padding, right-padded, unpadded, left-padded to one token. Pads hold pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (5, L), generator=g)
    mask = torch.ones(5, L, dtype=torch.long)
    mask[0, :3] = 0
    mask[1] = 0
    mask[2, 6:] = 0
    mask[4, :L - 1] = 0
    ids[mask == 0] = 0
    tt = torch.randint(0, 2, (5, L), generator=g)
    return ids, mask, tt


def maxdiff(a, b, rows=None):
    if rows is not None:
        a, b = a[rows], b[rows]
    return (a - b).abs().max().item()


def ref_outputs(model, attn, **kw):
    model.set_attn_implementation(attn)
    with torch.no_grad():
        return model(**kw)


# ---------------------------------------------------------------------------------------------- left padding
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("grad", [False, True])
def test_left_padding_pooler_matches_transformers(backend, grad):
    """The pooler reads position 0; on left-padded rows that is padding, which transformers computes from the pad
    token attending to the row's real keys. FastStudent matches sdpa (the default) on every row, eager on every row
    that has a real token (eager averages an all-padding row's values; sdpa gives it a zero context)."""
    hf = build()
    ours = FastStudent.from_hf(hf).eval()
    ids, mask, tt = left_padded()
    with fastdistil.use_backend(backend), torch.set_grad_enabled(grad):  # grad: per-op path, k/v from the layer
        out = ours(ids, mask, tt)
    assert (out.last_hidden_state[mask == 0] == 0).all()  # documented: zeros at padding, position 0 included
    has_real = mask.any(1)
    for attn in ("sdpa", "eager"):
        ref = ref_outputs(hf, attn, input_ids=ids, attention_mask=mask, token_type_ids=tt)
        rows = None if attn == ZERO_CONTEXT else has_real
        assert maxdiff(out.pooler_output, ref.pooler_output, rows) <= ATOL, attn
        assert maxdiff(out.last_hidden_state[mask.bool()], ref.last_hidden_state[mask.bool()]) <= ATOL


@pytest.mark.parametrize("backend", backends())
def test_left_padding_sequence_classification_logits(backend):
    hf = build(transformers.BertForSequenceClassification)
    ours = FastStudentForSequenceClassification.from_hf(hf).eval()
    ids, mask, tt = left_padded()
    labels = torch.tensor([0, 1, 2, 1, 0])
    with fastdistil.use_backend(backend), torch.no_grad():
        out = ours(ids, mask, tt, labels=labels)
    ref = ref_outputs(hf, "sdpa", input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert maxdiff(out.logits, ref.logits) <= ATOL and abs(out.loss.item() - ref.loss.item()) <= ATOL


def test_left_padding_gradients_match_transformers():
    """Training through the side rows: loss and every gradient as transformers' (sdpa)."""
    hf = build(transformers.BertForSequenceClassification).train()
    ours = FastStudentForSequenceClassification.from_hf(hf).train()
    ids, mask, tt = left_padded()
    labels = torch.tensor([0, 1, 2, 1, 0])
    hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss.backward()
    ours(ids, mask, tt, labels=labels).loss.backward()
    ref = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        g = ref[n].grad
        assert maxdiff(p.grad, g) <= ATOL * max(1.0, g.abs().max().item()), n


def test_left_padding_side_rows_only_when_needed(monkeypatch):
    """No extra work for batches whose rows all start with a real token, nor for models without a pooler."""
    built = []
    real_init = fastdistil.leftpad.LeftPad.__init__
    monkeypatch.setattr(fastdistil.leftpad.LeftPad, "__init__",
                        lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    hf = build()
    ids, mask, tt = left_padded()
    right = torch.ones_like(mask)
    right[2, 4:] = 0
    with torch.no_grad():
        FastStudent.from_hf(hf).eval()(ids, right, tt)
        FastStudent.from_hf(hf, ).eval()(ids, None, tt)
        FastStudentForTokenClassification.from_hf(build(transformers.BertForTokenClassification)).eval()(ids, mask)
        assert built == []
        FastStudent.from_hf(hf).eval()(ids, mask, tt)
    assert built == [1]


def test_left_padding_under_torch_compile():
    """torch.compile cannot branch on data: every row rides along; rows starting with a real token keep the main
    path's value."""
    hf = build()
    ours = FastStudent.from_hf(hf).eval()
    ids, mask, tt = left_padded()
    with fastdistil.use_backend("torch"), torch.no_grad(), \
            torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        out = compiled(ids, mask, tt)
    ref = ref_outputs(hf, "sdpa", input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert maxdiff(out.pooler_output, ref.pooler_output) <= ATOL


@pytest.mark.interpreter
def test_left_padding_triton_backend():
    if not fastdistil.backend.interpreting():
        pytest.skip("the triton backend needs CUDA, or TRITON_INTERPRET=1 on CPU")
    hf = build()
    ours = FastStudent.from_hf(hf).eval()
    ids, mask, tt = left_padded(L=5)
    with fastdistil.use_backend("triton"), torch.no_grad():
        out = ours(ids, mask, tt)
    ref = ref_outputs(hf, "sdpa", input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert maxdiff(out.pooler_output, ref.pooler_output) <= ATOL


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("cls", [transformers.BertModel, transformers.BertForSequenceClassification])
def test_left_padding_patched(backend, cls):
    """A patched model on the padding-free route: pooler / logits, and position 0 of left-padded rows in
    last_hidden_state, as transformers computes them."""
    ref_m = build(cls)
    m = patching.patch(copy.deepcopy(ref_m))
    ids, mask, tt = left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    with fastdistil.use_backend(backend), torch.no_grad():
        out = m(**kw)
    has_real = mask.any(1)
    for attn in ("sdpa", "eager"):
        ref = ref_outputs(ref_m, attn, **kw)
        rows = None if attn == ZERO_CONTEXT else has_real
        if cls is transformers.BertModel:
            assert maxdiff(out.pooler_output, ref.pooler_output, rows) <= ATOL, attn
            real = mask.bool().clone()
            real[:, 0] = True
            real &= has_real[:, None] | (attn == ZERO_CONTEXT)
            assert maxdiff(out.last_hidden_state[real], ref.last_hidden_state[real]) <= ATOL, attn
        else:
            assert maxdiff(out.logits, ref.logits, rows) <= ATOL, attn


# ---------------------------------------------------------------------------------------------- padded losses
def right_padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (4, 9), generator=g)
    mask = (torch.arange(9)[None] < torch.tensor([9, 6, 2, 4])[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("backend", backends())
def test_patched_question_answering_loss_matches_transformers(backend):
    """transformers' QA loss takes every position (padding included) into its softmax: the patched model runs
    those calls on the padded route, so loss and gradients equal transformers'."""
    ref_m = build(transformers.BertForQuestionAnswering, num_labels=2).train()
    m = patching.patch(copy.deepcopy(ref_m)).train()
    ids, mask = right_padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([1, 2, 0, 3]),
              end_positions=torch.tensor([4, 5, 1, 3]))
    ref = ref_m(**kw)
    with fastdistil.use_backend(backend):
        out = m(**kw)
        out.loss.backward()
    ref.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    assert maxdiff(out.start_logits, ref.start_logits) <= ATOL and maxdiff(out.end_logits, ref.end_logits) <= ATOL
    g, g_ref = m.qa_outputs.weight.grad, ref_m.qa_outputs.weight.grad
    assert maxdiff(g, g_ref) <= ATOL * max(1.0, g_ref.abs().max().item())
    fast = patching.patch(copy.deepcopy(ref_m), exact_padded_loss=False)  # the documented opt-out
    assert abs(fast(**kw).loss.item() - ref.loss.item()) > 1e-3


def test_patched_token_labels_at_padding():
    """Token labels other than -100 at padded positions count in transformers' loss: matched exactly. Labels that
    ignore padding keep the padding-free route (checked through the route's unpad call)."""
    ref_m = build(transformers.BertForTokenClassification)
    m = patching.patch(copy.deepcopy(ref_m))
    ids, mask = right_padded_batch()
    labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, out = ref_m(ids, attention_mask=mask, labels=labels), m(ids, attention_mask=mask, labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL
    labels[mask == 0] = -100
    calls = []
    forwards = importlib.import_module("fastdistil.patch.forwards")  # where the fused encoder looks it up
    real_unpad = forwards.unpad
    forwards.unpad = lambda *a, **k: calls.append(1) or real_unpad(*a, **k)
    try:
        with torch.no_grad():
            ref, out = ref_m(ids, attention_mask=mask, labels=labels), m(ids, attention_mask=mask, labels=labels)
    finally:
        forwards.unpad = real_unpad
    assert abs(out.loss.item() - ref.loss.item()) <= ATOL and calls == [1]


def test_patched_head_forward_keeps_signature_and_unpatches():
    """Trainer reads forward's signature to keep dataset columns; unpatch removes the per-instance forward."""
    import inspect
    m = patching.patch(build(transformers.BertForQuestionAnswering, num_labels=2))
    assert "start_positions" in inspect.signature(m.forward).parameters
    assert "forward" in m.__dict__
    clone = copy.deepcopy(m)
    assert clone.forward.__self__ is clone
    patching.unpatch(m)
    assert "forward" not in m.__dict__


# ---------------------------------------------------------------------------------------------- PreTrainedModel API
def test_surface_counts_and_attributes():
    hf = build(transformers.BertForSequenceClassification)
    ours = FastStudentForSequenceClassification.from_hf(hf)
    for m in (hf, ours):
        m.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    for kw in ({}, dict(only_trainable=True), dict(exclude_embeddings=True),
               dict(only_trainable=True, exclude_embeddings=True)):
        assert ours.num_parameters(**kw) == hf.num_parameters(**kw), kw
        assert ours.bert.num_parameters(**kw) == hf.bert.num_parameters(**kw), kw
    assert ours.main_input_name == hf.main_input_name == "input_ids"
    assert ours.base_model_prefix == hf.base_model_prefix and ours.base_model is ours.bert
    assert ours.bert.base_model is ours.bert and ours.supports_gradient_checkpointing
    assert ours.get_output_embeddings() is None and ours.tie_weights() is None
    c = ours.config
    assert (c.use_return_dict, c.output_hidden_states, c.output_attentions, c.is_encoder_decoder, c.model_type) == \
        (hf.config.use_return_dict, hf.config.output_hidden_states, hf.config.output_attentions,
         hf.config.is_encoder_decoder, hf.config.model_type)
    assert c.id2label == hf.config.id2label and c.label2id == hf.config.label2id and c.get_text_config() is c
    c.use_cache = False  # what Trainer sets: kept, and written to config.json like transformers does
    assert c.to_dict()["use_cache"] is False and '"use_cache": false' in c.to_json_string()
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        c.nonsense


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_token_embeddings_like_transformers(mean_resizing):
    hf = build(transformers.BertForSequenceClassification)
    ours = FastStudentForSequenceClassification.from_hf(hf).eval()
    old_param = ours.get_input_embeddings().weight
    torch.manual_seed(7)
    e_ref = hf.resize_token_embeddings(120, mean_resizing=mean_resizing)
    torch.manual_seed(7)
    e = ours.resize_token_embeddings(120, mean_resizing=mean_resizing)
    assert e is ours.get_input_embeddings() and e.weight is old_param  # same Parameter, new rows
    assert torch.equal(e.weight, e_ref.weight) and e.num_embeddings == 120
    assert ours.config.vocab_size == ours.bert.config.vocab_size == 120
    ids = torch.randint(0, 120, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert maxdiff(ours(ids).logits, hf(ids).logits) <= ATOL
    for kw in (dict(new_num_tokens=None, pad_to_multiple_of=64), dict(new_num_tokens=50)):
        assert ours.resize_token_embeddings(**kw).weight.shape == hf.resize_token_embeddings(**kw).weight.shape
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()
    with pytest.raises(ValueError, match="new_num_tokens"):
        ours.resize_token_embeddings(0)


def test_input_embedding_module_and_hooks_take_effect():
    """set_input_embeddings' module and hooks on it (NEFTune, enable_input_require_grads) run, as in transformers."""
    hf = build()
    ours = FastStudent.from_hf(hf).eval()
    ids, mask, _ = left_padded()
    for m in (hf, ours):
        m.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out + 0.5)
    with torch.no_grad():
        a, b = ours(ids, mask), hf(input_ids=ids, attention_mask=mask)
    assert maxdiff(a.pooler_output, b.pooler_output) <= ATOL
    emb = torch.nn.Embedding(97, 32)
    ours.set_input_embeddings(emb)
    hf.set_input_embeddings(copy.deepcopy(emb))
    with torch.no_grad():
        assert maxdiff(ours(ids).last_hidden_state, hf(ids).last_hidden_state) <= ATOL


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_gradient_checkpointing_same_gradients(monkeypatch, torch_backend, kwargs):
    """Layers really run under torch.utils.checkpoint in training, with the gradients of the plain run (frozen
    embeddings too: enable_input_require_grads keeps reentrant checkpoints differentiable, as transformers).
    Bitwise on the torch backend (on native, the hooked embeddings' unfused sum differs from its fused op by
    ~1e-8)."""
    ours = FastStudentForSequenceClassification.from_hf(build(transformers.BertForSequenceClassification,
                                                               hidden_dropout_prob=0.1)).train()
    ours.bert.embeddings.requires_grad_(False)
    ids, mask = right_padded_batch()
    labels = torch.tensor([0, 2, 1, 1])

    def grads():
        ours.zero_grad()
        torch.manual_seed(3)
        ours(ids, mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    calls = []
    real = fastdistil.hf_surface.checkpoint
    monkeypatch.setattr(fastdistil.hf_surface, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    ours.gradient_checkpointing_enable(kwargs)
    assert ours.is_gradient_checkpointing and ours.bert.gradient_checkpointing
    ckpt = grads()
    assert len(calls) == 2 and calls[0] == (kwargs or {"use_reentrant": False})  # one per layer
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n
    ours.gradient_checkpointing_disable()
    ours.activation_checkpointing_enable(every_n_layers=2)  # transformers 5.24's name, as Trainer calls it
    calls.clear()
    grads()
    assert len(calls) == 1
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


def test_peft_lora_on_faststudent_matches_transformers():
    """PEFT's get_peft_model wraps projections: FastStudent calls non-plain linears as modules, so the LoRA delta
    counts (before, it read the base weights and silently dropped it)."""
    peft = pytest.importorskip("peft")
    hf = build(transformers.BertForSequenceClassification)
    ours = FastStudentForSequenceClassification.from_hf(hf).eval()
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "dense"],
                          init_lora_weights=False)
    torch.manual_seed(1)
    p_hf = peft.get_peft_model(copy.deepcopy(hf), cfg)
    torch.manual_seed(1)
    p_ours = peft.get_peft_model(ours, cfg)
    assert p_ours.get_nb_trainable_parameters() == p_hf.get_nb_trainable_parameters()
    ids, mask, _ = left_padded()
    for backend in backends():
        with fastdistil.use_backend(backend), torch.no_grad():
            a = p_ours(input_ids=ids, attention_mask=mask).logits
        b = ref_outputs(p_hf, "sdpa", input_ids=ids, attention_mask=mask).logits
        assert maxdiff(a, b) <= ATOL, backend
    with torch.no_grad():
        assert maxdiff(b, hf(input_ids=ids, attention_mask=mask).logits) > 1e-3  # the adapters do change it


def test_trainer_with_gradient_checkpointing(tmp_path):
    """transformers.Trainer with gradient checkpointing on a FastStudent head: the calls it makes exist."""
    from torch.utils.data import Dataset

    class DS(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.randint(1, 97, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
                    "labels": torch.tensor(i % 3)}

    model = FastStudentForSequenceClassification.from_hf(build(transformers.BertForSequenceClassification))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          gradient_checkpointing=True, report_to=[], save_strategy="no",
                                          use_cpu=True, logging_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=DS())
        trainer.train()
    assert model.bert.gradient_checkpointing
    assert trainer.state.log_history[0]["loss"] > 0
