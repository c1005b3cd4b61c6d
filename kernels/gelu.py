"""Bias + GELU: h = GELU(x + bias), BERT's exact erf form (x * Phi(x)); the tanh form only when asked for.

Forward: 2-D tiles (BLOCK_M rows x BLOCK_N columns) of a row-major (M, N) input; each element read once and
written once, the bias tile loaded once per program. The element math (`gelu_math`, `gelu_grad_math`) is shared
with the GEMM epilogue in kernels/matmul.py.
Backward: dx = dh * GELU'(x + bias); the bias gradient is the column sum of dx, accumulated per program over a
column strip in fp32 and written as (P, N) partials, reduced once afterwards (no atomics).

Layout: unit column stride, row stride an argument, int64 row offsets; any N (masked). fp32 math throughout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, on_tensor_device
from .layer_norm import sm_count
from .spec import CompileSpec, Cost, spec

@triton.jit
def _tanh(t):
    """tanh in fp32 without overflow: sign(t) (1 - e) / (1 + e), e = exp(-2|t|) in (0, 1]."""
    e = tl.exp(-2.0 * tl.abs(t))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(t < 0, -th, th)


@triton.jit
def gelu_math(u, TANH: tl.constexpr):
    """GELU(u) in fp32: exact u * Phi(u) = u/2 (1 + erf(u / sqrt 2)); tanh form u/2 (1 + tanh(sqrt(2/pi)(u + .044715 u^3)))."""
    if TANH:
        th = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        return 0.5 * u * (1.0 + th)
    else:
        return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def gelu_grad_math(u, TANH: tl.constexpr):
    """GELU'(u) in fp32: exact Phi(u) + u * phi(u); tanh form 0.5(1+th) + 0.5 u (1-th^2) sqrt(2/pi)(1 + 3*.044715 u^2)."""
    if TANH:
        th = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        return 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
        return cdf + u * pdf


@triton.jit
def _bias_gelu_fwd(X, stride_x,       # input (M, N)
                   BIAS,              # (N,)
                   H, stride_h,       # output (M, N)
                   M, N,
                   TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(H + rows[:, None] * stride_h + cols[None, :], gelu_math(u, TANH).to(H.dtype.element_ty), mask=mask)


# Backward: u = x + bias;  dx = dh * GELU'(u);  dbias = sum over rows of dx.
# Program (i, j) walks rows_per_prog rows of column strip j in BLOCK_M tiles; its bias partial goes to
# DB_PART[i, strip j] (fp32), summed over i afterwards.
@triton.jit
def _bias_gelu_bwd(DH, stride_dh,     # upstream gradient (M, N)
                   X, stride_x,       # saved input (M, N)
                   BIAS,              # (N,)
                   DX, stride_dx,     # gradient of x (M, N)
                   DB_PART,           # (P, N) fp32 partial bias gradient
                   M, N, rows_per_prog,
                   TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog
    for start in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + start + tl.arange(0, BLOCK_M)
        mask = ((rows < M) & (rows < row0 + rows_per_prog))[:, None] & cmask[None, :]
        u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = tl.where(mask, dh * gelu_grad_math(u, TANH), 0.0)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        acc += tl.sum(dx, axis=0)
    tl.store(DB_PART + pid * N + cols, acc, mask=cmask)


# ---------------------------------------------------------------------------------------------- launchers
# One configuration per kernel, read by the launchers and compile_specs() alike.
_FWD = dict(BLOCK_M=16, BLOCK_N=256, num_warps=4, num_stages=1)  # no loop: one stage
_BWD = dict(BLOCK_M=16, BLOCK_N=256, num_warps=8, num_stages=2)  # 4 warps spilled 8 bytes (sm_90 bf16 tanh)


@on_tensor_device
def bias_gelu_fwd(x, bias, approximate="none"):
    """GELU(x + bias) for a 2-D x with unit column stride; returns a new (M, N) tensor in x's dtype."""
    M, N = x.shape
    h = torch.empty_like(x)
    bm, bn = _FWD["BLOCK_M"], _FWD["BLOCK_N"]
    if M and N:
        _bias_gelu_fwd[(cdiv(M, bm), cdiv(N, bn))](
            x, x.stride(0), bias, h, h.stride(0), M, N, TANH=approximate == "tanh", **_FWD)
    return h


def _row_programs(m: int, device, strips: int, block_m: int) -> int:
    if device.type == "cuda":
        want = sm_count(device.index if device.index is not None else torch.cuda.current_device()) // max(1, strips)
    else:
        want = 4  # the interpreter runs programs one after another
    return max(1, min(cdiv(m, block_m), want))


@on_tensor_device
def bias_gelu_bwd(dh, x, bias, approximate="none"):
    """(dx, dbias fp32) of GELU(x + bias) for upstream dh (M, N)."""
    M, N = x.shape
    dh = dh.contiguous()
    dx = torch.empty_like(x)
    bm, bn = _BWD["BLOCK_M"], _BWD["BLOCK_N"]
    strips = cdiv(N, bn)
    P = _row_programs(M, x.device, strips, bm)
    per = cdiv(cdiv(M, P), bm) * bm if M else bm
    P = cdiv(M, per) if M else 1
    alloc = torch.empty if M and N else torch.zeros  # every program writes its partial row and strip
    part = alloc(P, N, device=x.device, dtype=torch.float32)
    if M and N:
        _bias_gelu_bwd[(P, strips)](dh, dh.stride(0), x, x.stride(0), bias, dx, dx.stride(0), part, M, N, per,
                                   TANH=approximate == "tanh", **_BWD)
    return dx, part.sum(0)


# ------------------------------------------------------------------------------------------- protocol
def compile_specs() -> list[CompileSpec]:
    """Both kernels for fp32/fp16/bf16, erf and tanh forms (block sizes are fixed, any width)."""
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for tanh in (False, True):
            form = "tanh" if tanh else "erf"
            specs.append(spec(
                "_bias_gelu_fwd", _bias_gelu_fwd,
                {"X": f"*{dt}", "stride_x": "i32", "BIAS": f"*{dt}", "H": f"*{dt}", "stride_h": "i32", "M": "i32",
                 "N": "i32", "TANH": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                {"TANH": tanh}, _FWD, f"{dt} {form} fwd"))
            specs.append(spec(
                "_bias_gelu_bwd", _bias_gelu_bwd,
                {"DH": f"*{dt}", "stride_dh": "i32", "X": f"*{dt}", "stride_x": "i32", "BIAS": f"*{dt}",
                 "DX": f"*{dt}", "stride_dx": "i32", "DB_PART": "*fp32", "M": "i32", "N": "i32",
                 "rows_per_prog": "i32", "TANH": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                {"TANH": tanh}, _BWD, f"{dt} {form} bwd"))
    return specs


def cost(rows: int, width: int, elem_bytes: int, backward: bool = False) -> list[Cost]:
    """Standalone bias + GELU. Minimum bytes: forward reads x and writes h once (the bias vector once); the
    backward reads dh and x, writes dx, and writes + reads the bias gradient's fp32 column partials (P x N, P =
    132 SMs / column strips: under 2% at BERT shapes). The kernels move exactly these bytes, each element once
    (tests/test_gelu.py counts them in the interpreter). FLOPs count the erf as ~20 operations."""
    mn = rows * width
    out = [Cost("bias_gelu.fwd", 24.0 * mn, float(2 * mn * elem_bytes + width * elem_bytes))]
    if backward:
        p = max(1, min(cdiv(rows, _BWD["BLOCK_M"]), 132 // cdiv(width, _BWD["BLOCK_N"])))
        out.append(Cost("bias_gelu.bwd", 32.0 * mn,
                        float(3 * mn * elem_bytes + width * elem_bytes + width * 4 * (2 * p + 1))))
    return out
