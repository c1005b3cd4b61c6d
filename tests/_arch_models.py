"""Tiny random transformers DistilBERT / RoBERTa / XLM-R models for the architecture tests (no downloads), with
biases and LayerNorm affines moved off their 0/1 init so that every parameter matters (as tests/_hf_models.py does
for BERT), and padded batches in either padding side."""
import torch
import transformers

VOCAB = 97
PAD = {"distilbert": 0, "roberta": 1, "xlm-roberta": 1}


def tiny_config(model_type: str, hidden=32, heads=2, layers=2, inter=64, max_pos=40, **kw):
    if model_type == "distilbert":
        base = dict(vocab_size=VOCAB, dim=hidden, n_heads=heads, n_layers=layers, hidden_dim=inter,
                    max_position_embeddings=max_pos, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
                    qa_dropout=0.0, num_labels=3)
        cls = transformers.DistilBertConfig
    else:
        base = dict(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                    intermediate_size=inter, max_position_embeddings=max_pos + 2, type_vocab_size=1,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1, num_labels=3)
        cls = transformers.RobertaConfig if model_type == "roberta" else transformers.XLMRobertaConfig
    base.update(kw)
    return cls(attn_implementation="eager", **base)


def build(model_type: str, head: str = "Model", seed: int = 1, **kw):
    """transformers' `<Arch><head>` (e.g. DistilBertModel, RobertaForSequenceClassification) on tiny_config, eval."""
    name = {"distilbert": "DistilBert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[model_type]
    torch.manual_seed(seed)
    m = getattr(transformers, name + head)(tiny_config(model_type, **kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def padded_batch(model_type: str, B=4, L=11, side="right", seed=0):
    """(ids, mask) with rows of lengths L, then random in [1, L]; pad tokens at the padding (so RoBERTa's positions
    computed from the ids see them), on `side`."""
    g = torch.Generator().manual_seed(seed)
    pad = PAD[model_type]
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L
    idx = torch.arange(L)[None]
    mask = (idx < lens[:, None]) if side == "right" else (idx >= L - lens[:, None])
    return ids.masked_fill(~mask, pad), mask.long()


def check_backend_parity(model_type: str, device, atol: float = 2e-5):
    """FastStudent of `model_type` on the current backend against transformers (fp32): every hidden state on real
    tokens within atol, and every gradient of a weighted sum of them within atol relative to its largest value
    (tests/test_model_triton.py's bound); then inference (no grad), where a backend may run whole layers. Left
    padding, so RoBERTa's positions start past pad tokens."""
    from fastdistil import FastStudent
    from fastdistil.loading import hf_state_dict
    hf = build(model_type, hidden=32, heads=2).to(device)
    ours = FastStudent.from_hf(hf)
    ids, mask = (t.to(device) for t in padded_batch(model_type, B=3, L=9, side="left", seed=2))
    w = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(0)).to(device)
    outs = []
    for m in (ours, hf):
        out = m(ids, attention_mask=mask, output_hidden_states=True)
        (out.last_hidden_state * w * mask[..., None]).sum().backward()
        outs.append(out.hidden_states)
    real = mask.bool()
    for i, (a, b) in enumerate(zip(*outs, strict=True)):
        assert (a - b)[real].abs().max().item() <= atol, f"hidden_states[{i}]"
    with torch.no_grad():  # inference: the backend's whole-layer encoder_layer op on the layer's LayerWeights
        a = ours.eval()(ids, attention_mask=mask).last_hidden_state
    assert (a - outs[1][-1])[real].abs().max().item() <= atol
    grads = {n: p.grad for n, p in hf.named_parameters()}
    for (n, p), k in zip(ours.named_parameters(), hf_state_dict(ours), strict=True):
        if grads[k] is None:  # the pooler: not in this loss
            assert p.grad is None, n
            continue
        err = (p.grad - grads[k]).abs().max().item()
        assert err <= atol * max(1.0, grads[k].abs().max().item()), f"grad of {k} differs by {err}"


def maxdiff(a, b, mask):
    """Largest |a - b| over the real tokens of a (B, L) mask."""
    return (a - b)[mask.bool()].abs().max().item()
