"""`fastdistil bench`'s engine room: set up every engine, check its outputs against transformers eager fp32 in the
same run, time them in interleaved rounds (A B C A B C ...) so machine noise hits all alike, and report medians,
real tokens/s and ratios to transformers sdpa. Results go to a table, a JSON file and a bar chart.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import math
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from . import engines as E
from .workloads import get_workload

TARGET_SAMPLE_S = 0.05  # calls shorter than this are repeated within one sample, so timer noise stays small
MAX_REPEATS = 50


def machine_info(threads: int | None = None, device: str = "cpu") -> dict:
    """CPU model, cores, threads, versions, GPU (if any) and the load average when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = {}
    for pkg in ("torch", "triton", "transformers", "onnxruntime", "onnx", "numpy"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    from .. import __version__
    from ..backend import availability
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "fastdistil": __version__,
            "versions": vers, "backends": {k: v[0] for k, v in availability().items()},
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "device": device, "gpu": None}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class _Progress:
    """One status line on stderr (tqdm when it is installed and stderr is a terminal, plain lines otherwise)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def step(self, msg: str, advance: int = 1) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(msg[:60])
            self.bar.update(advance)
        else:
            print(f"  {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def _threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def run_workload(name: str, *, device: str = "cpu", engines=None, rounds: int = 5, threads: int | None = None,
                 model: str = "minilm", progress: bool = True) -> dict:
    """Benchmark one workload.

    Args:
        name: workload name (A, B, C, train, distill).
        device: "cpu" or "cuda".
        engines: names or prefixes to keep (default: all of the workload's kind).
        rounds: timed rounds; each round calls every engine once (after one warm-up call each).
        threads: torch (and ONNX Runtime) intra-op threads; default torch's current setting.
        model: see engines.load_reference ("minilm", "random", "tiny" or a directory).
        progress: show progress on stderr.
    Returns:
        {"workload", "summary", "weights", "reference", "rows": [...]} (see format_table for the columns).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to torch here")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    wl = get_workload(name)
    threads = threads or torch.get_num_threads()
    names = E.select(wl.kind, engines, device)
    if not names:
        raise ValueError(f"no engine of workload {name} matches {engines}; known: "
                         f"{', '.join(E.engine_names(wl.kind, device))}")
    bar = _Progress(len(names) * (rounds + 1) + 1, progress)
    with _threads(threads):
        ctx = E.make_context(wl, device, threads, model)
        try:
            return _run(wl, ctx, names, rounds, bar)
        finally:
            bar.close()
            shutil.rmtree(ctx.tmpdir, ignore_errors=True)


def _run(wl, ctx, names, rounds, bar) -> dict:
    rows, live = [], []
    cuda = ctx.device.type == "cuda"
    # the reference every engine is checked against: transformers eager, fp32, this run's batch
    ref_engine = E.make_engine("transformers-eager", wl.kind) if wl.kind != "distill" else None
    ref = None
    if ref_engine is not None:
        bar.step("reference: transformers eager fp32")
        ref_engine.setup(ctx)
        ref = ref_engine.check()
    for n in names:
        eng = E.make_engine(n, wl.kind)
        row = {"engine": n, "family": eng.family, "backend": eng.backend, "precision": eng.precision,
               "status": "ok", "reason": ""}
        bar.step(f"setup {n}")
        t = time.perf_counter()
        try:
            if n == "transformers-eager" and ref_engine is not None:
                eng = ref_engine
            else:
                eng.setup(ctx)
            row["setup_s"] = round(time.perf_counter() - t, 2)
            out = eng.check()
            if out is None:  # nothing to compare (the GEMM floor: the encoder's GEMMs alone)
                row.update(agrees=None, checked="n/a")
            elif ref is not None:
                agree = E.agreement(out, ref, ctx.seqlens if isinstance(out, torch.Tensor) else None)
                row.update(agree)
                tol = E.tolerance(eng.precision)
                row["agrees"] = all(row.get(k, math.nan) <= v if k == "max_abs_diff" else row.get(k, -1) >= v
                                    for k, v in tol.items()) if wl.kind == "inference" else \
                    bool(row["max_abs_diff"] <= (1e-3 if eng.precision == "fp32" else 5e-2))
                row["tolerance"] = tol if wl.kind == "inference" else {"max_abs_diff_of_loss_and_grads": 1e-3}
            else:
                loss = float(out["loss"]) if isinstance(out, dict) else math.nan
                row.update(loss=loss, agrees=math.isfinite(loss))
            # warm-up calls (on a GPU three: Triton/cuBLAS/inductor first calls, then CUDA-graph recording); the
            # last one sizes the repeats per sample
            for _ in range(3 if cuda else 1):
                t = time.perf_counter()
                eng()
                ctx.sync()
                warm = time.perf_counter() - t
            row["repeats"] = max(1, min(MAX_REPEATS, int(TARGET_SAMPLE_S / max(warm, 1e-6))))
            row["times_ms"] = []
            if cuda and "peak_cuda_MB" not in eng.extra:  # what one call allocates above what was live before it
                torch.cuda.reset_peak_memory_stats(ctx.device)
                base = torch.cuda.memory_allocated(ctx.device)
                eng()
                ctx.sync()
                eng.extra["peak_cuda_MB"] = round((torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20, 1)
            row.update(eng.extra)
            live.append((eng, row))
        except E.Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # a peer that breaks is reported, not fatal to the run
            row.update(status="failed", reason=f"{type(e).__name__}: {e}")
        rows.append(row)
    for r in range(rounds):
        for eng, row in live:
            bar.step(f"round {r + 1}/{rounds} {row['engine']}")
            k = row["repeats"]
            ctx.sync()
            if cuda:  # CUDA events on the stream: GPU time of the k calls, including gaps the host leaves
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(k):
                    eng()
                end.record()
                end.synchronize()
                row["times_ms"].append(start.elapsed_time(end) / k)
                continue
            t = time.perf_counter()
            for _ in range(k):
                eng()
            ctx.sync()
            row["times_ms"].append((time.perf_counter() - t) * 1e3 / k)
    tokens = ctx.real_tokens
    for eng, row in live:
        ts = row["times_ms"]
        row["median_ms"] = statistics.median(ts)
        row["min_ms"], row["max_ms"] = min(ts), max(ts)
        row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
        eng.teardown()
    # the ratio's baseline: transformers sdpa, in bf16 on a GPU (what GPU users run) when that engine ran
    ok = {r["engine"]: r for r in rows if r["status"] == "ok"}
    base_name = "transformers-sdpa-bf16" if cuda and "transformers-sdpa-bf16" in ok else "transformers-sdpa"
    base = ok.get(base_name)
    for row in rows:
        if row["status"] == "ok" and base is not None:
            row["ratio_vs_sdpa"] = base["median_ms"] / row["median_ms"]
    _relative_to_peers(rows)
    return {"workload": wl.name, "kind": wl.kind, "summary": wl.summary(), "real_tokens": tokens,
            "ratio_base": base_name if base is not None else None,
            "padded_tokens": int(ctx.ids.numel()), "weights": ctx.weights, "rounds": len(next(iter(
                [r["times_ms"] for _, r in live]), [])) if live else 0,
            "reference": "transformers eager fp32, same batch, same run" if ref is not None else None,
            "timing": "CUDA events, median of interleaved rounds after 3 warm-up calls" if cuda else
            "wall clock, median of interleaved rounds after 1 warm-up call", "rows": rows}


def run(workloads, *, device="cpu", engines=None, rounds=5, threads=None, model="minilm", progress=True,
        argv=None) -> dict:
    """Benchmark several workloads; returns the whole result (machine info, date, command, per workload)."""
    threads = threads or torch.get_num_threads()
    result = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "fastdistil bench " + " ".join(argv or []),
              "machine": machine_info(threads, device), "workloads": {}}
    for w in workloads:
        result["workloads"][w] = run_workload(w, device=device, engines=engines, rounds=rounds, threads=threads,
                                              model=model, progress=progress)
    return result


def _relative_to_peers(rows: list[dict]) -> None:
    """Per fastdistil row: its speed relative to ONNX Runtime's best configuration in this run (the fastest of
    padded, bucketed and per-sequence, fp32) and the share of the GEMM floor of its precision it reaches
    (floor time / its time; 1.0 would be an encoder that costs nothing but its GEMMs)."""
    ok = [r for r in rows if r["status"] == "ok"]
    ort = [r for r in ok if r["engine"].startswith("onnxruntime-") and r["precision"] == "fp32"]
    best = min(ort, key=lambda r: r["median_ms"]) if ort else None
    floors = {r["precision"]: r for r in ok if r["engine"].startswith("gemm-floor-")}
    for r in ok:
        if not r["engine"].startswith("fastdistil-"):
            continue
        if best is not None:
            r["vs_ort_best"], r["ort_best"] = best["median_ms"] / r["median_ms"], best["engine"]
        floor = floors.get(r["precision"].replace("-autocast", ""))
        if floor is not None:
            r["of_gemm_floor"] = floor["median_ms"] / r["median_ms"]


def peer_lines(wres: dict) -> list[str]:
    """One line per fastdistil engine: x ONNX Runtime best, % of the GEMM floor (where those ran)."""
    out = []
    for r in wres["rows"]:
        parts = []
        if r.get("vs_ort_best") is not None:
            parts.append(f"{r['vs_ort_best']:.2f}x ONNX Runtime best ({r['ort_best']})")
        if r.get("of_gemm_floor") is not None:
            parts.append(f"{100 * r['of_gemm_floor']:.0f}% of the GEMM floor")
        if parts:
            out.append(f"{r['engine']}: " + ", ".join(parts))
    return out


def _fmt(v, spec, missing="-", suffix=""):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return format(v, spec) + suffix


def format_table(wres: dict) -> list[str]:
    """Engine, median ms, real tokens/s, ratio to transformers sdpa, max abs diff (and why an engine did not run)."""
    base = wres.get("ratio_base") or "transformers-sdpa"
    lines = [f"{wres['summary']}; weights: {wres['weights']}; 'vs sdpa' = speed relative to {base}",
             f"{'engine':<32} {'median ms':>10} {'min..max ms':>17} {'real tok/s':>11} {'vs sdpa':>8} "
             f"{'max abs diff':>12}  agrees"]
    for r in wres["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['engine']:<32} {r['status']}: {r['reason']}")
            continue
        p = 3 if r["median_ms"] < 1 else 2 if r["median_ms"] < 100 else 0
        spread = f"{r['min_ms']:.{p}f}..{r['max_ms']:.{p}f}"
        extra = ""
        if "min_cosine" in r and r["precision"] != "fp32":
            extra = f" (cos {r['min_cosine']:.5f})"
        if "saved_activation_MB" in r:
            extra += f" saved {r['saved_activation_MB']:.0f} MB"
        for k, label in (("peak_rss_MB", "peak RSS"), ("peak_cuda_MB", "peak CUDA")):
            if k in r:
                extra += f", {label} +{r[k]:.0f} MB"
        if "loss" in r:
            extra += f" loss {r['loss']:.4f}"
        lines.append(f"{r['engine']:<32} {r['median_ms']:>10.2f} {spread:>17} {r['tokens_per_s']:>11,.0f} "
                     f"{_fmt(r.get('ratio_vs_sdpa'), '.2f', suffix='x'):>8} {_fmt(r.get('max_abs_diff'), '.2e'):>12}  "
                     f"{'n/a' if r.get('checked') == 'n/a' else 'yes' if r.get('agrees') else 'NO'}{extra}")
    notes = peer_lines(wres)
    for r in wres["rows"]:
        if r.get("compile_s") is not None:
            notes.append(f"{r['engine']}: compiled in {r['compile_s']} s (not timed)")
        if r.get("fused_ops") and not any("fused ops" in n for n in notes):
            ops = ", ".join(f"{k} x{v}" for k, v in r["fused_ops"].items())
            notes.append(f"onnxruntime: legacy export + BERT fusions in {r.get('export_s', '?')} s; fused ops: {ops}")
    lines += [f"  note: {n}" for n in notes]
    return lines


def markdown(result: dict) -> str:
    """The result as Markdown (command, date, machine, one table per workload), for PERFORMANCE.md."""
    m = result["machine"]
    v = m["versions"]
    out = [f"`{result['command']}`, {result['date']}", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} threads for torch and ONNX Runtime"
           + (f", load average {m['load_average'][0]:.1f} at the start" if m.get("load_average") else "")
           + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; torch {v['torch']}, transformers "
           f"{v['transformers']}, onnxruntime {v['onnxruntime']}, triton {v['triton']}."]
    for w in result["workloads"].values():
        out += ["", f"**{w['summary']}**; weights: {w['weights']}; median of {w['rounds']} interleaved rounds.", "",
                f"| engine | median ms | min..max ms | real tokens/s | vs {w.get('ratio_base') or 'transformers-sdpa'} "
                "| max abs diff | agrees |",
                "|---|---|---|---|---|---|---|"]
        for r in w["rows"]:
            if r["status"] != "ok":
                out.append(f"| {r['engine']} | {r['status']}: {r['reason']} | | | | | |")
                continue
            p = 3 if r["median_ms"] < 1 else 2 if r["median_ms"] < 100 else 0
            agree = "n/a" if r.get("checked") == "n/a" else "yes" if r.get("agrees") else "**NO**"
            if "min_cosine" in r and r["precision"] != "fp32":
                agree += f" (cos {r['min_cosine']:.5f})"
            for k, label in (("saved_activation_MB", "saved "), ("peak_rss_MB", "peak RSS +"),
                             ("peak_cuda_MB", "peak CUDA +")):
                if k in r:
                    agree += f", {label}{r[k]:.0f} MB"
            out.append(f"| {r['engine']} | {r['median_ms']:.{p}f} | {r['min_ms']:.{p}f}..{r['max_ms']:.{p}f} | "
                       f"{r['tokens_per_s']:,.0f} | {_fmt(r.get('ratio_vs_sdpa'), '.2f', suffix='x')} | "
                       f"{_fmt(r.get('max_abs_diff'), '.1e')} | {agree} |")
        notes = [ln.strip()[len("note: "):] for ln in format_table(w) if ln.strip().startswith("note: ")]
        if notes:
            out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot(result: dict, path) -> None:
    """A bar chart (median ms per engine, one panel per workload, ratio to sdpa on each bar) as PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib (pip install fastdistil[bench])") from None
    ws = list(result["workloads"].values())
    sizes = [max(1, sum(r["status"] == "ok" for r in w["rows"])) + 1 for w in ws]
    fig, axes = plt.subplots(len(ws), 1, figsize=(9, 1.0 + 0.4 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    colors = {"fastdistil": "#d62728", "transformers": "#1f77b4", "torch.compile": "#9467bd",
              "onnxruntime": "#2ca02c"}
    for ax, w in zip(axes[:, 0], ws):
        rows = [r for r in w["rows"] if r["status"] == "ok"]
        names = [r["engine"] for r in rows]
        vals = [r["median_ms"] for r in rows]
        ax.barh(names, vals, color=[colors.get(r["family"], "#7f7f7f") for r in rows],
                xerr=[[r["median_ms"] - r["min_ms"] for r in rows], [r["max_ms"] - r["median_ms"] for r in rows]],
                capsize=2)
        for i, r in enumerate(rows):
            tag = f" {r['ratio_vs_sdpa']:.2f}x" if r.get("ratio_vs_sdpa") else ""
            tag += "" if r.get("agrees") or r.get("checked") == "n/a" else " (DISAGREES)"
            ax.text(r["median_ms"], i, tag, va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median ms (lower is better)")
        ax.set_title(w["summary"], fontsize=9)
    m = result["machine"]
    fig.suptitle(f"fastdistil bench, {result['date']}, {m['cpu']}, {m['torch_threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_error_lines(result: dict) -> list[str]:
    """On CUDA: the cost model's error against the measurement of the same workload (fastdistil triton and
    transformers eager, forward, eager launches; fp16 is modeled as bf16: same bytes, same matrix rate). Empty on
    CPU."""
    if result["machine"]["device"] != "cuda":
        return []
    from . import costmodel as cm
    lines = []
    for name, w in result["workloads"].items():
        if w["kind"] != "inference":
            continue
        for prec in ("bf16", "fp32"):
            try:
                rep = cm.model_perf(name, dtype=prec, peers=("eager",), compile_report=None)
            except Exception as e:  # the model is optional here; say why it is missing
                lines.append(f"modeled vs measured ({name}, {prec}): cost model unavailable ({e})")
                continue
            fd = rep["fastdistil"]["forward"]["whole_model"]["time_eager_s"]
            tr = rep["transformers"]["eager"]["forward"]["totals"]["time_eager_s"]
            precs = ("bf16", "fp16") if prec == "bf16" else ("fp32",)
            pairs = [(f"fastdistil-triton-{p}", fd) for p in precs]
            pairs += [("transformers-eager" if p == "fp32" else f"transformers-eager-{p}", tr) for p in precs]
            for eng, modeled in pairs:
                row = next((r for r in w["rows"] if r["engine"] == eng and r["status"] == "ok"), None)
                if row is None:
                    continue
                err = (modeled * 1e3 - row["median_ms"]) / row["median_ms"]
                lines.append(f"modeled vs measured ({name}, {eng}): modeled {modeled * 1e3:.3f} ms, measured "
                             f"{row['median_ms']:.3f} ms, error {err:+.0%}")
    return lines
