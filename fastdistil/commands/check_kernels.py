"""`fastdistil check-kernels`: build every Triton kernel configuration for sm_80/sm_90 without a GPU and report
registers, shared memory, spills and tensor-core instructions per build (see fastdistil/compile_check.py)."""
from __future__ import annotations

import json
import sys


def add_parser(sub):
    from ..cli import int_at_least
    p = sub.add_parser("check-kernels", help="compile every Triton kernel config for real GPU targets (no GPU "
                       "needed); non-zero exit on a failed build or a spill")
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--json", action="store_true", help="print one JSON list of build results instead of a table")
    p.add_argument("--kernel", default=None, help="only this kernel module (e.g. attention) or kernel name")
    p.add_argument("--match", default=None, help="only configs whose label matches this regular expression (e.g. 'hd=32 fp16')")
    p.add_argument("--jobs", type=int_at_least(1), default=2, help="parallel build processes (default 2)")
    p.add_argument("--align", default="aligned,unaligned",
                   help="divisibility variants to build: aligned (every pointer/int argument 16-divisible, as for "
                        "aligned tensors at BERT widths), unaligned (none), or both (default)")
    return p


def _archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(a.strip().removeprefix("sm_")) for a in text.split(",") if a.strip())
    except ValueError:
        raise ValueError(f"--arch takes comma-separated integers such as 80,90, got {text!r}") from None
    if not archs or any(a < 70 for a in archs):
        raise ValueError(f"--arch needs compute capabilities >= 70, got {text!r}")
    return archs


def run(args) -> int:
    from .. import compile_check as cc

    archs = _archs(args.arch)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if not args.json:
        print(cc.HEADER)
    progress = None if args.json else (lambda r: print(cc.format_row(r), flush=True))
    aligns = tuple(a.strip() for a in args.align.split(",") if a.strip())
    if not aligns or any(a not in cc.ALIGNS for a in aligns):
        raise ValueError(f"--align takes {', '.join(cc.ALIGNS)} (comma-separated), got {args.align!r}")
    results = cc.run_builds(archs, args.kernel, args.jobs, progress, match=args.match, aligns=aligns)
    if not results:
        raise ValueError("nothing to build: no kernel configuration matches the selection")
    summary = cc.summarize(results)
    failed = [r for r in results if not r.ok]
    if args.json:
        json.dump([r.as_dict() for r in results], sys.stdout, indent=1)
        print()
    else:
        print("\nsummary per kernel and arch:")
        print(f"{'kernel':<24} {'arch':<6} {'builds':>6} {'failed':>6} {'max regs':>8} {'max shared':>10} "
              f"{'spills':>6} {'tensor-core':>11} {'seconds':>8}")
        for s in summary:
            tc = f"{s['tensor_core_builds']}/{s['builds']}"
            print(f"{s['kernel']:<24} sm_{s['arch']:<3} {s['builds']:>6} {s['failed']:>6} {s['max_registers']:>8} "
                  f"{s['max_shared_bytes']:>10} {s['spill_bytes']:>6} {tc:>11} {s['seconds']:>8.1f}")
        alloc = sum(s.get("allocator_spill_builds", 0) for s in summary)
        print(f"\n{len(results)} builds, {len(failed)} failed"
              + (f"; {alloc} with an allocator spill of <= {cc.ALLOCATOR_SPILL_BYTES} B at < "
                 f"{cc.ALLOCATOR_SPILL_REGS} registers (not failures, see fastdistil/compile_check.py)" if alloc else ""))
    for r in failed:
        print(f"FAILED {r.kernel} sm_{r.arch} {r.config}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
