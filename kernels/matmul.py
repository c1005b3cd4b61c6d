"""Linear layers with fused epilogues: C = epilogue(A @ W^T + bias), A (M, K) row-major, W (N, K) (nn.Linear's
layout), so each BERT sub-block is one launch.

Epilogues (constexpr EPILOGUE):
  0  bias                                    C = A W^T + b
  1  bias + GELU (exact erf; tanh on request) C = GELU(A W^T + b); optionally stores the bias-free product
                                             (PRE) for the backward, only when training
  2  bias + dropout + residual + LayerNorm   C = LN(dropout(A W^T + b) + R): one program owns BLOCK_M full rows
                                             (BLOCK_N = next power of two >= N, masked), so the row statistics
                                             come straight from the accumulator; the row math is `ln_rows` of
                                             kernels/layer_norm.py, dropout its counter-based Philox mask.
  3  bias + tanh                             C = tanh(A W^T + b): BERT's pooler, inference only (no backward)
Backward (registered in fastdistil/ops/gelu.py and ops/layer_norm.py): the epilogue's own backward kernel
(kernels/gelu.py's or kernels/layer_norm.py's) turns dC into d(A W^T), then two library GEMMs give dA and dW.

Precision: fp16/bf16 operands accumulate in fp32 on tensor cores. fp32 operands use input_precision="ieee" (true
fp32 FMA, what torch does with allow_tf32 off) so fp32 parity claims hold on a GPU, not only in the interpreter.
Interpreter workaround (Triton 3.9, issue 11584): bf16 tl.dot multiplies raw bit patterns there, so the launcher
sets UPCAST=True when TRITON_INTERPRET=1 and the operands are bf16: the tiles are cast to fp32 before the dot.
On a GPU UPCAST is False and bf16 runs on tensor cores; the bf16 path is otherwise the fp16 code.
Limits: K, N any (masked); unit column stride for A, W, C; EPILOGUE 2 needs N <= 512 (wider: GEMM, then kernels/layer_norm.py).
The ops use these kernels up to FUSED_MAX_ROWS rows; above, a library GEMM and the epilogue's own kernel (see there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gelu import _tanh, gelu_math

from .launch import cdiv, interpreting, next_power_of_2, on_tensor_device
from .layer_norm import ln_rows
from .spec import CompileSpec, Cost, gemm_cost, spec

LN_MAX_WIDTH = 512  # wider rows (768) spill with a full-row fp32 accumulator; they run GEMM + LN kernel


@triton.jit
def _linear_fwd(A, stride_am,                 # (M, K) input
                W, stride_wn,                 # (N, K) weight
                BIAS,                         # (N,) bias
                C, stride_cm,                 # (M, N) output
                PRE, stride_pm,               # (M, N) bias-free product (EPILOGUE 1 with STORE_PRE)
                RES, stride_res,              # (M, N) residual (EPILOGUE 2)
                LN_W, LN_B,                   # (N,) LayerNorm affine (EPILOGUE 2)
                Z, stride_z,                  # (M, N) pre-norm sum (EPILOGUE 2 with STORE_Z)
                MEAN, RSTD,                   # (M,) fp32 statistics (EPILOGUE 2 with STORE_STATS)
                SEED,                         # (1,) int64 Philox seed (HAS_DROPOUT)
                M, N, K,
                p, eps,                       # dropout probability, LayerNorm epsilon
                EPILOGUE: tl.constexpr, TANH: tl.constexpr, STORE_PRE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                STORE_Z: tl.constexpr, STORE_STATS: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    if EPILOGUE == 2:
        pid_m = pid
        pid_n = 0
    else:  # grouped ordering: GROUP_M row blocks share the W tiles in L2
        n_blocks = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * n_blocks
        first_m = (pid // width) * GROUP_M
        group = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group
        pid_n = (pid % width) // group
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_ptr = A + rm[:, None] * stride_am + rk[None, :]
    w_ptr = W + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kmask = (k + rk) < K
        a = tl.load(a_ptr, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr, mask=kmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) = W^T tile
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    if EPILOGUE == 2:
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(SEED)
        ln_rows(acc, rm, rn, M, N, RES, stride_res, BIAS, LN_W, LN_B, C, stride_cm, Z, stride_z, MEAN, RSTD, seed,
                p, eps, True, True, HAS_DROPOUT, STORE_Z, STORE_STATS)
    else:
        mask = mmask[:, None] & nmask[None, :]
        if STORE_PRE:
            tl.store(PRE + rm[:, None] * stride_pm + rn[None, :], acc.to(PRE.dtype.element_ty), mask=mask)
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1:
            acc = gelu_math(acc, TANH)
        if EPILOGUE == 3:  # BERT's pooler
            acc = _tanh(acc)
        tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
# One configuration table for the launchers and compile_specs() (what check-kernels builds is what runs).
# fp32 runs on CUDA-core FMAs (ieee), whose operand fragments live in registers, so its tiles are smaller.
# lowp: 8 warps. With 4 warps and 3 stages (Triton's default) the GELU epilogue build spilled 10 registers at
# 255 on sm_90 once the JIT's 16-divisibility hints applied (measured on H100, Triton 3.6, 2026-11-27,
# docs/gpu-runs/2026-11-27-h100-shared-harness/kernels_dense.json); check-kernels had built it without hints.
# fp32: 8 warps (4 warps with 2 stages put 16 bytes on the stack on sm_90 with the divisibility hints).
_TILES = {"lowp": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
          "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=2)}

# When the fused epilogues pay (use_fused_epilogue). Measured on H100 (2026-11-27, bf16, docs/gpu-runs/
# 2026-11-27-h100-shared-harness/summary.json "micro"): at M = 16384 rows the GELU-epilogue GEMM (64x128 tiles)
# took 0.100 ms against 0.083 ms for cuBLAS linear + torch gelu (its tensor cores ran at 194 TFLOP/s, cuBLAS's
# at 454), and the LayerNorm-epilogue GEMM (16 x 512 full-row tiles: W, 1.2 MB at K=1536, is re-read from L2 for
# every 16 rows, M/16 x |W| = 1.2 GB at M=16384) took 0.396 ms against 0.125 ms for cuBLAS + our LayerNorm
# kernel. Below a few thousand rows every variant was launch/host-bound (0.10-0.14 ms for all of them), where the
# fused form saves a launch and an (M, N) round trip. Cost model: the re-read W traffic of the LN epilogue,
# (M / BLOCK_M) x N x K x 2 bytes, passes the (M, N) round trip it saves (~3 x M x N x 2 bytes) once
# K / BLOCK_M > 3, i.e. always at BERT widths, so the LN epilogue only pays while launches dominate: up to
# FUSED_MAX_ROWS rows (4096: 2.4 us of extra L2 traffic at ~10 TB/s for K=1536, under one launch).
FUSED_MAX_ROWS = 4096


def use_fused_epilogue(rows: int, n: int, k: int, epilogue: str) -> bool:
    """Whether linear_gelu / linear_layer_norm run the Triton GEMM with its fused epilogue ("gelu" or
    "layer_norm") for a (rows, k) x (k, n) product, or a library GEMM followed by the epilogue as its own kernel
    (the cost model, fastdistil/bench/costmodel.py, makes the same choice). See FUSED_MAX_ROWS for why."""
    if epilogue == "layer_norm" and n > LN_MAX_WIDTH:
        return False
    return rows <= FUSED_MAX_ROWS


def _tile(dtype_name: str) -> dict:
    return _TILES["fp32" if dtype_name in ("fp32", "float32") else "lowp"]


def _ln_tile(n: int, dtype_name: str = "fp16") -> dict:
    """Full-row tiles: BLOCK_M x next_pow2(N) with at most 8K fp32 accumulator elements (4K for fp32 operands,
    whose dot fragments live in registers; BLOCK_M >= 16 for tl.dot), a thin K step so the W^T tile stays small,
    8 warps and one stage for fp16/bf16 (2 stages put 8 bytes on the stack on sm_80 once the divisibility hints
    applied), 16 warps for fp32 (8 warps sat at 255 registers with dropout): spill-free with the dropout epilogue
    up to N = 512. (N = 1024 spilled 64-900 bytes at 8 and 16 warps with Triton 3.9, so 768-wide models take the
    unfused path.) Used at M <= FUSED_MAX_ROWS only, where launches, not the K loop's pipelining, dominate."""
    if n > LN_MAX_WIDTH:
        raise ValueError(f"the LayerNorm epilogue supports widths up to {LN_MAX_WIDTH}, got {n}")
    bn = max(16, next_power_of_2(n))
    fp32 = dtype_name in ("fp32", "float32")
    budget = 4096 if fp32 else 8192  # 16K spilled (~1 KB) with dropout
    return dict(BLOCK_M=max(16, budget // bn), BLOCK_N=bn, BLOCK_K=16, GROUP_M=1, num_warps=16 if fp32 else 8,
                num_stages=2 if fp32 else 1)


def _common(a):
    upcast = interpreting() and a.dtype == torch.bfloat16
    return dict(UPCAST=upcast, PRECISION="ieee")


@on_tensor_device
def linear_gelu_fwd(a, w, bias, epilogue_gelu=True, approximate="none", store_pre=False):
    """C = GELU(a @ w.T + bias) (or a @ w.T + bias when not epilogue_gelu); a (M, K), w (N, K), bias (N,).
    Returns (C, PRE or None) where PRE = a @ w.T (no bias), stored only when store_pre."""
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    pre = torch.empty(M, N, device=a.device, dtype=a.dtype) if store_pre else c
    t = _tile("fp32" if a.dtype == torch.float32 else "lowp")  # no dtype-name parsing per call
    if M and N:
        grid = (cdiv(M, t["BLOCK_M"]) * cdiv(N, t["BLOCK_N"]),)
        _linear_fwd[grid](a, a.stride(0), w, w.stride(0), bias, c, c.stride(0), pre, pre.stride(0), c, 0, bias, bias,
                          c, 0, bias, bias, bias, M, N, K, 0.0, 0.0,
                          EPILOGUE=1 if epilogue_gelu else 0, TANH=approximate == "tanh", STORE_PRE=store_pre,
                          HAS_DROPOUT=False, STORE_Z=False, STORE_STATS=False, **_common(a), **t)
    return c, (pre if store_pre else None)


@on_tensor_device
def linear_tanh_fwd(a, w, bias):
    """C = tanh(a @ w.T + bias) (EPILOGUE 3, BERT's pooler in one launch); a (M, K) with any row stride (the
    [CLS] rows of a padded output), w (N, K), bias (N,). Inference only (no saved tensors)."""
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    t = _tile("fp32" if a.dtype == torch.float32 else "lowp")
    if M and N:
        _linear_fwd[(cdiv(M, t["BLOCK_M"]) * cdiv(N, t["BLOCK_N"]),)](
            a, a.stride(0), w, w.stride(0), bias, c, c.stride(0), c, 0, c, 0, bias, bias, c, 0, bias, bias, bias,
            M, N, K, 0.0, 0.0, EPILOGUE=3, TANH=False, STORE_PRE=False, HAS_DROPOUT=False, STORE_Z=False,
            STORE_STATS=False, **_common(a), **t)
    return c


@on_tensor_device
def linear_layer_norm_fwd(a, w, bias, residual, ln_w, ln_b, eps, dropout_p=0.0, seed=None, save=False):
    """y = LayerNorm(dropout(a @ w.T + bias) + residual). Returns (y, z, mean, rstd); z/mean/rstd (what the
    backward needs) are written only when `save`, else (y, None, empty, empty). y and z have the promoted dtype of
    a and residual (autocast: a bf16 GEMM into an fp32 residual stream gives fp32)."""
    M, K = a.shape
    N = w.shape[0]
    t = _ln_tile(N, "fp32" if a.dtype == torch.float32 else "fp16")
    y = torch.empty(M, N, device=a.device, dtype=torch.promote_types(a.dtype, residual.dtype))
    z = torch.empty_like(y) if save else y
    mean = torch.empty(M if save else 0, device=a.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    has_drop = dropout_p > 0
    if M:
        _linear_fwd[(cdiv(M, t["BLOCK_M"]),)](
            a, a.stride(0), w, w.stride(0), bias, y, y.stride(0), y, 0, residual, residual.stride(0), ln_w, ln_b,
            z, z.stride(0), mean, rstd, seed if has_drop else mean, M, N, K, float(dropout_p), float(eps),
            EPILOGUE=2, TANH=False, STORE_PRE=False, HAS_DROPOUT=has_drop, STORE_Z=save, STORE_STATS=save,
            **_common(a), **t)
    return y, (z if save else None), mean, rstd


# ------------------------------------------------------------------------------------------- protocol
def _signature(xt: str, ot: str, epilogue: int, dropout: bool) -> dict:
    """Argument types as the launchers pass them: A/W/BIAS in the GEMM dtype xt; for the LayerNorm epilogue the
    residual, LN parameters, output and z in ot (fp32 under autocast); the unused pointers alias C or BIAS."""
    unused = f"*{xt}"  # the GEMM-only epilogues pass C / BIAS for the LayerNorm pointers
    ln = epilogue == 2
    sig = {"A": f"*{xt}", "stride_am": "i32", "W": f"*{xt}", "stride_wn": "i32", "BIAS": f"*{xt}",
           "C": f"*{ot}", "stride_cm": "i32", "PRE": f"*{ot}", "stride_pm": "i32",
           "RES": f"*{ot}", "stride_res": "i32", "LN_W": f"*{ot}" if ln else unused, "LN_B": f"*{ot}" if ln else unused,
           "Z": f"*{ot}", "stride_z": "i32", "MEAN": "*fp32" if ln else unused, "RSTD": "*fp32" if ln else unused,
           "SEED": "*i64" if dropout else ("*fp32" if ln else unused), "M": "i32", "N": "i32", "K": "i32",
           "p": "fp32", "eps": "fp32"}
    for k in ("EPILOGUE", "TANH", "STORE_PRE", "HAS_DROPOUT", "STORE_Z", "STORE_STATS", "UPCAST", "PRECISION",
              "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
        sig[k] = "constexpr"
    return sig


def compile_specs() -> list[CompileSpec]:
    """Every epilogue for fp16/bf16/fp32 at the tiles the launchers choose (LN widths 256/512 cover the 250-odd test
    width and 384), plus the LayerNorm epilogue under autocast (bf16/fp16 GEMM, fp32 residual stream)."""
    specs = []
    base = dict(TANH=False, STORE_PRE=False, HAS_DROPOUT=False, STORE_Z=False, STORE_STATS=False, UPCAST=False,
                PRECISION="ieee")
    for dt in ("fp16", "bf16", "fp32"):
        tc = dt != "fp32"
        for epi, extra, label in ((0, {}, "bias"), (1, {}, "bias+gelu infer"), (1, {"STORE_PRE": True}, "bias+gelu train"),
                                   (3, {}, "bias+tanh pooler")):
            specs.append(spec("_linear_fwd", _linear_fwd, _signature(dt, dt, epi, False), {**base, **extra, "EPILOGUE": epi},
                              _tile(dt), f"{dt} {label}", expect_tensor_cores=tc, extra={"ieee": not tc}))
        for ot in ((dt,) if dt == "fp32" else (dt, "fp32")):
            amp = "" if ot == dt else " out=fp32"
            for n in (256, 512):
                for extra, label in (({}, "infer"), ({"STORE_Z": True, "STORE_STATS": True}, "train"),
                                     ({"HAS_DROPOUT": True, "STORE_Z": True, "STORE_STATS": True}, "train+dropout")):
                    specs.append(spec("_linear_fwd", _linear_fwd, _signature(dt, ot, 2, extra.get("HAS_DROPOUT", False)),
                                      {**base, **extra, "EPILOGUE": 2}, _ln_tile(n, dt),
                                      f"{dt}{amp} N<={n} bias+dropout+res+LN {label}", expect_tensor_cores=tc,
                                      extra={"ieee": not tc}))
    return specs


def cost(rows: int, width: int, k: int, elem_bytes: int, epilogue: str = "gelu", backward: bool = False,
         dropout: bool = False) -> list[Cost]:
    """One fused linear: (rows, k) @ (k, width) with epilogue "bias", "gelu" or "layer_norm".

    Minimum bytes: A, W read once, C written once, plus the epilogue's own operands (bias; residual, LN vectors
    and, when training, z and the fp32 stats for "layer_norm"; the bias-free product PRE for "gelu" when
    training). The kernel reads A once per column block and W once per row block; with the L2-grouped order
    (and a single column block for "layer_norm") HBM traffic stays at this minimum for BERT shapes (the whole W
    fits L2). Backward: the epilogue's backward kernel plus the two GEMMs of gemm_cost.
    """
    m, n = rows, width
    out = gemm_cost(f"linear_{epilogue}", m, n, k, elem_bytes)
    extra = n * elem_bytes
    if epilogue == "gelu":
        extra += m * n * elem_bytes * backward
    elif epilogue == "layer_norm":
        extra += m * n * elem_bytes + 2 * n * elem_bytes + backward * (m * n * elem_bytes + 8 * m)
    out[0] = Cost(out[0].name, out[0].flops + 10.0 * m * n, out[0].bytes + extra, 1, True)
    if backward:
        if epilogue == "gelu":
            from .gelu import cost as c
            out += c(m, n, elem_bytes, backward=True)[1:]
        elif epilogue == "layer_norm":
            from .layer_norm import cost as c
            out += c(m, n, elem_bytes, residual=True, input_bias=True, dropout=dropout, backward=True)[1:]
        out += gemm_cost(f"linear_{epilogue}", m, n, k, elem_bytes, backward=True)[1:]
    return out
