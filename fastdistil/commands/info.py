"""`fastdistil info`: versions, backends available and why not, the native kernel table and the CPU features it was
chosen from (bf16 and int8 modes), the backend each device resolves to."""
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
    try:
        avail = availability()
    except ValueError as e:  # FASTDISTIL_NATIVE_ISA names a table this CPU cannot run, or no table at all
        print(f"  native  no   {e}")
        return 2
    for name, (ok, why) in avail.items():
        print(f"  {name:<7} {'yes' if ok else 'no ':<4} {why}")
    if avail["native"][0]:
        _native_cpu()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        try:
            print(f"ops on {d} tensors run on: {resolve(d)}")
        except RuntimeError as e:
            print(f"ops on {d} tensors: {e}")
    return 0


def _native_cpu() -> None:
    """The native backend's kernel table, the CPU features it was chosen from, and what bf16 and int8 run on."""
    from .. import _C
    from ..ops import onednn

    f = _C.cpu_features()
    print(f"native kernels: {_C.isa()} table (this CPU runs: {', '.join(_C.supported_isas())}; "
          "FASTDISTIL_NATIVE_ISA forces one)")
    print(f"  CPU features seen: {' '.join(k for k, on in sorted(f.items()) if on) or 'none of ' + ' '.join(f)}")
    print("  bf16: " + ("native bf16 dot products (avx512_bf16/AMX)" if onednn.native_bf16()
                        else "bf16 storage-only: fp32 compute"))
    vnni = [k for k in ("avx512_vnni", "avx_vnni", "amx_int8") if f.get(k)]
    print("  int8: " + (f"VNNI dot products ({', '.join(vnni)})" if vnni else "no VNNI on this CPU"))
