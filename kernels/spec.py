"""Shared plain-data types of the kernel modules: what to compile (check-kernels) and what a launch costs
(the GPU cost model). No triton import here, so the cost model runs without triton installed.

Protocol every kernels/<op>.py module follows:
  compile_specs() -> list[CompileSpec]   every configuration its launchers can choose
  cost(...) -> list[Cost]                FLOPs, minimum HBM bytes and launches of the op's kernels for a shape
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cost:
    """One kernel launch (or `launches` identical ones): arithmetic and the minimum bytes it must move."""
    name: str
    flops: float
    bytes: float
    launches: int = 1
    tensor_core: bool = False  # FLOPs run at the matrix rate (GEMM-like), else at the vector rate


@dataclass
class CompileSpec:
    """One `triton.compile(ASTSource(fn, signature, constexprs), target, options)` build."""
    name: str                      # kernel name as reported
    fn: object                     # the @triton.jit function
    signature: dict                # {"X": "*fp16", "N": "i32", "BLOCK": "constexpr", ...}
    constexprs: dict               # {"BLOCK": 128, ...}
    config: str                    # human label: "hd=32 fp16 dropout fwd"
    num_warps: int = 4
    num_stages: int = 2
    expect_tensor_cores: bool = False
    extra: dict = field(default_factory=dict)


def launch_options(cfg: dict) -> tuple[dict, int, int]:
    """Split a launch configuration (block sizes + num_warps + num_stages, the dict a launcher passes as
    ``kernel[grid](..., **cfg)``) into (constexprs, num_warps, num_stages) for a CompileSpec."""
    tiles = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return tiles, cfg["num_warps"], cfg["num_stages"]


def spec(name: str, fn, signature: dict, flags: dict, cfg: dict, label: str, **kw) -> CompileSpec:
    """The CompileSpec of a launch with constexpr `flags` and configuration `cfg` (the same dict the launcher
    passes): the built configuration and the launched one are one object."""
    tiles, warps, stages = launch_options(cfg)
    order = getattr(fn, "arg_names", None)  # Triton reads the signature in parameter order
    if order and set(order) == set(signature):
        signature = {n: signature[n] for n in order}
    return CompileSpec(name, fn, signature, {**flags, **tiles}, label, warps, stages, **kw)


def gemm_cost(name: str, m: int, n: int, k: int, elem_bytes: int, backward: bool = False) -> list[Cost]:
    """C (m, n) = A (m, k) @ B (k, n) on tensor cores; backward adds dA and dB GEMMs."""
    out = [Cost(name, 2.0 * m * n * k, elem_bytes * (m * k + k * n + m * n), 1, True)]
    if backward:
        out += [Cost(name + ".dA", 2.0 * m * n * k, elem_bytes * (m * n + k * n + m * k), 1, True),
                Cost(name + ".dB", 2.0 * m * n * k, elem_bytes * (m * n + m * k + k * n), 1, True)]
    return out
