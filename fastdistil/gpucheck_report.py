"""The GPU check's reports (fastdistil/gpucheck.py runs the parts): the kernel profile of workload C against the
cost model, the totals of the sharded CUDA test runs, the cost model's error per workload, and the summary
(summary.json, summary.md ready for PERFORMANCE.md, a one-line summary).
"""
from __future__ import annotations

import glob
import json
import os
import time

INFERENCE = ("A", "B", "large", "C")


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


def summarize(run, env: dict) -> dict:
    """summary.json's content from a finished gpucheck.Run (its out folder, parts and start time)."""
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
                if r.get("status") == "ok" and not r.get("agrees") and r.get("checked") != "n/a"]
    if disagree:
        parts.append("DISAGREE " + ",".join(disagree))
    bad = [n for n, p in s["parts"].items() if p.get("status") != "ok"]
    parts.append(f"parts not ok: {','.join(bad)}" if bad else "all parts ok")
    return f"gpu-check ({s['seconds']:.0f} s): " + "; ".join(parts) + f"; {out}" + (f" ({tar})" if tar else "")


# ------------------------------------------------------------------------------------------------ main
