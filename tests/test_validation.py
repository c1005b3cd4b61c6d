"""Bad input to the model, the ops and the loaders (issue 11): a clear ValueError/TypeError naming the problem, the
right answer where the input is valid, never a silent guess or a traceback from deep inside."""
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import fastdistil
from fastdistil import FastStudent, FastStudentConfig, ops
from fastdistil.heads import FastStudentForSequenceClassification
from fastdistil.loading import CheckpointError

INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64]


def tiny_config(**kw):
    return FastStudentConfig(**{**dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=16, type_vocab_size=3), **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FastStudent(tiny_config()).eval()
    with torch.no_grad():  # type and position rows that differ a lot, so that a wrong row shows
        m.embeddings.token_type_embeddings.weight.normal_(0, 1)
    return m


def backend_or_skip(name):
    ok, why = fastdistil.backend.availability().get(name, (True, ""))
    if not ok:
        pytest.skip(f"backend {name} unavailable: {why}")
    return fastdistil.use_backend(name)


def hidden(model, *args, **kw):
    with torch.no_grad():
        return model(*args, **kw).last_hidden_state


# ---- one rule for integer ids on every backend ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_every_integer_dtype_gives_the_int64_answer(model, backend, dtype):
    """uint8 token types were a byte mask on torch (off by 3.9), uint16/32/64 raised NotImplementedError and
    int8/int16 IndexError: now every integer dtype means the same ids everywhere."""
    cases = [(torch.tensor([[3, 7]]), torch.tensor([[1, 2]]), None),  # T = 2 = a byte mask's length over 2 rows
             (torch.tensor([[1, 4, 9], [2, 5, 0]]), torch.tensor([[0, 1, 2], [2, 2, 0]]),
              torch.tensor([[1, 1, 1], [1, 1, 0]]))]
    with backend_or_skip(backend):
        for ids, tt, mask in cases:
            ref = hidden(model, ids, mask, tt, torch.arange(ids.shape[1]).expand_as(ids))
            out = hidden(model, ids.to(dtype), mask, tt.to(dtype), torch.arange(ids.shape[1]).expand_as(ids).to(dtype))
            assert torch.equal(out, ref), f"{dtype} ids differ by {(out - ref).abs().max()}"


@pytest.mark.parametrize("name", ["input_ids", "token_type_ids", "position_ids"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16, torch.complex64])
def test_bool_and_floating_ids_are_type_errors(model, name, dtype):
    args = {"input_ids": torch.ones(1, 3, dtype=torch.long), name: torch.ones(1, 3).to(dtype)}
    with pytest.raises(TypeError, match=f"{name} must be an integer tensor, got {dtype}"):
        model(**args)


def test_ids_out_of_range_in_any_dtype(model):
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=50\)"):
        model(torch.tensor([[1, 200]], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=50\)"):
        model(torch.tensor([[1, -3]], dtype=torch.int8))
    with pytest.raises(ValueError, match="input_ids must lie"):
        model(torch.tensor([[1, 2**64 - 1]], dtype=torch.uint64))  # wraps negative as int64: still refused
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, type_vocab_size=3\)"):
        model(torch.ones(1, 2, dtype=torch.long), token_type_ids=torch.tensor([[0, 3]], dtype=torch.uint16))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, max_position_embeddings=16\); got values "
                                         r"in \[0, 16\]"):
        model(torch.ones(1, 2, dtype=torch.long), position_ids=torch.tensor([[0, 16]], dtype=torch.int16))


# ---- keyword arguments ----------------------------------------------------------------------------------------

def test_misspelled_keyword_is_a_type_error(model):
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(TypeError, match="unexpected keyword argument 'attn_mask'; did you mean 'attention_mask'"):
        model(ids, attn_mask=mask)
    with pytest.raises(TypeError, match="unexpected keyword argument 'quantize'"):
        model(ids, quantize="int8")
    head = FastStudentForSequenceClassification(tiny_config()).eval()
    with pytest.raises(TypeError, match="'attn_mask'"):
        head(ids, attn_mask=mask)


def test_harmless_bert_keywords_are_accepted(model):
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref = hidden(model, ids, mask)
    for kw in (dict(use_cache=False), dict(use_cache=True), dict(output_attentions=False), dict(head_mask=None),
               dict(inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None),
               dict(past_key_values=None, cache=None, cache_position=None), dict(output_attentions=None),
               dict(num_items_in_batch=torch.tensor(4))):
        assert torch.equal(hidden(model, ids, mask, **kw), ref), kw
    with torch.no_grad():
        out = model(ids, mask, return_dict=None, output_hidden_states=None)  # None: the default, as in transformers
    assert torch.equal(out.last_hidden_state, ref) and out.hidden_states is None
    assert isinstance(model(ids, mask, return_dict=False), tuple)


@pytest.mark.parametrize("kw, match", [
    (dict(output_attentions=True), "output_attentions=True: it never materialises attention probabilities"),
    (dict(inputs_embeds=torch.zeros(2, 3, 16)), "inputs_embeds=<tensor"),
    (dict(head_mask=torch.ones(2, 2)), "head_mask"),
    (dict(encoder_hidden_states=torch.zeros(2, 3, 16)), "encoder_hidden_states.*cross-attention"),
    (dict(past_key_values=()), "past_key_values.*cache"),
    (dict(cache=()), "cache"),
    (dict(is_causal=True), "is_causal"),
    (dict(cu_seq_lens_q=torch.tensor([0, 3])), "cu_seq_lens_q"),
])
def test_unsupported_bert_keywords_are_refused_by_name(model, kw, match):
    with pytest.raises(ValueError, match=match):
        model(torch.ones(2, 3, dtype=torch.long), **kw)


# ---- attention masks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [2, -1, 0.5, float("nan"), float("inf")])
def test_mask_values_other_than_0_and_1_are_refused(model, value):
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    mask[0, 1] = value
    for dt in ((torch.float32, torch.int64, torch.int8) if float(value).is_integer() else (torch.float32,)):
        with pytest.raises(ValueError, match=f"attention_mask must hold only 0 .* and 1 .*, got {value}"):
            model(torch.ones(1, 3, dtype=torch.long), mask.to(dt))


def test_masks_of_any_dtype_agree(model):
    ids = torch.tensor([[4, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    ref = hidden(model, ids, mask)
    for dt in (torch.bool, torch.uint8, torch.int32, torch.uint32, torch.float16, torch.float64):
        assert torch.equal(hidden(model, ids, mask.to(dt)), ref), dt


def test_complex_mask_is_a_type_error(model):
    with pytest.raises(TypeError, match="attention_mask must be a bool, integer or floating tensor"):
        model(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.complex64))


@pytest.mark.parametrize("name", ["attention_mask", "token_type_ids", "position_ids", "input_ids"])
def test_lists_are_type_errors(model, name):
    args = {"input_ids": torch.ones(1, 3, dtype=torch.long), name: [[1, 1, 0]]}
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        model(**args)


# ---- empty inputs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "native"])
def test_empty_batch_gives_empty_outputs_and_empty_sequences_are_refused(model, backend):
    with backend_or_skip(backend):
        for mask in (None, torch.ones(0, 4, dtype=torch.long)):
            out = model(torch.zeros(0, 4, dtype=torch.long), mask, output_hidden_states=True)
            assert out.last_hidden_state.shape == (0, 4, 16) and out.pooler_output.shape == (0, 16)
            assert len(out.hidden_states) == 2 and out.hidden_states[1].shape == (0, 4, 16)
        for shape in ((2, 0), (0, 0)):
            with pytest.raises(ValueError, match=r"every sequence needs at least one token"):
                model(torch.zeros(shape, dtype=torch.long))


# ---- cu_seqlens of the public ops -----------------------------------------------------------------------------

BAD_CU = [([0, 3, 2, 5], 3, "never decrease"), ([0, 3, 6], 3, "end at the token count 5"),
          ([0, 2, 4], 2, "end at the token count 5"), ([1, 3, 5], 2, "start at 0"), ([], 3, r"\(batch \+ 1,\)"),
          ([0, 2, 5], 2, r"longest sequence \(3\)"), ([0, 2, 5], 6, r"token count \(5\), got 6"),
          ([0, 5], 2**62, "got 4611686018427387904")]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("cu, max_seqlen, match", BAD_CU)
def test_varlen_attention_refuses_bad_cu_seqlens(backend, cu, max_seqlen, match):
    q = torch.randn(5, 2, 16)
    with backend_or_skip(backend), pytest.raises(ValueError, match=match):
        ops.varlen_attention(q, q, q, torch.tensor(cu, dtype=torch.int32), max_seqlen)


def test_varlen_attention_argument_types():
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="max_seqlen must be an integer"):
        ops.varlen_attention(q, q, q, cu, 3.0)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        ops.varlen_attention(q, q, q, [0, 2, 5], 3)
    # valid: an upper bound for max_seqlen, a 0-d tensor for it, int64 boundaries, empty sequences
    ref = ops.varlen_attention(q, q, q, cu, 3)
    assert torch.equal(ops.varlen_attention(q, q, q, cu.long(), torch.tensor(5)), ref)
    ops.varlen_attention(q, q, q, torch.tensor([0, 0, 5, 5]), 5)


@pytest.mark.parametrize("cu, max_seqlen, match", BAD_CU[:3])
def test_relation_kl_refuses_bad_cu_seqlens(cu, max_seqlen, match):
    a = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match=match):
        ops.relation_kl_rows(a, a, a, a, num_relation_heads=2, cu_seqlens=torch.tensor(cu), max_seqlen=max_seqlen)


# ---- config values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, exc, match", [
    ("num_attention_heads", 0, ValueError, "num_attention_heads must be a positive integer, got 0"),
    ("hidden_size", "384", TypeError, r"hidden_size must be a positive integer, got '384' \(str\)"),
    ("num_hidden_layers", 2.5, TypeError, r"num_hidden_layers must be a positive integer, got 2.5"),
    ("num_hidden_layers", True, TypeError, "num_hidden_layers must be a positive integer, got True"),
    ("vocab_size", 0, ValueError, "vocab_size must be a positive integer, got 0"),
    ("num_attention_heads", 5, ValueError, "hidden_size 64 is not divisible by num_attention_heads 5"),
    ("layer_norm_eps", -1e-12, ValueError, r"layer_norm_eps must be a finite number > 0, got -1e-12"),
    ("layer_norm_eps", float("nan"), ValueError, "layer_norm_eps"),
    ("hidden_dropout_prob", -0.1, ValueError, r"hidden_dropout_prob must be in \[0, 1\), got -0.1"),
    ("attention_probs_dropout_prob", 1.0, ValueError, "attention_probs_dropout_prob"),
    ("hidden_act", "swish", ValueError, "hidden_act must be one of BERT's GELU variants"),
    ("hidden_act", None, TypeError, "hidden_act"),
    ("pad_token_id", 211, ValueError, r"pad_token_id must be in \[0, vocab_size=211\) or null, got 211"),
    ("initializer_range", "0.02", TypeError, "initializer_range"),
])
def test_bad_config_values_name_field_value_and_file(tmp_path, field, value, exc, match):
    d = hf_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(exc, match=match) as e:
        FastStudent.from_pretrained(d)
    assert str(d / "config.json") in str(e.value)


def test_layer_norm_eps_below_zero_no_longer_loads_as_nan():
    with pytest.raises(ValueError, match="layer_norm_eps"):
        tiny_config(layer_norm_eps=-1.0)


def test_config_file_that_is_not_an_object_or_not_utf8(tmp_path):
    d = hf_dir(tmp_path)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{d / 'config.json'} must hold a JSON object, got a JSON list")):
        FastStudent.from_pretrained(d)
    (d / "config.json").write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(OSError, match="is not UTF-8"):
        FastStudent.from_pretrained(d)


def test_a_billion_layers_fail_before_allocating(tmp_path):
    d = hf_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9
    cfg["vocab_size"] = 10**12
    (d / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        FastStudent.from_pretrained(d)
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "num_hidden_layers is 1000000000 but the checkpoint holds 2 layers" in msg
    assert "embeddings.word_embeddings.weight is (211, 64) but the config implies (1000000000000, 64)" in msg
    assert "config.json" in msg


def test_heads_zero_is_one_line_from_the_cli(tmp_path, capsys):
    from fastdistil.cli import main
    d = hf_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = 0
    (d / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "in.txt").write_text("hello\n")
    assert main(["embed", "--model", str(d), "--input", str(tmp_path / "in.txt"),
                 "--output", str(tmp_path / "o.npy")]) == 1
    err = capsys.readouterr().err
    assert "num_attention_heads must be a positive integer, got 0" in err and "Traceback" not in err


# ---- checkpoint files -----------------------------------------------------------------------------------------

def hf_dir(tmp_path, name="hf"):
    from test_model import hf_bert
    d = tmp_path / name
    hf_bert().save_pretrained(d)
    return d


def test_bad_safetensors_index_names_the_file(tmp_path):
    d = hf_dir(tmp_path)
    (d / "model.safetensors").rename(d / "shard-1.safetensors")
    idx = d / "model.safetensors.index.json"
    for text in ('{"metadata": {}}', '{"weight_map": ["shard-1.safetensors"]}', "[]", '{"weight_map": {"a": 3}}'):
        idx.write_text(text)
        with pytest.raises(ValueError, match=f"{re.escape(str(idx))} is not a safetensors index"):
            FastStudent.from_pretrained(d)
    idx.write_text('{"weight_map": {"x": "shard-2.safetensors"}}')
    with pytest.raises(FileNotFoundError, match=r"cannot read .*shard-2.safetensors: No such file"):
        FastStudent.from_pretrained(d)
    idx.write_text(json.dumps({"weight_map": {"x": "shard-1.safetensors"}}))
    assert FastStudent.from_pretrained(d).config.hidden_size == 64


def test_bad_modules_json_names_the_file(tmp_path):
    root = tmp_path / "st"
    root.mkdir()
    for text in ('{"type": "x"}', '[{"type": 3}]', "[1]", "{bad"):
        (root / "modules.json").write_text(text)
        with pytest.raises((ValueError, OSError), match=re.escape(str(root / "modules.json"))):
            FastStudent.from_pretrained(root)


def test_unreadable_weights_say_what_happened(tmp_path, monkeypatch):
    """Root reads any file, so permission denied is simulated where fastdistil opens the file."""
    import builtins

    import fastdistil.loading as loading
    d = hf_dir(tmp_path)

    def denied(path, *a, **kw):
        if str(path).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *a, **kw)

    monkeypatch.setattr(loading, "open", denied, raising=False)
    with pytest.raises(PermissionError, match=r"cannot read .*model.safetensors: Permission denied") as e:
        FastStudent.from_pretrained(d)
    assert "corrupt" not in str(e.value)


def test_integer_tensors_for_float_parameters_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    d = hf_dir(tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["embeddings.position_ids"] = torch.arange(64)[None]  # old checkpoints' int64 buffer: still ignored
    save_file(sd, d / "model.safetensors")
    FastStudent.from_pretrained(d)
    sd["encoder.layer.0.output.dense.bias"] = sd["encoder.layer.0.output.dense.bias"].round().long()
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"non-floating tensors for floating parameters: "
                                              r"encoder.layer.0.output.dense.bias \(torch.int64\)"):
        FastStudent.from_pretrained(d)


def test_from_pretrained_refuses_unknown_keywords(tmp_path):
    d = hf_dir(tmp_path)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'load_in_8bit'"):
        FastStudent.from_pretrained(d, load_in_8bit=True)  # transformers' bitsandbytes flag: ours is quantize="int8"
    with pytest.raises(TypeError, match="'torch_dtype'"):
        FastStudent.from_pretrained(d, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="keyword overrides.*layer_norm_eps must be a finite number > 0"):
        FastStudent.from_pretrained(d, layer_norm_eps=-1.0)
    m = FastStudent.from_pretrained(d, hidden_dropout_prob=0.0, pad_token_id=0)  # config fields: fine
    assert m.config.hidden_dropout_prob == 0.0
    head = FastStudentForSequenceClassification.from_pretrained(d, num_labels=3, problem_type="regression")
    assert head.num_labels == 3 and head.config.extra["problem_type"] == "regression"


# ---- tokenizers -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_without_tokenizer(tmp_path_factory, minilm_dir):
    from pathlib import Path
    d = tmp_path_factory.mktemp("no_tok")
    for f in ("config.json", "model.safetensors"):
        (d / f).symlink_to(Path(minilm_dir) / f)
    return d


def test_a_directory_without_tokenizer_files_is_refused(minilm_without_tokenizer, minilm_dir, tmp_path):
    from fastdistil.loading import load_tokenizer
    with pytest.raises(OSError, match="has no tokenizer files"):
        load_tokenizer(minilm_without_tokenizer)
    assert len(load_tokenizer(minilm_dir)) == 30522
    (tmp_path / "in.txt").write_text("a sentence\n")
    r = subprocess.run([sys.executable, "-m", "fastdistil", "embed", "--model", str(minilm_without_tokenizer),
                        "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "e.npy")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "has no tokenizer files" in r.stderr and not (tmp_path / "e.npy").exists()


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(minilm_without_tokenizer, tmp_path):
    from fastdistil.loading import load_tokenizer
    d = tmp_path / "small_vocab"
    shutil.copytree(minilm_without_tokenizer, d, symlinks=True)
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(ValueError, match="has 6 tokens but the model's vocab_size is 30522"):
        load_tokenizer(d)
    with pytest.raises(ValueError, match="has 6 tokens but the model's vocab_size is 4"):
        load_tokenizer(d, vocab_size=4)  # ids up to 5 could not be embedded by 4 rows
