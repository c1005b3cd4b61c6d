"""Loading and saving: HF directories, hub cache, sentence-transformers layout, heads, pickle safety, errors."""
import json
import os
import pickle
import shutil

import pytest
import torch
import transformers

from fastdistil import (FastStudent, FastStudentForQuestionAnswering, FastStudentForSequenceClassification,
                        FastStudentForTokenClassification)
from fastdistil.loading import CheckpointError

from test_model import batch, hf_bert


def save_hf(tmp_path, model, name="ckpt", safe=True):
    d = tmp_path / name
    model.save_pretrained(d, safe_serialization=safe)
    return d


def test_save_pretrained_loads_in_transformers_without_warnings(tmp_path, minilm_dir):
    ours = FastStudent.from_pretrained(minilm_dir)
    out = tmp_path / "saved"
    ours.save_pretrained(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(os.listdir(out))
    hf, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, tt = batch(2, 19, 30522)
    with torch.no_grad():
        a, b = ours(ids, mask, tt), hf.eval()(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert (a.last_hidden_state - b.last_hidden_state)[mask.bool()].abs().max() <= 1e-5
    again = FastStudent.from_pretrained(out)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_from_hf_to_hf_roundtrip():
    hf = hf_bert()
    ours = FastStudent.from_hf(hf)
    back = ours.to_hf()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_pytorch_bin_and_bert_prefix_and_gamma_beta(tmp_path):
    hf = hf_bert()
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(hf.config.to_json_string())
    sd = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in hf.state_dict().items()}
    sd["cls.predictions.bias"] = torch.zeros(3)
    torch.save(sd, d / "pytorch_model.bin")
    ours = FastStudent.from_pretrained(d)
    for k, v in hf.state_dict().items():
        if k in ours.state_dict():
            assert torch.equal(ours.state_dict()[k], v), k


def test_pickle_checkpoint_never_executes_code(tmp_path):
    hf = hf_bert()
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(hf.config.to_json_string())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": Evil()}, f)
    with pytest.raises(OSError, match="weights_only"):
        FastStudent.from_pretrained(d)
    assert not marker.exists()


def test_sentence_transformers_dir_and_nested_module(tmp_path, minilm_dir):
    a = FastStudent.from_pretrained(minilm_dir)  # root holds config.json and modules.json
    nested = tmp_path / "st"
    nested.mkdir()
    shutil.copytree(minilm_dir, nested / "0_Transformer")
    (nested / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    b = FastStudent.from_pretrained(nested)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_hub_id_resolved_from_local_cache(tmp_path, monkeypatch):
    hf = hf_bert()
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-bert" / "snapshots" / "0123abcd"
    hf.save_pretrained(snap)
    (cache / "models--acme--tiny-bert" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-bert" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    ours = FastStudent.from_pretrained("acme/tiny-bert")
    assert torch.equal(ours.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)
    with pytest.raises(OSError, match="local Hugging Face cache"):
        FastStudent.from_pretrained("acme/not-there")


def test_dtype_and_device(minilm_dir):
    m = FastStudent.from_pretrained(minilm_dir, dtype=torch.bfloat16, device="cpu")
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    with pytest.raises(TypeError, match="dtype"):
        FastStudent.from_pretrained(minilm_dir, dtype="float8")


@pytest.mark.parametrize("ours_cls,hf_cls", [
    (FastStudentForSequenceClassification, transformers.BertForSequenceClassification),
    (FastStudentForTokenClassification, transformers.BertForTokenClassification),
    (FastStudentForQuestionAnswering, transformers.BertForQuestionAnswering)])
def test_heads_match_transformers(tmp_path, ours_cls, hf_cls):
    cfg = hf_bert().config
    cfg.num_labels = 2 if ours_cls is FastStudentForQuestionAnswering else 3
    torch.manual_seed(0)
    hf = hf_cls(cfg).eval()
    d = save_hf(tmp_path, hf)
    ours = ours_cls.from_pretrained(d)
    assert list(ours.state_dict()) == [k for k in hf.state_dict() if not k.endswith(("position_ids",
                                                                                        "token_type_ids"))]
    ids, mask, tt = batch(4, 10, 211)
    if ours_cls is FastStudentForQuestionAnswering:  # transformers scores padded positions: compare unpadded
        mask = torch.ones_like(mask)
    kw = {}
    if ours_cls is FastStudentForSequenceClassification:
        kw["labels"] = torch.tensor([0, 2, 1, 1])
    elif ours_cls is FastStudentForTokenClassification:
        kw["labels"] = torch.where(mask.bool(), torch.randint(0, 3, (4, 10)), -100)
    else:
        kw["start_positions"], kw["end_positions"] = torch.tensor([0, 3, 20, 1]), torch.tensor([2, 4, 5, 1])
    a = ours(ids, mask, tt, **kw)
    b = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, **kw)
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    names = ["start_logits", "end_logits"] if ours_cls is FastStudentForQuestionAnswering else ["logits"]
    for n in names:
        x, y = a[n], b[n]
        if x.dim() == 3 or n != "logits":
            x, y = x[mask.bool()], y[mask.bool()]
        assert (x - y).abs().max() <= 1e-5
    a.loss.backward()
    out = tmp_path / "head_saved"
    ours.save_pretrained(out)
    again, info = hf_cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_head_from_base_checkpoint_initialises_classifier(tmp_path, caplog):
    d = save_hf(tmp_path, hf_bert())
    m = FastStudentForSequenceClassification.from_pretrained(d, num_labels=5)
    assert m.classifier.weight.shape == (5, 64)
    assert "classifier.weight" in caplog.text


def test_regression_and_multilabel_losses(tmp_path):
    d = save_hf(tmp_path, hf_bert())
    ids, mask, tt = batch(3, 6, 211)
    m = FastStudentForSequenceClassification.from_pretrained(d, num_labels=1)
    out = m(ids, mask, labels=torch.tensor([0.5, 1.0, -1.0]))
    assert torch.allclose(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([.5, 1., -1.])))
    m = FastStudentForSequenceClassification.from_pretrained(d, num_labels=3)
    y = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1]])
    out = m(ids, mask, labels=y)
    assert torch.allclose(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, y))


# ---- bad checkpoints: clear errors naming the problem ------------------------------------------------------

def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="no config.json"):
        FastStudent.from_pretrained(tmp_path / "empty")
    with pytest.raises(OSError, match="neither a local directory"):
        FastStudent.from_pretrained(tmp_path / "nope")


def test_corrupt_and_truncated_safetensors(tmp_path):
    d = save_hf(tmp_path, hf_bert())
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated or corrupt"):
        FastStudent.from_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(OSError, match="truncated or corrupt"):
        FastStudent.from_pretrained(d)


def test_missing_keys_and_wrong_shapes_listed(tmp_path):
    from safetensors.torch import load_file, save_file
    d = save_hf(tmp_path, hf_bert())
    sd = load_file(d / "model.safetensors")
    del sd["encoder.layer.1.output.dense.weight"]
    sd["encoder.layer.0.intermediate.dense.bias"] = torch.zeros(7)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        FastStudent.from_pretrained(d)
    msg = str(e.value)
    assert "encoder.layer.1.output.dense.weight" in msg
    assert "encoder.layer.0.intermediate.dense.bias: (7,) vs (256,)" in msg


def test_unused_keys_reported(tmp_path, caplog):
    from safetensors.torch import load_file, save_file
    d = save_hf(tmp_path, hf_bert())
    sd = load_file(d / "model.safetensors")
    sd["mystery.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors")
    FastStudent.from_pretrained(d)
    assert "mystery.weight" in caplog.text


def test_bad_config(tmp_path):
    d = save_hf(tmp_path, hf_bert())
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not divisible"):
        FastStudent.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="not valid JSON"):
        FastStudent.from_pretrained(d)


def test_question_answering_never_points_at_padding(tmp_path):
    m = FastStudentForQuestionAnswering.from_pretrained(save_hf(tmp_path, hf_bert()))
    ids, mask, tt = batch(3, 9, 211)
    out = m(ids, mask, tt)
    assert (out.start_logits.argmax(-1) < mask.sum(-1)).all() and torch.isfinite(out.end_logits).all()
