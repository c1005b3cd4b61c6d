"""fastdistil's pytest-benchmark suites. They time; they are not part of the pass/fail test run (`make test` runs
tests/ only).

Run them with the one documented command (from the repository root, in the project's virtual environment):

    python -m pytest benchmarks --benchmark-only            # or: make bench

Useful additions: `-k inference` (one suite), `--benchmark-json out.json` (raw numbers),
`--benchmark-group-by group`, `--bench-device cuda` (when a GPU is present), `--bench-threads N` (default: torch's
setting; the value used is recorded in every benchmark's extra_info), `--bench-rounds N` (default 5).

Suites:
- test_ops.py: each fused op against its plain-PyTorch composition (the `torch` backend, which is the reference
  module) and the `native` (CPU, C++) or `triton` (CUDA) backend, forward / backward / full, with bytes/s and
  FLOP/s derived from the kernels' own cost functions (the minimum bytes and FLOPs of the op, so the rates of two
  providers compare the same work).
- test_inference.py: whole-model inference on workloads A (32 x lengths U[16,128]), B (1 x 32) and C (128 x lengths
  U[64,256]): fastdistil on each available backend and precision beside transformers eager / sdpa, torch.compile
  of transformers and ONNX Runtime (padded, length-bucketed, one sequence at a time). Peers that are not installed
  are skipped with the reason. Each engine's outputs are checked against transformers eager fp32 before it is
  timed: a fast wrong answer fails its benchmark.
- test_train_step.py: one training step (classification head, AdamW) on workload A's batch: time, and the
  activation bytes autograd saves (peak CUDA memory on a GPU), beside transformers.
- test_distill_step.py: one distillation step (owned by the distillation engine).

For one run that interleaves every engine round by round (A B A B ...) and prints ratios, use `fastdistil bench`
instead; these suites time each engine in its own pytest-benchmark loop.
"""
import os

import pytest
import torch


def pytest_addoption(parser):
    g = parser.getgroup("fastdistil benchmarks")
    g.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"), help="device to benchmark on")
    g.addoption("--bench-threads", type=int, default=None, help="torch / ONNX Runtime intra-op threads")
    g.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark")


@pytest.fixture(scope="session")
def bench_device(request):
    dev = request.config.getoption("--bench-device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device visible")
    return torch.device(dev)


@pytest.fixture(scope="session", autouse=True)
def bench_threads(request):
    n = request.config.getoption("--bench-threads") or torch.get_num_threads()
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield n
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def bench_rounds(request):
    return max(1, request.config.getoption("--bench-rounds"))
