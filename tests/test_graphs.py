"""fastdistil.GraphRunner on CPU: buckets, their waste bound, static buffers, outputs that equal the model's and
survive later calls, and the refusals. The capture itself needs CUDA: tests/test_gpu.py (-m gpu)."""
import numpy as np
import pytest
import torch

import fastdistil
from fastdistil import FastStudent
from fastdistil.graphs import GraphRunner, bucket_batch, bucket_length
from test_model import hf_bert


@pytest.fixture(scope="module")
def model():
    return FastStudent.from_hf(hf_bert(hidden=32, heads=2, layers=1, inter=64, max_pos=64)).eval()


def _batch(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 211, (B, L), generator=g)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L
    return ids, (torch.arange(L)[None] < lens[:, None]).long(), torch.randint(0, 2, (B, L), generator=g)


def test_buckets_and_their_waste_bound():
    assert [bucket_batch(b, 128) for b in (1, 2, 3, 5, 8, 9, 100, 128, 200)] == [1, 2, 4, 8, 8, 16, 104, 128, 200]
    assert [bucket_length(n, 16, 512) for n in (1, 16, 17, 31, 500, 512)] == [16, 16, 32, 32, 512, 512]
    assert bucket_length(60, 16, 60) == 60  # capped at max_position_embeddings
    for B in range(1, 129):
        for L in range(1, 129):
            b, l = bucket_batch(B, 128), bucket_length(L, 16, 512)
            assert B <= b < min(2 * B, B + 8) + (B == 1) and L <= l < L + 16  # see fastdistil/graphs.py


def test_runner_equals_the_model_and_fills_static_buffers(model):
    runner = GraphRunner(model, max_batch=8)
    ids, mask, tt = _batch(3, 11)
    with fastdistil.use_backend("torch"), torch.inference_mode():
        want = model(ids, mask, tt)
        out = runner(ids, mask, tt)
    assert list(runner.graphs) == [(("forward",), 4, 16, False)]
    g = runner.graphs[(("forward",), 4, 16, False)]
    buf = g.inputs  # (3, 4, 16): ids, mask, token types of the bucket
    assert torch.equal(buf[0, :3, :11], ids) and (buf[0, 3:] == 0).all() and (buf[0, :, 11:] == 0).all()
    assert torch.equal(buf[1, :3, :11], mask) and buf[1, 3:].sum() == 0 and buf[1, :, 11:].sum() == 0
    assert torch.equal(buf[2, :3, :11], tt)
    assert out.last_hidden_state.shape == (3, 11, 32) and out.pooler_output.shape == (3, 32)
    assert (out.last_hidden_state - want.last_hidden_state).abs().max() <= 1e-6
    assert (out.pooler_output - want.pooler_output).abs().max() <= 1e-6
    kept = out.last_hidden_state.clone()
    with fastdistil.use_backend("torch"), torch.inference_mode():
        runner(*_batch(2, 9, seed=1))  # same bucket (2 -> 2 is another batch bucket) and a new one
        runner(*_batch(4, 16, seed=2))
    assert torch.equal(out.last_hidden_state, kept)  # outputs are copies, not views of the static buffers
    assert set(runner.graphs) == {(("forward",), 4, 16, False), (("forward",), 2, 16, False)}
    runner.reset()
    assert not runner.graphs


def test_embed_is_masked_mean_pooling(model):
    runner = model.cuda_graphs(max_batch=4)
    ids, mask, tt = _batch(3, 7)
    with fastdistil.use_backend("torch"), torch.inference_mode():
        last = model(ids, mask).last_hidden_state
        e = runner.embed(ids, mask)
        raw = runner.embed(ids, mask, normalize=False)
        cls = runner.embed(ids, mask, pooling="cls", normalize=False)
    w = mask[..., None].float()
    mean = (last * w).sum(1) / w.sum(1)
    assert (raw - mean).abs().max() <= 1e-6 and (cls - last[:, 0]).abs().max() <= 1e-6
    assert (e - torch.nn.functional.normalize(mean, dim=-1)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'cls'"):
        runner.embed(ids, mask, pooling="max")


def test_host_inputs_any_integer_dtype_and_no_mask(model):
    runner = GraphRunner(model)
    ids, _, _ = _batch(2, 5)
    with fastdistil.use_backend("torch"), torch.inference_mode():
        a = runner(ids.to(torch.int32))
        b = model(ids)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-6
    assert list(runner.graphs) == [(("forward",), 2, 16, False)]


def test_refusals(model):
    with pytest.raises(ValueError, match="model.eval"):
        GraphRunner(FastStudent.from_hf(hf_bert(hidden=32, heads=2, layers=1)).train())
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        GraphRunner(model, capture=True)
    with pytest.raises(ValueError, match="length_multiple must be an integer >= 1"):
        GraphRunner(model, length_multiple=0)
    with pytest.raises(ValueError, match=r"sequence length 65 exceeds max_position_embeddings 64"):
        GraphRunner(model)(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        GraphRunner(model).encode("one string")


def test_waste_bound_holds_for_random_batches():
    rng = np.random.default_rng(0)
    for _ in range(200):
        B, L = int(rng.integers(1, 300)), int(rng.integers(1, 513))
        b, l = bucket_batch(B, 128), bucket_length(L, 16, 512)
        assert b * l <= (B if B > 128 else min(2 * B - 1, B + 7) if B > 1 else 1) * (L + 15)


@pytest.mark.parametrize("masked", [False, True])
def test_device_inputs_are_staged_on_the_device(model, monkeypatch, masked):
    """The branch for inputs already on the GPU (checked with one fused check, copied device to device), run on
    CPU tensors by telling the runner they are not host tensors: same buffers, same outputs."""
    ids, mask, tt = _batch(3, 11)
    with fastdistil.use_backend("torch"), torch.inference_mode():
        want = GraphRunner(model)(ids, mask if masked else None, tt)
        monkeypatch.setattr("fastdistil.graphs.is_host", lambda *ts: False)
        runner = GraphRunner(model)
        got = runner(ids, mask if masked else None, tt)
        bad = ids.clone()
        bad[0, 0] = 999
        with pytest.raises(ValueError, match="input_ids must lie"):
            runner(bad, mask, tt)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    buf = runner.graphs[(("forward",), 4, 16, False)].inputs
    assert torch.equal(buf[1, :3, :11], mask if masked else torch.ones_like(mask)) and buf[1, :, 11:].sum() == 0
