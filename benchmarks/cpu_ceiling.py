"""The fp32 ceiling of this CPU, and what a speed target against ONNX Runtime demands of it (issue 13).

    python benchmarks/cpu_ceiling.py [--threads 2] [--ort-a MS] [--ort-b MS] [--floor-a MS] [--json FILE]

Measures, on this machine: the FMA peak (benchmarks/fma_peak.c, built with the system C compiler for AVX-512
and/or AVX2 + FMA, one thread per core), a large sgemm (2048^3, torch), and memory bandwidth (a 256 MB copy).
Counts the forward's FLOPs of workloads A and B for all-MiniLM-L6-v2's shape (GEMMs on the real tokens, attention
over each sequence's own length) and prints the shortest forward the FMA peak allows. With --ort-a / --ort-b (an
ONNX Runtime median from `fastdistil bench` in the same session), prints the share of the FMA peak that a forward
1.5x (A) or 1.6x (B) faster than ONNX Runtime would have to sustain from its first instruction to its last; with
--floor-a (the `gemm-floor-fp32` median), the largest share of that floor a forward can reach when its attention
alone runs at the FMA peak.
Nothing is asserted: the numbers go to PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fma_peak(threads: int) -> dict[str, float]:
    """GFLOP/s per vector width this CPU and compiler can build (empty without a C compiler)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    flags, out = cpu_flags(), {}
    widths = [("avx512", "512", ["-mavx512f"])] if "avx512f" in flags else []
    if {"avx2", "fma"} <= flags:
        widths.append(("avx2", "256", ["-mavx2", "-mfma"]))
    if cc is None:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        for name, width, march in widths:
            exe = os.path.join(tmp, f"fma_{name}")
            subprocess.run([cc, "-O2", "-fopenmp", *march, f"-DWIDTH={width}", str(HERE / "fma_peak.c"), "-o", exe],
                           check=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="spread")
            res = subprocess.run([exe], env=env, capture_output=True, text=True)
            out[name] = float(res.stdout.split()[1])
    return out


def _best(fn, n: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / _best(lambda: a @ b) / 1e9


def copy_bandwidth() -> float:
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src)) / 1e9


def forward_flops(lengths, d: int = 384, f: int = 1536, layers: int = 6) -> float:
    """fp32 FLOPs of one padding-free forward: the four GEMMs per token and QK^T + PV per sequence, every layer."""
    gemm = 2 * d * (3 * d + d + 2 * f) * sum(lengths)
    attention = 4 * d * sum(n * n for n in lengths)
    return float(layers * (gemm + attention))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ort-a", type=float, help="ONNX Runtime's best median on workload A, ms (same session)")
    ap.add_argument("--ort-b", type=float, help="ONNX Runtime's best median on workload B, ms (same session)")
    ap.add_argument("--floor-a", type=float, help="the gemm-floor-fp32 median on workload A, ms (same session)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from fastdistil.bench.workloads import get_workload

    torch.set_num_threads(args.threads)
    peaks = fma_peak(args.threads)
    rep = {"threads": args.threads, "fma_peak_gflops": peaks, "sgemm_2048_gflops": sgemm_rate(),
           "copy_gb_s": copy_bandwidth(), "workloads": {}}
    peak = max(peaks.values()) if peaks else None
    print(f"threads {args.threads}; FMA peak " + (", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) or "n/a (no C "
          "compiler)") + f" GFLOP/s; sgemm 2048^3 {rep['sgemm_2048_gflops']:.1f} GFLOP/s; copy {rep['copy_gb_s']:.1f} "
          "GB/s (read + write)")
    for name, ort, factor in (("A", args.ort_a, 1.5), ("B", args.ort_b, 1.6)):
        flops = forward_flops(get_workload(name).lengths())
        w = {"gflop": flops / 1e9}
        line = f"workload {name}: {flops / 1e9:.2f} GFLOP per forward"
        if peak:
            w["ms_at_fma_peak"] = flops / peak / 1e6
            line += f"; at the FMA peak {w['ms_at_fma_peak']:.1f} ms"
        if ort and peak:
            need = ort / factor
            w.update(ort_ms=ort, target_ms=need, share_of_peak=flops / (need * 1e6) / peak)
            line += (f"; {factor}x ONNX Runtime ({ort:.2f} ms) = {need:.2f} ms needs {w['share_of_peak']:.0%} of the "
                     f"FMA peak sustained over the whole forward (sgemm 2048^3 reaches "
                     f"{rep['sgemm_2048_gflops'] / peak:.0%})")
        if name == "A" and args.floor_a and peak:
            att = 4 * 384 * 6 * sum(n * n for n in get_workload(name).lengths())  # QK^T + PV, every layer
            w.update(attention_gflop=att / 1e9, attention_ms_at_peak=att / peak / 1e6,
                     best_share_of_floor=args.floor_a / (args.floor_a + att / peak / 1e6))
            line += (f"; attention alone ({att / 1e9:.2f} GFLOP) takes {w['attention_ms_at_peak']:.1f} ms at the FMA "
                     f"peak, so the forward reaches at most {w['best_share_of_floor']:.1%} of the GEMM floor "
                     f"({args.floor_a:.1f} ms) before LayerNorm, GELU and the embeddings")
        rep["workloads"][name] = w
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
