"""Unpad once, pad once: the padding-free data path's only two layout changes.

`unpad` turns a (B, L) attention mask into the indices of the real tokens, `cu_seqlens` and `max_seqlen`, with
one host synchronisation per batch (the token count and max length size the kernels' grids). Every layer then
works on (T, d) packed tokens; `pad` scatters back to (B, L, d) only when the caller wants padded outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    """Where the real tokens of a (B, L) batch live once packed."""
    indices: torch.Tensor | None  # (T,) int64 flat positions in B*L; None when nothing is padding
    cu_seqlens: torch.Tensor      # (B+1,) int32 prefix sums of the lengths
    max_seqlen: int
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        return self.batch * self.seqlen if self.indices is None else self.indices.shape[0]


def unpad(attention_mask: torch.Tensor | None, batch: int, seqlen: int, device=None) -> Packing:
    """Packing of a batch whose real tokens are where attention_mask != 0 (all tokens when mask is None).

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


def gather(x: torch.Tensor, p: Packing) -> torch.Tensor:
    """(B, L, ...) -> (T, ...) real tokens."""
    flat = x.reshape(p.batch * p.seqlen, *x.shape[2:])
    return flat if p.indices is None else flat.index_select(0, p.indices)


def pad(x: torch.Tensor, p: Packing) -> torch.Tensor:
    """(T, ...) -> (B, L, ...) with zeros at padding positions."""
    if p.indices is None:
        return x.reshape(p.batch, p.seqlen, *x.shape[1:])
    out = x.new_zeros(p.batch * p.seqlen, *x.shape[1:])
    out = out.index_copy(0, p.indices, x)
    return out.reshape(p.batch, p.seqlen, *x.shape[1:])
