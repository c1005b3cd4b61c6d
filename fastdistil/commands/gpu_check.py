"""`fastdistil gpu-check`: the CUDA test suite, bench, model-perf and a kernel profile in one bounded run (the logic
is fastdistil/gpucheck.py; `make gpu-check` calls it)."""
from __future__ import annotations


def add_parser(sub):
    from .. import gpucheck
    p = sub.add_parser("gpu-check", help="prove fastdistil on a CUDA GPU in one bounded run (tests, bench, "
                       "model-perf, profile); --dry-run checks the harness on a CPU",
                       description=gpucheck.__doc__.split("\n\n")[0] + " Run it from the root of a checkout "
                       "(the tests live there). Exit 2 without CUDA, 1 when a part or a test failed.")
    gpucheck.add_arguments(p)
    return p


def run(args) -> int:
    from .. import gpucheck
    return gpucheck.run(args)
