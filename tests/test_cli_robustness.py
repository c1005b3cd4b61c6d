"""The command line under hostile use: output paths, line splitting, failed writes, bad numbers, Ctrl-C, unexpected
errors and fork after first use. Every case here misbehaved once (issue 11); the crash-type ones run in a
subprocess."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from _distill_fixtures import save_tiny
from fastdistil import FastStudent
from fastdistil.cli import main
from fastdistil.commands.embed import read_lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli_tiny") / "model", "base", layers=2)


def _env():
    env = dict(os.environ)
    env.setdefault("FASTDISTIL_BACKEND", "torch")
    env.pop("FASTDISTIL_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    return env


def _embed(tiny, src, out, *extra):
    return main(["embed", "--model", str(tiny), "--input", str(src), "--output", str(out), *extra])


# ---- output path and rows -------------------------------------------------------------------------------------
def test_embed_writes_exactly_the_output_path(tiny, tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text("one\ntwo\n")
    assert _embed(tiny, src, tmp_path / "emb.bin") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.bin", "t.txt"]  # no emb.bin.npy, no temporary
    assert np.load(tmp_path / "emb.bin").shape == (2, 32)


def test_embed_refuses_a_directory_as_output(tiny, tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text("one\n")
    (tmp_path / "outdir").mkdir()
    assert _embed(tiny, src, tmp_path / "outdir") == 1
    err = capsys.readouterr().err
    assert "is a directory" in err and str(tmp_path / "outdir") in err
    assert not (tmp_path / "outdir.npy").exists() and not any((tmp_path / "outdir").iterdir())


def test_embed_gives_one_row_per_line_split_on_newline_only(tiny, tmp_path):
    lines = ["form\ffeed", "line\u2028separator", "next\x85line", "file\x1cseparator", "lone\rreturn", "",
             "crlf", "last, no newline"]
    raw = "\n".join(lines[:6]) + "\ncrlf\r\n" + lines[7]
    src = tmp_path / "t.txt"
    src.write_bytes(raw.encode())
    assert read_lines(src) == lines  # str.splitlines() gave 13 pieces here
    out = tmp_path / "e.npy"
    assert _embed(tiny, src, out, "--batch-size", "3") == 0
    emb = np.load(out)
    ref = FastStudent.from_pretrained(tiny).encode(lines)  # row i is the embedding of line i + 1, empty included
    assert emb.shape == (8, 32) and np.abs(emb - ref.numpy()).max() <= 1e-6
    src.write_text("a\n\n")  # a final newline ends the last line; the blank line before it is a row
    assert read_lines(src) == ["a", ""]


def test_embed_rejects_input_that_is_not_utf8_or_empty(tiny, tmp_path, capsys):
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\n")
    (tmp_path / "empty.txt").write_text("")
    assert _embed(tiny, tmp_path / "bin.txt", tmp_path / "e.npy") == 1
    assert "not UTF-8" in capsys.readouterr().err
    assert _embed(tiny, tmp_path / "empty.txt", tmp_path / "e.npy") == 1
    assert "empty" in capsys.readouterr().err


# ---- writes that fail -----------------------------------------------------------------------------------------
def test_embed_disk_full_keeps_the_old_file_and_names_the_path(tiny, tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "t.txt", tmp_path / "emb.npy"
    src.write_text("one\ntwo\n")
    out.write_bytes(b"the previous embeddings")
    seen = {}

    def full(fp, array, *args, **kwargs):  # numpy's writer: half the bytes, then ENOSPC
        seen["old file while writing"] = out.read_bytes()
        fp.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np.lib.format, "write_array", full)
    assert _embed(tiny, src, out) == 1
    err = capsys.readouterr().err
    assert "disk full" in err and str(out) in err and "Traceback" not in err
    assert seen["old file while writing"] == b"the previous embeddings"  # a kill -9 then would leave it too
    assert out.read_bytes() == b"the previous embeddings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "t.txt"]  # the temporary is gone


def test_atomic_write_reports_the_real_cause_of_a_failed_torch_save(tmp_path, monkeypatch):
    """torch.save turns a failed write into `inline_container.cc: unexpected pos`; the error must say disk full."""
    import torch

    from fastdistil import atomic
    path = tmp_path / "x.pt"
    torch.save({"old": 1}, path)
    real = atomic._Recorder.write
    budget = [4096]

    def write(self, b):
        budget[0] -= len(b)
        if budget[0] < 0:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real(self, b)
    monkeypatch.setattr(atomic._Recorder, "write", write)
    with pytest.raises(OSError, match="disk full") as e:
        with atomic.atomic_write(path) as f:
            torch.save({"w": torch.zeros(100_000)}, f)
    assert str(path) in str(e.value) and e.value.errno == errno.ENOSPC
    assert torch.load(path) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_atomic_write_files_follow_the_umask(tmp_path):
    from fastdistil.atomic import atomic_write
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a") as f:
            f.write(b"x")
        os.umask(0o077)
        with atomic_write(tmp_path / "b") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600


# ---- numbers on the command line ------------------------------------------------------------------------------
BAD_NUMBERS = [
    ("embed", "--max-length", "-5"), ("embed", "--max-length", "0"), ("embed", "--max-length", "1"),
    ("embed", "--batch-size", "0"), ("embed", "--batch-size", "2.5"),
    ("distill", "--lr", "nan"), ("distill", "--lr", "inf"), ("distill", "--lr", "0"), ("distill", "--lr", "-1e-4"),
    ("distill", "--max-steps", "0"), ("distill", "--batch-size", "-1"), ("distill", "--max-length", "0"),
    ("distill", "--save-every", "0"), ("distill", "--log-every", "0"), ("distill", "--seed", "-1"),
    ("bench", "--rounds", "0"), ("bench", "--threads", "-2"), ("demo", "--rounds", "0"),
    ("demo", "--distill-steps", "0"), ("check-kernels", "--jobs", "0"), ("model-perf", "--bandwidth", "-1"),
    ("model-perf", "--tflops", "nan"), ("model-perf", "--jobs", "0"),
]


@pytest.mark.parametrize("cmd,option,value", BAD_NUMBERS)
def test_bad_numbers_are_one_line_usage_errors(tmp_path, capsys, cmd, option, value):
    base = {"embed": ["--input", "x.txt", "--output", "e.npy"],
            "distill": ["--teacher", "t", "--recipe", "minilmv2", "--out", str(tmp_path / "o")]}.get(cmd, [])
    assert main([cmd, *base, f"{option}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and value in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_encode_rejects_a_max_length_it_used_to_ignore(tiny):
    model = FastStudent.from_pretrained(tiny)
    for bad in (0, -5, 1, 2.5):
        with pytest.raises(ValueError, match="max_length"):
            model.encode(["x"], max_length=bad)


# ---- errors, interrupts, debug --------------------------------------------------------------------------------
def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    import fastdistil.commands.info as info

    def boom(args):
        return 1 // 0
    monkeypatch.setattr(info, "run", boom)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastdistil info: error: ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info"])
    with pytest.raises(ZeroDivisionError):
        main(["info", "--debug"])
    monkeypatch.setenv("FASTDISTIL_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info"])


def test_a_broken_config_is_one_line_in_a_real_process(tiny, tmp_path):
    """A config with 0 attention heads raised ZeroDivisionError through `fastdistil embed` as a traceback."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = 0
    (bad / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "t.txt").write_text("hello\n")
    r = subprocess.run([sys.executable, "-m", "fastdistil", "embed", "--model", str(bad), "--input",
                        str(tmp_path / "t.txt"), "--output", str(tmp_path / "e.npy")], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("fastdistil embed: error:"), r.stderr
    assert not (tmp_path / "e.npy").exists()


def test_ctrl_c_in_embed_exits_130_with_one_line(tiny, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("a sentence to embed, one of many\n" * 200_000)
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fastdistil", "embed", "--model", str(tiny), "--input",
                                 str(src), "--output", str(tmp_path / "e.npy"), "--batch-size", "8"],
                                env={**_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=err,
                                # a shell's background job (CI launched with `&`) ignores SIGINT, and the child
                                # would inherit that: give it the default disposition, as a terminal's Ctrl-C finds
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and "embedding:" not in err_path.read_text():
            time.sleep(0.1)
        assert proc.poll() is None, "embed finished before it could be interrupted: " + err_path.read_text()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    text = err_path.read_text()
    assert rc == 130, text
    assert "Traceback" not in text and text.rstrip().splitlines()[-1] == "fastdistil embed: interrupted"
    assert not (tmp_path / "e.npy").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["stderr", "t.txt"]


# ---- fork after first use -------------------------------------------------------------------------------------
FORK = textwrap.dedent("""
    import os, signal, sys, torch
    from fastdistil import FastStudent
    from fastdistil.cli import main
    assert main(["info"]) == 0                      # the CLI installs the at-fork hook
    torch.set_num_threads(2)
    model = FastStudent.from_pretrained(sys.argv[1])
    ids = torch.randint(1000, 2000, (16, 48))
    x = torch.randn(512, 512)
    with torch.inference_mode():
        model(ids), x @ x                         # the parent's OpenMP pool is up
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)                      # a hung child must not outlive the test
            model(ids), x @ x, torch.randn(4096, 384).tanh()
            os._exit(0 if torch.get_num_threads() == 1 else 3)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_fork_after_a_forward_does_not_hang(tiny):
    r = subprocess.run([sys.executable, "-c", FORK, str(tiny)], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
