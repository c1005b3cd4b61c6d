"""Unpad once, pad once: the padding-free data path's only two layout changes.

A Packing says where the real tokens of a (B, L) batch live in the (rows, d) tensors every layer works on. Three
ways to build one, none of which costs a device synchronisation on the usual path:

- `pack_host`: the mask is a host tensor (tokenizer output, the usual case). The packing, and the packed ids,
  token types and positions, are computed on the host with numpy and reach the device in ONE host-to-device copy
  (non-blocking). Exact layout: rows = T real tokens; T and max_seqlen are host integers for free.
- `unpad_static`: the mask is already on a device, or the forward is being traced (torch.compile) or captured
  (fastdistil.graphs): capacity layout, rows = B*L. The real tokens come first in mask order, then the padding
  positions; cu_seqlens[-1] (the real-token count) stays on the device and max_seqlen is the static bound L.
  Rows past the real count hold the padding tokens' values (or, after attention, unspecified values): every op is
  row-independent and attention reads keys only through cu_seqlens, so they never reach a real row, and `pad`
  writes zeros there. Inference only: the model uses the exact layout whenever autograd records a graph.
- `unpad`: a device mask with autograd on: exact layout, one host synchronisation (nonzero sizes T).

`pad` is the way back: (rows, d) -> (B, L, d), zeros where the mask is 0, one launch on the triton backend
(kernels/padding.py), bit-identical values (a copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .ops.dispatch import kernel_module, lookup, register


@dataclass
class Packing:
    """Where the real tokens of a (B, L) batch live once packed."""
    indices: torch.Tensor | None  # (rows,) int64 flat positions in B*L of each packed row; None: nothing is padding
    cu_seqlens: torch.Tensor      # (B+1,) int32 prefix sums of the lengths; cu_seqlens[-1] = T real tokens
    max_seqlen: int               # longest length, or an upper bound (L in the capacity layout)
    batch: int
    seqlen: int
    dest: torch.Tensor | None = None  # (B*L,) int64 packed row of each flat position; padding: >= T (pad reads it)
    capacity: bool = False            # rows = B*L (real tokens first) instead of T

    @property
    def total(self) -> int:
        """Rows of the packed tensors: T (exact layout) or B*L (capacity layout)."""
        return self.batch * self.seqlen if self.indices is None else self.indices.shape[0]


def unpad(attention_mask: torch.Tensor | None, batch: int, seqlen: int, device=None) -> Packing:
    """Exact Packing of a batch whose real tokens are where attention_mask != 0 (all tokens when mask is None),
    computed with torch ops on the mask's device: one host synchronisation (the token count and max length).

    Real tokens need not be contiguous (left padding works): each row's real tokens keep their order, and a row's
    sequence is the list of its real tokens.
    """
    if attention_mask is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return Packing(None, cu, seqlen if batch else 0, batch, seqlen)
    mask = attention_mask.to(torch.bool)
    lens = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()  # one sync: T
    max_seqlen = int(lens.max()) if batch > 0 else 0
    return Packing(indices, cu, max_seqlen, batch, seqlen)


def unpad_static(attention_mask: torch.Tensor, batch: int, seqlen: int) -> Packing:
    """Capacity Packing (rows = B*L) computed on the mask's device with static shapes: no host synchronisation,
    no data-dependent shape (torch.compile traces it without capture_* flags; CUDA graphs capture it).

    indices is a permutation of the B*L flat positions: the real tokens in mask order, then the padding positions;
    dest is its inverse. A real token's rank is the running count of real tokens before it; a padding position's
    rank is T plus the running count of padding before it.
    """
    flat = attention_mask.reshape(-1) != 0  # (C,)
    c = torch.cumsum(flat, 0)  # (C,) int64: real tokens at or before each position
    n = c[-1:] if flat.numel() else c.new_zeros(1)  # (1,) T, on the device
    ar = torch.arange(flat.numel(), device=flat.device)
    dest = torch.where(flat, c - 1, n + ar - c)  # (C,)
    indices = torch.empty_like(dest).scatter_(0, dest, ar)  # (C,) the inverse permutation
    lens = flat.view(batch, seqlen).sum(1, dtype=torch.int32)
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    return Packing(indices, cu, seqlen if batch else 0, batch, seqlen, dest=dest, capacity=True)


def unpack_static(ids: Tensor, mask: Tensor, tt: Tensor | None, pos: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor, Packing]:
    """unpad_static plus the packed (B*L,) ids, token types and positions (defaults: zeros, 0..L-1 for None):
    one launch on the triton backend (kernels/padding.py `_unpack`), torch ops otherwise."""
    B, L = ids.shape
    cu, dest, indices, ids_p, tt_p, pos_p = lookup("unpack", ids.device)(mask, ids, tt, pos)
    return ids_p, tt_p, pos_p, Packing(indices, cu, L if B else 0, B, L, dest=dest, capacity=True)


def _unpack_torch(mask, ids, tt, pos):
    B, L = ids.shape
    p = unpad_static(mask, B, L)
    tt = torch.zeros_like(ids) if tt is None else tt
    pos = torch.arange(L, device=ids.device).expand(B, L) if pos is None else pos
    return (p.cu_seqlens, p.dest, p.indices, *(t.reshape(-1).index_select(0, p.indices) for t in (ids, tt, pos)))


def pack_host(ids: np.ndarray, mask: np.ndarray | None, tt: np.ndarray | None, pos: np.ndarray | None,
              device) -> tuple[Tensor, Tensor, Tensor, Packing]:
    """Exact packing of host arrays, done on the host: (ids, token_type_ids, position_ids) (T,) int64 and the
    Packing, all views of one int64 buffer that reaches `device` in one non-blocking copy (none on the CPU).

    Args:
        ids: (B, L) int64; mask: (B, L) bool or None (all real); tt, pos: (B, L) int64 or None (zeros, 0..L-1).
    """
    B, L = ids.shape
    C = B * L
    if mask is not None and mask.all():  # every token real: the identity packing (no gather, pad is a reshape)
        mask = None
    if mask is None:
        idx, dest, lens = None, None, np.full(B, L, dtype=np.int64)
    else:
        m = mask.reshape(-1)
        idx = np.flatnonzero(m)  # (T,) ascending: the same order as torch.nonzero
        dest = np.empty(C, dtype=np.int64)
        dest[idx] = np.arange(idx.size)
        dest[~m] = idx.size + np.arange(C - idx.size)
        lens = mask.sum(1)
    T = C if idx is None else idx.size
    cu = np.zeros(B + 2 - (B % 2), dtype=np.int32)  # an even count of int32s: whole int64 slots
    np.cumsum(lens, out=cu[1:B + 1])
    parts = [ids.reshape(-1) if idx is None else ids.reshape(-1)[idx]]
    for t, default in ((tt, None), (pos, "arange")):
        if t is None:
            t = np.zeros((B, L), np.int64) if default is None else np.broadcast_to(np.arange(L), (B, L))
        parts.append(t.reshape(-1) if idx is None else t.reshape(-1)[idx])
    if idx is not None:
        parts += [idx, dest]
    parts.append(cu.view(np.int64))
    buf = torch.from_numpy(np.concatenate(parts)).to(device, non_blocking=True)  # the one copy
    ids_t, tt_t, pos_t = buf[:T], buf[T:2 * T], buf[2 * T:3 * T]
    o = 3 * T
    if idx is not None:
        idx, dest, o = buf[o:o + T], buf[o + T:o + T + C], o + T + C
    cu_t = buf[o:].view(torch.int32)[:B + 1]
    max_seqlen = int(lens.max()) if B else 0
    return ids_t, tt_t, pos_t, Packing(idx, cu_t, max_seqlen, B, L, dest=dest)


def gather(x: torch.Tensor, p: Packing) -> torch.Tensor:
    """(B, L, ...) -> (rows, ...) packed tokens."""
    flat = x.reshape(p.batch * p.seqlen, *x.shape[2:])
    return flat if p.indices is None else flat.index_select(0, p.indices)


def pad(x: torch.Tensor, p: Packing) -> torch.Tensor:
    """(rows, ...) -> (B, L, ...) with zeros at padding positions (rows past the real count are never read)."""
    shape = (p.batch, p.seqlen, *x.shape[1:])
    if p.indices is None:
        return x.reshape(shape)
    if p.dest is not None and x.dim() == 2 and x.shape[0]:
            return lookup("pad_rows", x.device)(x, p.dest, p.cu_seqlens).view(shape)
    if p.dest is not None and x.shape[0]:  # (rows, ...) beyond 2-D: the torch form
        real = (p.dest < p.cu_seqlens[-1]).view(-1, *[1] * (x.dim() - 1))
        return torch.where(real, x.index_select(0, torch.where(real.flatten(), p.dest, 0)), 0).reshape(shape)
    out = x.new_zeros(p.batch * p.seqlen, *x.shape[1:])  # unpad's exact layout
    return out.index_copy(0, p.indices, x).reshape(shape)


def _pad_rows_torch(x: Tensor, dest: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(B*L, d): x[dest[f]] where dest[f] < cu_seqlens[-1] (a real token), else 0."""
    if x.shape[0] == 0:  # no real token anywhere (exact layout)
        return x.new_zeros(dest.shape[0], *x.shape[1:])
    real = dest < cu_seqlens[-1]
    return torch.where(real[:, None], x.index_select(0, torch.where(real, dest, 0)), 0)


# The triton implementation: one launch (kernels/padding.py), a torch.library op so torch.compile and CUDA graphs
# see through it.
@torch.library.custom_op("fastdistil::pad_rows", mutates_args=())
def _pad_rows_op(x: Tensor, dest: Tensor, cu_seqlens: Tensor) -> Tensor:
    return kernel_module("padding").pad_rows(x, dest, cu_seqlens)


@_pad_rows_op.register_fake
def _(x, dest, cu_seqlens):
    return x.new_empty(dest.shape[0], x.shape[1])


def _pad_rows_setup(ctx, inputs, output):
    x, dest, cu_seqlens = inputs
    ctx.rows = x.shape[0]
    ctx.save_for_backward(dest, cu_seqlens)


def _pad_rows_backward(ctx, dy):
    """out[f] = x[dest[f]] for real f (dest[f] < count), so dx[r] = dy[inv[r]] for r < count and 0 above, inv the
    inverse permutation of dest (a scatter; the backward of a gather is a gather here because dest is one-to-one)."""
    dest, cu = ctx.saved_tensors
    if dy is None:
        return None, None, None
    C, R = dest.shape[0], ctx.rows
    inv = torch.empty_like(dest).scatter_(0, dest, torch.arange(C, device=dest.device))[:R]  # (R,)
    real = torch.arange(R, device=dest.device) < cu[-1]
    return torch.where(real[:, None], dy.index_select(0, inv), 0), None, None


_pad_rows_op.register_autograd(_pad_rows_backward, setup_context=_pad_rows_setup)


@torch.library.custom_op("fastdistil::unpack", mutates_args=())
def _unpack_op(mask: Tensor, ids: Tensor, tt: Optional[Tensor], pos: Optional[Tensor]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernel_module("padding").unpack(mask, ids, tt, pos)


@_unpack_op.register_fake
def _(mask, ids, tt, pos):
    n = ids.numel()
    return (ids.new_empty(ids.shape[0] + 1, dtype=torch.int32), *(ids.new_empty(n, dtype=torch.int64)
                                                                  for _ in range(5)))


def _register() -> None:
    register("pad_rows", "torch")(_pad_rows_torch)
    register("unpack", "torch")(_unpack_torch)
    register("unpack", "triton")(lambda mask, ids, tt, pos: _unpack_op(mask, ids, tt, pos))

    def _pad_rows_triton(x, dest, cu_seqlens):
        if x.dtype == torch.float64:
            return _pad_rows_torch(x, dest, cu_seqlens)
        return _pad_rows_op(x, dest, cu_seqlens)
    register("pad_rows", "triton")(_pad_rows_triton)


_register()
