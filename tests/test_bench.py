"""fastdistil bench: workloads, interleaved timing, the agreement check, skipped peers, and the commands end to end
(`fastdistil bench` on a tiny model writing JSON and a PNG; `fastdistil model-perf --json`)."""
import json
import sys

import pytest
import torch

from fastdistil.bench import engines as E
from fastdistil.bench import runner
from fastdistil.bench.workloads import WORKLOADS, get_workload
from fastdistil.cli import main


def test_workloads_are_fixed_and_in_range():
    a = get_workload("a")
    lens = a.lengths()
    assert len(lens) == 32 and all(16 <= n <= 128 for n in lens)
    assert lens == get_workload("A").lengths() and a.real_tokens() == 2135
    ids, mask = a.inputs()
    assert ids.shape == mask.shape == (32, 128)
    assert mask.sum(1).tolist() == lens and (ids[mask == 0] == 0).all() and (ids[:, 0] == 101).all()
    assert get_workload("B").inputs()[1].all() and WORKLOADS["C"].padded_tokens() == 128 * 256
    tiny_ids, _ = get_workload("C").inputs(vocab_size=50)
    assert int(tiny_ids.max()) < 50
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("D")


def test_engine_selection():
    inf = E.engine_names("inference")
    assert "transformers-sdpa" in inf and "onnxruntime-per-seq" in inf and "fastdistil-native-bf16" in inf
    assert E.select("inference", ["fastdistil"]) == [n for n in inf if n.startswith("fastdistil-")]
    assert E.select("inference", ["transformers-sdpa"]) == ["transformers-sdpa"]
    assert E.select("inference", ["transformers"]) == ["transformers-eager", "transformers-sdpa",
                                                       "transformers-sdpa-bf16"]
    assert E.select("train", None) == E.engine_names("train")
    with pytest.raises(ValueError, match="unknown engine"):
        E.make_engine("tensorflow", "inference")


class _Fake(E.Engine):
    """An engine that logs its calls and returns the reference's outputs (optionally perturbed)."""
    family = "fake"
    log: list = []

    def __init__(self, name, offset=0.0):
        super().__init__(name, "torch", torch.float32)
        self.offset = offset

    def __call__(self):
        _Fake.log.append(self.name)
        return None

    def check(self):
        return torch.ones(self.ctx.real_tokens, 4) + self.offset


def test_rounds_are_interleaved_and_wrong_answers_flagged(monkeypatch):
    _Fake.log = []
    fakes = {"transformers-eager": 0.0, "transformers-sdpa": 0.0, "fastdistil-torch-fp32": 0.5}
    monkeypatch.setattr(E, "make_engine", lambda name, kind: _Fake(name, fakes[name]))
    monkeypatch.setattr(E, "select", lambda kind, patterns, device="cpu": ["transformers-sdpa",
                                                                         "fastdistil-torch-fp32"])
    res = runner.run_workload("B", rounds=3, model="tiny", threads=1, progress=False)
    timed = [n for n in _Fake.log if n != "transformers-eager"]
    runs = [n for i, n in enumerate(timed) if i == 0 or timed[i - 1] != n]  # a sample repeats short calls
    # one warm-up call each, then three rounds alternating A B A B A B
    assert runs == ["transformers-sdpa", "fastdistil-torch-fp32"] * 4
    rows = {r["engine"]: r for r in res["rows"]}
    assert len(rows["transformers-sdpa"]["times_ms"]) == 3
    assert rows["transformers-sdpa"]["agrees"] and rows["transformers-sdpa"]["ratio_vs_sdpa"] == 1.0
    assert not rows["fastdistil-torch-fp32"]["agrees"]
    assert rows["fastdistil-torch-fp32"]["max_abs_diff"] == pytest.approx(0.5)


def test_missing_peers_are_skipped_not_failed(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    res = runner.run_workload("B", engines=["onnxruntime-padded", "fastdistil-triton-fp32"], rounds=1, model="tiny",
                              threads=1, progress=False)
    rows = {r["engine"]: r for r in res["rows"]}
    assert rows["onnxruntime-padded"]["status"] == "skipped"
    assert "pip install" in rows["onnxruntime-padded"]["reason"]
    assert rows["fastdistil-triton-fp32"]["status"] == "skipped"
    assert "CUDA" in rows["fastdistil-triton-fp32"]["reason"]
    lines = runner.format_table(res)
    assert any(ln.startswith("onnxruntime-padded") and "skipped" in ln for ln in lines)


@pytest.mark.slow
def test_bench_command_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    engines = ["transformers-eager", "transformers-sdpa", "fastdistil-torch-fp32", "onnxruntime-padded"]
    md = tmp_path / "bench.md"
    rc = main(["bench", "--workload", "B", "--model", "tiny", "--rounds", "2", "--threads", "1", "--no-progress",
               "--engines", *engines, "--json", str(out), "--plot", str(png), "--markdown", str(md)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert data["machine"]["cpu"] and data["machine"]["torch_threads"] == 1
    assert data["machine"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        data["machine"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    w = data["workloads"]["B"]
    assert w["real_tokens"] == 32 and w["rounds"] == 2
    rows = {r["engine"]: r for r in w["rows"]}
    assert set(rows) == set(engines)
    for name in ("transformers-eager", "transformers-sdpa", "fastdistil-torch-fp32"):
        r = rows[name]
        assert r["status"] == "ok" and r["agrees"] and r["max_abs_diff"] < 1e-4
        assert r["median_ms"] > 0 and r["tokens_per_s"] == pytest.approx(32 / (r["median_ms"] / 1e3))
    assert rows["transformers-sdpa"]["ratio_vs_sdpa"] == 1.0
    assert rows["onnxruntime-padded"]["status"] in ("ok", "skipped")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "median ms" in text and "fastdistil-torch-fp32" in text
    table = md.read_text()
    assert table.startswith("`fastdistil bench --workload B") and "| fastdistil-torch-fp32 |" in table


@pytest.mark.slow
def test_train_workload_checks_loss_and_gradients():
    res = runner.run_workload("train", engines=["transformers-sdpa", "fastdistil-torch-fp32"], rounds=1,
                              model="tiny", threads=1, progress=False)
    rows = {r["engine"]: r for r in res["rows"]}
    for r in rows.values():
        assert r["status"] == "ok", r["reason"]
        assert r["agrees"] and r["compared"] > 10 and r["saved_activation_MB"] > 0
    # fastdistil packs real tokens: it saves fewer activation bytes than transformers on the padded batch
    assert rows["fastdistil-torch-fp32"]["saved_activation_MB"] < rows["transformers-sdpa"]["saved_activation_MB"]


def test_model_perf_command_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTDISTIL_COMPILE_REPORT", str(tmp_path / "no-report.json"))  # hermetic: no cache
    out = tmp_path / "perf.json"
    rc = main(["model-perf", "--workload", "B", "--peers", "eager", "--json", str(out), "--launch-us", "5"])
    text = capsys.readouterr().out
    assert rc == 0
    assert all("modeled" in ln for ln in text.splitlines() if ln.strip())
    rep = json.loads(out.read_text())
    assert rep["modeled"] is True and rep["gpu"]["launch_eager_s"] == pytest.approx(5e-6)
    assert rep["compile_report"] is None and "none cached" in text
    assert rep["workload"]["real_tokens"] == 32 and rep["dtype"] == "bf16"
    from fastdistil.bench.costmodel import launches_per_layer
    assert rep["launches_per_layer"] == launches_per_layer(seqlens=[32])
    assert rep["modeled_speedup_vs_transformers"] == pytest.approx(
        rep["speedups"]["forward_vs_eager"]["eager"])
    assert rep["modeled_speedup_vs_transformers"] > 1.0
    assert len(rep["fastdistil"]["forward"]["per_layer"]) == rep["launches_per_layer"] or \
        sum(r["launches"] for r in rep["fastdistil"]["forward"]["per_layer"]) == rep["launches_per_layer"]


def test_bench_command_rejects_bad_arguments(capsys):
    assert main(["bench", "--threads", "0"]) == 2  # a usage error, from argparse
    assert "--threads" in capsys.readouterr().err
    assert main(["bench", "--plot", "out.jpg"]) == 1
    assert main(["bench", "--list"]) == 0
    assert "onnxruntime-per-seq" in capsys.readouterr().out
