"""Position 0 of left-padded rows, computed as transformers computes it, for the pooler and [CLS] heads.

With left padding (``padding_side="left"``) a row's position 0 is padding, yet BERT's pooler and heads that read
[CLS] read that position. transformers computes a value there: the pad token's embedding at position 0, run through
every layer as a query over its row's *real* keys only (its own key is masked like every padding key). A row with
no real token at all attends to nothing there and gets a zero context: that is what transformers 5's sdpa (its
default attention) computes; eager attention, and 4.x's sdpa, instead average the row's padded values uniformly,
which fastdistil does not reproduce.

The padding-free path has no token at those positions, so they ride through the layers as a small side batch of
E query-only rows: per layer, each row's q comes from its own state, its k, v are those of its row's real tokens
(taken from the layer's own per-op computation, or recomputed from the layer input for those rows where a backend
runs the whole layer in one call), and the layer's output projection, LayerNorms and FFN run on the (E, d) rows.
They are never keys, so the real tokens are untouched. Built only when some row starts with padding (or always
under torch.compile, which cannot branch on data): other batches cost nothing.
"""
from __future__ import annotations

import torch

from . import reference
from .padding import Packing


class LeftPad:
    """The query-only rows of one batch: which rows, and where their keys live in the packed tokens.

    Attributes:
        rows: (E,) int64 batch rows whose position 0 is padding (all B rows when built with ``every_row``).
        lead: (B,) bool, True where position 0 is padding.
        tokens: (N,) int64 packed indices of the real tokens of those rows.
        key_mask: (E, Lk) bool, each side row's real keys laid out left-aligned.
        state: (E, d) the rows' hidden state, advanced layer by layer (set by the caller).
    """

    def __init__(self, lead: torch.Tensor, p: Packing, every_row: bool):
        B, dev = p.batch, lead.device
        cu = p.cu_seqlens.to(torch.int64)
        lens = cu[1:] - cu[:-1]  # (B,)
        T = p.total
        seq, pos = reference.seq_ids(p.cu_seqlens, T)  # (T,) each: row and position within the row's real tokens
        self.lead, self.every_row = lead, every_row
        if every_row:  # no data-dependent shapes beyond T (torch.compile)
            self.rows = torch.arange(B, device=dev)
            self.tokens = torch.arange(T, device=dev)
            self._row, self._pos = seq, pos
        else:
            self.rows = torch.nonzero(lead).flatten()  # (E,): one host sync, (B,) booleans
            side = torch.full((B,), -1, dtype=torch.int64, device=dev)
            side[self.rows] = torch.arange(self.rows.shape[0], device=dev)
            self.tokens = torch.nonzero(side[seq] >= 0).flatten()  # (N,)
            self._row, self._pos = side[seq[self.tokens]], pos[self.tokens]
        Lk = p.max_seqlen
        self.key_mask = torch.arange(Lk, device=dev)[None, :] < lens[self.rows][:, None]  # (E, Lk)
        self.state = None

    @classmethod
    def build(cls, attention_mask: torch.Tensor | None, p: Packing, lead_any: bool | None = None) -> "LeftPad | None":
        """The side rows of a batch, or None when no row's position 0 is padding (no extra work then).

        Args:
            attention_mask: (B, L) mask the batch was unpacked with (nonzero = real token), or None.
            p: its Packing.
            lead_any: whether some row's position 0 is padding, when the caller knows it without a device read
                (FastStudent reads it from host masks); None: decided here (one host sync, none under
                torch.compile or in the capacity layout, which take every row).
        """
        if attention_mask is None or p.batch == 0 or p.seqlen == 0 or lead_any is False:
            return None
        lead = ~attention_mask[:, 0].to(device=p.cu_seqlens.device, dtype=torch.bool)  # (B,)
        if torch.compiler.is_compiling() or p.capacity:
            return cls(lead, p, every_row=True)
        if lead_any is None and not bool(lead.any()):
            return None
        return cls(lead, p, every_row=False)

    def keys(self, k: torch.Tensor, v: torch.Tensor, packed: bool = True) -> None:
        """Set this layer's keys and values of the side rows. k, v: (T, H, D) for every packed token when
        `packed`, else (N, H, D) for `tokens` only."""
        if packed and not self.every_row:  # every_row: tokens are all of them, in order
            k, v = k.index_select(0, self.tokens), v.index_select(0, self.tokens)
        E, Lk = self.key_mask.shape
        # the capacity layout's spare rows (row E, fastdistil/padding.py) go to one slot past the E x Lk keys
        flat = torch.where(self._row < E, self._row * Lk + self._pos, E * Lk)
        self._k, self._v = (x.new_zeros(E * Lk + 1, *x.shape[1:]).index_put((flat,), x)[:E * Lk].view(
            E, Lk, *x.shape[1:]) for x in (k, v))

    def attend(self, q: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        """Attention of the side rows' queries q (E, H, D) over their rows' real keys: (E, H, D). A row with no
        real key gets zeros (sdpa's result for a query that may attend to nothing)."""
        ctx = reference.attention(q[:, :, None], self._k.transpose(1, 2), self._v.transpose(1, 2), self.key_mask,
                                  dropout_p=dropout_p, training=dropout_p > 0)  # (E, H, 1, D)
        return ctx[:, :, 0]

    def first(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, d) with the side rows' state at the rows whose position 0 is padding."""
        if self.every_row:  # rows whose position 0 is real keep the main path's value
            return torch.where(self.lead[:, None], self.state, x0)
        return x0.index_put((self.rows,), self.state)
