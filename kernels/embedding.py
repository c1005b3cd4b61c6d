"""Embeddings: LayerNorm(word[id] + type[tt] + position[pos]) in one kernel, and its backward.

Forward: one program gathers ROWS tokens' three table rows (int64 row offsets), sums them in fp32 and normalises
them with the LayerNorm row math shared with kernels/layer_norm.py (`ln_rows`); it writes the output and the
fp32 row statistics. Nothing else is saved: the backward re-gathers the sum from the tables (parameters, alive
anyway) instead of storing a (T, N) pre-norm activation.

Backward, deterministic and atomic-free:
  1. `_embed_bwd`: P programs each walk a block of tokens, recompute xhat, write dz (fp32, (T, N)), and
     accumulate the LayerNorm weight/bias gradients and the token-type table gradient (a (TYPES, N) register
     tile; BERT has 2 types) as fp32 partials, reduced once afterwards.
  2. `_segment_sum` for the word and position tables: tokens are sorted by id (stable torch.sort); the program
     at the first token of each run of equal ids sums the run's dz rows in sorted order and writes that table
     row once. Repeated ids therefore sum in a fixed order (bitwise reproducible run to run, unlike fp32
     atomics whose order varies), each gradient row is written by exactly one program, and untouched rows stay
     zero. The cost is one sort per table and serial work proportional to the longest run (a position id
     repeats batch-size times; a word id such as [CLS] as often), small next to the dense (V, N) zero-fill.
Layout: ids (T,) any integer dtype; tables row-major with unit column stride; N <= 8192.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, next_power_of_2, on_tensor_device
from .layer_norm import _block_n, _num_programs, ln_rows
from .spec import CompileSpec, Cost, spec

MAX_TYPES_IN_REGISTERS = 16


@triton.jit
def _gather_sum(IDS, TT, POS, WORD, stride_w, TYPE, stride_t, POSW, stride_p, rows, cols, T, N):
    """(ROWS, BLOCK_N) fp32 sum word[id] + type[tt] + position[pos] (transformers' order), 0 outside."""
    rmask = rows < T
    mask = rmask[:, None] & (cols < N)[None, :]
    ids = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
    tts = tl.load(TT + rows, mask=rmask, other=0).to(tl.int64)
    pos = tl.load(POS + rows, mask=rmask, other=0).to(tl.int64)
    x = tl.load(WORD + ids[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x += tl.load(TYPE + tts[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x += tl.load(POSW + pos[:, None] * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _embed_fwd(IDS, TT, POS,                 # (T,) token, token-type and position ids
               WORD, stride_w,               # (V, N) word table
               TYPE, stride_t,               # (Tt, N) token-type table
               POSW, stride_p,               # (P, N) position table
               LN_W, LN_B,                   # (N,) LayerNorm weight and bias
               Y, stride_y,                  # (T, N) output
               MEAN, RSTD,                   # (T,) fp32 statistics (when STORE_STATS)
               T, N, eps,
               STORE_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    x = _gather_sum(IDS, TT, POS, WORD, stride_w, TYPE, stride_t, POSW, stride_p, rows, cols, T, N)
    ln_rows(x, rows, cols, T, N, Y, 0, LN_W, LN_W, LN_B, Y, stride_y, Y, 0, MEAN, RSTD, 0, 0.0, eps,
            False, False, False, False, STORE_STATS)


# Backward per token (x = word[id] + type[tt] + position[pos], xhat = (x - mean) * rstd, g = dy * ln_w):
#   dx = rstd * (g - mean(g) - xhat * mean(g * xhat));   d ln_w += dy * xhat;   d ln_b += dy
#   d word[id] += dx,  d position[pos] += dx,  d type[tt] += dx
@triton.jit
def _embed_bwd(DY, stride_dy,                # (T, N) upstream gradient
               IDS, TT, POS,
               WORD, stride_w, TYPE, stride_t, POSW, stride_p,
               LN_W,                          # (N,)
               MEAN, RSTD,                    # (T,) fp32 saved statistics
               DX,                            # (T, N) fp32 gradient of the embedding sum (row stride N)
               DW_PART, DB_PART,              # (P, N) fp32 partials of the LayerNorm weight / bias gradients
               DTYPE_PART,                    # (P, TYPES, N) fp32 partials of the token-type table gradient
               T, N, rows_per_prog,
               TYPE_IN_REGS: tl.constexpr, TYPES: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(LN_W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    types = tl.arange(0, TYPES)
    dtab = tl.zeros([TYPES, BLOCK_N], dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, T)
    for row in range(row0, row_end):
        x = tl.sum(_gather_sum(IDS, TT, POS, WORD, stride_w, TYPE, stride_t, POSW, stride_p,
                               row + tl.arange(0, 1), cols, T, N), axis=0)
        dy = tl.load(DY + row * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
        g = tl.where(cmask, dy * w, 0.0)  # a select: no fma contraction of g - mean(g) (see kernels/layer_norm.py)
        dx = (g - tl.sum(g, axis=0) / N - xhat * (tl.sum(xhat * g, axis=0) / N)) * rstd
        dw += dy * xhat
        db += dy
        tl.store(DX + row * N + cols, dx, mask=cmask)
        if TYPE_IN_REGS:
            tt = tl.load(TT + row).to(tl.int32)
            dtab += tl.where((types == tt)[:, None], dx[None, :], 0.0)
    tl.store(DW_PART + pid * N + cols, dw, mask=cmask)
    tl.store(DB_PART + pid * N + cols, db, mask=cmask)
    if TYPE_IN_REGS:
        tl.store(DTYPE_PART + (pid * TYPES + types[:, None]) * N + cols[None, :], dtab, mask=cmask[None, :])


@triton.jit
def _segment_sum(SORTED,                      # (T,) int64 ids in ascending order (stable sort)
                 ORDER,                       # (T,) int64: SORTED[i] = ids[ORDER[i]]
                 DX,                          # (T, N) fp32 per-token gradient rows (row stride N)
                 OUT, stride_out,             # (V, N) table gradient, zero-filled
                 T, N, BLOCK_N: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    key = tl.load(SORTED + i)
    prev = tl.load(SORTED + i - 1, mask=i > 0, other=-1)
    if prev != key:  # this program owns the run of `key` that starts at i
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        j = i
        nxt = key
        while nxt == key:
            r = tl.load(ORDER + j)
            acc += tl.load(DX + r * N + cols, mask=cmask, other=0.0)
            j += 1
            nxt = tl.load(SORTED + j, mask=j < T, other=-1)
        tl.store(OUT + key * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------- launchers
# One configuration function per kernel, read by the launchers and compile_specs() alike.
def fwd_config(n: int) -> dict:
    """ROWS x BLOCK_N tiles of 2K elements; 8 warps at 2K elements: spill-free (sm_90 fp16 spilled at 4)."""
    bn = _block_n(n)
    rows = max(1, min(8, 2048 // bn))
    return dict(ROWS=rows, BLOCK_N=bn, num_warps=max(1, min(8, bn * rows // 256)), num_stages=1)


def row_config(n: int) -> dict:
    """`_embed_bwd` and `_segment_sum`: one BLOCK_N row per step, a warp per 256 columns.
    Kept one row per step (the LayerNorm backward moved to row tiles): measured on H100 (2026-11-27,
    docs/gpu-runs/2026-11-27-h100-shared-harness/summary.json) the whole embedding backward at 128 x 128 tokens
    took 0.89 ms against 10.5 ms for torch's embedding + LayerNorm backward; its time is the sorted segment sums
    over repeated ids (serial per run of equal ids), not this loop."""
    bn = _block_n(n)
    return dict(BLOCK_N=bn, num_warps=max(1, min(8, bn // 256)), num_stages=2)


@on_tensor_device
def embed_fwd(ids, tt, pos, word, type_w, pos_w, ln_w, ln_b, eps, store_stats=True):
    """Launch the forward on (T,) ids. Returns (y (T, N) in word's dtype, mean, rstd (T,) fp32 or empty)."""
    T, N = ids.shape[0], word.shape[1]
    cfg = fwd_config(N)
    y = torch.empty(T, N, device=word.device, dtype=word.dtype)
    mean = torch.empty(T if store_stats else 0, device=word.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if T:
        _embed_fwd[(cdiv(T, cfg["ROWS"]),)](ids, tt, pos, word, word.stride(0), type_w, type_w.stride(0), pos_w,
                                                  pos_w.stride(0), ln_w, ln_b, y, y.stride(0), mean, rstd, T, N,
                                                  float(eps), STORE_STATS=store_stats, **cfg)
    return y, mean, rstd


def _table_grad(ids, dx, rows, like):
    """Deterministic scatter-add of dx rows into a zero (rows, N) table gradient at `ids`."""
    out = torch.zeros(rows, dx.shape[1], device=dx.device, dtype=like.dtype)
    T = ids.shape[0]
    if T:
        sorted_ids, order = torch.sort(ids.to(torch.int64), stable=True)
        _segment_sum[(T,)](sorted_ids, order, dx, out, out.stride(0), T, dx.shape[1], **row_config(dx.shape[1]))
    return out


@on_tensor_device
def embed_bwd(dy, ids, tt, pos, word, type_w, pos_w, ln_w, mean, rstd):
    """Gradients (dword, dtype, dpos, dln_w, dln_b) of the forward for upstream dy (T, N)."""
    T, N = dy.shape
    dy = dy.contiguous()
    bn = _block_n(N)
    P = _num_programs(T, dy.device)
    per = cdiv(T, P) if T else 1
    P = cdiv(T, per) if T else 1
    n_types = type_w.shape[0]
    in_regs = n_types <= MAX_TYPES_IN_REGISTERS
    types = next_power_of_2(n_types) if in_regs else 1
    f32 = dict(device=dy.device, dtype=torch.float32)
    dx = torch.empty(T, N, **f32)
    alloc = torch.empty if T else torch.zeros  # every program writes all its partial rows
    dw_part, db_part = alloc(P, N, **f32), alloc(P, N, **f32)
    dtype_part = alloc(P, types, N, **f32)
    if T:
        _embed_bwd[(P,)](dy, dy.stride(0), ids, tt, pos, word, word.stride(0), type_w, type_w.stride(0), pos_w,
                         pos_w.stride(0), ln_w, mean, rstd, dx, dw_part, db_part, dtype_part, T, N, per,
                         TYPE_IN_REGS=in_regs, TYPES=types, **row_config(N))
    if in_regs:
        dtype = dtype_part.sum(0)[:n_types].to(type_w.dtype)
    else:
        dtype = _table_grad(tt, dx, n_types, type_w)
    return (_table_grad(ids, dx, word.shape[0], word), dtype, _table_grad(pos, dx, pos_w.shape[0], pos_w),
            dw_part.sum(0).to(ln_w.dtype), db_part.sum(0).to(ln_w.dtype))


# ------------------------------------------------------------------------------------------- protocol
def compile_specs() -> list[CompileSpec]:
    """The three kernels for fp32/fp16/bf16 tables at BERT widths (384 -> 512, 768 -> 1024), int64 ids (the model
    passes them as torch.long)."""
    specs = []
    for n in (512, 1024):
        fc, rc = fwd_config(n), row_config(n)
        bn = fc["BLOCK_N"]
        for dt in ("fp16", "bf16", "fp32"):
            tabs = {"WORD": f"*{dt}", "stride_w": "i32", "TYPE": f"*{dt}", "stride_t": "i32", "POSW": f"*{dt}",
                    "stride_p": "i32"}
            ids = {"IDS": "*i64", "TT": "*i64", "POS": "*i64"}
            for train in (False, True):
                specs.append(spec(
                    "_embed_fwd", _embed_fwd,
                    {**ids, **tabs, "LN_W": f"*{dt}", "LN_B": f"*{dt}", "Y": f"*{dt}", "stride_y": "i32",
                     "MEAN": "*fp32", "RSTD": "*fp32", "T": "i32", "N": "i32", "eps": "fp32",
                     "STORE_STATS": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr"},
                    {"STORE_STATS": train}, fc, f"N<={bn} {dt} {'train' if train else 'infer'} fwd"))
            specs.append(spec(
                "_embed_bwd", _embed_bwd,
                {"DY": f"*{dt}", "stride_dy": "i32", **ids, **tabs, "LN_W": f"*{dt}", "MEAN": "*fp32",
                 "RSTD": "*fp32", "DX": "*fp32", "DW_PART": "*fp32", "DB_PART": "*fp32", "DTYPE_PART": "*fp32",
                 "T": "i32", "N": "i32", "rows_per_prog": "i32", "TYPE_IN_REGS": "constexpr",
                 "TYPES": "constexpr", "BLOCK_N": "constexpr"},
                {"TYPE_IN_REGS": True, "TYPES": 2}, rc, f"N<={bn} {dt} bwd"))
            specs.append(spec(
                "_segment_sum", _segment_sum,
                {"SORTED": "*i64", "ORDER": "*i64", "DX": "*fp32", "OUT": f"*{dt}", "stride_out": "i32",
                 "T": "i32", "N": "i32", "BLOCK_N": "constexpr"},
                {}, rc, f"N<={bn} {dt} table scatter"))
    return specs


def cost(tokens: int, width: int, elem_bytes: int, backward: bool = False) -> list[Cost]:
    """Minimum bytes: forward reads three table rows and three int64 ids per token, writes the output and the
    fp32 statistics (8 bytes a token), reads the LayerNorm vectors once; the kernel moves exactly that (table
    rows shared by tokens hit in L2, so this is an upper bound of the true traffic).
    Backward: `_embed_bwd` re-reads the three rows, ids, dy and stats, writes dx in fp32, and writes + reads its
    fp32 column partials (LN weight, bias, 2 token types; P = partial_programs(tokens) rows); `_segment_sum`
    (one launch per table: word, position) reads sorted ids, order and dx once and writes each touched table
    row once (counted as one row per token: at most that). The sort and the dense zero-fill of the (V, N)
    word-table gradient (which the framework's own embedding backward also pays) are not counted."""
    from .layer_norm import partial_programs
    t, n = tokens, width
    fwd = Cost("embed_layer_norm.fwd", 12.0 * t * n,
               float(t * n * elem_bytes * 4 + 24 * t + 8 * t + 2 * n * elem_bytes))
    out = [fwd]
    if backward:
        parts = 4 * n * 4
        out.append(Cost("embed_layer_norm.bwd", 16.0 * t * n,
                        float(t * n * (4 * elem_bytes + 4) + 32 * t + n * elem_bytes
                              + parts * (2 * partial_programs(t) + 1))))
        out.append(Cost("embed_layer_norm.scatter", 2.0 * t * n,
                        float(2 * (t * n * 4 + t * n * elem_bytes + 16 * t)), launches=2))
    return out
