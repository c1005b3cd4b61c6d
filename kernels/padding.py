"""The two layout changes of the capacity layout (fastdistil/padding.py), one launch each.

Unpack (`_unpack`): from a (B, L) mask and the (B, L) ids, token types and positions, the capacity packing
(cu_seqlens, dest, indices: real tokens first in mask order, then the padding positions) and the packed ids, token
types and positions, all in ONE program with static shapes: a first pass over the B rows sums each row's real
tokens into cu_seqlens, a second one ranks every position (tl.cumsum within the row plus the running totals) and
scatters it. B sequential steps of BLOCK_L-wide vector work: ~B x L / BLOCK_L iterations, a few microseconds at
128 x 128, in place of ~15 small torch launches. Missing token types read 0; missing positions read 0..L-1.

Pad back (`_pad_rows`): out[f] = x[dest[f]] when dest[f] < n (a real token), else 0, where n = cu_seqlens[-1] is
read on the device (the capacity layout's real-token count never reaches the host). ROWS flat positions x BLOCK_N
columns per program, a column loop for wide rows; x row-major with unit column stride; any float dtype (a copy:
values are exact).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch import on_tensor_device
from .spec import Cost, spec


@triton.jit
def _pad_rows(X, stride_x,                  # (rows, N) packed tokens
              DEST,                         # (M,) int64 packed row of each flat position
              NTOK,                         # (1,) int32 real-token count (cu_seqlens[-1]), on the device
              OUT, stride_o,                # (M, N) output
              M, N,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    d = tl.load(DEST + rows, mask=rmask, other=0)
    real = rmask & (d < tl.load(NTOK).to(tl.int64))
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        v = tl.load(X + d[:, None] * stride_x + cols[None, :], mask=real[:, None] & cmask[None, :], other=0.0)
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], v, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _unpack(MASK, stride_m,                 # (B, L) any integer mask, nonzero = real token
            IDS, TT, POS, stride_i,         # (B, L) int64 inputs (TT / POS unused without HAS_TT / HAS_POS)
            CU,                             # (B+1,) int32 out: prefix sums of the lengths
            DEST, INDICES,                  # (B*L,) int64 out: packed row of each position, and its inverse
            IDS_P, TT_P, POS_P,             # (B*L,) int64 out: packed ids, token types, positions
            B, L,
            HAS_TT: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_L: tl.constexpr):
    cols = tl.arange(0, BLOCK_L)
    cmask = cols < L
    tl.store(CU, 0)
    total = tl.zeros((), tl.int64)
    for b in range(B):  # pass 1: lengths -> cu_seqlens
        real = (tl.load(MASK + b * stride_m + cols, mask=cmask, other=0) != 0).to(tl.int64)
        total += tl.sum(real, 0)
        tl.store(CU + b + 1, total.to(tl.int32))
    real_base = tl.zeros((), tl.int64)
    pad_base = total
    for b in range(B):  # pass 2: ranks -> dest, indices and the packed inputs
        real = (tl.load(MASK + b * stride_m + cols, mask=cmask, other=0) != 0) & cmask
        r = tl.cumsum(real.to(tl.int64), 0)  # real tokens at or before each column
        d = tl.where(real, real_base + r - 1, pad_base + cols - r)
        flat = (b * L + cols).to(tl.int64)  # B*L < 2**31: one batch's positions (a mask that size is 8 GB)
        tl.store(DEST + flat, d, mask=cmask)
        tl.store(INDICES + d, flat, mask=cmask)
        src = b * stride_i + cols
        tl.store(IDS_P + d, tl.load(IDS + src, mask=cmask, other=0), mask=cmask)
        tt = tl.load(TT + src, mask=cmask, other=0) if HAS_TT else tl.zeros((BLOCK_L,), tl.int64)
        tl.store(TT_P + d, tt, mask=cmask)
        pos = tl.load(POS + src, mask=cmask, other=0) if HAS_POS else cols.to(tl.int64)
        tl.store(POS_P + d, pos, mask=cmask)
        n = tl.sum(real.to(tl.int64), 0)
        real_base += n
        pad_base += L - n


def unpack_config(seqlen: int) -> dict:
    """One program; BLOCK_L = the row length rounded up to a power of two; 4 warps."""
    return dict(BLOCK_L=max(16, triton.next_power_of_2(seqlen)), num_warps=4, num_stages=1)


@on_tensor_device
def unpack(mask, ids, tt=None, pos=None):
    """Capacity packing of a (B, L) batch: (cu_seqlens (B+1,) int32, dest, indices, ids, tt, pos (B*L,) int64)."""
    import torch
    B, L = ids.shape
    dev = ids.device
    cu = torch.empty(B + 1, dtype=torch.int32, device=dev)
    dest, indices, ids_p, tt_p, pos_p = (torch.empty(B * L, dtype=torch.int64, device=dev) for _ in range(5))
    if mask.dtype == torch.bool:
        mask = mask.view(torch.int8)  # same bytes; Triton loads 0/1
    elif mask.is_floating_point():
        mask = (mask != 0).view(torch.int8)
    mask = mask.contiguous()
    ids, tt, pos = (None if t is None else t.contiguous() for t in (ids, tt, pos))  # (B, L), row stride L
    _unpack[(1,)](mask, mask.stride(0), ids, ids if tt is None else tt, ids if pos is None else pos, L,
                  cu, dest, indices, ids_p, tt_p, pos_p, B, L, HAS_TT=tt is not None, HAS_POS=pos is not None,
                  **unpack_config(L))
    return cu, dest, indices, ids_p, tt_p, pos_p


def config(n: int) -> dict:
    """ROWS x BLOCK_N tiles of up to 2K elements, 4 warps."""
    bn = min(1024, max(16, triton.next_power_of_2(n)))
    return dict(ROWS=max(1, 2048 // bn), BLOCK_N=bn, num_warps=4, num_stages=1)


@on_tensor_device
def pad_rows(x, dest, cu_seqlens):
    """(B*L, N) in x's dtype: x[dest[f]] for real positions (dest[f] < cu_seqlens[-1]), zeros elsewhere."""
    import torch
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, N = dest.shape[0], x.shape[1]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    cfg = config(N)
    if M and N:
        _pad_rows[(triton.cdiv(M, cfg["ROWS"]),)](x, x.stride(0), dest, cu_seqlens[-1:], out, out.stride(0), M, N,
                                                 **cfg)
    return out


def compile_specs():
    """Pad back: fp16/bf16/fp32 at the widths of the students and teachers (384, 768). Unpack: int64 masks (the
    GraphRunner's static buffer) and int32/bool-as-int8 masks, with and without token types and positions, at
    lengths 128 and 512."""
    out = []
    for mt in ("i64", "i32", "i8"):
        for has_tt, has_pos in ((False, False), (True, False), (True, True)):
            for n in (128, 512):
                sig = {"MASK": f"*{mt}", "stride_m": "i32", "IDS": "*i64", "TT": "*i64", "POS": "*i64",
                       "stride_i": "i32", "CU": "*i32", "DEST": "*i64", "INDICES": "*i64", "IDS_P": "*i64",
                       "TT_P": "*i64", "POS_P": "*i64", "B": "i32", "L": "i32", "HAS_TT": "constexpr",
                       "HAS_POS": "constexpr", "BLOCK_L": "constexpr"}
                out.append(spec("_unpack", _unpack, sig, {"HAS_TT": has_tt, "HAS_POS": has_pos}, unpack_config(n),
                                f"mask {mt} tt={has_tt} pos={has_pos} L<={n} unpack"))
    for dt in ("fp16", "bf16", "fp32"):
        for n in (384, 768):
            sig = {"X": f"*{dt}", "stride_x": "i32", "DEST": "*i64", "NTOK": "*i32", "OUT": f"*{dt}",
                   "stride_o": "i32", "M": "i32", "N": "i32", "ROWS": "constexpr", "BLOCK_N": "constexpr"}
            out.append(spec("_pad_rows", _pad_rows, sig, {}, config(n), f"{dt} N={n} pad rows"))
    return out


def cost(rows: int, width: int, elem_bytes: int) -> list[Cost]:
    """Pad back: read the real rows and dest, write every (B*L, width) output row once (rows = B*L here)."""
    return [Cost("pad_rows", 0.0, 2.0 * rows * width * elem_bytes + 8 * rows, 1)]


def unpack_cost(rows: int) -> list[Cost]:
    """Unpack of B*L = rows positions: read the mask and three id arrays, write cu, dest, indices and three
    packed arrays (8 bytes each)."""
    return [Cost("unpack", 0.0, 8.0 * rows * 9, 1)]
