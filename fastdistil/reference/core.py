"""Plain-PyTorch reference of every model op: the `torch` backend and the truth the kernels are tested against.

Every function here works in any floating dtype (float64 included) on any device and is differentiable by
autograd. Kernels, tests and benchmarks import these functions; nobody re-types them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps: float = 1e-12, residual=None, *, input_bias=None, dropout_p: float = 0.0,
               training: bool = False):
    """LayerNorm(dropout(x + input_bias) + residual) over the last dimension.

    Args:
        x: (..., N) input, typically the output of a bias-free GEMM.
        weight, bias: (N,) LayerNorm affine parameters.
        eps: added to the variance.
        residual: optional (..., N) tensor added after dropout (the skip connection).
        input_bias: optional (N,) bias of the preceding linear layer, added before dropout.
        dropout_p: dropout probability on x + input_bias, applied only when `training`.
    Returns:
        (..., N) tensor in x's dtype. Statistics are computed in at least float32.
    """
    if input_bias is not None:
        x = x + input_bias
    if dropout_p > 0.0 and training:
        x = F.dropout(x, dropout_p, training=True)
    if residual is not None:
        x = x + residual
    compute = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute), bias.to(compute), eps)
    return y.to(x.dtype)


def gelu(x, approximate: str = "none"):
    """BERT's exact GELU, x * Phi(x) with the erf form; `approximate="tanh"` only when asked for."""
    return F.gelu(x, approximate=approximate)


def bias_gelu(x, bias, approximate: str = "none"):
    """GELU(x + bias). x: (..., N), bias: (N,)."""
    return gelu(x + bias, approximate)


def linear_tanh(x, weight, bias):
    """BERT's pooler: tanh(x W^T + b). x: (B, K), weight: (N, K), bias: (N,)."""
    return torch.tanh(F.linear(x, weight, bias))


def embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                     ln_weight, ln_bias, eps: float = 1e-12):
    """LayerNorm(word[ids] + position[pos] + type[tt]).

    Args:
        input_ids, token_type_ids, position_ids: integer tensors of one shape S (e.g. (B, L) or (T,)).
        word_weight (V, N), position_weight (P, N), type_weight (Tt, N): embedding tables.
        ln_weight, ln_bias: (N,).
    Returns:
        S + (N,) tensor in the tables' dtype.
    """
    # F.embedding, not table[ids]: the backward of advanced indexing (index_put_ with accumulate) adds rows with
    # float atomics in parallel on CPU (torch 2.13, > 1 thread), so the tables' gradients changed from run to run;
    # embedding's backward sums each row in token order (transformers' nn.Embedding does the same).
    x = (F.embedding(input_ids, word_weight) + F.embedding(token_type_ids, type_weight)
         + F.embedding(position_ids, position_weight))  # transformers' order
    return layer_norm(x, ln_weight, ln_bias, eps)


def attention(q, k, v, attention_mask=None, *, dropout_p: float = 0.0, softmax_scale=None, dropout_mask=None,
              training: bool = True):
    """softmax(q k^T * scale, masked over padded keys) v with the probabilities in float32 (or float64).

    Args:
        q, k, v: (B, H, L, D).
        attention_mask: optional (B, L), nonzero = real key (transformers' convention).
        dropout_p: dropout on the probabilities (when `training`), unless `dropout_mask` is given.
        softmax_scale: defaults to 1/sqrt(D).
        dropout_mask: optional bool (B, H, L, L) keep-mask; kept probabilities are scaled by 1/(1-p).
    Returns:
        (B, H, L, D) in q's dtype. A query whose keys are all padding gets zeros, never NaN.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # (B, H, L, L)
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, L)
        # a finite bias (as transformers adds) keeps all-padding rows finite; they are zeroed below
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)  # s.dtype: under autocast the matmul may be bf16
    p = torch.softmax(s, dim=-1)
    if attention_mask is not None:
        p = p * keep.any(dim=-1, keepdim=True).to(compute)  # a query with no real key attends to nothing
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0 and training:
        p = F.dropout(p, dropout_p, training=True)
    return torch.matmul(p, v.to(compute)).to(q.dtype)


def seq_ids(cu_seqlens, total: int):
    """For packed tokens, the sequence index and position of each token: two (T,) int64 tensors, no host sync.
    Rows at or past cu_seqlens[-1] (the capacity layout's spare rows, fastdistil/padding.py) get sequence B and
    position 0: callers route them to a spare slot."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), t, right=True)  # (T,)
    pos = torch.where(seq < cu_seqlens.shape[0] - 1, t - cu_seqlens.to(torch.int64)[seq], 0)
    return seq, pos


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, dropout_p: float = 0.0, softmax_scale=None,
                     training: bool = True):
    """Attention over packed variable-length sequences.

    Args:
        q, k, v: (T, H, D) packed tokens of B sequences laid end to end.
        cu_seqlens: (B+1,) int32/int64 prefix sums of the sequence lengths, cu_seqlens[0] = 0.
        max_seqlen: the longest sequence length (a Python int).
    Returns:
        (T, H, D) in q's dtype.
    """
    T, H, D = q.shape
    B, L = cu_seqlens.shape[0] - 1, max_seqlen
    seq, pos = seq_ids(cu_seqlens, T)
    flat = torch.where(seq < B, seq * L + pos, B * L)  # rows past cu_seqlens[-1] go to one spare slot

    def pad(x):  # (T, H, D) -> (B, H, L, D)
        out = x.new_zeros(B * L + 1, H, D).index_put((flat,), x)
        return out[:B * L].view(B, L, H, D).transpose(1, 2)

    mask = torch.zeros(B * L + 1, dtype=torch.bool, device=q.device)
    mask = mask.index_put((flat,), torch.ones((), dtype=torch.bool, device=q.device))
    o = attention(pad(q), pad(k), pad(v), mask[:B * L].view(B, L), dropout_p=dropout_p,
                  softmax_scale=softmax_scale, training=training)  # (B, H, L, D)
    return o.transpose(1, 2).reshape(B * L, H, D)[flat.clamp(max=max(B * L - 1, 0))]  # (T, H, D); spare rows:
    # unspecified (a real row's value)
