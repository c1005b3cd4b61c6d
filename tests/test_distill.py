"""fastdistil.distill: data, order, students, taps vs transformers, objectives' routing, recipes, the XtremeDistil
schedule, the teacher cache, inference-mode teacher, MLM distillation and the HF Trainer subclass. Tiny random
BERT configs only (the quality example with real weights is not part of the test run)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from _distill_fixtures import SENTENCES, save_tiny, tiny_config
from fastdistil import FastStudent, FastStudentForSequenceClassification, losses
from fastdistil.distill import (Distiller, Examples, FastStudentForMaskedLM, StepOrder, TeacherCache,
                                align_labels, build_recipe, collate, default_corpus, encode, forward_side,
                                load_model, read_examples, student_from_teacher)
from fastdistil.distill.models import Needs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return {k: save_tiny(root / k, k) for k in ("base", "cls", "mlm")}


@pytest.fixture(scope="module")
def tok(dirs):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(dirs["base"])


@pytest.fixture(scope="module")
def enc(tok):
    return encode(Examples(SENTENCES * 2, labels=[i % 3 for i in range(2 * len(SENTENCES))]), tok, 24)


# ---------------------------------------------------------------------------------------------- data
def test_read_examples_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line \n")
    assert read_examples(tmp_path / "a.txt").texts == ["first line", "second line"]
    rows = [{"text": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}, {"text": "ok", "label": "pos"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_examples(tmp_path / "b.jsonl")
    assert ex.texts == ["good", "bad", "ok"] and ex.label_names == ["neg", "pos"] and ex.labels == [1, 0, 1]
    align_labels(ex, {"neg": 0, "pos": 1})
    assert ex.labels == [1, 0, 1]
    align_labels(ex, {"pos": 0, "neg": 1})  # the teacher's ids win over the sorted order
    assert ex.labels == [0, 1, 0] and ex.label_names == ["pos", "neg"]
    with pytest.raises(ValueError, match="not among the teacher's labels"):
        align_labels(ex, {"pos": 0, "other": 1})
    (tmp_path / "c.tsv").write_text("text\ttext_b\tlabel\nA\tB\t1\nC\tD\t0\n")
    ex = read_examples(tmp_path / "c.tsv")
    assert ex.pairs == ["B", "D"] and ex.labels == [1, 0]
    (tmp_path / "d.tsv").write_text("x y\t2\nz\t0\n")
    assert read_examples(tmp_path / "d.tsv").labels == [2, 0]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_examples(tmp_path / "bad.jsonl")
    (tmp_path / "half.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="no label"):
        read_examples(tmp_path / "half.jsonl")
    with pytest.raises(OSError, match="does not exist"):
        read_examples(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="extension"):
        (tmp_path / "e.csv").write_text("a,b\n")
        read_examples(tmp_path / "e.csv")


def test_default_corpus_is_prose_and_deterministic():
    c = default_corpus()
    assert len(c) > 1000 and len(set(c)) == len(c)
    assert list(c) == sorted(c, key=lambda t: hashlib.sha1(t.encode()).hexdigest())  # order: by hash, not by disk
    assert all(">>>" not in t and t[0].isupper() for t in c[:200])


def test_step_order_is_pure_and_ranks_partition_the_global_batch():
    o = StepOrder(10, seed=3, global_batch=4)
    steps = [o.indices(s) for s in range(5)]  # 20 examples = two epochs
    assert sorted(torch.cat(steps[:2] + [steps[2][:2]]).tolist()) == list(range(10))
    assert torch.equal(StepOrder(10, 3, 4).indices(4), steps[4])  # no state: step 4 directly
    r0, r1 = StepOrder(10, 3, 4, 0, 2), StepOrder(10, 3, 4, 1, 2)
    for s in range(5):
        assert torch.equal(torch.cat([r0.indices(s), r1.indices(s)]), steps[s])
    with pytest.raises(ValueError, match="multiple"):
        StepOrder(10, 0, 5, 0, 2)


def test_collate_packs_without_padding(enc):
    b = collate(enc, [3, 0, 9])
    lens = enc.lengths()[[3, 0, 9]]
    assert b.num_tokens == int(lens.sum()) and b.packing.cu_seqlens.tolist() == [0, *torch.cumsum(lens, 0).tolist()]
    assert b.position_ids[: int(lens[0])].tolist() == list(range(int(lens[0])))
    assert b.labels.tolist() == [0, 0, 0] and b.index.tolist() == [3, 0, 9]


# ---------------------------------------------------------------------------------------------- models
def test_student_from_teacher_copies_the_chosen_layers(dirs):
    t = load_model(dirs["cls"], role="teacher")
    s = student_from_teacher(t, [3, 1])
    assert isinstance(s, FastStudentForSequenceClassification) and s.config.num_hidden_layers == 2
    assert torch.equal(s.bert.encoder.layer[0].output.dense.weight, t.bert.encoder.layer[3].output.dense.weight)
    assert torch.equal(s.bert.encoder.layer[1].attention.self.key.bias, t.bert.encoder.layer[1].attention.self.key.bias)
    assert torch.equal(s.classifier.weight, t.classifier.weight)
    with pytest.raises(ValueError, match="out of range"):
        student_from_teacher(t, [0, 4])
    with pytest.raises(ValueError, match="only 4"):
        student_from_teacher(t, [0, 1, 2, 3, 0])


def test_taps_match_transformers(dirs, enc):
    """Packed taps (hidden states, q, k, v) of the teacher equal transformers' padded eager forward, float64."""
    import transformers
    m = load_model(dirs["base"]).double()
    hf = transformers.BertModel.from_pretrained(dirs["base"], attn_implementation="eager").double().eval()
    cap = {}
    lay = hf.encoder.layer[2].attention.self
    hooks = [getattr(lay, n).register_forward_hook(lambda mod, i, o, n=n: cap.__setitem__(n, o))
             for n in ("query", "key", "value")]
    b = collate(enc, [1, 9, 4])
    with torch.inference_mode():
        side = forward_side(m, b, Needs(hidden={0, 2, 4}, qkv={3}, mean=True, cls=True))
    ids = torch.zeros(3, b.packing.max_seqlen, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for j, i in enumerate([1, 9, 4]):
        row = enc.ids[enc.offsets[i]:enc.offsets[i + 1]]
        ids[j, :len(row)], mask[j, :len(row)] = row, 1
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, output_hidden_states=True)
    for h in hooks:
        h.remove()
    real = mask.bool()
    for i in (0, 2, 4):
        torch.testing.assert_close(side.hidden[i], out.hidden_states[i][real], rtol=1e-9, atol=1e-9)
    for n, k in (("query", "q"), ("key", "k"), ("value", "v")):
        torch.testing.assert_close(side.qkv[3][k].reshape(b.num_tokens, -1), cap[n][real], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(side.cls, out.last_hidden_state[:, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(side.mean, losses.mean_pool(out.last_hidden_state, mask=mask), rtol=1e-9, atol=1e-9)


def test_forward_stops_as_deep_as_the_objectives_read(dirs, enc, monkeypatch):
    """q/k/v of layer 3 only: layers 1-2 run in full, layer 3 stops after its q/k/v projection, layer 4 never
    runs; the values equal the full forward's."""
    m = load_model(dirs["base"])
    b = collate(enc, [1, 9, 4])
    with torch.inference_mode():
        full = forward_side(m, b, Needs(hidden={2}, qkv={3}, mean=True))
    calls = []
    for i, layer in enumerate(m.encoder.layer):
        orig = layer.forward
        monkeypatch.setattr(layer, "forward", lambda *a, i=i, orig=orig, **k: (calls.append(i), orig(*a, **k))[1])
    with torch.inference_mode():
        part = forward_side(m, b, Needs(hidden={2}, qkv={3}))
    assert calls == [0, 1] and part.last is None
    # fp32 tolerance, not bitwise: under native, layers with taps run the op path and others the fused C++ layer
    torch.testing.assert_close(part.hidden[2], full.hidden[2], rtol=1e-5, atol=1e-5)
    for k in "qkv":
        torch.testing.assert_close(part.qkv[3][k], full.qkv[3][k], rtol=1e-5, atol=1e-5)


def test_mlm_head_matches_transformers(dirs, enc):
    import transformers
    m = load_model(dirs["mlm"])
    assert isinstance(m, FastStudentForMaskedLM)
    hf = transformers.BertForMaskedLM.from_pretrained(dirs["mlm"]).eval()
    b = collate(enc, [2])
    b.extra["mlm_pos"] = torch.arange(b.num_tokens)
    with torch.inference_mode():
        ours = forward_side(m, b, Needs(logits=True)).logits
        ref = hf(b.ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- distiller
def _distiller(dirs, recipe, teacher="base", layers=(1, 3), max_steps=10, **kw):
    t = load_model(dirs[teacher], role="teacher")
    s = student_from_teacher(t, list(layers))
    r = build_recipe(recipe, t, s, max_steps=max_steps, has_labels=kw.pop("has_labels", False))
    return Distiller(t, s, r.objectives, plan=r.plan, max_steps=max_steps, lr=1e-3, **kw)


def test_minilmv2_and_hidden_losses_equal_an_independent_padded_computation(dirs, enc):
    """The distiller's packed losses equal the same objectives on transformers' padded outputs (float64)."""
    import transformers
    d = _distiller(dirs, "minilmv2")
    d.teacher.double(), d.core.double()
    b = collate(enc, [0, 5, 9, 2])
    got = d(b)["relation_kl"]
    pad = lambda m: transformers.BertModel.from_pretrained(m.name_or_path, attn_implementation="eager")  # noqa
    ids = torch.zeros(4, b.packing.max_seqlen, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for j, i in enumerate([0, 5, 9, 2]):
        row = enc.ids[enc.offsets[i]:enc.offsets[i + 1]]
        ids[j, :len(row)], mask[j, :len(row)] = row, 1

    def qkv(model, layer):
        hf = model.to_hf().double().eval()
        cap = {}
        sa = hf.encoder.layer[layer].attention.self
        hs = [getattr(sa, n).register_forward_hook(lambda mod, i, o, n=n: cap.__setitem__(n[0], o))
              for n in ("query", "key", "value")]
        with torch.no_grad():
            hf(ids, attention_mask=mask)
        for h in hs:
            h.remove()
        return cap

    s, t = qkv(d.student, 1), qkv(d.teacher, 3)
    want = sum(losses.relation_kl_loss(s[x], s[x], t[x], t[x], num_relation_heads=4, attention_mask=mask)
               for x in "qkv")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert got > 1e-4  # tiny configs with initializer_range 0.2 give real relations, not ~0

    x = _distiller(dirs, "xtremedistil")
    x.teacher.double(), x.core.double()
    got = x(b)["hidden_mse"]
    hs = x.student.to_hf().double()(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ht = x.teacher.to_hf().double()(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    proj = x.objectives["hidden_mse"].proj
    want = sum(losses.hidden_mse_loss(hs[a], ht[c], projection=proj, index=j, mask=mask)
               for j, (a, c) in enumerate([(0, 0), (1, 2), (2, 4)])) / 3
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_dict_batch_equals_packed_batch_and_step_trains(dirs, enc, tok):
    d = _distiller(dirs, "minilm")
    b = collate(enc, [0, 1, 2])
    hf = tok([SENTENCES[i] for i in (0, 1, 2)], padding=True, truncation=True, max_length=24, return_tensors="pt")
    torch.testing.assert_close(d(dict(hf))["loss"], d(b)["loss"], rtol=1e-5, atol=1e-7)
    w = d.student.encoder.layer[1].attention.self.query.weight.clone()
    r = d.step(b)
    assert set(r) >= {"loss", "attention_kl", "value_relation_kl", "lr", "grad_norm", "tokens"}
    assert d.global_step == 1 and not torch.equal(w, d.student.encoder.layer[1].attention.self.query.weight)


def test_fit_runs_the_complete_loop(dirs, enc):
    d = _distiller(dirs, "embedding", max_steps=3)
    order = StepOrder(len(enc), 0, 4)
    seen = []
    hist = d.fit((collate(enc, order.indices(s)) for s in range(10)), callback=seen.append)
    assert [h["step"] for h in hist] == [1, 2, 3] and len(seen) == 3 and d.global_step == 3
    assert hist[0]["lr"] > 0 and hist[-1]["lr"] > 0 and all(h["tokens"] > 0 for h in hist)


def test_teacher_runs_under_inference_mode_and_is_frozen(dirs, enc, monkeypatch):
    d = _distiller(dirs, "minilmv2")
    seen = []
    emb = d.teacher.embeddings
    orig = type(emb).forward

    def spy(self, *a, **k):
        seen.append((self is emb, torch.is_inference_mode_enabled()))
        return orig(self, *a, **k)
    monkeypatch.setattr(type(emb), "forward", spy)
    d.step(collate(enc, [0, 1]))
    assert seen == [(True, True), (False, False)]  # the teacher's forward, then the student's
    assert not any(p.requires_grad for p in d.teacher.parameters()) and not d.teacher.training
    assert all(p.grad is None for p in d.teacher.parameters())


def test_xtremedistil_stage_schedule_freezes_the_right_parameters(dirs, enc):
    """20 steps, labels: stage 1 = steps 0-7 (hidden MSE), stage 2 = 8-15 in n+2 = 4 phases of 2 steps
    (head only -> + layer 1 -> + layer 0 -> + embeddings), stage 3 = 16-19 (labels, everything trains)."""
    d = _distiller(dirs, "xtremedistil", teacher="cls", max_steps=20, has_labels=True)
    p = d.plan
    emb, l0, l1 = "student.bert.embeddings.", "student.bert.encoder.layer.0.", "student.bert.encoder.layer.1."
    head = ("student.bert.pooler.", "student.classifier.")

    def frozen(step):
        d._apply_phase(p.phase(step))
        names = d.frozen_parameters()
        return {g: any(n.startswith(g) for n in names) for g in (emb, l0, l1, *head)}, d.phase

    f, ph = frozen(0)
    assert ph.weights == {"hidden_mse": 1.0} and not f[emb] and not f[l0] and not f[l1] and f[head[1]]
    assert frozen(7)[1].name == "stage1"
    f, ph = frozen(8)
    assert ph.weights == {"logit_mse": 1.0} and f[emb] and f[l0] and f[l1] and not f[head[0]] and not f[head[1]]
    f, _ = frozen(10)
    assert f[emb] and f[l0] and not f[l1]
    f, _ = frozen(12)
    assert f[emb] and not f[l0] and not f[l1]
    f, _ = frozen(14)
    assert not any(f[g] for g in (emb, l0, l1, *head))
    f, ph = frozen(16)
    assert ph.weights == {"label_ce": 1.0} and not any(f.values())
    assert "objectives.hidden_mse.proj.maps.0.weight" in d.frozen_parameters()
    # a real step in stage 2's first phase changes the classifier only
    d.global_step = 8
    before = {n: q.detach().clone() for n, q in d.core.named_parameters()}
    r = d.step(collate(enc, [0, 1, 2, 3]))
    assert r["phase"] == "stage2.0" and "logit_mse" in r
    changed = {n for n, q in d.core.named_parameters() if not torch.equal(before[n], q)}
    assert changed and all(n.startswith(head) for n in changed), changed


def test_caller_frozen_parameters_stay_frozen_in_every_phase(dirs):
    t = load_model(dirs["cls"])
    s = student_from_teacher(t, [1, 3])
    s.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    r = build_recipe("xtremedistil", t, s, max_steps=20, has_labels=True)
    d = Distiller(t, s, r.objectives, plan=r.plan, max_steps=20)
    name = "student.bert.embeddings.word_embeddings.weight"
    assert all(p is not s.bert.embeddings.word_embeddings.weight for p in d.parameters())
    for step in (0, 8, 14, 16):  # stage 1, stage 2 (embeddings frozen, then unfrozen), stage 3
        d._apply_phase(d.plan.phase(step))
        assert name in d.frozen_parameters()
    assert "student.bert.embeddings.LayerNorm.weight" not in d.frozen_parameters()  # unfrozen by step 16


def test_bfloat16_teacher_for_a_float32_student(dirs, enc):
    d32 = _distiller(dirs, "minilmv2")
    d16 = _distiller(dirs, "minilmv2")
    d16.teacher.to(torch.bfloat16)
    b = collate(enc, [0, 5, 9])
    want, got = d32(b)["relation_kl"], d16(b)["relation_kl"]
    assert got.dtype == torch.float32 and abs(float(got) - float(want)) <= 0.05 * float(want)
    assert torch.isfinite(torch.tensor(d16.step(b)["loss"]))


def test_teacher_cache_serves_the_second_epoch(dirs, enc, tmp_path, monkeypatch):
    d = _distiller(dirs, "embedding")
    fields = {"mean": ((32,), "float32")}
    d.cache = TeacherCache(tmp_path / "c", len(enc), fields, "fp")
    calls = []
    orig = type(d.teacher).forward_packed
    monkeypatch.setattr(type(d.teacher), "forward_packed",
                        lambda self, *a, **k: (calls.append(self is d.teacher), orig(self, *a, **k))[1])
    b = collate(enc, [4, 2, 7])
    first = d(b)
    second = d(b)
    assert calls.count(True) == 1 and d.cache.hits == 1 and d.cache.misses == 1
    for k in first:
        torch.testing.assert_close(first[k], second[k], rtol=1e-6, atol=1e-7)
    # reopened from disk (another epoch, another process) with the same fingerprint: still filled
    again = TeacherCache(tmp_path / "c", len(enc), fields, "fp", create=False)
    assert again.has(["mean"], torch.tensor([4, 2, 7])) and not again.has(["mean"], torch.tensor([0]))
    assert TeacherCache(tmp_path / "c", len(enc), fields, "other").coverage("mean") == 0.0  # stale: reset


def test_distilbert_recipe_with_an_mlm_teacher(dirs, enc):
    d = _distiller(dirs, "distilbert", teacher="mlm")
    r = d.step(collate(enc, [0, 1, 2, 3]))
    assert set(r) >= {"logit_kd", "label_ce", "hidden_cosine"} and all(
        torch.isfinite(torch.tensor(r[k])) for k in ("logit_kd", "label_ce", "hidden_cosine"))
    assert r["loss"] == pytest.approx(5 * r["logit_kd"] + 2 * r["label_ce"] + r["hidden_cosine"], rel=1e-5)


def test_recipe_and_pair_errors(dirs, tmp_path):
    t = load_model(dirs["base"])
    s = student_from_teacher(t, [0])
    with pytest.raises(ValueError, match="teacher logits"):
        build_recipe("distilbert", t, s)
    other = FastStudent(tiny_config(hidden=32, heads=2, layers=1))
    with pytest.raises(ValueError, match="equal head"):
        build_recipe("minilm", t, other)
    build_recipe("minilmv2", t, other)  # relation heads lift the head-count constraint
    wide = FastStudent(tiny_config(hidden=64, heads=4, layers=1))
    with pytest.raises(ValueError, match="wider"):
        Distiller(t, wide, build_recipe("embedding", t, wide, pooling="mean").objectives)
    with pytest.raises(ValueError, match="unknown recipe"):
        build_recipe("tinybert", t, s)


def test_head_dim_64_teacher_with_a_narrow_student(tmp_path, enc):
    """A BERT-base-like head_dim (64) teacher and a head_dim 8 student under minilmv2 (relation heads 2)."""
    tdir = save_tiny(tmp_path / "t64", hidden=128, heads=2, layers=2)
    t = load_model(tdir)
    s = FastStudent(tiny_config(hidden=32, heads=4, layers=1))
    r = build_recipe("minilmv2", t, s, relation_heads=2)
    d = Distiller(t, s, r.objectives, lr=1e-3)
    assert d.step(collate(enc, [0, 3]))["relation_kl"] > 0


def test_trainer_subclass_trains_and_saves_the_student(dirs, tok, tmp_path):
    import transformers
    from transformers import DataCollatorWithPadding, TrainingArguments

    from fastdistil.distill import DistillationTrainer
    d = _distiller(dirs, "minilmv2")
    ds = [dict(tok(t, truncation=True, max_length=24), index=i) for i, t in enumerate(SENTENCES)]
    args = TrainingArguments(str(tmp_path / "tr"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    tr = DistillationTrainer(distiller=d, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok))
    w = d.student.encoder.layer[0].attention.self.query.weight.detach().clone()
    tr.train()
    assert not torch.equal(w, d.student.encoder.layer[0].attention.self.query.weight)
    assert any("distill/relation_kl" in h for h in tr.state.log_history)
    tr.save_model(str(tmp_path / "student"))
    hf = transformers.BertModel.from_pretrained(tmp_path / "student")
    assert hf.config.num_hidden_layers == 2


def test_quality_demo_runs_on_a_tiny_teacher(dirs):
    """The code path of `fastdistil demo`'s distillation part (real weights only in the example, not here)."""
    from fastdistil.distill.quality import distill_quality, report
    res = distill_quality(str(dirs["base"]), layers=(0, 2), steps=2, batch_size=4, max_length=16, held_out=8,
                          progress=False)
    assert set(res) >= {"before", "after", "steps", "seconds"} and -1 <= res["before"] <= 1 and res["steps"] == 2
    assert "held-out" in report(res)
