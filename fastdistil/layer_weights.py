"""LayerWeights: the weights and settings of one encoder layer, as every backend's ``encoder_layer`` reads them.

One named structure, architecture-neutral, built by whoever owns the parameters (FastStudent's ``Layer.weights()``,
the drop-in patch from a transformers layer, an ``arch/`` adapter from DistilBERT's or RoBERTa's layer) and consumed
by the torch op sequence (:func:`layer_ops`), the native C++ layer and whole-encoder calls, and the cost model's plan
(:func:`plan_shapes`). It holds references to the owner's tensors (nothing is copied; the fused QKV weight comes from
fastdistil/weight_cache.py) and is rebuilt per call, so a replaced or updated parameter is always seen.

    qkv = x W_qkv^T + b_qkv                      (T, 3d)   one GEMM over the three projections
    ctx = attention(q, k, v) over the packing    (T, d)
    x1  = LN1(dropout(ctx W_o^T + b_o) + x)      (T, d)    post-LayerNorm ("post"); no dropout for DistilBERT
    h   = act(x1 W_in^T + b_in)                  (T, f)    act: "gelu" (erf) or "gelu_tanh"
    out = LN2(dropout(h W_out^T + b_out) + x1)   (T, d)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # name -> F.gelu's `approximate`
NORMS = ("post",)

# Field order of the twelve tensors: the C++ struct (csrc/layer.cpp) reads them by these names.
TENSOR_FIELDS = ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_w", "ln1_b", "w_in", "b_in", "w_out", "b_out", "ln2_w", "ln2_b")


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """The twelve tensors of one encoder layer and its settings. Weights are (out, in) as in nn.Linear.

    Attributes:
        w_qkv, b_qkv: (3d, d), (3d,) query, key and value projections stacked in that order.
        w_o, b_o: (d, d), (d,) attention output projection.
        ln1_w, ln1_b: (d,) LayerNorm after attention; eps1 its epsilon.
        w_in, b_in: (f, d), (f,) FFN input projection.
        w_out, b_out: (d, f), (d,) FFN output projection.
        ln2_w, ln2_b: (d,) LayerNorm after the FFN; eps2 its epsilon.
        heads: attention heads H (d % H == 0).
        activation: "gelu" (erf) or "gelu_tanh".
        norm: LayerNorm placement; "post" (BERT, RoBERTa, DistilBERT) is the only one so far.
        attn_dropout, hidden_dropout: dropout probabilities in training (the inference calls ignore them).
        attn_out_dropout: dropout after the attention output projection; None means hidden_dropout (BERT,
            RoBERTa), 0.0 for DistilBERT, which has none there.
    """

    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    eps1: float
    eps2: float
    heads: int
    activation: str = "gelu"
    norm: str = "post"
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0
    attn_out_dropout: float | None = None  # after the attention output projection; None: hidden_dropout

    def __post_init__(self):  # cheap settings checks only: this is built per inference call
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LayerWeights.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.norm not in NORMS:
            raise ValueError(f"LayerWeights.norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.heads, int) or self.heads <= 0 or self.w_o.shape[0] % self.heads:
            raise ValueError(f"LayerWeights.heads must be a positive int dividing the hidden size "
                             f"{self.w_o.shape[0]}, got {self.heads!r}")

    @property
    def hidden(self) -> int:
        """d, the model width."""
        return self.w_o.shape[0]

    @property
    def intermediate(self) -> int:
        """f, the FFN width."""
        return self.w_in.shape[0]

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def approximate(self) -> str:
        """F.gelu's `approximate` argument for this activation."""
        return ACTIVATIONS[self.activation]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The twelve tensors in TENSOR_FIELDS order."""
        return tuple(getattr(self, n) for n in TENSOR_FIELDS)


class LayerList(list):
    """A model's LayerWeights, one per layer: a list that can be referenced weakly (ops/onednn.py remembers the
    last one it prepacked without keeping it alive)."""
    __slots__ = ("__weakref__",)


def activation_name(approximate: str) -> str:
    """LayerWeights.activation for F.gelu's `approximate` ("none" or "tanh")."""
    for name, a in ACTIVATIONS.items():
        if a == approximate:
            return name
    raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")


def plan_shapes(w: LayerWeights) -> tuple[int, int, int]:
    """(hidden, heads, intermediate) of a layer: the shape arguments of bench.costmodel.layer_plan."""
    return w.hidden, w.heads, w.intermediate


def attend(q, k, v, where, dropout_p: float = 0.0):
    """Attention on either layout. Packed: q, k, v (T, H, D) and `where` a padding.Packing (cu_seqlens,
    max_seqlen), or a leftpad.LeftPad of query-only side rows (its own keys). Padded: (B, L, H, D) and `where` a
    (B, L) key mask or None. Returns the layout it was given. Duck-typed so this module imports no padding code."""
    if hasattr(where, "attend"):  # LeftPad: query-only rows (E, H, D) over their rows' real tokens
        return where.attend(q, dropout_p)
    if hasattr(where, "cu_seqlens"):  # Packing
        return ops.varlen_attention(q, k, v, where.cu_seqlens, where.max_seqlen, dropout_p=dropout_p)  # (T, H, D)
    ctx = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), where,
                        dropout_p=dropout_p)  # (B, H, L, D)
    return ctx.transpose(1, 2)  # (B, L, H, D)


def layer_ops(w: LayerWeights, x: torch.Tensor, where, *, training: bool = False, tap: dict | None = None):
    """The plain layer as a sequence of fastdistil ops: the one op-level definition, which FastStudent's
    Layer.forward_ops, the patch and the torch backend's ``encoder_layer`` (training=False) all call.

    Args:
        w: the layer's weights.
        x: (T, d) packed tokens with `where` a Packing / LeftPad, or (B, L, d) with a (B, L) key mask or None.
        training: apply w's dropout probabilities.
        tap: when given, receives q, k, v (..., H, D) (distillation taps; strided views of the QKV GEMM output).
    Returns:
        the layer output, x's shape.
    """
    o_drop = w.hidden_dropout if w.attn_out_dropout is None else w.attn_out_dropout
    a_drop, o_drop, h_drop = (w.attn_dropout, o_drop, w.hidden_dropout) if training else (0.0, 0.0, 0.0)
    q, k, v = F.linear(x, w.w_qkv, w.b_qkv).unflatten(-1, (3, w.heads, w.head_dim)).unbind(-3)  # (..., H, D)
    if tap is not None:
        tap.update(q=q, k=k, v=v)
    ctx = attend(q, k, v, where, a_drop).flatten(-2)  # (..., d)
    x = ops.linear_layer_norm(ctx, w.w_o, w.b_o, x, w.ln1_w, w.ln1_b, w.eps1, dropout_p=o_drop)  # (..., d)
    h = ops.linear_gelu(x, w.w_in, w.b_in, approximate=w.approximate)  # (..., f)
    return ops.linear_layer_norm(h, w.w_out, w.b_out, x, w.ln2_w, w.ln2_b, w.eps2, dropout_p=h_drop)  # (..., d)
