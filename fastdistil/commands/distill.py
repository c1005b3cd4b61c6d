"""`fastdistil distill`: distil a BERT teacher into a smaller student with a published recipe.

Examples:
    fastdistil distill --teacher bert-dir --recipe minilmv2 --out runs/a --student-layers 0,2,4,6,8,10
    fastdistil distill --teacher st-dir --recipe embedding --data texts.txt --out runs/b --max-steps 2000
    fastdistil distill ... --resume                  # continue OUT after an interruption, same arguments
    torchrun --nproc_per_node=2 -m fastdistil distill ...   # DDP: --batch-size is the global batch
"""
from __future__ import annotations

import argparse


def _layers(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--student-layers takes comma-separated integers such as 0,2,4; got "
                                         f"{s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("--student-layers is empty")
    return out


def add_parser(sub):
    from ..cli import int_at_least, positive_float
    from ..distill.recipes import RECIPES
    p = sub.add_parser("distill", help="distil a teacher into a smaller student (xtremedistil, minilm, minilmv2, "
                       "distilbert, embedding)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory (HF or sentence-transformers)")
    p.add_argument("--recipe", required=True, choices=RECIPES, help="distillation method")
    p.add_argument("--data", default=None, help=".txt (one text per line), or .jsonl/.tsv with labels; default: an "
                   "embedded corpus of Python standard-library docstrings (no download)")
    p.add_argument("--out", required=True, help="output directory: metrics.jsonl, checkpoint.pt, final/")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--student", default=None, help="student checkpoint directory")
    g.add_argument("--student-layers", type=_layers, default=None,
                   help="build the student from these 0-based teacher layers, e.g. 0,2,4 (default: every other)")
    p.add_argument("--max-steps", type=int_at_least(1), default=1000)
    p.add_argument("--batch-size", type=int_at_least(1), default=32,
                   help="global batch (sequences per step over all processes)")
    p.add_argument("--max-length", type=int_at_least(2), default=128,
                   help="tokens per sequence, [CLS] and [SEP] included")
    p.add_argument("--lr", type=positive_float, default=1e-4,
                   help="peak AdamW learning rate (6%% warmup, linear decay). A step whose loss or gradient is not "
                   "finite (NaN/inf: the rate is too high) stops the run with exit status 1 before the weights are "
                   "updated; the last checkpoint is kept and no non-finite weights are ever written")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--save-every", type=int_at_least(1), default=500,
                   help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int_at_least(1), default=1, help="write metrics every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same arguments, same "
                   "data and tokenizer: their content hashes are checked)")
    p.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="teacher precision (bfloat16: about 2x faster teacher on AVX512-BF16 CPUs and GPUs)")
    p.add_argument("--no-cache", action="store_true", help="do not cache per-example teacher targets in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from ..distill.run import RunArgs
    from ..distill.run import run as run_distill
    res = run_distill(RunArgs(teacher=args.teacher, recipe=args.recipe, data=args.data, out=args.out,
                              student=args.student, student_layers=args.student_layers, max_steps=args.max_steps,
                              batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, seed=args.seed,
                              save_every=args.save_every, log_every=args.log_every, resume=args.resume,
                              cache=not args.no_cache, teacher_dtype=args.teacher_dtype,
                              progress=not args.no_progress))
    if res.get("final_dir"):
        print(f"step {res['step']}  loss {res['loss']:.6f}  final student: {res['final_dir']}")
    return 0
