"""Proof 2: build every Triton kernel configuration for real GPU targets, without a GPU.

Every module named in ``fastdistil.kernels.KERNEL_MODULES`` exposes ``compile_specs() -> list[CompileSpec]`` (see
kernels/spec.py). For each spec and each requested architecture this module runs
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options)``,
then reads from the result:
- registers, stack and local bytes from ``cuobjdump --dump-resource-usage`` (the one bundled with triton) on the
  cubin; spill_bytes = STACK + LOCAL (Triton kernels use no local arrays, so any is a spill);
- shared memory: the dynamic shared memory Triton launches with (``metadata.shared``) plus cuobjdump's static
  SHARED (the driver's reserved bytes on sm_90);
- tensor-core instructions in the PTX: ``wgmma`` (sm_90 warp-group MMA) or ``mma`` (``mma.sync``); whether any
  MMA takes tf32 operands (a spec with ``extra={"ieee": True}`` promises full fp32 and fails if so).
A build fails when triton raises, when it spills under register pressure, when a spec expecting tensor cores got
none, or when an ieee spec got tf32. A spill of at most ALLOCATOR_SPILL_BYTES at fewer than ALLOCATOR_SPILL_REGS
registers is not register pressure: ptxas 12.8+/13.x, run by Triton 3.6-3.9 with ``--regAllocOptLevel=2`` (a
workaround for a ptxas bug), puts 4-8 bytes of a few kernels on the stack at 48-168 registers out of 255; no
configuration change of ours removes it reliably, and the H100 runtime reported 0 spills for every kernel a
MiniLM-sized training step launched (docs/gpu-runs/2026-11-27-h100-helper-f/). Such builds pass, marked
``allocator spill`` in their status, and are counted apart in the summary.

What runs is what is built: each kernel module's launchers and its compile_specs() read one configuration function
per kernel (block sizes, num_warps, num_stages), and tests/test_gpu_bugs.py records the arguments every launcher
passes and finds the spec that builds them. Triton's JIT also specialises each launch on its argument values: a
pointer or integer divisible by 16 gets the ``tt.divisibility=16`` hint (vectorised, asynchronous loads), an
integer equal to 1 becomes a constant. So every spec is built twice: ``aligned`` (every pointer and integer
argument divisible by 16: aligned tensors at BERT widths, token counts that are multiples of 16) and
``unaligned`` (no hint: odd widths, odd token counts); real launches mix the two, between these extremes.
``extra["divisible_by_16"]`` instead names the hinted arguments explicitly (one build).

Triton versions: the ASTSource API changed in 3.3 (``constexprs=`` and attrs ``{(index,): [[name, value]]}``
instead of ``constants=`` and an ``AttrsDescriptor``); :func:`ast_source` speaks both, so check-kernels runs on
Triton 3.2 through 3.9 (MIN_TRITON).

Builds run in worker processes started with ``spawn`` and without TRITON_INTERPRET (the interpreter replaces
``@triton.jit`` functions at import, so the kernels must be imported afresh), two at a time by default.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
import multiprocessing

DEFAULT_ARCHS = (80, 90)
ALLOCATOR_SPILL_BYTES = 16   # at most this many spilled bytes ...
ALLOCATOR_SPILL_REGS = 200   # ... at fewer registers than this (of 255) is ptxas's allocator, not pressure
ALIGNS = ("aligned", "unaligned")
MIN_TRITON = (3, 2)


@dataclass
class BuildResult:
    """One build of one CompileSpec for one architecture."""
    module: str
    kernel: str
    arch: int
    config: str
    align: str
    num_warps: int
    num_stages: int
    registers: int = -1
    shared_bytes: int = -1
    spill_bytes: int = -1
    tensor_cores: str = "-"        # "wgmma", "mma" or "-"
    tf32: bool = False
    expect_tensor_cores: bool = False
    seconds: float = 0.0
    ok: bool = False
    error: str = ""
    note: str = ""                 # e.g. an allocator spill that does not fail the build

    def as_dict(self) -> dict:
        return asdict(self)


def _kernel_modules() -> tuple[str, ...]:
    from fastdistil import kernels
    return tuple(kernels.KERNEL_MODULES)


@functools.lru_cache(maxsize=None)
def _specs(module: str) -> list:
    """compile_specs() of a KERNEL_MODULES name (fastdistil.kernels.<name>) or of a dotted module path."""
    path = module if "." in module else f"fastdistil.kernels.{module}"
    return importlib.import_module(path).compile_specs()


def collect(kernel: str | None = None, match: str | None = None, modules=None) -> list[tuple[str, int, object]]:
    """(module, index, spec) for every spec to build.

    Args:
        kernel: keep one kernel module (e.g. 'attention') or kernel name (e.g. 'attention_fwd'); None keeps all.
        match: keep specs whose config label matches this regular expression (re.search).
        modules: kernel module names or dotted paths; defaults to fastdistil.kernels.KERNEL_MODULES.
    """
    out = []
    names = tuple(modules) if modules is not None else _kernel_modules()
    for module in names:
        for i, spec in enumerate(_specs(module)):
            if (kernel is None or kernel in (module, spec.name)) and (match is None or re.search(match, spec.config)):
                out.append((module, i, spec))
    if kernel is not None and not any(kernel in (m, s.name) for m in names for s in _specs(m)):
        known = sorted(set(names) | {s.name for m in names for s in _specs(m)})
        raise ValueError(f"no kernel or kernel module named {kernel!r}; known: {', '.join(known)}")
    return out


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found (it ships with triton under backends/nvidia/bin)")
    return found


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of the (single) function in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True)
    for line in res.stdout.splitlines():
        if "REG:" in line:
            return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    raise RuntimeError(f"cuobjdump printed no resource usage:\n{res.stdout}{res.stderr}")


def tensor_core_instructions(ptx: str) -> tuple[str, bool]:
    """('wgmma' | 'mma' | '-', whether any MMA multiplies tf32 operands) for a PTX listing."""
    mma = [ln for ln in ptx.splitlines() if re.search(r"\b(wgmma|mma)\.", ln)]
    kind = "wgmma" if any("wgmma." in ln for ln in mma) else ("mma" if mma else "-")
    return kind, any(".tf32" in ln for ln in mma)


def hinted_args(spec, align: str) -> list[str]:
    """Arguments built with the 16-divisibility hint: the spec's explicit list, else every pointer and integer
    argument ("aligned") or none ("unaligned")."""
    if "divisible_by_16" in spec.extra:
        return [n for n in spec.extra["divisible_by_16"] if spec.signature.get(n, "constexpr") != "constexpr"]
    if align == "unaligned":
        return []
    return [n for n, t in spec.signature.items() if t.startswith("*") or t in ("i32", "i64")]


def ast_source(fn, signature: dict, constexprs: dict, hinted: list[str]):
    """triton.compiler.ASTSource for this Triton: 3.3+ takes ``constexprs=`` and attrs keyed by (index,); 3.2 takes
    ``constants=`` and an AttrsDescriptor built from hints."""
    import inspect

    from triton.compiler import ASTSource
    idx = {n: i for i, n in enumerate(fn.arg_names)}
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        attrs = {(idx[n],): [["tt.divisibility", 16]] for n in hinted}
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor  # Triton 3.2
    return ASTSource(fn, signature, constexprs, AttrsDescriptor.from_hints({idx[n]: 16 for n in hinted}))


def allocator_spill(spill_bytes: int, registers: int) -> bool:
    """Whether a spill is ptxas's allocator at low register use (see the module docstring), not pressure."""
    return 0 < spill_bytes <= ALLOCATOR_SPILL_BYTES and 0 < registers < ALLOCATOR_SPILL_REGS


def build(module: str, index: int, arch: int, align: str = "aligned") -> BuildResult:
    """Compile spec `index` of kernel module `module` for sm_`arch` and measure it (runs in a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget

    spec = _specs(module)[index]
    if "divisible_by_16" in spec.extra:
        align = "explicit"
    r = BuildResult(module, spec.name, arch, spec.config, align, spec.num_warps, spec.num_stages,
                    expect_tensor_cores=spec.expect_tensor_cores)
    t0 = time.perf_counter()
    try:
        fn = spec.fn
        if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("kernel was imported under TRITON_INTERPRET=1; builds need the real @triton.jit")
        src = ast_source(fn, spec.signature, spec.constexprs, hinted_args(spec, align))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        use = resource_usage(k.asm["cubin"])
        r.registers = use.get("REG", -1)
        r.spill_bytes = use.get("STACK", 0) + use.get("LOCAL", 0)
        r.shared_bytes = int(k.metadata.shared) + use.get("SHARED", 0)
        r.tensor_cores, r.tf32 = tensor_core_instructions(k.asm["ptx"])
        problems = []
        if r.spill_bytes and allocator_spill(r.spill_bytes, r.registers):
            r.note = f"allocator spill ({r.spill_bytes} B at {r.registers} regs)"
        elif r.spill_bytes:
            problems.append(f"spills {r.spill_bytes} bytes")
        if spec.expect_tensor_cores and r.tensor_cores == "-":
            problems.append("expected tensor-core instructions, found none")
        if spec.extra.get("ieee") and r.tf32:
            problems.append("promised ieee fp32 but the PTX multiplies tf32")
        r.ok = not problems
        r.error = "; ".join(problems)
    except Exception as e:  # a failed build is a result row, not a crash of the whole check
        r.ok = False
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        where = f" ({lines[0]})" if len(lines) > 1 else ""
        r.error = f"{type(e).__name__}: {lines[-1] if lines else ''}{where}"[:300]
    r.seconds = round(time.perf_counter() - t0, 2)
    return r


def _check_triton() -> None:
    """check-kernels needs triton >= MIN_TRITON (3.2); older releases have another ASTSource API."""
    try:
        import triton
    except ImportError as e:
        raise RuntimeError(f"check-kernels needs triton >= {'.'.join(map(str, MIN_TRITON))} (pip install triton): "
                           f"{e}") from None
    found = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if found < MIN_TRITON:
        raise RuntimeError(f"check-kernels needs triton >= {'.'.join(map(str, MIN_TRITON))}; found "
                           f"{triton.__version__}")


def _build_args(args):
    return build(*args)


def _worker_init():
    # Triton 3.9 warns once per process that TRITON_DEFAULT_FP_FUSION is unset; the default (fusion on) is what
    # the JIT uses too, so the builds match and the warning is noise here.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def run_builds(archs=DEFAULT_ARCHS, kernel: str | None = None, jobs: int = 2, progress=None, match: str | None = None,
               modules=None, aligns=ALIGNS) -> list[BuildResult]:
    """Build every selected spec for every arch in `jobs` spawned workers.

    Args:
        archs: compute capabilities as ints (80, 90, ...).
        kernel, match, modules: the selection, as in :func:`collect`.
        aligns: which divisibility variants to build ("aligned", "unaligned"); specs with an explicit
            ``divisible_by_16`` list are built once.
        jobs: worker processes.
        progress: optional callable(BuildResult) called as each build finishes, in order.
    Returns:
        BuildResults ordered by kernel module, spec, arch.
    """
    _check_triton()
    work = [(m, i, a, al) for m, i, sp in collect(kernel, match, modules)
            for al in (("explicit",) if "divisible_by_16" in sp.extra else aligns) for a in archs]
    if not work:
        return []
    saved = os.environ.pop("TRITON_INTERPRET", None)  # workers must import real @triton.jit kernels
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, initializer=_worker_init) as ex:
            results = []
            for r in ex.map(_build_args, work, chunksize=1):
                results.append(r)
                if progress is not None:
                    progress(r)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return results


def summarize(results: list[BuildResult]) -> list[dict]:
    """Per (kernel, arch): builds, failures, max registers, max shared bytes, total spills, tensor-core builds."""
    rows: dict[tuple[str, int], dict] = {}
    for r in results:
        s = rows.setdefault((r.kernel, r.arch), {"kernel": r.kernel, "arch": r.arch, "builds": 0, "failed": 0,
                                                 "max_registers": 0, "max_shared_bytes": 0, "spill_bytes": 0,
                                                 "tensor_core_builds": 0, "expect_tensor_core_builds": 0,
                                                 "seconds": 0.0})
        s["builds"] += 1
        s["failed"] += not r.ok
        s["max_registers"] = max(s["max_registers"], r.registers)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r.shared_bytes)
        pressure = r.spill_bytes > 0 and not allocator_spill(r.spill_bytes, r.registers)
        s["spill_bytes"] += max(r.spill_bytes, 0) if pressure else 0
        s["allocator_spill_builds"] = s.get("allocator_spill_builds", 0) + (r.spill_bytes > 0 and not pressure)
        s["tensor_core_builds"] += r.tensor_cores != "-"
        s["expect_tensor_core_builds"] += r.expect_tensor_cores
        s["seconds"] = round(s["seconds"] + r.seconds, 2)
    return list(rows.values())


def format_row(r: BuildResult) -> str:
    return (f"{r.kernel:<24} sm_{r.arch:<3} {r.config + ' ' + r.align:<44} w{r.num_warps} s{r.num_stages} {r.registers:>4} "
            f"{r.shared_bytes:>7} {r.spill_bytes:>6} {r.tensor_cores + ('(tf32)' if r.tf32 else ''):<11} "
            f"{r.seconds:>6.2f}s {('ok' + (' ' + r.note if r.note else '')) if r.ok else 'FAIL ' + r.error}")


HEADER = (f"{'kernel':<24} {'arch':<6} {'config (divisibility)':<44} {'opts':<5} {'regs':>4} {'shared':>7} {'spill':>6} "
          f"{'tensor-core':<11} {'time':>7} status")
