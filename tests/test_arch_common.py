"""What every non-BERT architecture must do the same way (DistilBERT, RoBERTa): run on every backend as on the torch
one, and train in lockstep with transformers (20 AdamW steps: the same losses and final weights to 1e-4)."""
import pytest
import torch

import fastdistil
from fastdistil import FastStudentForSequenceClassification
from fastdistil.loading import hf_state_dict

from _arch_models import build, check_backend_parity, padded_batch
from _hf_models import train_in_lockstep


@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_twenty_adamw_steps_track_transformers(model_type):
    hf = build(model_type, "ForSequenceClassification", hidden=48, heads=3, inter=100).train()
    ours = FastStudentForSequenceClassification.from_hf(hf).train()
    g = torch.Generator().manual_seed(3)

    def batch_of_step(step):
        ids, mask = padded_batch(model_type, B=4, L=15, seed=step)
        labels = torch.randint(0, 3, (4,), generator=g)
        kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        return kwargs, torch.randn(4, 48, generator=g)

    def loss_of(out, kw, target):
        h, mask = out.hidden_states[-1], kw["attention_mask"]
        return out.loss + ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) - target).pow(2).mean()

    train_in_lockstep(ours, hf, batch_of_step, loss_of, state_of=hf_state_dict)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("model_type", ["distilbert", "roberta", "xlm-roberta"])
def test_sequence_classification_on_left_padding_matches_transformers(model_type, backend):
    """The classifier of DistilBERT and RoBERTa reads position 0 itself (no pooler): on left-padded rows the base
    model computes transformers' value there (the pad token's row), so logits, the loss and every gradient match
    transformers, in training and in inference; the plain model's last_hidden_state keeps zeros at padding."""
    if backend == "native" and not fastdistil.availability()["native"][0]:
        pytest.skip("native extension not built")
    hf = build(model_type, "ForSequenceClassification", hidden=32, heads=2).train()
    ours = FastStudentForSequenceClassification.from_hf(hf).train()
    assert ours.bert.pooler is None and ours.bert.first_token
    ids, mask = padded_batch(model_type, B=5, L=9, side="left", seed=4)
    assert (mask[:, 0] == 0).any()
    labels = torch.tensor([0, 2, 1, 1, 0])
    with fastdistil.use_backend(backend):
        a = ours(ids, mask, labels=labels)
        a.loss.backward()
        with torch.no_grad():
            inf = ours.eval()(ids, mask)
            plain = ours.bert(ids, mask).last_hidden_state
    b = hf(input_ids=ids, attention_mask=mask, labels=labels)
    b.loss.backward()
    assert (a.logits - b.logits).abs().max().item() <= 2e-5
    assert (inf.logits - b.logits).abs().max().item() <= 2e-5
    assert torch.equal(plain[~mask.bool()], torch.zeros_like(plain[~mask.bool()]))
    grads = dict(zip(hf_state_dict(ours), (p.grad for p in ours.parameters())))
    for n, p in hf.named_parameters():
        if p.grad is not None and n in grads:
            err = (grads[n] - p.grad).abs().max().item()
            assert err <= 2e-5 * max(1.0, p.grad.abs().max().item()), n


@pytest.mark.interpreter
@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_triton_backend_parity(model_type, device):
    """The same model on the triton kernels (interpreter on CPU; compiled with --device cuda)."""
    with fastdistil.use_backend("triton"):
        check_backend_parity(model_type, device)


@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_native_backend_parity(model_type):
    ok, why = fastdistil.availability()["native"]
    if not ok:
        pytest.skip(why)
    with fastdistil.use_backend("native"):
        check_backend_parity(model_type, torch.device("cpu"))


@pytest.mark.parametrize("model_type,after_attention", [("distilbert", 0.0), ("roberta", 0.25)])
def test_dropout_sites_follow_the_architecture(model_type, after_attention, monkeypatch):
    """DistilBERT has no dropout after the attention output projection (transformers' MultiHeadSelfAttention),
    BERT and RoBERTa do: the training forward passes each LayerNorm op the architecture's probability."""
    from fastdistil import FastStudent, FastStudentConfig, ops
    kw = {"dropout": 0.25} if model_type == "distilbert" else {"hidden_dropout_prob": 0.25}
    ours = FastStudent(FastStudentConfig.from_hf(build(model_type, **kw).config)).train()
    seen, real = [], ops.linear_layer_norm

    def spy(*args, dropout_p=0.0, **kwargs):
        seen.append(dropout_p)
        return real(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(ops, "linear_layer_norm", spy)
    ids, mask = padded_batch(model_type, B=2, L=7)
    ours(ids, mask)
    assert seen == [after_attention, 0.25] * ours.config.num_hidden_layers
