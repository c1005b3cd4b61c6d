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
