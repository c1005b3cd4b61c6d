"""Property tests (hypothesis) of the model's input handling, with a bounded, derandomised example count.

Valid inputs (batch, lengths, left or right padding, token types, position ids, every integer dtype for the ids,
any mask dtype): the auto backend equals the torch reference to 1e-4 on the real tokens. Invalid inputs (wrong
dtypes, shapes, out-of-range ids, mask values other than 0/1, unknown keywords, bad cu_seqlens): always a
ValueError or TypeError, never another exception (a crash would end the run).
"""
import pytest
import torch

pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

import fastdistil
from fastdistil import FastStudent, FastStudentConfig, ops

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64]
V, TV, P = 40, 3, 12  # vocabulary, token types, positions of the tiny model (ids fit int8)

_MODEL = []


def model() -> FastStudent:
    if not _MODEL:
        torch.manual_seed(0)
        cfg = FastStudentConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=P, type_vocab_size=TV,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        m = FastStudent(cfg).eval()
        with torch.no_grad():  # biases and LayerNorm away from 0/1 so that every parameter matters
            for n, p in m.named_parameters():
                if n.endswith("bias") or "LayerNorm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        _MODEL.append(m)
    return _MODEL[0]


@st.composite
def valid_inputs(draw):
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    lens = draw(st.lists(st.integers(0, L), min_size=B, max_size=B))
    left = draw(st.booleans())
    mask = torch.zeros(B, L, dtype=torch.int64)
    for b, n in enumerate(lens):
        (mask[b, L - n:] if left else mask[b, :n]).fill_(1)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    ids = torch.randint(0, V, (B, L), generator=g)
    tt = torch.randint(0, TV, (B, L), generator=g) if draw(st.booleans()) else None
    pos = torch.randint(0, P, (B, L), generator=g) if draw(st.booleans()) else None
    dt = draw(st.sampled_from(INT_DTYPES))
    kw = dict(input_ids=ids.to(dt), attention_mask=mask.to(draw(st.sampled_from(MASK_DTYPES))),
              token_type_ids=None if tt is None else tt.to(dt), position_ids=None if pos is None else pos.to(dt))
    if draw(st.booleans()):
        kw["attention_mask"] = None if min(lens) == L else kw["attention_mask"]
    return kw, mask.bool()


def max_diff(a, b, real) -> float:
    d = (a - b)[real].abs()
    return d.max().item() if d.numel() else 0.0


@settings(max_examples=40, **SETTINGS)
@given(valid_inputs())
def test_auto_backend_equals_torch_on_valid_inputs(case):
    kw, real = case
    m = model()
    outs = {}
    for backend in ("auto", "torch"):
        with fastdistil.use_backend(backend), torch.no_grad():
            outs[backend] = m(**kw, output_hidden_states=True)
    a, t = outs["auto"], outs["torch"]
    assert a.last_hidden_state.shape == (*real.shape, 32)
    d = max_diff(a.last_hidden_state, t.last_hidden_state, real)
    assert d <= 1e-4, f"last_hidden_state differs by {d}"
    assert (a.last_hidden_state[~real] == 0).all()
    for i, (x, y) in enumerate(zip(a.hidden_states, t.hidden_states, strict=True)):
        assert max_diff(x, y, real) <= 1e-4, f"hidden_states[{i}] differs"
    assert torch.allclose(a.pooler_output, t.pooler_output, atol=1e-4, rtol=0)
    assert torch.isfinite(a.last_hidden_state).all() and torch.isfinite(a.pooler_output).all()


def _bad_value(draw, t, low, high):
    """`t` with one entry moved out of [low, high)."""
    t = t.clone()
    t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([low - 1, high, high + 1000, -(2**40)]))
    return t


@st.composite
def invalid_inputs(draw):
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    ids = torch.randint(0, V, (B, L))
    kw = dict(input_ids=ids)
    kind = draw(st.sampled_from(["ids_dtype", "tt_dtype", "ids_shape", "mask_shape", "ids_range", "tt_range",
                                 "pos_range", "mask_value", "not_tensor", "kwarg", "too_long", "empty",
                                 "unsupported_kwarg"]))
    if kind == "ids_dtype":
        kw["input_ids"] = ids.to(draw(st.sampled_from([torch.float32, torch.float64, torch.bool, torch.complex64])))
    elif kind == "tt_dtype":
        kw[draw(st.sampled_from(["token_type_ids", "position_ids"]))] = torch.zeros(B, L).to(
            draw(st.sampled_from([torch.float16, torch.bool])))
    elif kind == "ids_shape":
        kw["input_ids"] = draw(st.sampled_from([ids.view(-1), ids[None], ids.view(-1)[0]]))
    elif kind == "mask_shape":
        name = draw(st.sampled_from(["attention_mask", "token_type_ids", "position_ids"]))
        kw[name] = torch.zeros(draw(st.sampled_from([(B, L + 1), (B + 1, L), (B * L,), (B, L, 1)])),
                               dtype=torch.long)
    elif kind == "ids_range":
        kw["input_ids"] = _bad_value(draw, ids, 0, V)
    elif kind == "tt_range":
        kw["token_type_ids"] = _bad_value(draw, torch.zeros(B, L, dtype=torch.long), 0, TV)
    elif kind == "pos_range":
        kw["position_ids"] = _bad_value(draw, torch.zeros(B, L, dtype=torch.long), 0, P)
    elif kind == "mask_value":
        mask = torch.ones(B, L)
        mask.view(-1)[draw(st.integers(0, B * L - 1))] = draw(st.sampled_from([2.0, -1.0, 0.5, float("nan"),
                                                                                float("inf")]))
        kw["attention_mask"] = mask.to(draw(st.sampled_from([torch.float32, torch.float64]))) \
            if mask.isnan().any() or mask.isinf().any() or (mask != mask.round()).any() \
            else mask.to(draw(st.sampled_from([torch.float32, torch.int64, torch.int8])))
    elif kind == "not_tensor":
        name = draw(st.sampled_from(["input_ids", "attention_mask", "token_type_ids", "position_ids"]))
        kw[name] = draw(st.sampled_from([ids.tolist(), ids.numpy(), "ids", 3]))
    elif kind == "kwarg":
        kw[draw(st.sampled_from(["attn_mask", "mask", "token_types", "labels", "quantize", "input_id"]))] = None
    elif kind == "too_long":
        kw["input_ids"] = torch.zeros(B, P + draw(st.integers(1, 5)), dtype=torch.long)
    elif kind == "empty":
        kw["input_ids"] = torch.zeros(draw(st.integers(0, 2)), 0, dtype=torch.long)
    else:
        k, v = draw(st.sampled_from([("output_attentions", True), ("inputs_embeds", torch.zeros(B, L, 32)),
                                     ("encoder_hidden_states", torch.zeros(B, L, 32)), ("is_causal", True),
                                     ("past_key_values", ())]))
        kw[k] = v
    return kind, kw


@settings(max_examples=80, **SETTINGS)
@given(invalid_inputs(), st.sampled_from(["auto", "torch"]))
def test_invalid_inputs_are_value_or_type_errors(case, backend):
    kind, kw = case
    with fastdistil.use_backend(backend), torch.no_grad(), pytest.raises((ValueError, TypeError)):
        model()(**kw)


@st.composite
def bad_cu_seqlens(draw):
    T = draw(st.integers(1, 12))
    cu = sorted(draw(st.lists(st.integers(0, T), min_size=0, max_size=4)))
    cu = [0, *cu, T]
    lens = [b - a for a, b in zip(cu, cu[1:])]
    max_seqlen = max(lens)
    kind = draw(st.sampled_from(["decrease", "first", "last", "max_small", "max_large", "max_float"]))
    if kind == "decrease":
        cu.insert(draw(st.integers(1, len(cu) - 1)), T + 1)
    elif kind == "first":
        cu[0] = draw(st.sampled_from([1, -1]))
    elif kind == "last":
        cu[-1] = draw(st.sampled_from([T - 1, T + 1, T + 100])) if T > 0 else T + 1
    elif kind == "max_small":
        max_seqlen = draw(st.integers(-(2**40), max_seqlen - 1)) if max_seqlen > 0 else -1
    elif kind == "max_large":
        max_seqlen = draw(st.sampled_from([T + 1, 2**31, 2**62, 2**63 - 1]))
    else:
        max_seqlen = float(max_seqlen)
    return T, cu, max_seqlen, draw(st.sampled_from([torch.int32, torch.int64]))


@settings(max_examples=60, **SETTINGS)
@given(bad_cu_seqlens(), st.sampled_from(["auto", "torch"]))
def test_bad_cu_seqlens_are_value_or_type_errors(case, backend):
    T, cu, max_seqlen, dt = case
    q = torch.randn(T, 2, 16)
    with fastdistil.use_backend(backend), pytest.raises((ValueError, TypeError)):
        ops.varlen_attention(q, q, q, torch.tensor(cu, dtype=dt), max_seqlen)
