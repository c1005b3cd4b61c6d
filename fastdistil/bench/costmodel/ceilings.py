"""The ceilings of the modeled GPUs (bandwidth, matrix and vector rates, launch overheads) and the time of one
kernel under them: ``max(FLOPs / rate, bytes / bandwidth) + launches * launch overhead``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...kernels.spec import Cost

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GPU:
    """The ceilings of one GPU. Rates in FLOP/s, bandwidth in bytes/s, launch overheads in seconds.

    matrix_flops maps a dtype name to the dense tensor-core rate; "fp32" is PyTorch's default for fp32 GEMMs
    (``torch.backends.cuda.matmul.allow_tf32 = False``: no tensor cores), "tf32" the rate with TF32 allowed.
    """
    name: str
    bandwidth: float
    matrix_flops: dict
    vector_flops: float
    launch_eager: float = 4.5e-6
    launch_graph: float = 1.0e-6

    def matrix_rate(self, dtype: str) -> float:
        if dtype not in self.matrix_flops:
            raise ValueError(f"{self.name}: no matrix rate for dtype {dtype!r}; known: {sorted(self.matrix_flops)}")
        return self.matrix_flops[dtype]

    def describe(self, dtype: str) -> str:
        return (f"{self.name}: {self.bandwidth / 1e12:.2f} TB/s, {self.matrix_rate(dtype) / 1e12:.0f} TFLOP/s "
                f"{dtype} matrix, {self.vector_flops / 1e12:.0f} TFLOP/s vector, launch {self.launch_eager * 1e6:.1f}"
                f" us eager / {self.launch_graph * 1e6:.1f} us graph replay")


GPUS: dict[str, GPU] = {
    # H100 SXM5 80 GB: datasheet 3.35 TB/s and 989 TFLOP/s bf16 dense; measured copy ~3.0 TB/s, GEMM ~790.
    "h100": GPU("H100 SXM (modeled)", 3.0e12, {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 60e12},
                60e12),
    # A100 SXM 80 GB: datasheet 2.04 TB/s and 312 TFLOP/s bf16 dense; measured copy ~1.8 TB/s, GEMM ~280.
    "a100": GPU("A100 SXM 80GB (modeled)", 1.8e12, {"bf16": 280e12, "fp16": 280e12, "tf32": 140e12, "fp32": 18e12},
                18e12),
}


def get_gpu(name: str = "h100", **overrides) -> GPU:
    """A GPU's default ceilings, with any field overridden (bandwidth=, launch_eager=, matrix_flops=...)."""
    if name.lower() not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    gpu = GPUS[name.lower()]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(gpu, **overrides) if overrides else gpu


def kernel_time(c: Cost, gpu: GPU, dtype: str, host_s: float = 0.0) -> dict:
    """Modeled time of one Cost row (all its launches), in both launch regimes.

    Eager: each launch costs the GPU's launch overhead, and the device waits for the host when the host's time
    per launch (`host_s`: Python and dispatcher, see host.py) exceeds the kernel's own time:
    ``launches * launch_eager + max(body, launches * host_s)``. Graph replay: ``body + launches * launch_graph``.

    Returns:
        dict with compute_s, memory_s, bound ("compute"/"memory"), host_s, time_eager_s, time_graph_s.
    """
    rate = gpu.matrix_rate(dtype) if c.tensor_core else gpu.vector_flops
    compute = c.flops / rate
    memory = c.bytes / gpu.bandwidth
    body = max(compute, memory)
    host = c.launches * host_s
    return {"compute_s": compute, "memory_s": memory, "bound": "compute" if compute > memory else "memory",
            "host_s": host, "time_eager_s": c.launches * gpu.launch_eager + max(body, host),
            "time_graph_s": body + c.launches * gpu.launch_graph}
