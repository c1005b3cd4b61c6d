"""FastStudent against transformers.BertModel (eager): outputs, gradients and training, fp32 on CPU."""
import pytest
import torch
import transformers

import fastdistil
from fastdistil import FastStudent, FastStudentConfig

from _hf_models import train_in_lockstep


@pytest.fixture(autouse=True)
def _torch_backend():
    """The foundation's parity claims are about the torch backend (the reference path, bit-exact with transformers
    in fp32 on CPU); the native and triton backends have their own parity tests."""
    with fastdistil.use_backend("torch"):
        yield


def hf_bert(hidden=64, heads=4, layers=2, inter=None, type_vocab=2, vocab=211, max_pos=64, dropout=0.0):
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=inter or 4 * hidden,
                                  type_vocab_size=type_vocab, max_position_embeddings=max_pos,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                  attn_implementation="eager")
    torch.manual_seed(1)
    m = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # LayerNorm/bias parameters away from their 1/0 init so that every one matters
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def batch(B, L, vocab, type_vocab=2, pad_rows=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    for r in pad_rows:
        mask[r] = 0
    tt = torch.randint(0, type_vocab, (B, L), generator=g)
    return ids, mask, tt


def assert_parity(ours, ref, mask, atol=1e-5):
    real = mask.bool()
    d = (ours.last_hidden_state - ref.last_hidden_state)[real].abs().max().item()
    assert d <= atol, f"last_hidden_state differs by {d}"
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states, strict=True)):
        d = (a - b)[real].abs().max().item()
        assert d <= atol, f"hidden_states[{i}] differs by {d}"
    cls_real = real[:, 0]
    d = (ours.pooler_output - ref.pooler_output)[cls_real].abs().max().item()
    assert d <= atol, f"pooler differs by {d}"
    assert torch.isfinite(ours.last_hidden_state).all() and torch.isfinite(ours.pooler_output).all()


def test_real_minilm_parity(minilm_dir):
    ours = FastStudent.from_pretrained(minilm_dir)
    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    for B, L, pad_rows in ((1, 1, ()), (3, 7, ()), (8, 129, (5,)), (2, 512, ())):
        ids, mask, tt = batch(B, L, 30522, pad_rows=pad_rows, seed=L)
        with torch.no_grad():
            a = ours(ids, mask, tt, output_hidden_states=True)
            b = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        assert len(a.hidden_states) == 7
        assert_parity(a, b, mask)


@pytest.mark.parametrize("hidden,heads,layers,inter,type_vocab", [
    (256, 4, 1, 1000, 1), (384, 12, 2, 1536, 2), (768, 12, 1, 3072, 2), (384, 6, 3, 777, 2), (256, 4, 2, 513, 1)])
def test_random_config_parity(hidden, heads, layers, inter, type_vocab):
    hf = hf_bert(hidden, heads, layers, inter, type_vocab, max_pos=512)
    ours = FastStudent.from_hf(hf).eval()
    assert list(ours.state_dict()) == [k for k in hf.state_dict() if not k.endswith(("position_ids",
                                                                                        "token_type_ids"))]
    for B, L in ((1, 5), (8, 33), (3, 200)):
        ids, mask, tt = batch(B, L, 211, type_vocab, pad_rows=(B - 1,) if B > 2 else (), seed=B * L)
        with torch.no_grad():
            a = ours(ids, mask, tt, output_hidden_states=True)
            b = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        assert_parity(a, b, mask)


def test_no_mask_left_padding_and_position_ids():
    hf = hf_bert()
    ours = FastStudent.from_hf(hf).eval()
    ids, _, tt = batch(3, 11, 211)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    pos = torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        for m in (None, mask):
            a = ours(ids, m, tt, position_ids=pos, output_hidden_states=True)
            b = hf(input_ids=ids, attention_mask=m, token_type_ids=tt, position_ids=pos, output_hidden_states=True)
            assert_parity(a, b, torch.ones_like(ids) if m is None else m)


def test_all_padding_row_is_finite_and_outputs_index_like_transformers():
    ours = FastStudent.from_hf(hf_bert()).eval()
    ids, mask, _ = batch(3, 9, 211, pad_rows=(1,))
    out = ours(ids, mask)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert (out.last_hidden_state[1] == 0).all()
    assert out[0] is out.last_hidden_state and out[1] is out.pooler_output
    assert out["pooler_output"] is out.pooler_output and out.hidden_states is None
    assert len(ours(ids, mask, return_dict=False)) == 2


def test_gradients_match_transformers():
    hf = hf_bert(hidden=96, heads=6, layers=2, inter=200)
    ours = FastStudent.from_hf(hf)
    ids, mask, tt = batch(4, 13, 211, pad_rows=(3,))
    w = torch.randn(4, 13, 96)
    real = mask.bool()[..., None]
    for m in (ours, hf):
        out = m(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        loss = (out.last_hidden_state * w * real).sum() + out.pooler_output[:3].pow(2).sum()
        loss.backward()
    g_hf = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        ref = g_hf[n]
        err = (p.grad - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"grad of {n} differs by {err}"


def test_twenty_adamw_steps_track_transformers():
    hf = hf_bert(hidden=64, heads=4, layers=2, inter=130)
    hf.train()
    ours = FastStudent.from_hf(hf).train()
    g = torch.Generator().manual_seed(3)

    def batch_of_step(step):
        ids, mask, tt = batch(4, 17, 211, seed=step)
        return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt), torch.randn(4, 64, generator=g)

    def loss_of(out, kw, target):
        mask = kw["attention_mask"]
        pooled = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return (pooled - target).pow(2).mean() + out.pooler_output.pow(2).mean()

    train_in_lockstep(ours, hf, batch_of_step, loss_of)


def test_config_roundtrip_and_errors():
    cfg = FastStudentConfig(hidden_size=64, num_attention_heads=4, extra={"id2label": {"0": "a", "1": "b"}})
    again = FastStudentConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.hidden_size == 64 and again.num_labels == 2
    with pytest.raises(ValueError, match="not divisible"):
        FastStudentConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="relu"):
        FastStudentConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="relative_key"):
        FastStudentConfig(position_embedding_type="relative_key")


def test_backend_seam():
    assert fastdistil.get_backend() in fastdistil.backend.BACKENDS
    with pytest.raises(ValueError, match="unknown backend"):
        fastdistil.set_backend("cuda")
    with fastdistil.use_backend("torch"):
        assert fastdistil.backend.resolve("cpu") == "torch"
    avail = fastdistil.availability()
    assert set(avail) == {"torch", "triton", "native"} and avail["torch"][0]


def test_compile_fullgraph_under_auto_backend():
    """torch.compile(fullgraph=True) of FastStudent under `auto`: native's C++ ops are not torch.library ops, so
    tracing resolves them to the torch reference (no graph break) and eager keeps the native path."""
    m = FastStudent.from_hf(hf_bert()).eval()
    ids, mask, tt = batch(3, 9, 211)
    with fastdistil.use_backend("auto"), torch.no_grad(), \
            torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        a, b = compiled(ids, mask, tt).last_hidden_state, m(ids, mask, tt).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
