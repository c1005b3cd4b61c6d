"""`fastdistil info`: versions, backends available and why not, the backend each device resolves to."""
from __future__ import annotations

import importlib.metadata as md
import platform


def add_parser(sub):
    return sub.add_parser("info", help="show versions and which backends are available (and why not)")


def run(args) -> int:
    import torch

    from .. import __version__
    from ..backend import availability, get_backend, resolve

    print(f"fastdistil {__version__}  python {platform.python_version()}  {platform.machine()}")
    for pkg in ("torch", "triton", "transformers", "safetensors"):
        try:
            print(f"  {pkg:<13} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg:<13} not installed")
    print(f"  torch threads {torch.get_num_threads()}  cuda available: {torch.cuda.is_available()}")
    print(f"selected backend: {get_backend()} (set_backend() or FASTDISTIL_BACKEND)")
    for name, (ok, why) in availability().items():
        print(f"  {name:<7} {'yes' if ok else 'no ':<4} {why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        try:
            print(f"ops on {d} tensors run on: {resolve(d)}")
        except RuntimeError as e:
            print(f"ops on {d} tensors: {e}")
    return 0
