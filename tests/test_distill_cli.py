"""`fastdistil distill` end to end on tiny random checkpoints: outputs, exact resume after SIGKILL of a real
subprocess, torchrun with 2 processes (gloo, CPU) against one process with the same global batch, clear errors."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from _distill_fixtures import SENTENCES, save_tiny
from fastdistil.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    teacher = save_tiny(root / "teacher", "base")
    (root / "data.txt").write_text("\n".join(SENTENCES * 3))
    rnd = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
    # every line truncates to --max-length 16: equal token counts per rank, so DDP's mean of per-rank means
    # equals the single-process mean
    (root / "long.txt").write_text("\n".join(" ".join(rnd.choice(words) for _ in range(40)) for _ in range(32)))
    return root, teacher


def _env():
    env = dict(os.environ)
    env.setdefault("FASTDISTIL_BACKEND", "torch")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    return env


def _cmd(teacher, data, out, *extra):
    return [sys.executable, "-m", "fastdistil", "distill", "--teacher", str(teacher), "--data", str(data),
            "--out", str(out), "--max-length", "24", "--batch-size", "4", "--no-progress", *extra]


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_reaches_the_same_final_loss(setup):
    root, teacher = setup
    args = ("--recipe", "xtremedistil", "--max-steps", "24", "--save-every", "2")
    a, b = root / "uninterrupted", root / "killed"
    subprocess.run(_cmd(teacher, root / "data.txt", a, *args), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_cmd(teacher, root / "data.txt", b, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = b / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(_losses(b)) < 24
    r = subprocess.run(_cmd(teacher, root / "data.txt", b, *args, "--resume"), env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    ma, mb = _losses(a), _losses(b)
    assert [m["step"] for m in mb] == list(range(1, 25))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]  # bit-identical, every step
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()
    # outputs: metrics per step with loss, and a final HF directory transformers loads with its tokenizer
    assert {"step", "loss", "hidden_mse", "lr", "tokens_per_s", "phase"} <= set(ma[0])
    assert ma[0]["phase"] == "stage1" and ma[-1]["phase"].startswith("stage2")
    # resuming a finished run trains nothing and leaves the metrics as they are
    assert main(_cmd(teacher, root / "data.txt", a, *args, "--resume")[3:]) == 0
    assert [m["loss"] for m in _losses(a)] == [m["loss"] for m in ma]
    import transformers
    model = transformers.BertModel.from_pretrained(a / "final")
    tok = transformers.AutoTokenizer.from_pretrained(a / "final")
    assert model.config.num_hidden_layers == 2 and tok("hello world")["input_ids"][0] == tok.cls_token_id


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process(setup):
    root, teacher = setup
    args = ("--recipe", "xtremedistil", "--max-steps", "8", "--max-length", "16")
    one, two = root / "one", root / "two"
    subprocess.run(_cmd(teacher, root / "long.txt", one, *args), check=True, env=_env(), capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "fastdistil", *_cmd(teacher, root / "long.txt", two, *args)[3:]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    l1, l2 = [m["loss"] for m in _losses(one)], [m["loss"] for m in _losses(two)]
    assert len(l1) == len(l2) == 8
    # 8 steps cover stage 1 and every unfreezing phase of stage 2 (DDP re-wrapped at each change)
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)


def test_student_checkpoint_and_task_labels(setup, tmp_path, capsys):
    """--student PATH with a classifier teacher, string labels mapped through the teacher's label2id."""
    root, _ = setup
    teacher = save_tiny(tmp_path / "cls_teacher", "cls")
    student = save_tiny(tmp_path / "cls_student", "cls", seed=1, layers=2)
    labels = ["neg", "pos", "neutral"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": labels[i % 3]})
                                                for i, t in enumerate(SENTENCES)))
    out = tmp_path / "o"
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--recipe", "distilbert",
                 "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--max-length", "16", "--no-progress"]) == 0
    m = _losses(out)
    assert {"logit_kd", "label_ce", "hidden_cosine"} <= set(m[-1]) and len(m) == 2
    import transformers
    assert transformers.BertForSequenceClassification.from_pretrained(out / "final").config.num_labels == 3


@pytest.mark.parametrize("case", ["teacher", "data", "jsonl", "layers", "exists", "steps"])
def test_clear_errors(setup, tmp_path, capsys, case):
    root, teacher = setup
    args = ["distill", "--teacher", str(teacher), "--recipe", "minilmv2", "--data", str(root / "data.txt"),
            "--out", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]
    expect = {"teacher": "teacher", "data": "does not exist", "jsonl": "not valid JSON", "layers": "only 4",
              "exists": "--resume", "steps": "--max-steps"}[case]
    if case == "teacher":
        args[2] = str(tmp_path / "nowhere")
    elif case == "data":
        args[6] = str(tmp_path / "missing.txt")
    elif case == "jsonl":
        (tmp_path / "bad.jsonl").write_text("{oops\n")
        args[6] = str(tmp_path / "bad.jsonl")
    elif case == "layers":
        args += ["--student-layers", "0,1,2,3,0"]
    elif case == "exists":
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "checkpoint.pt").write_bytes(b"x")
    elif case == "steps":
        args[args.index("--max-steps") + 1] = "0"
    assert main(args) == (2 if case == "steps" else 1)  # --max-steps 0: a usage error, from argparse
    err = capsys.readouterr().err
    assert "fastdistil distill: error:" in err and expect in err, err


def test_atomic_save_keeps_the_old_checkpoint_when_interrupted(tmp_path, monkeypatch):
    from fastdistil.distill import checkpoint as ck
    path = tmp_path / "checkpoint.pt"
    ck.atomic_save({"step": 1}, path)

    def torn(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert ck.load(path) == {"step": 1}
