"""Fused residual + bias + dropout + LayerNorm: y = LayerNorm(dropout(x + input_bias) + residual).

Forward: one program normalises ROWS rows of width N (BLOCK_N = next power of two >= N, masked), reading x,
input_bias, residual once and writing y (and z = the pre-norm sum, only when a backward will need it) plus the
fp32 row statistics. The row math lives in `ln_rows`, shared with the GEMM epilogue in kernels/matmul.py.
Dropout draws Philox numbers `tl.rand(seed, row * N + col)` (counter-based): the backward regenerates the same
keep-mask from the same seed, so no mask is stored. The seed is a 1-element int64 device tensor, so creating it
needs no host sync and traces under torch.compile.

Backward: P programs each walk a contiguous block of rows, write dz / dx and accumulate their rows' weight,
bias and input-bias gradients in fp32 registers; the (P, N) partials are reduced once afterwards (no atomics,
deterministic for a given P).

Layout: rows are contiguous in the last dimension (stride 1), row strides are arguments, row offsets int64.
Statistics are fp32 whatever the storage dtype (fp32 / fp16 / bf16). Limits: N <= 8192 (one row per block).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import cdiv, next_power_of_2, on_tensor_device
from .spec import CompileSpec, Cost, spec

MAX_WIDTH = 8192


@triton.jit
def ln_rows(x,                       # (ROWS, BLOCK_N) fp32 tile: GEMM output or loaded input, 0 beyond N
            rows,                    # (ROWS,) int64 row indices
            cols,                    # (BLOCK_N,) int32 column indices
            M,                       # number of rows
            N,                       # row width
            RES, stride_res,         # residual (M, N) and its row stride
            IN_BIAS,                 # (N,) bias added before dropout
            W, B,                    # (N,) LayerNorm weight and bias
            Y, stride_y,             # output (M, N)
            Z, stride_z,             # pre-norm sum z (M, N), stored when STORE_Z
            MEAN, RSTD,              # (M,) fp32 statistics
            seed,                    # scalar Philox seed (used when HAS_DROPOUT)
            p,                       # dropout probability
            eps,                     # variance epsilon
            HAS_RES: tl.constexpr, HAS_IN_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            STORE_Z: tl.constexpr, STORE_STATS: tl.constexpr):
    """z = dropout(x + in_bias) + res; y = (z - mean) * rstd * w + b for a tile of rows (statistics in fp32)."""
    cmask = cols < N
    rmask = rows < M
    mask = rmask[:, None] & cmask[None, :]
    if HAS_IN_BIAS:
        x += tl.load(IN_BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        keep = tl.rand(seed, rows[:, None] * N + cols[None, :]) >= p
        x = tl.where(keep, x / (1.0 - p), 0.0)
    if HAS_RES:
        x += tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # z is rounded to the storage dtype before the statistics (as PyTorch forms it), so the backward, which reads
    # the stored z, normalises exactly the values the forward did (else a width-1 row blows up by rstd = 1/sqrt(eps))
    x = tl.where(mask, x.to(Y.dtype.element_ty).to(tl.float32), 0.0)
    if STORE_Z:
        tl.store(Z + rows[:, None] * stride_z + cols[None, :], x.to(Z.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_fwd(X, stride_x,            # input (M, N)
            RES, stride_res,        # residual (M, N)
            IN_BIAS, W, B,          # (N,) input bias, LayerNorm weight and bias
            Y, stride_y,            # output (M, N)
            Z, stride_z,            # pre-norm sum (M, N) when STORE_Z
            MEAN, RSTD,             # (M,) fp32
            SEED,                   # (1,) int64 Philox seed
            M, N,                   # rows, width
            p, eps,                 # dropout probability, variance epsilon
            HAS_RES: tl.constexpr, HAS_IN_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            STORE_Z: tl.constexpr, STORE_STATS: tl.constexpr,
            ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    ln_rows(x, rows, cols, M, N, RES, stride_res, IN_BIAS, W, B, Y, stride_y, Z, stride_z, MEAN, RSTD, seed, p,
            eps, HAS_RES, HAS_IN_BIAS, HAS_DROPOUT, STORE_Z, STORE_STATS)


# Backward, per row (xhat = (z - mean) * rstd, g = dy * w):
#   dz      = rstd * (g - mean(g) - xhat * mean(g * xhat))
#   dres    = dz                                  (z = dropout(x + in_bias) + res)
#   dx      = dz * keep / (1 - p)                 (dz without dropout)
#   d_in_b  = sum over rows of dx
#   dw      = sum over rows of dy * xhat,  db = sum over rows of dy
# Each program walks its contiguous block of rows ROWS at a time (a (ROWS, BLOCK_N) tile per step, so the loads of
# several rows are in flight at once), accumulates the column sums in fp32 registers and writes them as (P, N)
# partials, reduced once afterwards.
@triton.jit
def _ln_bwd(DY, stride_dy,          # upstream gradient (M, N)
            Z, stride_z,            # saved pre-norm sum (M, N)
            MEAN, RSTD,             # (M,) fp32 saved statistics
            W,                      # (N,) LayerNorm weight
            DZ, stride_dz,          # gradient of z = of the residual (M, N)
            DX, stride_dx,          # gradient of x (M, N), written when STORE_DX (else it equals DZ)
            DW_PART, DB_PART,       # (P, N) fp32 partial column sums
            DIB_PART,               # (P, N) fp32 partial input-bias gradient, when HAS_IN_BIAS
            SEED,                   # (1,) int64 Philox seed
            M, N, rows_per_prog,    # rows, width, rows handled by one program (a multiple of ROWS)
            p,                      # dropout probability
            HAS_IN_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DX: tl.constexpr,
            ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    dib = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    row0 = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    for start in range(0, rows_per_prog, ROWS):
        rows = row0 + start + tl.arange(0, ROWS)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        # g through a select, so the compiler cannot contract `g - mean(g)` into fma(dy, w, -mean(g)): that
        # fma keeps dy * w unrounded on one side only, and rstd (up to 1/sqrt(eps) = 1e6 for a constant row)
        # turns the rounding residue into an O(1e-2) gradient where the exact one is 0 (N = 1; seen on H100).
        g = tl.where(mask, dy * w[None, :], 0.0)
        c1 = tl.sum(xhat * g, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dz = tl.where(mask, (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
        dw += dy * xhat
        db += dy
        tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
        dx = dz
        if HAS_DROPOUT:
            keep = tl.rand(seed, rows[:, None] * N + cols[None, :]) >= p
            dx = tl.where(keep, dz / (1.0 - p), 0.0)
        if STORE_DX:
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_IN_BIAS:
            dib += dx
    tl.store(DW_PART + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)
    tl.store(DB_PART + pid * N + cols, tl.sum(db, axis=0), mask=cmask)
    if HAS_IN_BIAS:
        tl.store(DIB_PART + pid * N + cols, tl.sum(dib, axis=0), mask=cmask)


# ---------------------------------------------------------------------------------------------- launchers
# One configuration function per kernel: the launcher passes its dict as **kwargs and compile_specs() builds the
# same dict (fastdistil check-kernels), so what is built is what runs.
def _block_n(n: int) -> int:
    if n > MAX_WIDTH:
        raise ValueError(f"layer_norm kernels support widths up to {MAX_WIDTH}, got {n}")
    return max(16, next_power_of_2(n))


def fwd_config(n: int) -> dict:
    """ROWS x BLOCK_N tiles of about 4K elements (at least one row), 8 warps at 4K; no loop, so one stage."""
    bn = _block_n(n)
    rows = max(1, min(16, 4096 // bn))
    return dict(ROWS=rows, BLOCK_N=bn, num_warps=max(1, min(8, bn * rows // 512)), num_stages=1)


def bwd_config(n: int, dropout: bool = False) -> dict:
    """Row tiles of about 4K elements per loop step (8 rows at N = 384 -> 512), 8 warps, 2 stages.
    Measured on H100 (2026-11-27, docs/gpu-runs/2026-11-27-h100-shared-harness/summary.json): the previous
    one-row-per-iteration loop with 2 warps took 0.63 ms at M=16384, N=384 against 0.16 ms for torch's add +
    layer_norm backward (too few loads in flight: 132 programs x 2 warps)."""
    bn = _block_n(n)
    rows = max(1, min(16, (2048 if dropout else 4096) // bn))  # dropout's Philox state: half the tile (N <= 256
    # with 16 rows spilled at 255 registers on sm_90 without divisibility hints)
    return dict(ROWS=rows, BLOCK_N=bn, num_warps=max(1, min(8, bn * rows // 512)), num_stages=2)


ROWS_PER_PARTIAL = 64
PROGRAMS_PER_SM = 4


def partial_programs(m: int, sms: int = 132) -> int:
    """Programs of a backward that writes (P, N) column partials: up to PROGRAMS_PER_SM per SM (loads in flight)
    and >= 64 rows each, so the partials (fp32, written and re-read once) stay near 5% of the row traffic (the
    cost functions count them)."""
    return max(1, min(PROGRAMS_PER_SM * sms, cdiv(m, ROWS_PER_PARTIAL)))


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device `index` (queried once per device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(m: int, device) -> int:
    if device.type == "cuda":
        return partial_programs(m, sm_count(device.index if device.index is not None else torch.cuda.current_device()))
    return max(1, min(m, 8))  # the interpreter runs programs one after another


def _split_rows(m: int, device, rows: int) -> tuple[int, int]:
    """(programs P, rows per program, a multiple of `rows`) covering m rows."""
    if not m:
        return 1, rows
    per = cdiv(cdiv(m, _num_programs(m, device)), rows) * rows
    return cdiv(m, per), per


@on_tensor_device
def layer_norm_fwd(x, weight, bias, eps, residual=None, input_bias=None, dropout_p=0.0, seed=None,
                   store_z=False, store_stats=True):
    """Launch the forward.

    Args:
        x: (M, N) with unit column stride. residual: optional (M, N), of x's dtype or another (under autocast a
            bf16 GEMM output meets an fp32 residual stream). input_bias: optional (N,).
        weight, bias: (N,). seed: (1,) int64 tensor, required when dropout_p > 0.
        store_z: also return z = dropout(x + input_bias) + residual (what the backward reads).
    Returns:
        (y, z or None, mean, rstd): y (M, N) in the promoted dtype of x and residual, z likewise, mean/rstd (M,)
        fp32 (empty unless store_stats).
    """
    M, N = x.shape
    cfg = fwd_config(N)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(M, N, device=x.device, dtype=out_dtype)
    z = torch.empty_like(y) if store_z else y
    mean = torch.empty(M if store_stats else 0, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    has_res, has_ib, has_drop = residual is not None, input_bias is not None, dropout_p > 0.0
    res = residual if has_res else x
    if M == 0:
        return y, (z if store_z else None), mean, rstd
    _ln_fwd[(cdiv(M, cfg["ROWS"]),)](
        x, x.stride(0), res, res.stride(0), input_bias if has_ib else weight, weight, bias, y, y.stride(0),
        z, z.stride(0), mean, rstd, seed if has_drop else mean, M, N, float(dropout_p), float(eps),
        HAS_RES=has_res, HAS_IN_BIAS=has_ib, HAS_DROPOUT=has_drop, STORE_Z=store_z, STORE_STATS=store_stats, **cfg)
    return y, (z if store_z else None), mean, rstd


@on_tensor_device
def layer_norm_bwd(dy, z, mean, rstd, weight, has_input_bias=False, dropout_p=0.0, seed=None, dx_dtype=None):
    """Launch the backward.

    Args:
        dy: (M, N) upstream gradient. z, mean, rstd: what the forward saved. weight: (N,).
        dx_dtype: dtype of the input x when it differs from z's (autocast: a bf16 GEMM output under an fp32
            residual stream); dx is then written in it directly.
    Returns:
        (dx, dres, dweight, dbias, dinput_bias or None): dres = dz; dx is dz itself unless dropout_p > 0 or
        dx_dtype differs from z's dtype.
    """
    M, N = z.shape
    dy = dy.contiguous()
    cfg = bwd_config(N, dropout_p > 0.0)
    P, per = _split_rows(M, z.device, cfg["ROWS"])
    dz = torch.empty_like(z)
    has_drop = dropout_p > 0.0
    store_dx = has_drop or (dx_dtype is not None and dx_dtype != z.dtype)
    dx = torch.empty(M, N, device=z.device, dtype=dx_dtype or z.dtype) if store_dx else dz
    f32 = dict(device=z.device, dtype=torch.float32)
    dw_part, db_part = torch.empty(P, N, **f32), torch.empty(P, N, **f32)
    dib_part = torch.empty(P, N, **f32) if has_input_bias else dw_part
    if M:
        _ln_bwd[(P,)](dy, dy.stride(0), z, z.stride(0), mean, rstd, weight, dz, dz.stride(0), dx, dx.stride(0),
                      dw_part, db_part, dib_part, seed if has_drop else mean, M, N, per, float(dropout_p),
                      HAS_IN_BIAS=has_input_bias, HAS_DROPOUT=has_drop, STORE_DX=store_dx, **cfg)
    else:
        dw_part.zero_(), db_part.zero_(), dib_part.zero_()
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype)
    dib = dib_part.sum(0) if has_input_bias else None
    return dx, dz, dw, db, dib


@triton.jit
def _keep_mask(SEED, OUT, M, N, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(SEED), offs) >= p
    tl.store(OUT + offs, keep.to(tl.int8), mask=offs < M * N)


_MASK_CFG = dict(BLOCK=1024, num_warps=4, num_stages=1)


@on_tensor_device
def dropout_keep_mask(seed, M, N, dropout_p):
    """The (M, N) bool keep-mask the kernels draw for `seed` (tests and references use it)."""
    out = torch.empty(M, N, dtype=torch.int8, device=seed.device)
    _keep_mask[(cdiv(M * N, _MASK_CFG["BLOCK"]),)](seed, out, M, N, float(dropout_p), **_MASK_CFG)
    return out.bool()


# ------------------------------------------------------------------------------------------- protocol
_DT = {"fp16": 2, "bf16": 2, "fp32": 4}
# Storage dtypes (x and input bias, everything else) the launchers see: one dtype throughout, or autocast's mix of
# a bf16/fp16 GEMM output with an fp32 residual stream, fp32 LayerNorm parameters and an fp32 result.
_MIXES = [(dt, dt) for dt in _DT] + [("bf16", "fp32"), ("fp16", "fp32")]


def compile_specs() -> list[CompileSpec]:
    """Every (width class, dtype mix, fusion) the launchers choose for BERT widths (250, 384, 768, 1024)."""
    specs = []
    for n in (256, 512, 1024):
        fc = fwd_config(n)
        bn = fc["BLOCK_N"]
        for xt, ot in _MIXES:
            amp = "" if xt == ot else f" x={xt}"
            # (residual, input bias, dropout, training): inference stores neither z nor the statistics
            modes = [(False, False, False, False), (False, False, False, True), (True, True, False, False),
                     (True, True, False, True), (True, True, True, True)]
            for res, ib, drop, train in modes if xt == ot else modes[2:]:
                sz = train and (res or ib or drop)
                sig = {"X": f"*{xt}", "stride_x": "i32", "RES": f"*{ot if res else xt}", "stride_res": "i32",
                       "IN_BIAS": f"*{xt if ib else ot}", "W": f"*{ot}", "B": f"*{ot}", "Y": f"*{ot}",
                       "stride_y": "i32", "Z": f"*{ot}", "stride_z": "i32", "MEAN": "*fp32", "RSTD": "*fp32",
                       "SEED": "*i64" if drop else "*fp32", "M": "i32", "N": "i32", "p": "fp32", "eps": "fp32",
                       "HAS_RES": "constexpr", "HAS_IN_BIAS": "constexpr", "HAS_DROPOUT": "constexpr",
                       "STORE_Z": "constexpr", "STORE_STATS": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr"}
                flags = {"HAS_RES": res, "HAS_IN_BIAS": ib, "HAS_DROPOUT": drop, "STORE_Z": sz, "STORE_STATS": train}
                tag = "+".join(t for t, on in (("res", res), ("bias", ib), ("dropout", drop)) if on) or "plain"
                specs.append(spec("_ln_fwd", _ln_fwd, sig, flags, fc,
                                  f"N<={bn} {ot}{amp} {tag} {'train' if train else 'infer'} fwd"))
            for ib, drop in ((False, False), (True, True), (True, False)):
                store_dx = drop or xt != ot
                sig = {"DY": f"*{ot}", "stride_dy": "i32", "Z": f"*{ot}", "stride_z": "i32", "MEAN": "*fp32",
                       "RSTD": "*fp32", "W": f"*{ot}", "DZ": f"*{ot}", "stride_dz": "i32",
                       "DX": f"*{xt}", "stride_dx": "i32", "DW_PART": "*fp32", "DB_PART": "*fp32", "DIB_PART": "*fp32",
                       "SEED": "*i64" if drop else "*fp32", "M": "i32", "N": "i32", "rows_per_prog": "i32",
                       "p": "fp32", "HAS_IN_BIAS": "constexpr", "HAS_DROPOUT": "constexpr", "STORE_DX": "constexpr",
                       "ROWS": "constexpr", "BLOCK_N": "constexpr"}
                flags = {"HAS_IN_BIAS": ib, "HAS_DROPOUT": drop, "STORE_DX": store_dx}
                tag = "+".join(t for t, on in (("bias", ib), ("dropout", drop)) if on) or "plain"
                specs.append(spec("_ln_bwd", _ln_bwd, sig, flags, bwd_config(n, drop), f"N<={bn} {ot}{amp} {tag} bwd"))
    specs.append(spec("_keep_mask", _keep_mask, {"SEED": "*i64", "OUT": "*i8", "M": "i32", "N": "i32", "p": "fp32",
                                                  "BLOCK": "constexpr"}, {}, _MASK_CFG, "dropout mask (tests)"))
    return specs


def cost(rows: int, width: int, elem_bytes: int, residual: bool = True, input_bias: bool = True,
         dropout: bool = False, backward: bool = False) -> list[Cost]:
    """FLOPs and minimum HBM bytes of the layer-norm launches for (rows, width).

    Minimum bytes: every operand read once and every result written once, nothing else: forward reads x (and
    residual), writes y, plus the fp32 stats (8 bytes a row) and z when training (backward needs it); vectors
    (weight, bias, input bias) are read once. The backward adds its fp32 column partials (P x N each, written
    and read once, P = partial_programs(rows)), the price of an atomic-free reduction. The kernels move exactly
    these bytes, each row once (tests/test_layer_norm.py counts the distinct bytes the interpreter loads and
    stores and checks them against these numbers); the per-program reloads of the (N,) vectors hit in L1/L2.
    """
    mn = rows * width
    vec = width * elem_bytes
    stores_z = backward and (residual or input_bias or dropout)  # else z is x itself
    fwd_bytes = (mn * elem_bytes * (1 + residual + 1 + stores_z)   # x (+ residual) in; y (+ z) out
                 + vec * (2 + input_bias) + 8 * rows * backward    # vectors once; fp32 mean/rstd when training
                 + 8 * dropout)                                    # the int64 Philox seed
    fwd_flops = mn * (8 + input_bias + residual + 2 * dropout)
    out = [Cost("layer_norm.fwd", float(fwd_flops), float(fwd_bytes))]
    if backward:
        # reads dy, z, stats, w; writes dz (= dres) and dx when dropout differs; the fp32 column partials of
        # dw, db (and d input_bias) are written once and read once by the reduction (P rows each, P for 132 SMs)
        parts = (2 + input_bias) * width * 4
        b = (mn * elem_bytes * (2 + 1 + dropout) + 8 * rows + vec + parts * (2 * partial_programs(rows) + 1)
             + 8 * dropout)
        out.append(Cost("layer_norm.bwd", float(mn * (12 + 2 * input_bias + 2 * dropout)), float(b)))
    return out
