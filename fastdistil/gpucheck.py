"""`make gpu-check` / `fastdistil gpu-check`: everything a GPU can prove, in one bounded command.

On a machine with a CUDA PyTorch and its Triton already installed and no internet, from the root of a checkout:

    python3 -m fastdistil.gpucheck [--install] [--out DIR] [--tar FILE.tgz] [--budget 420] [--dry-run]

Parts, each a subprocess under its own time limit (a hang or a poisoned CUDA context loses only that part; every
part's exit status is recorded, none is fatal), with what is left of the budget going to later parts:

    install     pip install --no-deps --no-build-isolation -e . (FASTDISTIL_NO_EXT=1: the GPU check does not
                measure the CPU backend, and the serial C++ build would take minutes)
    tests       python -m pytest tests --device cuda, in parallel shards (Triton compiles on the CPUs), no
                fail-fast, one JUnit XML per shard; beside them, on the CPU, `fastdistil model-perf` per workload
    bench       `fastdistil bench --device cuda` per workload (A, B, train, large, C, distill), alone on the GPU
    profile     one torch.profiler forward and one training step of workload C: kernel, count, total us, and the
                cost model's modeled us per kernel family
    summary     summary.json, summary.md (tables ready for PERFORMANCE.md), a one-line summary, OUT.tgz
                (profile and summary are written by fastdistil/gpucheck_report.py)

Without CUDA it exits 2 at once. --dry-run runs the same logic on the CPU (TRITON_INTERPRET=1, a tiny model, a
few tests and workloads), so CI checks the harness itself (`make gpu-check DRY=1`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

from .gpucheck_report import _write_json, one_line, profile, summarize

BUDGET_S = 420
RESERVE_S = 8  # kept for the summary and the tar file
# torch.compile(mode="reduce-overhead") compiles per shape (tens of seconds each): only where graphs matter most,
# in a part of its own (beside transformers sdpa bf16, its baseline) so that a slow compile loses only itself
COMPILED_ON = ("A", "B")


class Run:
    """The output directory, the deadline, the progress log and the record of every part."""

    def __init__(self, out: str, budget: float, dry: bool):
        self.out, self.dry, self.t0 = os.path.abspath(out), dry, time.time()
        self.deadline = self.t0 + budget
        os.makedirs(self.out, exist_ok=True)
        self.parts: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.log = open(os.path.join(self.out, "run.log"), "a")

    def say(self, msg: str) -> None:
        line = f"[gpu-check +{time.time() - self.t0:5.0f}s] {msg}"
        with self.lock:
            print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def part(self, name: str, cmd: list[str], limit: float, env: dict | None = None, min_s: float = 15) -> dict:
        """Run one part: `cmd` under min(limit, budget left) seconds, its output in OUT/<name>.log."""
        lim = min(limit, self.left())
        rec = {"cmd": " ".join(cmd), "log": f"{name}.log", "limit_s": round(lim)}
        if lim < min_s:
            rec.update(status="skipped", reason=f"budget: {max(lim, 0):.0f} s left")
            self.say(f"{name}: skipped ({rec['reason']})")
            return self._record(name, rec)
        self.say(f"{name}: start (limit {lim:.0f} s)")
        t = time.time()
        with open(self.path(f"{name}.log"), "w") as log:
            log.write(f"$ {rec['cmd']}\n")
            log.flush()
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                 cwd=os.getcwd())
            try:
                rc = p.wait(timeout=lim)
            except subprocess.TimeoutExpired:
                _kill(p)
                rc = 124
            _reap(p)
        rec.update(rc=rc, seconds=round(time.time() - t, 1),
                   status="ok" if rc == 0 else "timeout" if rc == 124 else "failed")
        self.say(f"{name}: {rec['status']} (exit {rc}) in {rec['seconds']:.0f} s" +
                 ("" if rc == 0 else f"; see {name}.log: {_tail(self.path(name + '.log'))}"))
        return self._record(name, rec)

    def _record(self, name: str, rec: dict) -> dict:
        with self.lock:
            self.parts[name] = rec
            _write_json(self.path("parts.json"), self.parts)
        return rec


def _kill(p: subprocess.Popen) -> None:
    """SIGTERM to the part's process group, SIGKILL 5 s later (pytest workers, inductor compile workers...)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _reap(p: subprocess.Popen) -> None:
    """SIGKILL whatever the part left running in its process group (compile workers): nothing outlives its part."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, n: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return " | ".join(lines[-n:])[-300:]
    except OSError:
        return "(no log)"


def _lanes(lanes: list[list]) -> None:
    """Run lanes concurrently; each lane is a list of thunks run one after another."""
    threads = [threading.Thread(target=lambda lane=lane: [f() for f in lane]) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------------------------------------ environment
def environment(dry: bool) -> tuple[dict, str | None]:
    """Versions and the GPU; the second value says why this python cannot run the check (None when it can)."""
    import importlib.metadata as md
    info = {"python": sys.executable, "python_version": sys.version.split()[0], "dry_run": dry,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for pkg in ("torch", "triton", "transformers", "sentence-transformers", "flash-attn", "onnxruntime", "pytest"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        import torch
    except ImportError as e:
        return info, f"torch is not importable ({e})"
    info["torch_cuda"] = torch.version.cuda
    if dry:
        return info, None
    if not torch.cuda.is_available():
        return info, (f"CUDA is not available to {sys.executable} (torch {torch.__version__}, CUDA build "
                      f"{torch.version.cuda}); `make gpu-check DRY=1` runs the harness logic on a CPU")
    if info["triton"] is None:
        return info, f"triton is not installed for {sys.executable} (it comes with CUDA builds of torch)"
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_GiB=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info, None


SHIM = """# written by fastdistil.gpucheck when `pip install -e .` failed: import fastdistil from the checkout, with
# kernels/ as fastdistil.kernels (what pyproject's package-dir does for an installed copy)
import importlib.abc, importlib.util, os, sys
_K = {kernels!r}
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastdistil.kernels":
            return importlib.util.spec_from_file_location(name, os.path.join(_K, "__init__.py"),
                                                          submodule_search_locations=[_K])
        return None
sys.meta_path.insert(0, _KernelsFinder())
"""
_SHIM_PATH: list[str] = []  # set when the install failed: PYTHONPATH entries for every later part


def use_checkout_shim(out: str) -> str:
    """Make later parts import fastdistil from this checkout without an install (a sitecustomize that maps
    fastdistil.kernels to kernels/); returns the shim's directory."""
    d = os.path.join(out, "_shim")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "sitecustomize.py"), "w") as f:
        f.write(SHIM.format(kernels=os.path.abspath("kernels")))
    _SHIM_PATH[:] = [d, os.getcwd()]
    return d


def _env(dry: bool, threads: int | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1", FASTDISTIL_NO_EXT="1")
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if _SHIM_PATH:
        env["PYTHONPATH"] = os.pathsep.join(_SHIM_PATH + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# ------------------------------------------------------------------------------------------------ parts
def test_shards(n: int) -> list[list[str]]:
    """tests/test_*.py in n shards, tests/test_gpu.py alone (its probes need the memory). A file weighs what runs
    on CUDA: about one unit per use of the `device` fixture (the CPU-only tests are deselected there)."""
    def weight(f):
        with open(f) as fh:
            return fh.read().count("device") + 1
    files = sorted(glob.glob(os.path.join("tests", "test_*.py")), key=weight, reverse=True)
    gpu = [f for f in files if os.path.basename(f) == "test_gpu.py"]
    shards: list[list[str]] = [[] for _ in range(max(1, n - len(gpu)))]
    for f in (f for f in files if f not in gpu):  # heaviest first, each to the lightest shard
        min(shards, key=lambda s: sum(map(weight, s))).append(f)
    return [s for s in shards if s] + [gpu] * bool(gpu)


def tests_cmds(run: Run, py: str) -> list[tuple[str, list[str]]]:
    if not os.path.isdir("tests"):
        return []
    base = [py, "-m", "pytest", "-p", "no:randomly", "-q", "-rfE", "--continue-on-collection-errors",
            "--device", "cpu" if run.dry else "cuda"]
    import importlib.util
    if importlib.util.find_spec("pytest_timeout"):  # one hung test ends its shard, not the shard's whole budget
        base += ["--timeout", "100", "--timeout-method", "thread"]
    if run.dry:  # the harness's logic, not the suite: two interpreter tests and the (skipped) gpu tests
        shards = [["tests/test_gelu.py", "-k", "3d_input or exact_erf"], ["tests/test_gpu.py"]]
    else:
        shards = test_shards(8)
    return [(f"tests-{i}", base + s + [f"--junitxml={run.path(f'tests-{i}.xml')}"]) for i, s in enumerate(shards)]


def _test_env(run: Run, name: str) -> dict:
    return dict(_env(run.dry), FASTDISTIL_TEST_LOG=run.path(f"{name}.jsonl"))


def bench_plan(dry: bool) -> list[tuple[str, str, list[str], float]]:
    """(part name, workload, engines, time limit) in the order they run (the headline workloads first; the
    profile runs after train); an empty engine list means the workload's default engines."""
    if dry:
        # torch.compile is left out here: inductor on a CPU takes 30-50 s, the rest of the dry run ~90 s
        return [("bench-B", "B", ["transformers-sdpa", "fastdistil-torch-fp32", "sentence-transformers-bf16"], 60),
                ("bench-train", "train", ["transformers-sdpa", "fastdistil-torch-fp32"], 60),
                ("bench-distill", "distill", ["fastdistil-distill-torch"], 60)]
    from .bench.engines import CUDA_INFERENCE
    eager = [e for e in CUDA_INFERENCE if not e.startswith("torch.compile")]
    compiled = ["transformers-sdpa-bf16", "torch.compile-sdpa-bf16"]
    return [("bench-A", "A", eager, 75), ("bench-B", "B", eager, 60), ("bench-train", "train", [], 60),
            ("bench-A-compiled", "A", compiled, 60), ("bench-B-compiled", "B", compiled, 50),
            ("bench-large", "large", eager, 45), ("bench-C", "C", eager, 45), ("bench-distill", "distill", [], 45)]


def bench_cmd(run: Run, py: str, name: str, workload: str, engines: list[str]) -> list[str]:
    cmd = [py, "-m", "fastdistil", "bench", "--device", "cpu" if run.dry else "cuda", "--workload", workload,
           "--rounds", "1" if run.dry else "5", "--model", "tiny" if run.dry else "minilm", "--no-progress",
           "--no-model-error", "--json", run.path(f"{name}.json"), "--markdown", run.path(f"{name}.md")]
    return cmd + (["--engines", *engines] if engines else [])


def model_perf_cmds(run: Run, py: str) -> list[tuple[str, list[str]]]:
    workloads = ("B",) if run.dry else ("A", "B", "C", "large")  # the costliest recording last
    out = []
    for w in workloads:
        cmd = [py, "-m", "fastdistil", "model-perf", "--workload", w, "--dtype", "bf16", "--peers", "eager",
               "--summary", "--json", run.path(f"model-perf-{w}.json")]
        out.append((f"model-perf-{w}", cmd + (["--train"] if w == "A" else [])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastdistil gpu-check", description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="", help="output directory (default out/gpu-check-<date>)")
    ap.add_argument("--tar", default="", help="also pack OUT into this .tgz (default OUT.tgz)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S})")
    ap.add_argument("--install", action="store_true", help="first pip install this checkout into this python "
                    "(--no-deps --no-build-isolation -e ., FASTDISTIL_NO_EXT=1; nothing is downloaded)")
    ap.add_argument("--dry-run", action="store_true", help="the same logic on the CPU: Triton interpreter, tiny "
                    "model, a few tests and workloads (a check of the harness; its numbers mean nothing)")
    ap.add_argument("--tests-limit", type=float, default=140, help="seconds for the CUDA test suite's shards "
                    "(default 140; the bench parts get the rest of the budget)")
    ap.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)  # the profile part's own process


def run(args) -> int:
    dry = bool(args.dry_run)
    out = args.out or os.path.join("out", f"gpu-check{'-dry' if dry else ''}-{_dt.date.today():%Y-%m-%d}")
    if args.profile_only:
        return profile(out, dry)
    if args.budget <= RESERVE_S:
        raise ValueError(f"--budget must be more than {RESERVE_S} s, got {args.budget}")
    env, why = environment(dry)
    if why:
        print(f"gpu-check: {why}", file=sys.stderr)
        return 2
    run_ = Run(out, args.budget, dry)
    _write_json(run_.path("env.json"), env)
    run_.say(f"{'DRY RUN on the CPU; ' if dry else ''}{env.get('gpu', '')} python {sys.executable}, out {run_.out}, "
             f"budget {args.budget:.0f} s")
    py = sys.executable
    if args.install and not dry:
        rec = run_.part("install", [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                                    "."], 90, _env(dry), min_s=5)
        if rec.get("status") != "ok":
            run_.say(f"install failed: later parts import the checkout through {use_checkout_shim(run_.out)}")
    # tests in parallel shards (Triton compiles on the CPUs; the GPU work is small) beside the CPU-only cost model
    cores = os.cpu_count() or 2
    limit = args.tests_limit if not dry else 90
    phase_end = time.time() + limit  # the CPU-only cost model never holds the GPU parts back
    test_lanes = [[lambda n=n, c=c: run_.part(n, c, limit, _test_env(run_, n))] for n, c in tests_cmds(run_, py)]
    mp_lane = [lambda n=n, c=c: run_.part(n, c, phase_end - time.time(), _env(dry, threads=max(1, cores // 4)),
                                          min_s=5) for n, c in model_perf_cmds(run_, py)]
    _lanes(test_lanes + [mp_lane])
    # timings alone on the GPU, one workload (or the compiled peer of one) per process; the profile after train
    for name, w, engines, limit in bench_plan(dry):
        run_.part(name, bench_cmd(run_, py, name, w, engines), limit, _env(dry))
        if name == "bench-train":
            run_.part("profile", [py, "-m", "fastdistil.gpucheck", "--profile-only", "--out", run_.out] +
                      (["--dry-run"] if dry else []), 45, _env(dry))
    s = summarize(run_, env)
    tar = args.tar or run_.out.rstrip("/") + ".tgz"
    try:
        with tarfile.open(tar, "w:gz") as tf:
            tf.add(run_.out, arcname=os.path.basename(run_.out.rstrip("/")))
    except OSError as e:
        run_.say(f"could not write {tar}: {e}")
        tar = None
    line = one_line(s, run_.out, tar)
    run_.say("done; summary.md holds the tables for PERFORMANCE.md")
    print(line, flush=True)
    with open(run_.path("summary.txt"), "w") as f:
        f.write(line + "\n")
    return 0 if all(p.get("status") == "ok" for p in run_.parts.values()) and not s["tests"]["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
