"""`fastdistil model-perf`: the modeled GPU report (fastdistil/bench/costmodel.py). No GPU needed; every number is
modeled from the kernels' FLOPs, minimum bytes and launch counts, and every line says so."""
from __future__ import annotations

import json


def add_parser(sub):
    from ..cli import int_at_least, positive_float
    p = sub.add_parser("model-perf", help="modeled GPU time of fastdistil vs transformers (no GPU needed)",
                       description="time(kernel) = max(FLOPs / matrix rate, bytes / bandwidth) + launch overhead, "
                       "summed over fastdistil's kernels (from their cost functions) and over the aten ops "
                       "transformers runs for the same batch (recorded on CPU). Two launch regimes: eager (plus the "
                       "host time per launch, measured on this CPU when the report is made) and CUDA-graph replay "
                       "(labelled with whether fastdistil's forward can be captured today). Modeled, not measured.")
    p.add_argument("--gpu", default="h100", choices=("h100", "a100"), help="ceilings to model (default h100)")
    p.add_argument("--workload", default="A", choices=("A", "B", "C", "large"), help="workload (default A)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32", "tf32"),
                   help="precision (default bf16; fp32 = PyTorch's default GEMMs without TF32)")
    p.add_argument("--train", action="store_true", help="also model a training step (forward + backward)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--bandwidth", type=positive_float, metavar="TB/s", help="override HBM bandwidth")
    p.add_argument("--tflops", type=positive_float, metavar="TFLOP/s", help="override the matrix rate for --dtype")
    p.add_argument("--launch-us", type=positive_float, help="override the eager launch overhead (microseconds)")
    p.add_argument("--graph-launch-us", type=positive_float, help="override the graph-replay cost per kernel (us)")
    p.add_argument("--unfused", action="store_true", help="model library GEMMs + separate LayerNorm / GELU "
                   "kernels instead of the GEMMs with fused epilogues")
    p.add_argument("--peers", default="eager,sdpa", help="transformers attention implementations to record "
                   "(default eager,sdpa; the headline speedup is against eager)")
    p.add_argument("--compile", action="store_true", help="build the kernels for this GPU's arch with "
                   "fastdistil.compile_check (minutes) and cache the report for later runs")
    p.add_argument("--jobs", type=int_at_least(1), default=2, help="parallel builds for --compile (default 2)")
    p.add_argument("--compile-report", metavar="FILE", help="read registers/spills from this report (the cache "
                   "or `fastdistil check-kernels --json` output) instead of the cache")
    p.add_argument("--no-host-overhead", action="store_true", help="model launch overhead only, without the host "
                   "time per launch measured on this CPU at report time (Python and dispatcher)")
    p.add_argument("--summary", action="store_true", help="totals only, no per-kernel rows")
    return p


def run(args) -> int:
    from ..bench import costmodel as cm

    g = cm.get_gpu(args.gpu)
    flops = dict(g.matrix_flops)
    if args.tflops is not None:
        flops[args.dtype] = args.tflops * 1e12
    gpu = cm.get_gpu(args.gpu, bandwidth=None if args.bandwidth is None else args.bandwidth * 1e12,
                     matrix_flops=flops if args.tflops is not None else None,
                     launch_eager=None if args.launch_us is None else args.launch_us * 1e-6,
                     launch_graph=None if args.graph_launch_us is None else args.graph_launch_us * 1e-6)
    for name, v in (("--bandwidth", args.bandwidth), ("--tflops", args.tflops), ("--launch-us", args.launch_us),
                    ("--graph-launch-us", args.graph_launch_us)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")
    peers = tuple(p for p in args.peers.split(",") if p)
    if not set(peers) <= {"eager", "sdpa"} or not peers:
        raise ValueError(f"--peers takes eager and/or sdpa, got {args.peers!r}")
    report_src = "cache"
    if args.compile_report:
        report_src = args.compile_report
    if args.compile:
        arch = 80 if args.gpu == "a100" else 90
        print(f"building the kernels for sm_{arch} (fastdistil.compile_check); the report is cached at "
              f"{cm.compile_report_path()}")
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        cm.build_compile_report((arch,), jobs=args.jobs, path=args.compile_report)
    rep = cm.model_perf(args.workload, gpu=gpu, dtype=args.dtype, train=args.train, fused=False if args.unfused
                        else None, peers=peers, compile_report=report_src,
                        host=None if args.no_host_overhead else "measure")
    print("\n".join(cm.format_report(rep, per_kernel=not args.summary)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cm.to_jsonable(rep), f, indent=1)
        print(f"modeled report written to {args.json}")
    return 0
