"""Dependency versions: fastdistil.patch follows the installed transformers' forward signatures (5.24 renamed
past_key_values -> cache and past_key_values_length -> cache_length; 4.x layers return tuples and its base models
build 4D masks inline), unknown keyword arguments run transformers' own forward with a warning, and the declared
ranges in pyproject.toml hold the pinned versions in constraints/. CI runs this file in the main venv (pinned 5.x)
and in .venv-tf4 (newest 4.x: `make test-tf4`)."""
import importlib
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.bert import modeling_bert

import fastdistil
from fastdistil import ops
from fastdistil.patch import MIN_TRANSFORMERS, _fused_class, is_patched, patch

ROOT = Path(__file__).resolve().parents[1]
TF4 = int(transformers.__version__.split(".")[0]) < 5
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _torch_backend():
    with fastdistil.use_backend("torch"):
        yield


def build(cls=transformers.BertModel, seed=1, **kw):
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = cls(transformers.BertConfig(**cfg)).eval()
    with torch.no_grad():  # biases and LayerNorm affine away from their 0/1 init, so every one matters
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def batch(B=3, L=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (B, L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor([L, 5, 1])[:B, None]).long()  # right padding, one single token
    return ids, mask


def maxdiff(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


@pytest.fixture
def calls(monkeypatch):
    """Counts of the fused ops a forward reached (proof that the fused path, not a fallback, served it)."""
    seen = {}
    for name in ("embed_layer_norm", "varlen_attention", "attention", "linear_gelu"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: seen.update({_n: seen.get(_n, 0) + 1})
                            or _r(*a, **k))
    return seen


# ------------------------------------------------------------------------------------- the installed release
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patched_forward_on_installed_release(attn, calls):
    """Every forward of a patched model used to raise TypeError on 5.24 (cache_length); on 4.x patch did nothing.
    Now a padded batch runs embeddings and layers fused, padding-free, on the installed release, within 1e-5."""
    m = build(attn_implementation=attn)
    ids, mask = batch()
    with torch.no_grad():
        ref = m(ids, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model patches and runs without a single warning
        patch(m)
        with torch.no_grad():
            out = m(ids, attention_mask=mask)
    assert type(m.encoder).__module__ == "fastdistil.patch"
    assert calls.get("embed_layer_norm") == 1 and calls.get("varlen_attention") == 2  # packed route, both layers
    assert maxdiff(out.last_hidden_state, ref.last_hidden_state, mask) <= ATOL
    assert maxdiff(out.pooler_output, ref.pooler_output) <= ATOL


def test_hidden_states_tuple_output_and_head_mask_match_transformers():
    """What 4.x's encoder does itself (output_hidden_states, return_dict=False, head_mask) matches the unpatched
    model on both majors: hidden states collected on the padded route, tuples when asked, head masks fall back."""
    m = build()
    ids, mask = batch()
    kw = dict(attention_mask=mask, output_hidden_states=True, return_dict=False)
    head_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # layer 0 without its second head (4.x; ignored on 5.x)
    with torch.no_grad():
        ref, ref_hm = m(ids, **kw), m(ids, attention_mask=mask, head_mask=head_mask).last_hidden_state
    patch(m)
    with torch.no_grad():
        out, out_hm = m(ids, **kw), m(ids, attention_mask=mask, head_mask=head_mask).last_hidden_state
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert maxdiff(out[0], ref[0], mask) <= ATOL
    hidden, ref_hidden = out[2], ref[2]
    assert len(hidden) == len(ref_hidden) == 3
    for a, b in zip(hidden, ref_hidden):
        assert maxdiff(a, b, mask) <= ATOL
    assert maxdiff(out_hm, ref_hm, mask) <= ATOL


def test_installed_signatures_are_ones_patch_reads():
    """The names patch maps are the installed release's own: a rename to something unknown must show up here."""
    emb = set(inspect.signature(modeling_bert.BertEmbeddings.forward).parameters)
    layer = set(inspect.signature(modeling_bert.BertLayer.forward).parameters)
    assert emb & {"cache_length", "past_key_values_length"}, emb
    assert layer & {"cache", "past_key_values"}, layer
    if TF4:
        assert {"head_mask", "output_attentions"} <= layer


# ------------------------------------------------------------------------------------- renamed arguments
def _reference_embeddings(emb, input_ids, token_type_ids, position_ids, offset):
    L = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(offset, offset + L)[None]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids) + emb.position_embeddings(
        position_ids)
    return emb.dropout(emb.LayerNorm(x))


class OldNames(modeling_bert.BertEmbeddings):  # transformers <= 5.23
    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                past_key_values_length: int = 0):
        return _reference_embeddings(self, input_ids, token_type_ids, position_ids, past_key_values_length)


class NewNames(modeling_bert.BertEmbeddings):  # transformers >= 5.24
    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                cache_length: int = 0):
        return _reference_embeddings(self, input_ids, token_type_ids, position_ids, cache_length)


@pytest.mark.parametrize("cls, offset_name", [(OldNames, "past_key_values_length"), (NewNames, "cache_length")])
def test_embeddings_follow_the_original_signature(cls, offset_name, calls):
    """A fused embeddings module reads the position offset under whichever name its original forward declares,
    positionally or by keyword, and runs the fused op (not the original) for it."""
    emb = build().embeddings
    ids, _ = batch()
    with torch.no_grad():
        ref = cls.forward(emb, ids, None, None, None, 3)
        emb.__class__ = _fused_class(cls, "embeddings")
        by_name = emb(input_ids=ids, **{offset_name: 3})
        by_position = emb(ids, None, None, None, 3)
    assert calls.get("embed_layer_norm") == 2
    assert maxdiff(by_name, ref) <= ATOL and maxdiff(by_position, ref) <= ATOL


class _Sentinel(Exception):
    pass


def _layer_class(cache_name: str):
    """A BertLayer whose original forward declares the cache under `cache_name` and only records that it ran."""
    ns = {}
    exec(f"def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, "
         f"encoder_attention_mask=None, {cache_name}=None, **kwargs):\n    raise _Sentinel(sorted(kwargs))",
         {"_Sentinel": _Sentinel}, ns)
    return type(f"Layer_{cache_name}", (modeling_bert.BertLayer,), {"forward": ns["forward"]})


@pytest.mark.parametrize("cache_name", ["past_key_values", "cache"])
def test_layer_cache_argument_under_either_name(cache_name, calls):
    """The cache argument is recognised under its old and new names: None runs the fused layer; a cache runs the
    original forward, silently (a known reason, not an unknown argument)."""
    m = build()
    layer = m.encoder.layer[0]
    layer._fastdistil_gelu = "none"
    layer.__class__ = _fused_class(_layer_class(cache_name), "layer")
    x = torch.randn(2, 5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = layer(x, None, **{cache_name: None})
        assert calls.get("linear_gelu") == 1
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == x.shape
        with pytest.raises(_Sentinel):  # the original ran: the cache was understood as a cache
            layer(x, None, **{cache_name: object()})
    other = "cache" if cache_name == "past_key_values" else "past_key_values"
    with pytest.raises(_Sentinel):  # the other spelling arrives through **kwargs and is mapped all the same
        layer(x, None, **{other: object()})


# ------------------------------------------------------------------------------------- unknown arguments
@pytest.mark.skipif(TF4, reason="4.x's BertModel.forward takes no **kwargs: an unknown keyword is transformers' "
                                "own TypeError (test_unbindable_call_raises_like_the_original)")
def test_unknown_keyword_warns_and_runs_the_original():
    """A keyword argument a future transformers passes (here: one nobody knows) runs transformers' own forward for
    that call, with a warning naming it, and gives transformers' result; never a TypeError from inside."""
    m = build()
    ids, mask = batch()
    flag = torch.ones(1)
    with torch.no_grad():
        ref = m(ids, attention_mask=mask, brand_new_flag=flag).last_hidden_state
    patch(m)
    with pytest.warns(UserWarning, match=r"BertEncoder\.forward got 'brand_new_flag', which fastdistil's fused path "
                                         r"does not know \(transformers [\d.]+"):
        with torch.no_grad():
            out = m(ids, attention_mask=mask, brand_new_flag=flag).last_hidden_state
    assert torch.equal(out.isfinite(), torch.ones_like(out, dtype=torch.bool))
    assert maxdiff(out, ref) <= ATOL  # every position, padding included: transformers' own layers ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():  # False / None values of unknown arguments change nothing: the fused path serves them
            assert maxdiff(m(ids, attention_mask=mask, brand_new_flag=None).last_hidden_state, ref, mask) <= ATOL


def test_unbindable_call_raises_like_the_original():
    """A call that does not fit the original signature raises the original's own TypeError, word for word."""
    m = build()
    ids, _ = batch()
    with pytest.raises(TypeError) as plain:
        m.embeddings(ids, bogus=1)
    patch(m)
    with pytest.raises(TypeError) as patched:
        m.embeddings(ids, bogus=1)
    assert str(patched.value) == str(plain.value) and "bogus" in str(plain.value)


# ------------------------------------------------------------------------------------- declared ranges and pins
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(name: str) -> dict[str, str]:
    lines = (ROOT / "constraints" / name).read_text().splitlines()
    return {_norm(k): v for k, v in (line.split("==") for line in lines if line and not line.startswith("#"))}


def _declared(group: str = "dependencies") -> dict[str, str]:
    """{name: requirement} of pyproject's dependencies (or of an optional group: test, bench)."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(rf"^{group} = \[(.*?)\]", text, re.S | re.M).group(1)
    deps = re.sub(r"#.*", "", deps)
    return {_norm(re.split(r"[<>=!~ ;\[]", d)[0]): d for d in re.findall(r'"([^"]+)"', deps)}


def test_pins_fall_inside_the_declared_ranges():
    """Each pinned version of a declared dependency, in both CI venvs, satisfies pyproject's range; the range's
    lower bound for transformers is the oldest release patch follows (MIN_TRANSFORMERS); torch is the CPU pin."""
    from packaging.requirements import Requirement
    declared = _declared()
    ci, tf4 = _pins("ci.txt"), _pins("transformers4.txt")
    for pins in (ci, tf4):
        assert pins["torch"] == "2.13.0"
        for name, spec in declared.items():
            assert Requirement(spec).specifier.contains(pins[name]), (name, spec, pins[name])
    assert ci["transformers"].split(".")[0] == "5" and tf4["transformers"].split(".")[0] == "4"
    # every requirement the CI venvs install is pinned (a new one needs `make constraints`)
    assert not ({*declared, *_declared("test"), *_declared("bench")} - set(ci))
    assert not ({*declared, *_declared("test")} - set(tf4))
    lower = re.search(r">=\s*([\d.]+)", declared["transformers"]).group(1)
    assert tuple(int(x) for x in lower.split(".")[:2]) == MIN_TRANSFORMERS


def test_patch_refuses_releases_older_than_declared(monkeypatch):
    """Below MIN_TRANSFORMERS the model is left as it is, with a warning naming the version needed."""
    P = importlib.import_module("fastdistil.patch.hf")  # where _load_transformers keeps what it imported
    monkeypatch.setattr(P, "_HF", {})
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "4.44.2")  # the one patch reads
    m = build()
    with pytest.warns(UserWarning, match=r"needs transformers >= 4\.57 \(installed: 4\.44\.2\)"):
        assert patch(m) is m
    assert not is_patched(m)


# ------------------------------------------------------------------------------------- forwards set on the instance
def test_stale_instance_forward_is_dropped_and_fused_path_runs(calls):
    """transformers 5.0's output capture leaves `module.forward = <its class's forward, bound>` on every layer after
    a call with output_hidden_states; that attribute would shadow the fused class and feed packed tokens to
    transformers' layers. patch drops such leftovers (and unpatch the fused ones), and the fused path runs."""
    m = build()
    ids, mask = batch()
    for layer in m.encoder.layer:
        layer.forward = layer.forward  # what 5.0's capture restores after each call
    with torch.no_grad():
        ref = m(ids, attention_mask=mask).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(m)
    with torch.no_grad():
        out = m(ids, attention_mask=mask).last_hidden_state
    assert calls.get("varlen_attention") == 2 and maxdiff(out, ref, mask) <= ATOL
    for layer in m.encoder.layer:  # ... and the same leftover of a patched model's forward goes with unpatch
        layer.forward = layer.forward
    importlib.import_module("fastdistil.patch").unpatch(m)
    assert not any("forward" in x.__dict__ for x in m.encoder.layer)
    with torch.no_grad():
        assert torch.equal(m(ids, attention_mask=mask).last_hidden_state, ref)


def test_wrapped_instance_forward_is_left_unpatched_with_a_warning():
    """A forward replaced on the instance (accelerate's hooks, as device_map / offloading install them) would run
    instead of the fused one: that layer, and so its encoder, stay unpatched with a warning, and outputs are exact
    (before, the fused encoder fed packed tokens to the wrapped original layer: a TypeError)."""
    hooks = pytest.importorskip("accelerate.hooks", reason="accelerate installs the hooks")
    m = build()
    ids, mask = batch()
    hooks.add_hook_to_module(m.encoder.layer[1], hooks.ModelHook())
    with torch.no_grad():
        ref = m(ids, attention_mask=mask).last_hidden_state
    with pytest.warns(UserWarning, match=r"left encoder\.layer\.1 \(BertLayer\) unpatched: its forward is replaced on "
                                         r"the instance"):
        patch(m)
    assert type(m.encoder).__module__.startswith("transformers")
    assert type(m.encoder.layer[0]).__module__ == "fastdistil.patch"
    with torch.no_grad():
        assert maxdiff(m(ids, attention_mask=mask).last_hidden_state, ref, mask) <= ATOL
