"""The GPU harness's logic on a CPU (fastdistil/gpucheck.py, `make gpu-check`): parts under time limits whose failures
are recorded, the budget, test shards, the summary and its one line, and the exits without CUDA (`make gpu-check`
itself runs on a CPU as `make gpu-check DRY=1`, in CI)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fastdistil import gpucheck as G
from fastdistil import gpucheck_report as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@no_cuda
def test_without_cuda_exits_2_at_once_with_one_line(tmp_path):
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "fastdistil.gpucheck", "--out", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "CUDA is not available" in p.stderr and "DRY=1" in p.stderr
    assert not (tmp_path / "o").exists() and time.time() - t < 60


@no_cuda
def test_pytest_device_cuda_fails_at_collection_with_one_line():
    env = dict(os.environ, FASTDISTIL_TEST_DEVICE="cuda")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gelu.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 4 and len(lines) == 1, lines
    assert "--device cuda" in lines[0] and "no CUDA device" in lines[0]


def test_parts_record_success_failure_timeout_and_budget(tmp_path):
    run = G.Run(str(tmp_path), budget=40, dry=True)
    py = sys.executable
    ok = run.part("ok", [py, "-c", "print('hi')"], 30, min_s=1)
    bad = run.part("bad", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30, min_s=1)
    t = time.time()
    slow = run.part("slow", [py, "-c", "import time; time.sleep(60)"], 2, min_s=1)
    assert time.time() - t < 15  # killed at its limit, not waited for
    skipped = run.part("late", [py, "-c", "pass"], 30, min_s=10 ** 6)
    assert (ok["status"], bad["status"], bad["rc"], slow["status"], slow["rc"]) == ("ok", "failed", 3, "timeout", 124)
    assert skipped["status"] == "skipped" and "budget" in skipped["reason"]
    assert (tmp_path / "bad.log").read_text().strip().endswith("boom")
    assert set(json.loads((tmp_path / "parts.json").read_text())) == {"ok", "bad", "slow", "late"}
    log = (tmp_path / "run.log").read_text()
    assert "[gpu-check +" in log and "slow: timeout" in log and "see bad.log: boom" in log


def test_shards_cover_every_test_file_once():
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        shards = G.test_shards(6)
    finally:
        os.chdir(old)
    files = [f for s in shards for f in s]
    assert sorted(files) == sorted(os.path.join("tests", f) for f in os.listdir(os.path.join(ROOT, "tests"))
                                   if f.startswith("test_") and f.endswith(".py"))
    assert shards[-1] == [os.path.join("tests", "test_gpu.py")] and len(shards) <= 6


def _bench_json(path, workload, rows):
    path.write_text(json.dumps({"workloads": {workload: {"rows": rows}}}))


def test_summary_tables_and_one_line(tmp_path):
    run = G.Run(str(tmp_path), budget=100, dry=True)
    run.parts = {"tests-0": {"status": "ok", "log": "tests-0.log"}, "bench-A": {"status": "ok", "log": "bench-A.log"},
                 "bench-C": {"status": "timeout", "log": "bench-C.log"}}
    (tmp_path / "tests-0.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"test": "a", "outcome": "passed", "seconds": 1.0, "message": ""},
        {"test": "b", "outcome": "failed", "seconds": 2.0, "message": "AssertionError: y: error 1"},
        {"test": "c", "outcome": "skipped", "seconds": 0.0, "message": "needs two GPUs"},
        {"test": "d", "outcome": "error", "seconds": 0.1, "message": "fixture"}]))
    ok = {"status": "ok", "agrees": True}
    _bench_json(tmp_path / "bench-A.json", "A", [
        {"engine": "transformers-sdpa-bf16", "median_ms": 4.0, **ok},
        {"engine": "fastdistil-triton-bf16", "median_ms": 2.0, **ok},
        {"engine": "transformers-eager-bf16", "median_ms": 5.0, **ok},
        {"engine": "fastdistil-triton-fp16", "median_ms": 2.5, "status": "ok", "agrees": False}])
    (tmp_path / "bench-A.md").write_text("**workload A** table")
    (tmp_path / "model-perf-A.json").write_text(json.dumps({
        "fastdistil": {"forward": {"whole_model": {"time_eager_s": 1e-3, "time_graph_s": 5e-4}}},
        "transformers": {"eager": {"forward": {"totals": {"time_eager_s": 4e-3, "time_graph_s": 2e-3}}}}}))
    s = R.summarize(run, {"date": "today", "gpu": "TestGPU"})
    t = s["tests"]
    assert (t["passed"], t["failed"], t["errors"], t["skipped"]) == (1, 1, 1, 1)
    assert [f["test"] for f in t["failures"]] == ["b", "d"] and t["skip_reasons"] == {"needs two GPUs": 1}
    errs = {r["engine"]: r for r in s["model_error"]}
    assert errs["fastdistil-triton-bf16"]["error"] == pytest.approx(-0.5)
    assert errs["transformers-eager-bf16"]["error"] == pytest.approx(-0.2)
    md = (tmp_path / "summary.md").read_text()
    assert "TestGPU" in md and "**workload A** table" in md and "FAILED `b`" in md and "bench-C (timeout" in md
    assert "| A | fastdistil-triton-bf16 | 2.000 | 1.000 | 0.500 | -50% |" in md
    line = R.one_line(s, str(tmp_path), "x.tgz")
    assert "tests 1 passed, 2 failed, 1 skipped" in line and "(2.00x)" in line
    assert "DISAGREE A:fastdistil-triton-fp16" in line and "parts not ok: bench-C" in line
    assert json.loads((tmp_path / "summary.json").read_text())["tests"]["passed"] == 1


def test_profile_families():
    names = {"_attn_fwd": "attention"}
    assert R.family("_attn_fwd", names) == "attention"
    assert R.family("nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTN", names) == "gemm"
    assert R.family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", names) == "gemm"
    assert R.family("void at::native::vectorized_elementwise_kernel<4, ...>", names) == "torch"
    fam = R._kernel_families()
    assert fam and set(fam.values()) <= {"layer_norm", "gelu", "embedding", "attention", "kd", "relation", "matmul",
                                         "padding"}
