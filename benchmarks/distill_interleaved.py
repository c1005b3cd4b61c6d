"""Interleaved timing of the distill-step engines of test_distill_step.py: round after round, every engine once
per round (A B C ... A B C ...), so a change in machine load hits every engine alike. Prints medians and ratios.

    python benchmarks/distill_interleaved.py [ROUNDS]        # from the repository root; default 3 rounds
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_distill_step as T  # noqa: E402

from fastdistil import FastStudent, FastStudentConfig, backend  # noqa: E402
from fastdistil.bench.workloads import get_workload  # noqa: E402


def main(rounds: int = 3) -> dict:
    torch.manual_seed(0)
    tcfg = FastStudentConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    scfg = FastStudentConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher, student = FastStudent(tcfg).eval(), FastStudent(scfg)
    ids, mask = get_workload("distill").inputs()
    tmp = tempfile.mkdtemp()
    engines = {}
    for recipe, e in T.ENGINES:
        if e == "transformers":
            step = T.HFStep(teacher, student, recipe, ids, mask)
        else:
            step = T.FastStep(teacher, student, recipe, ids, mask,
                              cache_dir=f"{tmp}/{recipe}" if e.endswith("cache-warm") else None,
                              teacher_dtype=torch.bfloat16 if "bf16" in e else None)
        step.losses()  # fills the cache of the cache-warm engine
        step()  # warm-up
        engines[f"{recipe}-{e}"] = step
    times = {k: [] for k in engines}
    for r in range(rounds):
        for k, step in engines.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"threads {torch.get_num_threads()}, fastdistil backend {backend.resolve('cpu')}")
    for k, v in med.items():
        print(f"{k:40s} median {v:6.2f} s")
    for recipe in ("minilm", "embedding"):
        base = med[f"{recipe}-transformers"]
        for k, v in med.items():
            if k.startswith(recipe) and not k.endswith("transformers"):
                print(f"{k}: {base / v:.2f}x faster than {recipe}-transformers")
    return {"medians_s": med, "times_s": times}


if __name__ == "__main__":
    res = main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    if "--json" in sys.argv:
        print(json.dumps(res))
