"""Peak resident memory of `fastdistil embed` on 10,000 sentences (issue 13: under 1 GiB at 2 threads).

    python benchmarks/encode_rss.py [--texts 10000] [--threads 2] [--backend native] [--batch-size 64]

Writes 10,000 deterministic sentences of mixed lengths (3 to 120 words drawn from the shipped calibration texts'
vocabulary, or a fixed word list), runs `fastdistil embed` on them in a child process with the given thread count
and backend, and prints the child's peak RSS (ru_maxrss of the child: the whole process, Python, torch, the model
and every buffer) and its throughput. Nothing is timed against a threshold: the number goes to PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

_WORDS = ("the model reads every sentence once and writes one embedding per line so that search ranks documents "
          "by cosine similarity between queries and passages while small students run on ordinary servers with "
          "two cores and little memory budget").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences of 3..120 words, lengths skewed short as in real corpora."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = min(120, 3 + int(rng.expovariate(1 / 18)))
        out.append(" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + ".")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        inp, out = os.path.join(d, "texts.txt"), os.path.join(d, "emb.npy")
        with open(inp, "w") as f:
            f.write("\n".join(sentences(a.texts)) + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
                   FASTDISTIL_BACKEND=a.backend)
        cmd = [sys.executable, "-m", "fastdistil", "embed", "--input", inp, "--output", out,
               "--batch-size", str(a.batch_size)]
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: kB
    print(f"embed {a.texts} texts, backend {a.backend}, {a.threads} threads, batch {a.batch_size}: "
          f"peak RSS {peak_mib:.0f} MiB, {dt:.1f} s wall ({a.texts / dt:.0f} texts/s, model load included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
