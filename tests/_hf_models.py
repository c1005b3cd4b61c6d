"""Tiny random transformers BERT models for the patch and fidelity tests (head_dim 16: a size the triton
attention kernel takes; it falls back below 16)."""
import torch
import transformers


def tiny_config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    base.update(kw)
    return transformers.BertConfig(**base)


def build(cls=transformers.BertModel, seed=1, pad_row=False, **kw):
    """`cls` on tiny_config(**kw) in eval mode, biases and LayerNorm affine moved away from their 0/1 init (so every
    one matters); with pad_row, the pad token's embedding row drawn at random too (trained in real checkpoints)."""
    torch.manual_seed(seed)
    m = cls(tiny_config(**kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))
            if pad_row and n.endswith("word_embeddings.weight"):
                p[0] = torch.randn_like(p[0])
    return m


def train_in_lockstep(ours, hf, batch_of_step, loss_of, state_of=None, steps=20, lr=1e-3):
    """Train `ours` and transformers' `hf` side by side with AdamW on the same batches: every step's loss must agree
    to 1e-4 and every parameter must end within 1e-4 (relative) of transformers'.

    batch_of_step(step) -> (kwargs for both models, extra for the loss); loss_of(out, kwargs, extra) -> scalar;
    state_of(ours) -> ours' state dict under transformers' keys (default: ours.state_dict())."""
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in (ours, hf)]
    for step in range(steps):
        kwargs, extra = batch_of_step(step)
        losses = []
        for m, opt in zip((ours, hf), opts):
            loss = loss_of(m(**kwargs), kwargs, extra)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[1]), f"step {step}: {losses}"
    sd = hf.state_dict()
    for n, p in (state_of or (lambda m: m.state_dict()))(ours).items():
        rel = ((p - sd[n]).abs().max() / sd[n].abs().max().clamp(min=1e-6)).item()
        assert rel <= 1e-4, f"{n} drifted by {rel} (relative)"
