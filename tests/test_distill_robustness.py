"""`fastdistil distill` and save_pretrained under hostile conditions: a full disk, temporaries of killed runs, a
diverging learning rate, mixed or out-of-range labels, data changed under --resume, the umask (issue 11)."""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from _distill_fixtures import SENTENCES, save_tiny
from fastdistil import FastStudent
from fastdistil.cli import main
from fastdistil.distill import read_examples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    teacher = save_tiny(root / "teacher", "base")
    (root / "data.txt").write_text("\n".join(SENTENCES * 3))
    return root, teacher


def _args(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--recipe", "minilmv2",
            "--max-length", "24", "--batch-size", "4", "--no-progress", *extra]


def _metrics(out):
    def refuse(c):
        raise ValueError(f"bare {c} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- a full disk ----------------------------------------------------------------------------------------------
def test_checkpoint_on_a_full_disk_keeps_the_old_one_and_leaves_no_temporary(setup, tmp_path, monkeypatch,
                                                                            capsys):
    root, teacher = setup
    out = tmp_path / "o"
    from fastdistil.distill import checkpoint as ck
    real, calls = torch.save, []

    def full_on_second(obj, f, *a, **k):  # the second checkpoint finds the disk full half-way
        calls.append(obj["step"])
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_on_second)
    assert main(_args(teacher, root / "data.txt", out, "--max-steps", "3", "--save-every", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastdistil distill: error: disk full") and str(out / "checkpoint.pt") in err[-1]
    monkeypatch.undo()
    assert ck.load(out / "checkpoint.pt")["step"] == 1
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name] and not (out / "final").exists()
    # with space again, --resume continues from step 1
    assert main(_args(teacher, root / "data.txt", out, "--max-steps", "3", "--save-every", "1", "--resume")) == 0
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3] and (out / "final" / "model.safetensors").is_file()


def test_stale_temporaries_of_dead_processes_are_removed_at_start(setup, tmp_path):
    root, teacher = setup
    out = tmp_path / "o"
    (out / "final").mkdir(parents=True)
    dead = _dead_pid()
    stale = [out / f".checkpoint.pt.tmp-{dead}", out / "final" / f".model.safetensors.tmp-{dead}"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        other = out / f".checkpoint.pt.tmp-{live.pid}"  # a write in flight in a live process: not ours to remove
        for p in (*stale, other):
            p.write_bytes(b"x" * 1000)
        assert main(_args(teacher, root / "data.txt", out, "--max-steps", "1", "--resume")) == 0
        assert not any(p.exists() for p in stale) and other.exists()
    finally:
        live.kill()
        live.wait()


def test_save_pretrained_honours_the_umask_and_cleans_up_after_a_failed_write(setup, tmp_path):
    _, teacher = setup
    model = FastStudent.from_pretrained(teacher)
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert "model.safetensors" in modes and "vocab.txt" in modes and set(modes.values()) == {0o644}, modes
    # a write that fails half-way (a file-size limit: EFBIG, as real as ENOSPC) keeps the old files, leaves no
    # temporary, and names the file
    before = (tmp_path / "a" / "model.safetensors").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError, match="model.safetensors") as e:
            model.save_pretrained(tmp_path / "a")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, prev)
    assert e.value.errno == errno.EFBIG
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == before
    assert sorted(modes) == sorted(p.name for p in (tmp_path / "a").iterdir())


def test_save_pretrained_says_disk_full(setup, tmp_path, monkeypatch):
    _, teacher = setup
    from fastdistil import atomic
    model = FastStudent.from_pretrained(teacher)

    def full(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic._Recorder, "write", full)
    with pytest.raises(OSError, match="disk full: cannot write .*model.safetensors"):
        model.save_pretrained(tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []


# ---- a diverging run ------------------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_an_error_and_writes_no_nan(setup, tmp_path, capsys):
    root, teacher = setup
    out = tmp_path / "o"
    assert main(_args(teacher, root / "data.txt", out, "--max-steps", "6", "--save-every", "1", "--lr", "1e6")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "not updated" in err[-1] and "--lr 1e+06" in err[-1]
    m = _metrics(out)  # strict JSON: the failed step's values are null, never a bare NaN
    assert m[-1]["error"] and None in (m[-1]["loss"], m[-1]["grad_norm"])
    assert all(x["loss"] is not None and "error" not in x for x in m[:-1])
    assert not (out / "final").exists()
    from fastdistil.distill import checkpoint as ck
    state = ck.load(out / "checkpoint.pt")
    assert state["step"] == len(m) - 1
    assert all(torch.isfinite(t).all() for t in state["distiller"]["core"].values() if t.is_floating_point())


def test_distiller_step_leaves_the_weights_alone_on_a_nan_loss(setup):
    _, teacher = setup
    from fastdistil.distill import Distiller, NonFiniteError, RelationKL, student_from_teacher
    from fastdistil.distill.models import load_model
    t = load_model(str(teacher), role="teacher")
    s = student_from_teacher(t, [0, 2])
    d = Distiller(t, s, [RelationKL(1.0, relation_heads=4)], lr=1e-3)
    ids = torch.randint(1000, 2000, (2, 8))
    d.step({"input_ids": ids})
    with torch.no_grad():
        dict(s.named_parameters())["embeddings.LayerNorm.weight"][0] = float("nan")
    before = {k: v.clone() for k, v in d.core.state_dict().items()}
    with pytest.raises(NonFiniteError, match="step 2"):
        d.step({"input_ids": ids})
    after = d.core.state_dict()
    assert d.global_step == 1 and before.keys() == after.keys()
    for k in after:  # nothing but the NaN we planted changed: no optimizer update happened
        torch.testing.assert_close(after[k], before[k], equal_nan=True, rtol=0, atol=0)
    assert all(p.grad is None for p in d.core.parameters())


# ---- labels ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels,match", [
    ([1, "1"], r"mix integers \(first on line 1\) and strings \(first on line 2\)"),
    ([1, 1.0], r":2: label 1.0 is a float \(write 1\)"),
    ([1, True], r":2: label true is a bool"),
    ([0, [1]], r":2: label \[1\] is a list"),
    ([0, -3], r":2: label -3 is negative"),
])
def test_labels_of_mixed_or_wrong_types_are_refused_with_a_line(tmp_path, labels, match):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"text {i}", "label": v}) for i, v in enumerate(labels)) + "\n")
    with pytest.raises(ValueError, match=match):
        read_examples(p)


def test_label_types_one_per_file_still_work(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": "t", "label": v}) for v in (2, 0, 2)))
    assert read_examples(p).labels == [2, 0, 2]
    p.write_text("\n".join(json.dumps({"text": "t", "label": v}) for v in ("pos", "neg", "pos")))
    assert read_examples(p).labels == [1, 0, 1]
    (tmp_path / "d.tsv").write_text("a\t1\r\nb\t0\r\n")
    assert read_examples(tmp_path / "d.tsv").labels == [1, 0]
    (tmp_path / "j.jsonl").write_text(json.dumps({"text": "a\u2028b\x85c", "label": 0}, ensure_ascii=False) + "\n")
    assert read_examples(tmp_path / "j.jsonl").texts == ["a\u2028b\x85c"]  # not split inside a JSON string


def test_a_huge_label_is_a_clear_error_not_a_huge_allocation(setup, tmp_path, capsys):
    root, _ = setup
    teacher = save_tiny(tmp_path / "cls", "cls", layers=2)
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "label": [0, 1, 10 ** 9][i % 3]}) for i, t in enumerate(SENTENCES)))
    # this built 10^9 label names once (tens of GB): read it in a child whose address space is capped 2 GB above
    # what it holds, so a regression fails with MemoryError instead of exhausting the machine
    code = ("import resource, sys; from fastdistil.distill import read_examples; "
            "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 2 ** 31, resource.RLIM_INFINITY)); "
            "print(max(read_examples(sys.argv[1]).labels))")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(),
                                                                                         os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0 and r.stdout.strip() == str(10 ** 9), r.stderr[-2000:]
    assert main(_args(teacher, p, tmp_path / "o", "--recipe", "distilbert", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert f"{p}:3: label 1000000000 is out of range: the teacher classifies 3 classes" in err, err


# ---- resume -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["data", "tokenizer"])
def test_resume_refuses_changed_data_or_tokenizer(setup, tmp_path, capsys, change):
    root, teacher = setup
    data, tdir = tmp_path / "data.txt", tmp_path / "teacher"
    shutil.copyfile(root / "data.txt", data)
    shutil.copytree(teacher, tdir)
    out = tmp_path / "o"
    args = _args(tdir, data, out, "--max-steps", "2", "--save-every", "1")
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0  # unchanged: accepted (nothing left to train)
    if change == "data":
        data.write_text(data.read_text().replace("fox", "cat"))  # same path, same size, other content
    else:
        cfg = json.loads((tdir / "tokenizer_config.json").read_text())
        cfg["do_lower_case"] = not cfg.get("do_lower_case", True)
        (tdir / "tokenizer_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    what = "the training data" if change == "data" else "the teacher's tokenizer files"
    assert f"--resume: {what} changed" in err, err
