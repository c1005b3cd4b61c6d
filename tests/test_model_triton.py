"""FastStudent on the triton backend (Triton interpreter on CPU): parity with transformers forward and backward,
dropout training, torch.compile(fullgraph=True), launches per layer, no host sync in a layer, and training
activation memory against transformers eager."""
import pytest
import torch

import fastdistil
from fastdistil import FastStudent
from fastdistil.launches import count_launches
from fastdistil.ops.dispatch import implemented
from fused_helpers import grad_drift
from test_model import assert_parity, batch, hf_bert

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _triton():
    fastdistil.set_backend("triton")


def _loss(out, mask, w):  # the pooler of an all-padding row is undefined (transformers pools a padding row)
    rows = mask.bool().any(1)
    return (out.last_hidden_state * w * mask.bool()[..., None]).sum() + out.pooler_output[rows].pow(2).sum()


def test_forward_and_gradients_match_transformers(device):
    hf = hf_bert(hidden=64, heads=4, layers=2, inter=200).to(device)
    ours = FastStudent.from_hf(hf).to(device)
    ids, mask, tt = (t.to(device) for t in batch(3, 11, 211, pad_rows=(2,)))
    with torch.no_grad():
        a = ours(ids, mask, tt, output_hidden_states=True)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    assert_parity(a, b, mask, atol=2e-5)
    w = torch.randn(3, 11, 64).to(device)
    for m in (ours, hf):
        _loss(m(input_ids=ids, attention_mask=mask, token_type_ids=tt), mask, w).backward()
    g_hf = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        ref = g_hf[n].grad
        err = (p.grad - ref).abs().max().item()
        assert err <= 2e-5 * max(1.0, ref.abs().max().item()), f"grad of {n} differs by {err}"


def test_dropout_training_is_seeded_and_differs_from_eval(device):
    hf = hf_bert(hidden=64, heads=4, layers=1, inter=128, dropout=0.1)
    ours = FastStudent.from_hf(hf).to(device).train()
    ids, mask, tt = (t.to(device) for t in batch(2, 9, 211))
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        out = ours(ids, mask, tt).last_hidden_state
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    outs[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    with torch.no_grad():
        ev = ours.eval()(ids, mask, tt).last_hidden_state
    assert not torch.allclose(ev, outs[0])


@pytest.mark.compile
def test_torch_compile_fullgraph_traces_the_model(device):
    """Unpadding sizes its outputs by data (nonzero, max length): dynamo captures them as unbacked symbolic
    sizes with these two flags; the model skips its input value checks (a host sync) while being traced."""
    hf = hf_bert(hidden=32, heads=2, layers=1, inter=64)
    ours = FastStudent.from_hf(hf).to(device)
    ids, mask, tt = (t.to(device) for t in batch(2, 7, 211))
    eager = ours(ids, mask, tt)
    g_eager = torch.autograd.grad(eager.last_hidden_state.sum() + eager.pooler_output.sum(), list(ours.parameters()))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        out = compiled(ids, mask, tt)
        g = torch.autograd.grad(out.last_hidden_state.sum() + out.pooler_output.sum(), list(ours.parameters()))
    assert torch.allclose(out.last_hidden_state, eager.last_hidden_state, atol=1e-6)
    for a, b in zip(g, g_eager):
        assert torch.allclose(a, b, atol=1e-6)


def test_forward_launches_per_layer_and_no_host_sync(device):
    if not implemented("varlen_attention", "triton"):
        pytest.skip("the triton varlen_attention (kernels/attention.py) is not registered yet")
    hf = hf_bert(hidden=64, heads=4, layers=1, inter=128)
    ours = FastStudent.from_hf(hf).to(device).eval()
    ids, mask, tt = (t.to(device) for t in batch(3, 9, 211))
    ids_, tt_, pos_, p = ours.prepare(ids, mask, tt)
    layer = ours.layers[0]
    with torch.no_grad():
        x = ours.embeddings(ids_, tt_, pos_)
        layer(x, p)  # warm the fused-QKV weight cache
        with count_launches() as c:
            layer(x, p)
    print(c)
    assert c.total <= 6, c
    assert not c.other, c                      # only GEMMs and Triton kernels
    assert not c.syncs, c                      # no host synchronisation inside a layer
    with torch.no_grad(), count_launches() as c:
        ours(ids, mask, tt)
    per_layer_free = c.total - 1 - 6           # the model adds embeddings (1) and the pad/pool ops around layers
    assert per_layer_free >= 0


def _training_forward_launches(layers):
    ours = FastStudent.from_hf(hf_bert(hidden=32, heads=2, layers=layers, inter=64, dropout=0.1)).train()
    ids, mask, tt = batch(3, 9, 211)
    ours(ids, mask, tt)
    with count_launches(host=(ids, mask, tt)) as c:
        ours(ids, mask, tt)
    return c


def test_training_forward_launches_per_layer():
    """Issue 14: a training forward with dropout issues at most 6 launches per layer (one torch.cat for the fused
    QKV weight and bias, the QKV GEMM, attention, three fused linears): the dropout seeds come from one draw per
    forward, not three per layer. Counted as the difference between a 3-layer and a 1-layer model."""
    one, three = _training_forward_launches(1), _training_forward_launches(3)
    assert (three.total - one.total) / 2 <= 6, (one, three)
    assert one.other.get("randint") == three.other.get("randint") == 1, three  # one seed draw per forward
    assert three.other.get("cat") == 3, three  # one cat per layer
    assert not three.syncs, three


def test_checkpointed_dropout_layers_replay_their_masks():
    """With dropout on, a checkpointed layer recomputes with the seeds it took from the forward's pool: its gradients
    equal the plain run's up to the order autograd sums them in (last bits), while another seed (other masks) moves
    them by far more: a fresh draw in the recompute would fail this."""
    ours = FastStudent.from_hf(hf_bert(hidden=32, heads=2, layers=2, inter=64, dropout=0.2)).train()
    ids, mask, tt = batch(2, 7, 211)

    def grads(seed):
        ours.zero_grad()
        torch.manual_seed(seed)
        ours(ids, mask, tt).last_hidden_state.square().sum().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain, other = grads(11), grads(12)
    ours.gradient_checkpointing_enable()
    ckpt = grads(11)
    ours.gradient_checkpointing_disable()
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    assert grad_drift(plain, ckpt) <= 1e-5
    assert grad_drift(plain, other) >= 1e-2


def test_activation_memory_at_most_half_of_transformers():
    if not implemented("varlen_attention", "triton"):
        pytest.skip("the triton varlen_attention (kernels/attention.py) is not registered yet")
    import transformers

    from fastdistil.memory import compare
    cfg = transformers.BertConfig(vocab_size=211, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=128, attn_implementation="eager")
    r = compare(batch=8, min_len=16, max_len=96, config=cfg)  # measured 0.32; MiniLM at 32 x U[16,128]: see
    assert r["ratio"] <= 0.5, r                                # `python -m fastdistil.memory`
