"""DistilBERT through the architecture registry (fastdistil/arch/distilbert.py): FastStudent against transformers'
DistilBertModel (fp32, the foundation's 1e-5 on every hidden state, both padding sides), checkpoints both ways,
20 training steps, the drop-in patch, and `fastdistil distill` with a DistilBERT student and teacher."""
import json
import warnings

import pytest
import torch
import transformers

import fastdistil
from fastdistil import FastStudent, FastStudentConfig, FastStudentForSequenceClassification
from fastdistil.patch import is_patched, patch, unpatch

from _arch_models import build, maxdiff, padded_batch

_TF4 = int(transformers.__version__.split(".")[0]) < 5  # the DistilBERT patch follows 5.x's signatures

ATOL = 1e-5  # tests/test_model.py's bound for fp32 parity with transformers


@pytest.fixture(autouse=True)
def _torch_backend():
    with fastdistil.use_backend("torch"):
        yield


def test_config_adapter_both_ways():
    hf = build("distilbert", hidden=48, heads=3, layers=3, inter=80, sinusoidal_pos_embds=True)
    cfg = FastStudentConfig.from_hf(hf.config)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers,
            cfg.intermediate_size, cfg.layer_norm_eps) == ("distilbert", 48, 3, 3, 80, 1e-12)
    assert not cfg.token_types and cfg.position_offset is None and cfg.sinusoidal_positions
    d = cfg.to_dict()
    assert d["model_type"] == "distilbert"
    assert (d["dim"], d["n_heads"], d["n_layers"], d["hidden_dim"]) == (48, 3, 3, 80)
    assert not {"hidden_size", "type_vocab_size", "layer_norm_eps"} & set(d)
    assert FastStudentConfig.from_dict(d).to_dict() == d
    with pytest.raises(ValueError, match="layer_norm_eps"):
        FastStudentConfig.from_dict({**d, "layer_norm_eps": 1e-5})
    with pytest.raises(ValueError, match="model_type"):
        FastStudentConfig(model_type="gpt2")


@pytest.mark.parametrize("hidden,heads,layers,inter", [(32, 2, 2, 64), (48, 3, 3, 97), (64, 4, 1, 256)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_parity_every_hidden_state(hidden, heads, layers, inter, side):
    hf = build("distilbert", hidden=hidden, heads=heads, layers=layers, inter=inter)
    ours = FastStudent.from_hf(hf).eval()
    assert ours.pooler is None and ours.embeddings.token_type_embeddings is None
    ids, mask = padded_batch("distilbert", B=5, L=13, side=side, seed=hidden)
    with torch.no_grad():
        a = ours(ids, mask, output_hidden_states=True)
        b = hf(ids, attention_mask=mask, output_hidden_states=True)
    assert a.pooler_output is None and len(a.hidden_states) == len(b.hidden_states) == layers + 1
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        assert maxdiff(x, y, mask) <= ATOL, f"hidden_states[{i}]"
    assert maxdiff(a.last_hidden_state, b.last_hidden_state, mask) <= ATOL


def test_sinusoidal_positions_initialised_as_transformers():
    hf = build("distilbert", sinusoidal_pos_embds=True)
    ours = FastStudent(FastStudentConfig.from_hf(hf.config))
    ref = transformers.DistilBertModel(hf.config).embeddings.position_embeddings.weight
    assert torch.allclose(ours.embeddings.position_embeddings.weight, ref, atol=1e-6, rtol=0)
    plain = FastStudent(FastStudentConfig.from_hf(build("distilbert").config))
    assert not torch.allclose(plain.embeddings.position_embeddings.weight, ref, atol=1e-2)


@pytest.mark.parametrize("head", ["Model", "ForSequenceClassification"])
def test_checkpoints_both_ways(tmp_path, head):
    hf = build("distilbert", head)
    cls = FastStudent if head == "Model" else FastStudentForSequenceClassification
    hf.save_pretrained(tmp_path / "hf")
    ours = cls.from_pretrained(tmp_path / "hf")  # strict: every key used, every shape checked
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "distilbert"
    back, info = getattr(transformers, "DistilBert" + head).from_pretrained(tmp_path / "ours",
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids, mask = padded_batch("distilbert")
    with torch.no_grad():
        a, b = ours(ids, mask), hf(ids, attention_mask=mask)
    if head == "Model":
        assert maxdiff(a.last_hidden_state, b.last_hidden_state, mask) <= ATOL
    else:
        assert (a.logits - b.logits).abs().max().item() <= ATOL
        assert ours.hf_architecture == "DistilBertForSequenceClassification"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("head", ["Model", "ForSequenceClassification"])
def test_patch_parity(head, side):
    m, ref = build("distilbert", head), build("distilbert", head)
    if _TF4:  # 4.x DistilBERT forwards have signatures the patch does not serve: it warns and changes nothing
        with pytest.warns(UserWarning, match="signature fastdistil does not serve"):
            patch(m)
        assert not is_patched(m)
        ids, mask = padded_batch("distilbert", side=side, seed=7)
        with torch.no_grad():
            assert torch.equal(m(ids, attention_mask=mask)[0], ref(ids, attention_mask=mask)[0])
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model patches without a single warning
        patch(m)
    M = transformers.models.distilbert.modeling_distilbert
    fused = [n for n, x in m.named_modules() if type(x).__module__ == "fastdistil.patch"]
    kinds = [next(c for c in (M.Embeddings, M.Transformer, M.TransformerBlock) if isinstance(m.get_submodule(n), c))
             for n in fused]
    assert sorted(k.__name__ for k in kinds) == ["Embeddings", "Transformer", "TransformerBlock", "TransformerBlock"]
    enc = fused[kinds.index(M.Transformer)]
    ids, mask = padded_batch("distilbert", side=side, seed=7)
    with torch.no_grad():  # packed route; inference runs the backend's encoder_layer op on LayerWeights
        a, b = m(ids, attention_mask=mask), ref(ids, attention_mask=mask)
        hs = m(ids, attention_mask=mask, output_hidden_states=True).hidden_states  # padded route (capture hooks)
        hs_ref = ref(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    if head == "Model":
        assert maxdiff(a.last_hidden_state, b.last_hidden_state, mask) <= ATOL
    else:  # the [CLS] head reads position 0, padding on left-padded rows: computed as transformers does
        assert (a.logits - b.logits).abs().max().item() <= ATOL
    for x, y in zip(hs, hs_ref, strict=True):
        assert maxdiff(x, y, mask) <= ATOL
    m.train(), ref.train()  # gradients through the fused training path (no dropout in these configs)
    for model in (m, ref):
        out = model(ids, attention_mask=mask)
        (out[0] * mask[..., None] if head == "Model" else out.logits).pow(2).sum().backward()
    g_ref = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        err = (p.grad - g_ref[n].grad).abs().max().item()
        assert err <= 1e-5 * max(1.0, g_ref[n].grad.abs().max().item()), n
    unpatch(m)
    assert not is_patched(m) and type(m.get_submodule(enc)) is M.Transformer


def test_patch_leaves_subclassed_code_with_a_warning():
    M = transformers.models.distilbert.modeling_distilbert

    class Odd(M.TransformerBlock):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            return super().forward(hidden_states, attention_mask, **kwargs) * 2

    m = build("distilbert")
    m.transformer.layer[1].__class__ = Odd
    with pytest.warns(UserWarning, match="Odd.forward differs" if not _TF4 else "Odd.*does not serve"):
        patch(m)
    assert type(m.transformer.layer[1]) is Odd and type(m.transformer).__module__ != "fastdistil.patch"


def test_distill_cli_bert_teacher_distilbert_student_and_back(tmp_path):
    """The classic DistilBERT recipe's shape: a BERT teacher into a DistilBERT student (--student), and a
    DistilBERT teacher into a student of its own layers (--student-layers)."""
    from _distill_fixtures import SENTENCES, save_tiny
    from fastdistil.cli import main
    teacher = save_tiny(tmp_path / "t", "base")
    student = save_tiny(tmp_path / "s", "base", seed=1, layers=2, model_type="distilbert")
    assert json.loads((student / "config.json").read_text())["model_type"] == "distilbert"
    (tmp_path / "d.txt").write_text("\n".join(SENTENCES))
    common = ["--recipe", "minilmv2", "--data", str(tmp_path / "d.txt"), "--max-steps", "2", "--batch-size", "4",
              "--max-length", "16", "--no-progress"]
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--out", str(tmp_path / "o1"),
                 *common]) == 0
    out, info = transformers.DistilBertModel.from_pretrained(tmp_path / "o1" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    before = transformers.DistilBertModel.from_pretrained(student)
    assert not torch.equal(out.transformer.layer[0].ffn.lin1.weight, before.transformer.layer[0].ffn.lin1.weight)
    assert main(["distill", "--teacher", str(student), "--student-layers", "1", "--out", str(tmp_path / "o2"),
                 *common]) == 0
    small = transformers.DistilBertModel.from_pretrained(tmp_path / "o2" / "final")
    assert small.config.n_layers == 1 and small.config.model_type == "distilbert"
