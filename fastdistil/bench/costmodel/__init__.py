"""A GPU cost model for fastdistil and for transformers, for machines without a GPU. Every number it makes is
*modeled*, never measured, and every line it prints says so.

The model (one formula for both sides):

    time(kernel) = max(FLOPs / rate, bytes / bandwidth) + launches * launch overhead

where `rate` is the GPU's matrix rate for the dtype when the kernel runs on tensor cores (GEMMs, attention) and
its vector rate otherwise, `bytes` is the minimum HBM traffic of the kernel, and the launch overhead is that of
one of two regimes, both reported: *eager* (a host launch per kernel, ~4.5 us on an H100 through PyTorch) and
*graph* (CUDA-graph replay, ~1 us per kernel: the path a user gets from PyTorch's own
``torch.compile(model, mode="reduce-overhead")`` over compile-safe ops). The sum is conservative: it assumes the
GPU waits for each launch, as it does when kernels are short, which is the case for a 6-layer 384-wide student.

**fastdistil side.** The kernels' own cost functions (``kernels/<op>.py: cost(...)`` and ``kernels/spec.py:
gemm_cost``) give FLOPs, minimum bytes and launches for the padding-free path: embeddings + LayerNorm on the
T real tokens, then per layer the enumeration in :func:`layer_plan` (the one source of truth: the launches per
layer reported here are counted from it, and a launch counter on the triton backend compares with
:func:`launches_per_layer`), plus the small glue ops (input checks, unpadding, padding back, pooler), which are
recorded from the real code with the op recorder below.

**transformers side.** :class:`OpRecorder` (a ``TorchDispatchMode``) records every aten op transformers eager
runs for the same batch on CPU, with the sizes of its inputs and outputs; each op that launches a kernel is
modeled as one kernel reading its inputs and writing its outputs (views and allocations launch nothing). The
batch is padded, so padding costs transformers what it costs in reality; fastdistil's path has none.

Ceilings (:class:`GPU`) are parameters. Defaults are measured-style numbers below the datasheet peaks (H100 SXM:
~3.0 TB/s copy bandwidth, ~790 TFLOP/s bf16 dense; A100 SXM 80 GB: ~1.8 TB/s, ~280 TFLOP/s). Both sides get the
same ceilings; small GEMMs rarely reach them on real hardware, so absolute times are optimistic for both.

The package, by what each part does: :mod:`.ceilings` (GPUs and the kernel-time formula), :mod:`.plan`
(fastdistil's kernels), :mod:`.recorder` (the op recorder and the two sides recorded on CPU), :mod:`.host` (host
overhead per op call, measured on this CPU), :mod:`.compile_report` (registers and spills), :mod:`.report`
(``model_perf`` and its text).
"""
from __future__ import annotations

from . import host  # noqa: F401  (cm.host.measure_host_overhead)
from .ceilings import DTYPE_BYTES, GPU, GPUS, TORCH_DTYPES, get_gpu, kernel_time
from .compile_report import (_compile_note, _cost_module, build_compile_report, compile_report_path,  # noqa: F401
                             kernels_fingerprint, load_compile_report, select_builds, summarize_compile_report)
from .plan import (COST_MODULES, KernelCostMissing, KernelCosts, available_kernel_costs, fused_epilogues_available,
                   launches_per_layer, layer_plan, model_kernels, weights_plan)
from .recorder import (OpRecorder, RecordedOp, TensorInfo, op_cost, record, record_fastdistil_glue,
                       record_transformers)
from .report import format_report, model_perf, to_jsonable

__all__ = ["DTYPE_BYTES", "GPU", "GPUS", "TORCH_DTYPES", "get_gpu", "kernel_time", "build_compile_report",
           "compile_report_path", "kernels_fingerprint", "load_compile_report", "select_builds",
           "summarize_compile_report", "COST_MODULES", "KernelCostMissing", "KernelCosts", "available_kernel_costs",
           "fused_epilogues_available", "launches_per_layer", "layer_plan", "model_kernels", "weights_plan",
           "OpRecorder", "RecordedOp", "TensorInfo", "op_cost", "record", "record_fastdistil_glue",
           "record_transformers",
           "format_report", "model_perf", "to_jsonable"]
