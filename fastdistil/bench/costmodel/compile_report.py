"""The compile report (``fastdistil check-kernels``): registers and spills of each kernel's builds, cached, and
matched to the cost model's rows."""
from __future__ import annotations

import json
import os
from pathlib import Path


def compile_report_path() -> Path:
    """Where the cached compile report lives: $FASTDISTIL_COMPILE_REPORT, else
    $XDG_CACHE_HOME/fastdistil/compile_report.json (~/.cache/... by default)."""
    env = os.environ.get("FASTDISTIL_COMPILE_REPORT")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastdistil" / "compile_report.json"


def kernels_fingerprint() -> str:
    """A hash of the kernel modules' sources: a cached compile report made from other sources is stale."""
    import hashlib
    from ... import kernels
    h = hashlib.sha256()
    root = Path(kernels.__file__).parent
    for name in sorted(set(kernels.KERNEL_MODULES) | {"spec"}):
        f = root / f"{name}.py"
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def load_compile_report(path=None) -> dict | None:
    """Read a compile report without compiling anything.

    Accepts the cache this module writes ({"fingerprint", "results": [...]}) or the output of
    `fastdistil check-kernels --json` (a list of build results). Returns {"source", "stale", "results"} or None
    when the file does not exist.
    """
    path = Path(path) if path is not None else compile_report_path()
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OSError(f"compile report {path} is not readable JSON ({e}); delete it or rerun with --compile") from None
    if isinstance(data, list):
        return {"source": str(path), "stale": None, "results": data}
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise OSError(f"compile report {path} has no 'results' list")
    stale = data.get("fingerprint") not in (None, kernels_fingerprint())
    return {"source": str(path), "stale": stale, "results": data["results"]}


def build_compile_report(archs=(90,), modules=None, jobs: int = 2, path=None, progress=None) -> dict:
    """Build the kernels' compile specs with fastdistil.compile_check (minutes) and cache the results.

    Args:
        archs: compute capabilities to build for.
        modules: kernel modules to build (default: those the model uses).
        jobs: parallel build processes.
        path: where to write the cache (default :func:`compile_report_path`).
        progress: optional callable(BuildResult) per finished build.
    Returns:
        the report as :func:`load_compile_report` returns it.
    """
    from ... import compile_check as cc
    results = []
    for m in modules or ("embedding", "attention", "matmul", "layer_norm", "gelu"):
        results += [r.as_dict() for r in cc.run_builds(tuple(archs), m, jobs, progress)]
    path = Path(path) if path is not None else compile_report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": kernels_fingerprint(), "archs": list(archs), "results": results}))
    os.replace(tmp, path)
    return {"source": str(path), "stale": False, "results": results}


def summarize_compile_report(report: dict | None, arch: int) -> dict | None:
    """The builds of one arch, and a one-line summary (builds, failures, spill bytes)."""
    if not report:
        return None
    rows = [r for r in report["results"] if int(r.get("arch", -1)) == arch]
    failed = sum(not r.get("ok", False) for r in rows)
    spills = sum(max(int(r.get("spill_bytes", 0)), 0) for r in rows)
    summary = (f"sm_{arch}: {len(rows)} builds, {failed} failed, {spills} spill bytes in all" +
               (" (STALE: the kernels changed since this report; rerun with --compile)" if report["stale"] else ""))
    return {"source": report["source"], "stale": report["stale"], "arch": arch, "summary": summary, "builds": rows}


def _cost_module(name: str, module: str) -> str | None:
    """The kernel module whose compile specs build the kernel of a Cost row (None: a library or torch kernel)."""
    if module in ("gemm", "torch") or name.endswith((".dA", ".dB")):
        return None
    for prefix, mod in (("attention", "attention"), ("layer_norm", "layer_norm"), ("bias_gelu", "gelu"),
                        ("embed_layer_norm", "embedding"), ("linear_", "matmul")):
        if name.startswith(prefix):
            return mod
    return module


def select_builds(builds: list[dict], name: str, module: str, dtype: str = "bf16", training: bool = False,
                  head_dim: int | None = None) -> list[dict]:
    """The builds of the compile report that a Cost row's kernel runs as: same module, then narrowed (each step
    only where it leaves something) by dtype, direction, GEMM epilogue, inference/training variant, head dim and
    the varlen form, without dropout (the model's timings have none) and with the exact erf GELU."""
    mod = _cost_module(name, module)
    cand = [b for b in builds if b.get("module") == mod]
    text = lambda b: f"{b.get('kernel', '')} {b.get('config', '')}"  # noqa: E731
    bwd = any(t in name for t in ("bwd", "scatter"))
    preds = [lambda b: (dtype if dtype != "tf32" else "fp32") in str(b.get("config", "")).split(),
             (lambda b: "bwd" in text(b)) if bwd else (lambda b: "bwd" not in text(b))]
    if mod == "matmul":
        epi = name[len("linear_"):].split(".")[0]
        preds.append({"gelu": lambda b: "gelu" in text(b), "layer_norm": lambda b: "LN" in text(b)}.get(
            epi, lambda b: str(b.get("config", "")).endswith("bias")))
        preds.append(lambda b: ("train" if training else "infer") in text(b))
    if mod == "attention":
        preds += [lambda b: "varlen" in text(b), lambda b: "dropout" not in text(b)]
        if head_dim:
            preds.append(lambda b: f"hd={head_dim}" in text(b))
    if mod == "gelu":
        preds.append(lambda b: "erf" in text(b))
    for pred in preds:
        kept = [b for b in cand if pred(b)]
        if kept:
            cand = kept
    return cand


def _compile_note(summary: dict | None, name: str, module: str, dtype: str = "bf16", training: bool = False,
                  head_dim: int | None = None) -> str:
    mod = _cost_module(name, module)
    if mod is None:
        return "library" if module == "gemm" or name.endswith((".dA", ".dB")) else "torch"
    if not summary:
        return "-"
    bs = select_builds(summary["builds"], name, module, dtype, training, head_dim)
    if not bs:
        return "not built"
    failed = sum(not b.get("ok", False) for b in bs)
    return (f"regs {max(int(b.get('registers', 0)) for b in bs)} spill "
            f"{sum(max(int(b.get('spill_bytes', 0)), 0) for b in bs)}" + (f" FAILED {failed}" if failed else ""))
