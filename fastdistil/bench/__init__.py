"""Benchmarks and the GPU cost model.

- :mod:`fastdistil.bench.workloads`: the fixed-seed workloads A, B, C, train, distill.
- :mod:`fastdistil.bench.engines`: what is timed: fastdistil on each backend and precision, and the peers
  (transformers eager/sdpa, torch.compile of transformers, ONNX Runtime padded / bucketed / per sequence).
- :mod:`fastdistil.bench.runner`: interleaved rounds, medians, ratios, agreement checks, JSON and plots
  (`fastdistil bench`).
- :mod:`fastdistil.bench.costmodel`: the modeled-GPU report (`fastdistil model-perf`), a package split by what
  each part does: ceilings, plan, recorder (ops, launches and host syncs), host (time per launch), compile_report,
  report.

Nothing here is imported by `import fastdistil`; transformers, onnxruntime and matplotlib load on first use.
"""
from .workloads import WORKLOADS, Workload, get_workload

__all__ = ["WORKLOADS", "Workload", "get_workload"]
