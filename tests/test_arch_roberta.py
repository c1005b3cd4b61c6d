"""RoBERTa and XLM-R through the architecture registry (fastdistil/arch/roberta.py): positions counted from
padding_idx + 1 over the non-pad ids (left and right padding), FastStudent against transformers (fp32, 1e-5 on every
hidden state and the pooler), checkpoints both ways, 20 training steps, the drop-in patch (embeddings included), and
`fastdistil distill` with a RoBERTa teacher and student."""
import json
import warnings

import pytest
import torch
import transformers

import fastdistil
from fastdistil import FastStudent, FastStudentConfig, FastStudentForSequenceClassification
from fastdistil.arch.roberta import position_ids
from fastdistil.patch import patch, unpatch

from _arch_models import build, maxdiff, padded_batch

ATOL = 1e-5  # tests/test_model.py's bound for fp32 parity with transformers
NAME = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta"}


@pytest.fixture(autouse=True)
def _torch_backend():
    with fastdistil.use_backend("torch"):
        yield


def test_positions_as_transformers_both_padding_sides():
    M = transformers.models.roberta.modeling_roberta  # a method in transformers 5.x, a module function in 4.x
    create = getattr(M.RobertaEmbeddings, "create_position_ids_from_input_ids", None) or \
        M.create_position_ids_from_input_ids
    for side in ("right", "left"):
        ids, mask = padded_batch("roberta", B=6, L=9, side=side, seed=4)
        want = create(ids, 1)
        assert torch.equal(position_ids(ids, 1), want)
        assert torch.equal(want[mask.bool()].unique(), torch.arange(2, 2 + int(mask.sum(1).max())))
    cfg = FastStudentConfig.from_hf(build("roberta").config)
    assert cfg.position_offset == 2 and cfg.max_sequence_length == cfg.max_position_embeddings - 2
    with pytest.raises(ValueError, match="pad_token_id"):
        FastStudentConfig(model_type="roberta", pad_token_id=None)


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
@pytest.mark.parametrize("hidden,heads,layers,inter", [(32, 2, 2, 64), (48, 3, 3, 97)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_parity_every_hidden_state_and_pooler(model_type, hidden, heads, layers, inter, side):
    hf = build(model_type, hidden=hidden, heads=heads, layers=layers, inter=inter)
    ours = FastStudent.from_hf(hf).eval()
    assert ours.config.model_type == model_type
    ids, mask = padded_batch(model_type, B=5, L=13, side=side, seed=hidden)
    with torch.no_grad():
        a = ours(ids, mask, output_hidden_states=True)
        b = hf(ids, attention_mask=mask, output_hidden_states=True)
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        assert maxdiff(x, y, mask) <= ATOL, f"hidden_states[{i}]"
    # the pooler reads position 0, padding on left-padded rows: computed from the pad token at padding_idx
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= ATOL


def test_explicit_position_ids_are_used_as_given():
    hf = build("roberta")
    ours = FastStudent.from_hf(hf).eval()
    ids, mask = padded_batch("roberta", B=3, L=7)
    pos = torch.randint(0, 42, ids.shape)
    with torch.no_grad():
        a, b = ours(ids, mask, position_ids=pos), hf(ids, attention_mask=mask, position_ids=pos)
    assert maxdiff(a.last_hidden_state, b.last_hidden_state, mask) <= ATOL


@pytest.mark.parametrize("model_type,head", [("roberta", "Model"), ("roberta", "ForSequenceClassification"),
                                             ("xlm-roberta", "ForSequenceClassification")])
def test_checkpoints_both_ways(tmp_path, model_type, head):
    hf = build(model_type, head)
    cls = FastStudent if head == "Model" else FastStudentForSequenceClassification
    hf.save_pretrained(tmp_path / "hf")
    ours = cls.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == model_type
    back, info = getattr(transformers, NAME[model_type] + head).from_pretrained(tmp_path / "ours",
                                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids, mask = padded_batch(model_type)
    with torch.no_grad():
        a, b = ours(ids, mask), hf(ids, attention_mask=mask)
    if head == "Model":
        assert maxdiff(a.last_hidden_state, b.last_hidden_state, mask) <= ATOL
    else:
        assert ours.bert.pooler is None and (a.logits - b.logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type,head", [("roberta", "Model"), ("roberta", "ForSequenceClassification"),
                                             ("xlm-roberta", "Model")])
def test_patch_parity_embeddings_included(model_type, head, side):
    m, ref = build(model_type, head), build(model_type, head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every part, the embeddings included, patches without a warning
        patch(m)
    base = getattr(m, "roberta", m)
    assert type(base.embeddings).__module__ == "fastdistil.patch"
    assert type(base.encoder.layer[0]).__module__ == "fastdistil.patch"
    ids, mask = padded_batch(model_type, side=side, seed=5)
    with torch.no_grad():
        a, b = m(ids, attention_mask=mask), ref(ids, attention_mask=mask)
        emb = base.embeddings(input_ids=ids)
        emb_ref = getattr(ref, "roberta", ref).embeddings(input_ids=ids)
    assert maxdiff(emb, emb_ref, torch.ones_like(mask)) <= ATOL  # pad positions too: positions from the ids
    if head == "Model":
        assert maxdiff(a.last_hidden_state, b.last_hidden_state, mask) <= ATOL
        assert (a.pooler_output - b.pooler_output).abs().max().item() <= ATOL
    else:
        assert (a.logits - b.logits).abs().max().item() <= ATOL
    unpatch(m)
    assert type(base.embeddings).__module__.startswith("transformers.")


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_patched_classifier_gradients_on_left_padding(model_type):
    """RoBERTa's position table has padding_idx (the pad token): transformers never gives its row a gradient. A
    left-padded row's [CLS] read puts the pad position into the loss, so the fused embeddings must hold that row's
    gradient at zero as nn.Embedding does (it received 0.12 before 2026-11-27). Every gradient within 1e-5."""
    m, ref = build(model_type, "ForSequenceClassification"), build(model_type, "ForSequenceClassification")
    patch(m)
    ids, mask = padded_batch(model_type, side="left", seed=5)
    assert (mask[:, 0] == 0).any()
    labels = torch.tensor([0, 1, 1, 0])
    for model in (m, ref):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    g = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        assert (p.grad - g[n].grad).abs().max().item() <= 1e-5 * max(1.0, g[n].grad.abs().max().item()), n
    pos = getattr(m, "roberta").embeddings.position_embeddings
    assert torch.equal(pos.weight.grad[pos.padding_idx], torch.zeros_like(pos.weight.grad[0]))
    unpatch(m)


def test_distill_cli_roberta_teacher_and_student(tmp_path):
    """A RoBERTa teacher distilled into a RoBERTa student of its layers (--student-layers) and into a BERT student
    (--student): the packed batches get RoBERTa's offset positions (distill/models.py)."""
    from _distill_fixtures import SENTENCES, save_tiny
    from fastdistil.cli import main
    teacher = save_tiny(tmp_path / "t", "base", model_type="roberta", pad_token_id=1, type_vocab_size=1)
    student = save_tiny(tmp_path / "s", "base", seed=1, layers=2)
    (tmp_path / "d.txt").write_text("\n".join(SENTENCES + [" ".join(["word"] * 80)]))  # one line past 64 tokens
    common = ["--recipe", "minilmv2", "--data", str(tmp_path / "d.txt"), "--max-steps", "2", "--batch-size", "4",
              "--max-length", "64", "--no-progress"]  # clipped to 62: RoBERTa's positions start at 2
    assert main(["distill", "--teacher", str(teacher), "--student-layers", "1,3", "--out", str(tmp_path / "o1"),
                 *common]) == 0
    out, info = transformers.RobertaModel.from_pretrained(tmp_path / "o1" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and out.config.num_hidden_layers == 2
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--out", str(tmp_path / "o2"),
                 *common]) == 0
    assert transformers.BertModel.from_pretrained(tmp_path / "o2" / "final").config.model_type == "bert"


def test_prepare_and_encode_use_offset_positions():
    """Callers that pack through FastStudent.prepare (encode, the distiller's dict batches, int8 calibration) get
    RoBERTa's positions too: packed forward equals the padded forward on real tokens."""
    hf = build("roberta")
    ours = FastStudent.from_hf(hf).eval()
    ids, mask = padded_batch("roberta", B=4, L=10, side="left", seed=9)
    with torch.no_grad():
        tids, tt, pos, p = ours.prepare(ids, mask)
        x, _ = ours.forward_packed(tids, tt, pos, p)
        ref = hf(ids, attention_mask=mask).last_hidden_state[mask.bool()]  # (T, d), row-major like the packing
    assert torch.equal(pos, position_ids(ids, 1)[mask.bool()])
    assert (x - ref).abs().max().item() <= ATOL
