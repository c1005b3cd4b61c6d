"""Host overhead per launch, measured on this machine when the report is made (never stored): on its GPU when one
is visible, else on its CPU.

In eager mode every kernel costs the host some Python and dispatcher time before its launch; when that time is
longer than the kernel (a 6-layer, 384-wide student at batch 1) the GPU waits for the host. The GPU runs of
2026-11-27 measured 75-98 us of host time per fastdistil op call and 10-25 us per transformers op (docs/NOTES.md),
which a per-launch constant of 4.5 us does not model. On a CPU-only machine this module measures:

- ``transformers_s``: a tiny transformers BertModel forward (same layer count, width 8, 8 tokens) divided by the
  kernel ops it runs: nn.Module calls, Python and the dispatcher per launch (its CPU kernels on 8-wide tensors
  are included, so this is an upper bound of the host part);
- ``glue_s``: the same for fastdistil's glue (input checks and packing, padding back, the pooler);
- ``fastdistil_op_s``: one fastdistil op call as the eager path makes it: the public op (argument checks, backend
  lookup) plus the raw function through ops/eager.py, on a probe op whose body allocates its output, the way a
  launcher does before its launch. Triton's own launcher is not measurable without a GPU: it stays in the GPU's
  ``launch_eager``, and fastdistil's modeled eager time is a lower bound;
- ``custom_op_s`` and ``direct_s``: the probe op called through the torch.library dispatcher and directly (what
  the eager fast path of ops/eager.py saves per call).
With a GPU, ``transformers_s`` and ``fastdistil_op_s`` are timed on it instead (bursts of calls, one
synchronisation), launch included (``includes_launch``).

The model (ceilings.kernel_time): eager time = launches * launch_eager + max(device time, launches * host time).
Graph replay has no per-kernel host time.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HostOverhead:
    """Host seconds per launch (per op call for fastdistil's ops) and where they were measured."""
    machine: str
    transformers_s: float
    glue_s: float
    fastdistil_op_s: float
    custom_op_s: float
    direct_s: float
    source: str = "measured at report time"
    includes_launch: bool = False  # measured on a GPU: the times include the launch itself (launch_eager)


def machine_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _quartile_s(fn, reps: int, warmup: int = 3) -> float:
    """The lower quartile of `reps` timings: robust to the other processes of a shared machine, which only ever
    add time."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.quantiles(ts, n=4)[0]


_PROBE: dict = {}


def _probe_op():
    """A torch.library custom op shaped like a launcher (allocate the output, no kernel), registered once."""
    if "op" not in _PROBE:
        @torch.library.custom_op("fastdistil_probe::alloc_like", mutates_args=())
        def alloc_like(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)

        @alloc_like.register_fake
        def _(x, bias):
            return torch.empty_like(x)

        _PROBE["op"] = alloc_like
    return _PROBE["op"]


def _per_launch(fn, recorded_kernels: int, reps: int) -> float:
    return _quartile_s(fn, reps) / max(1, recorded_kernels)


def _burst_s(fn, reps: int, device: torch.device) -> float:
    """Host seconds per call of `fn` on a GPU: `reps` calls back to back, then one synchronisation (the kernels are
    tiny, so the host is the bottleneck); the best of four bursts."""
    best = float("inf")
    for _ in range(4):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure_host_overhead(cfg=None, reps: int = 30, device=None) -> HostOverhead:
    """Measure the per-launch host times (about a second; one thread, no_grad as the modeled eager forward).

    Args:
        cfg: the modeled config (its layer count is kept; everything else is tiny).
        reps: timed repetitions.
        device: "cpu" (default when no GPU is visible) measures the Python and dispatcher time on the CPU, Triton's
            launcher excluded; "cuda" (default when a GPU is visible) times transformers' tiny forward and one
            fastdistil op on the triton backend on the GPU: the real host time per launch, launch included.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return _measure_cuda(cfg, reps, dev)
    from ...config import FastStudentConfig
    from ...model import FastStudent
    from ...ops import dispatch, eager
    from ...ops.gelu import bias_gelu
    from ...padding import pad
    from .recorder import OpRecorder, _hf_model, record

    cfg = cfg or FastStudentConfig()
    tiny = dict(vocab_size=64, hidden_size=8, num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=2,
                intermediate_size=16, max_position_embeddings=16)
    tcfg = FastStudentConfig(**tiny)
    ids = torch.randint(1, 64, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            hf = _hf_model(tcfg, "eager", torch.float32, False)
            _, rec = record(hf, input_ids=ids, attention_mask=mask)
            tr = _per_launch(lambda: hf(input_ids=ids, attention_mask=mask), len(rec.kernel_ops()), reps)
            fs = FastStudent(tcfg).eval()
            x = torch.randn(fs.prepare(ids, mask)[0].shape[0], tcfg.hidden_size)

            def glue():  # what record_fastdistil_glue records: checks and packing, padding back, the pooler
                fs.pooler(pad(x, fs.prepare(ids, mask)[3])[:, 0])
            with OpRecorder(host=(ids, mask)) as rec:
                glue()
            glue_s = _per_launch(glue, len(rec.kernel_ops()), reps)
            op = _probe_op()
            x, b = torch.randn(8, 8), torch.randn(8)
            reg = _quartile_s(lambda: op(x, b), reps * 10)
            direct = eager.fast(op)
            raw = _quartile_s(lambda: direct(x, b), reps * 10)
            # the public op's own Python: checks and lookup, with the implementation replaced by the probe
            saved = dispatch._IMPLS.get(("bias_gelu", "torch"))
            dispatch._IMPLS[("bias_gelu", "torch")] = lambda x, bias, approximate: direct(x, bias)
            try:
                from ...backend import use_backend
                with use_backend("torch"):
                    public = _quartile_s(lambda: bias_gelu(x, b), reps * 10)
            finally:
                dispatch._IMPLS[("bias_gelu", "torch")] = saved
    finally:
        torch.set_num_threads(threads)
    return HostOverhead(machine_name(), tr, glue_s, public, reg, raw)


def _measure_cuda(cfg, reps: int, dev: torch.device) -> HostOverhead:
    """On a GPU: transformers' and fastdistil's (triton backend, eager fast path) host time per launch, each a
    burst of calls with one synchronisation; the probe-op and glue figures are the CPU's (they do not touch the
    device)."""
    from ...backend import use_backend
    from ...config import FastStudentConfig
    from ...ops.gelu import bias_gelu
    from .recorder import _hf_model, record

    cpu = measure_host_overhead(cfg, reps, "cpu")
    cfg = cfg or FastStudentConfig()
    tcfg = FastStudentConfig(vocab_size=64, hidden_size=64, num_hidden_layers=cfg.num_hidden_layers,
                             num_attention_heads=2, intermediate_size=128, max_position_embeddings=16)
    ids = torch.randint(1, 64, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.int64)
    with torch.no_grad():
        hf = _hf_model(tcfg, "eager", torch.float32, False)
        _, rec = record(hf, input_ids=ids, attention_mask=mask)  # the kernel ops, counted on the CPU copy
        hf = hf.to(dev)
        gids, gmask = ids.to(dev), mask.to(dev)
        tr = _burst_s(lambda: hf(input_ids=gids, attention_mask=gmask), reps, dev) / max(1, len(rec.kernel_ops()))
        x, b = torch.randn(8, 64, device=dev, dtype=torch.float16), torch.randn(64, device=dev, dtype=torch.float16)
        with use_backend("triton"):
            op = _burst_s(lambda: bias_gelu(x, b), reps * 10, dev)
    gpu = torch.cuda.get_device_name(dev)
    return HostOverhead(f"{machine_name()} with {gpu}", tr, cpu.glue_s, op, cpu.custom_op_s, cpu.direct_s,
                        source="measured at report time (GPU launches timed; glue and probe on the CPU)",
                        includes_launch=True)


def describe(h: HostOverhead | None) -> str:
    """One line for the report."""
    if h is None:
        return "not modeled (launch overhead only)"
    if h.includes_launch:
        return (f"{h.source} on {h.machine}: fastdistil op call (triton, eager fast path) {h.fastdistil_op_s * 1e6:.1f}"
                f" us and transformers {h.transformers_s * 1e6:.1f} us per kernel op, launch included; fastdistil "
                f"glue {h.glue_s * 1e6:.1f} us per kernel op (CPU)")
    return (f"{h.source} on {h.machine}: fastdistil op call {h.fastdistil_op_s * 1e6:.1f} us (eager fast path; "
            f"through the torch.library dispatcher {h.custom_op_s * 1e6:.1f} us vs direct {h.direct_s * 1e6:.1f} us"
            f" for an op that only allocates), fastdistil glue {h.glue_s * 1e6:.1f} us and transformers "
            f"{h.transformers_s * 1e6:.1f} us per kernel op; Triton's own launcher (argument binding, "
            f"specialisation) is not measurable without a GPU and is missing: fastdistil's eager time is a lower "
            f"bound (the H100 run of 2026-11-27 measured 75-98 us per fastdistil op call)")
