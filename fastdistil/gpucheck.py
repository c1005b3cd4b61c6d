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

Without CUDA it exits 2 at once. --dry-run runs the same logic on the CPU (TRITON_INTERPRET=1, a tiny model, a
few tests and workloads), so CI checks the harness itself (`make gpu-check DRY=1`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

BUDGET_S = 420
RESERVE_S = 8  # kept for the summary and the tar file
INFERENCE = ("A", "B", "large", "C")
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


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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


# ------------------------------------------------------------------------------------------------ profile
def _kernel_families() -> dict[str, str]:
    """Triton kernel name -> kernel module (fastdistil.kernels.<module>)."""
    import importlib

    from . import kernels as KP
    fam = {}
    for mod in KP.KERNEL_MODULES:
        m = importlib.import_module(f"fastdistil.kernels.{mod}")
        for name, obj in vars(m).items():
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                fam[name] = mod
    return fam


def family(kernel: str, triton_names: dict[str, str]) -> str:
    """The cost model's module for a profiled kernel name: a fastdistil Triton kernel's module, 'gemm' for a
    library GEMM (cuBLAS / CUTLASS), 'torch' for everything else (PyTorch's elementwise, copies, reductions)."""
    if kernel in triton_names:
        return triton_names[kernel]
    k = kernel.lower()
    if any(s in k for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "addmm", "aten::mm", "matmul")):
        return "gemm"
    return "torch"


def profile(out: str, dry: bool, workload: str = "C") -> int:
    """One profiled forward and one profiled training step (forward + backward, no optimizer: what the cost model
    models) of FastStudent on the triton backend in bf16: measured kernels against the modeled ones."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from . import FastStudent, FastStudentConfig, set_backend
    from .bench import costmodel as cm
    from .bench.workloads import get_workload
    dev = torch.device("cpu" if dry else "cuda")
    dtype, dname = (torch.float32, "fp32") if dry else (torch.bfloat16, "bf16")
    cfg = FastStudentConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128) if dry else FastStudentConfig()
    wl = get_workload("B" if dry else workload)
    set_backend("torch" if dry else "triton")
    torch.manual_seed(0)
    model = FastStudent(cfg).to(dev, dtype)
    ids, mask = (t.to(dev) for t in wl.inputs(cfg.vocab_size))
    seqlens = [int(n) for n in mask.sum(1).tolist()]
    act = [ProfilerActivity.CPU] if dry else [ProfilerActivity.CUDA]
    names = _kernel_families()
    report = {"workload": wl.summary(), "dtype": dname, "device": str(dev), "backend": "torch" if dry else "triton",
              "modes": {}}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            model.eval()(ids, mask)

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(ids, mask)
        out.last_hidden_state.float().square().mean().backward()

    gpu = cm.get_gpu("h100")
    for mode, fn, training in (("forward", fwd, False), ("training", step, True)):
        for _ in range(2):  # Triton JIT and cuBLAS heuristics outside the profile
            fn()
        sync()
        with tprofile(activities=act) as prof:
            fn()
            sync()
        rows = []
        for e in prof.key_averages():
            if dry:  # CPU: the aten ops stand in for kernels (exercises the table's logic)
                if not e.key.startswith("aten::") or e.self_cpu_time_total <= 0:
                    continue
                us = e.self_cpu_time_total
            else:
                if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                    continue
                us = next((getattr(e, a) for a in ("self_device_time_total", "self_cuda_time_total",
                                                     "device_time_total", "cuda_time_total") if hasattr(e, a)), 0)
                if not us:
                    continue
            rows.append({"kernel": e.key, "count": e.count, "total_us": round(float(us), 1),
                         "family": family(e.key, names)})
        rows.sort(key=lambda r: -r["total_us"])
        modeled: dict[str, float] = {}
        for r in cm.model_kernels(cfg, seqlens, 2 if dtype != torch.float32 else 4, training=training):
            t = cm.kernel_time(r["cost"], gpu, dname)
            fam = "gemm" if r["module"] == "gemm" else r["module"]
            modeled[fam] = modeled.get(fam, 0.0) + max(t["compute_s"], t["memory_s"]) * 1e6  # device time, no launch
        measured: dict[str, float] = {}
        for r in rows:
            measured[r["family"]] = measured.get(r["family"], 0.0) + r["total_us"]
        fams = sorted(set(modeled) | set(measured), key=lambda f: -measured.get(f, 0.0))
        report["modes"][mode] = {
            "kernels": rows,
            "families": [{"family": f, "measured_us": round(measured.get(f, 0.0), 1),
                          "modeled_us": round(modeled[f], 1) if f in modeled else None,
                          "error": (modeled[f] - measured[f]) / measured[f] if f in modeled and measured.get(f)
                          else None} for f in fams],
            "total_measured_us": round(sum(measured.values()), 1),
            "total_modeled_us": round(sum(modeled.values()), 1)}
    _write_json(os.path.join(out, "profile.json"), report)
    with open(os.path.join(out, "profile.md"), "w") as f:
        f.write(profile_markdown(report))
    print(profile_markdown(report))
    return 0


def profile_markdown(rep: dict) -> str:
    out = [f"Profile of FastStudent ({rep['backend']}, {rep['dtype']}) on {rep['workload']}; device time per kernel "
           "from torch.profiler; modeled = the cost model's max(FLOPs / rate, bytes / bandwidth) per kernel family "
           "(launch overhead excluded; glue and the pooler are not in the model's kernel list).", ""]
    for mode, m in rep["modes"].items():
        out += [f"**{mode}**: measured {m['total_measured_us']:,.0f} us of kernels, modeled "
                f"{m['total_modeled_us']:,.0f} us", "", "| family | measured us | modeled us | model error |",
                "|---|---|---|---|"]
        for r in m["families"]:
            mod = "-" if r["modeled_us"] is None else f"{r['modeled_us']:,.1f}"
            err = "-" if r["error"] is None else f"{r['error']:+.0%}"
            out.append(f"| {r['family']} | {r['measured_us']:,.1f} | {mod} | {err} |")
        out += ["", "| kernel | family | count | total us |", "|---|---|---|---|"]
        for r in m["kernels"][:25]:
            out.append(f"| `{r['kernel'][:90]}` | {r['family']} | {r['count']} | {r['total_us']:,.1f} |")
        out.append("")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ summary
def test_totals(paths: list[str]) -> dict:
    """Counts, failures and skip reasons from the shards' FASTDISTIL_TEST_LOG lines (tests/conftest.py), which
    survive a shard killed by its limit; the JUnit XML files beside them are the standard record."""
    tot = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {},
           "slowest": []}
    for p in paths:
        try:
            with open(p) as f:
                recs = [json.loads(ln) for ln in f if ln.strip()]
        except (OSError, ValueError):
            continue
        for r in recs:
            tot["tests"] += 1
            kind = {"passed": "passed", "skipped": "skipped", "error": "errors"}.get(r["outcome"], "failed")
            tot[kind] += 1
            if kind in ("failed", "errors"):
                tot["failures"].append({"test": r["test"], "message": r["message"]})
            elif kind == "skipped":
                tot["skip_reasons"][r["message"][:120]] = tot["skip_reasons"].get(r["message"][:120], 0) + 1
            tot["slowest"].append((r["seconds"], r["test"]))
    tot["slowest"] = sorted(tot["slowest"], reverse=True)[:10]
    return tot


def model_errors(out: str) -> list[dict]:
    """Modeled (cost model, eager launches) against measured medians, per workload and engine."""
    rows = []
    for w in INFERENCE:
        mp, b = _read_json(os.path.join(out, f"model-perf-{w}.json")), _read_json(os.path.join(out, f"bench-{w}.json"))
        if not mp or not b:
            continue
        meas = {r["engine"]: r for r in b["workloads"][w]["rows"] if r.get("status") == "ok"}
        fd = mp["fastdistil"]["forward"]["whole_model"]
        tr = mp["transformers"]["eager"]["forward"]["totals"]
        for eng, side in (("fastdistil-triton-bf16", fd), ("fastdistil-triton-fp16", fd),
                          ("transformers-eager-bf16", tr), ("transformers-eager-fp16", tr)):
            if eng in meas:
                m = meas[eng]["median_ms"]
                rows.append({"workload": w, "engine": eng, "measured_ms": m, "modeled_eager_ms":
                             side["time_eager_s"] * 1e3, "modeled_graph_ms": side["time_graph_s"] * 1e3,
                             "error": (side["time_eager_s"] * 1e3 - m) / m})
    return rows


def summarize(run: Run, env: dict) -> dict:
    out = run.out
    s = {"env": env, "parts": dict(run.parts), "seconds": round(time.time() - run.t0, 1)}
    s["tests"] = test_totals(sorted(glob.glob(os.path.join(out, "tests-*.jsonl"))))
    bench = {}  # part name (bench-A, bench-A-compiled, ...) -> rows
    for f in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
        data = _read_json(f) or {}
        for res in data.get("workloads", {}).values():
            keep = ("engine", "status", "reason", "median_ms", "tokens_per_s", "ratio_vs_sdpa", "max_abs_diff",
                    "min_cosine", "agrees", "peak_cuda_MB", "compile_s")
            bench[os.path.basename(f)[:-5]] = [{k: r.get(k) for k in keep} for r in res["rows"]]
    s["bench"] = bench
    s["model_error"] = model_errors(out)
    s["profile"] = {m: {k: v for k, v in d.items() if k != "kernels"}
                    for m, d in (_read_json(os.path.join(out, "profile.json")) or {}).get("modes", {}).items()}
    _write_json(os.path.join(out, "summary.json"), s)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(s, out))
    return s


def summary_markdown(s: dict, out: str) -> str:
    env, t = s["env"], s["tests"]
    dry = env.get("dry_run")
    md = [f"## Measured on a GPU: {env.get('gpu')}, {env['date']}" if not dry else
          f"## Dry run on a CPU (a check of the harness: its numbers mean nothing), {env['date']}", "",
          f"`make gpu-check{' DRY=1' if dry else ''}` ({s['seconds']:.0f} s): torch {env.get('torch')} (CUDA "
          f"{env.get('torch_cuda')}), triton {env.get('triton')}, transformers {env.get('transformers')}, "
          f"sentence-transformers {env.get('sentence-transformers')}, flash-attn {env.get('flash-attn')}.", "",
          f"Tests (`pytest tests --device {'cpu' if dry else 'cuda'}`): {t['passed']} passed, {t['failed']} failed, "
          f"{t['errors']} errors, {t['skipped']} skipped."]
    md += [f"- FAILED `{f['test']}`: {f['message'][:200]}" for f in t["failures"]]
    bad = {n: p for n, p in s["parts"].items() if p.get("status") != "ok"}
    if bad:
        md += ["", "Parts that did not finish: " + ", ".join(f"{n} ({p.get('status')}: {p.get('reason') or p['log']})"
                                                            for n, p in bad.items())]
    for name in s["parts"]:  # in the order they ran
        if name.startswith("bench-") and os.path.exists(os.path.join(out, name + ".md")):
            with open(os.path.join(out, name + ".md")) as fh:
                md += ["", fh.read().strip()]
    if s["model_error"]:
        md += ["", "Cost model against measurement (forward; modeled with eager launches, and with CUDA-graph "
               "replay for reference):", "", "| workload | engine | measured ms | modeled ms (eager) | "
               "modeled ms (graph) | model error |", "|---|---|---|---|---|---|"]
        md += [f"| {r['workload']} | {r['engine']} | {r['measured_ms']:.3f} | {r['modeled_eager_ms']:.3f} | "
               f"{r['modeled_graph_ms']:.3f} | {r['error']:+.0%} |" for r in s["model_error"]]
    if os.path.exists(os.path.join(out, "profile.md")):
        with open(os.path.join(out, "profile.md")) as fh:
            md += ["", fh.read().strip()]
    return "\n".join(md) + "\n"


def one_line(s: dict, out: str, tar: str | None) -> str:
    t = s["tests"]
    parts = [f"tests {t['passed']} passed, {t['failed'] + t['errors']} failed, {t['skipped']} skipped"]
    for w in ("A", "B"):
        rows = {r["engine"]: r for r in s["bench"].get(f"bench-{w}", []) if r.get("status") == "ok"}
        fd, sd = rows.get("fastdistil-triton-bf16"), rows.get("transformers-sdpa-bf16")
        if fd and sd:
            parts.append(f"{w}: fastdistil bf16 {fd['median_ms']:.2f} ms vs sdpa bf16 {sd['median_ms']:.2f} ms "
                         f"({sd['median_ms'] / fd['median_ms']:.2f}x)")
    disagree = [f"{w[len('bench-'):]}:{r['engine']}" for w, rows in s["bench"].items() for r in rows
                if r.get("status") == "ok" and not r.get("agrees")]
    if disagree:
        parts.append("DISAGREE " + ",".join(disagree))
    bad = [n for n, p in s["parts"].items() if p.get("status") != "ok"]
    parts.append(f"parts not ok: {','.join(bad)}" if bad else "all parts ok")
    return f"gpu-check ({s['seconds']:.0f} s): " + "; ".join(parts) + f"; {out}" + (f" ({tar})" if tar else "")


# ------------------------------------------------------------------------------------------------ main
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
