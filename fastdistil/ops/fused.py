"""The two GEMM-plus-epilogue blocks of a BERT layer, as ops a backend can fuse whole.

    linear_gelu(x, W, b)                    = GELU(x W^T + b)                                   (FFN in)
    linear_layer_norm(x, W, b, r, g, beta)  = LayerNorm(dropout(x W^T + b) + r) * g + beta      (attention out, FFN out)

A backend registers its own implementation (e.g. a Triton matmul with the epilogue fused) under these names.
Otherwise: the `torch` backend runs transformers' exact op order (bias inside the GEMM, which makes it bit-exact
with transformers.BertModel in fp32), and any other backend runs a bias-free GEMM followed by its fused
`bias_gelu` / `layer_norm(input_bias=...)` kernel, which move the same bytes in as many launches.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..backend import resolve
from . import amp
from .dispatch import implemented, lookup
from .gelu import bias_gelu
from .layer_norm import layer_norm


def linear_gelu(x, weight, bias, *, approximate: str = "none"):
    """GELU(x @ weight.T + bias). x (..., K), weight (N, K), bias (N,) -> (..., N).
    Under torch.autocast x, weight and bias are cast to the autocast dtype first (ops/amp.py)."""
    dt = amp.autocast_dtype(x.device)
    if dt is not None:
        x, weight, bias = amp.cast(dt, x, weight, bias)
        with amp.disabled(x.device):
            return _linear_gelu(x, weight, bias, approximate)
    return _linear_gelu(x, weight, bias, approximate)


def _linear_gelu(x, weight, bias, approximate):
    backend = resolve(x.device)
    if implemented("linear_gelu", backend):
        return lookup("linear_gelu", x.device)(x, weight, bias, approximate=approximate)
    if backend == "torch":
        return F.gelu(F.linear(x, weight, bias), approximate=approximate)
    return bias_gelu(F.linear(x, weight), bias, approximate=approximate)


def linear_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps: float = 1e-12, *,
                      dropout_p: float = 0.0):
    """LayerNorm(dropout(x @ weight.T + bias) + residual). x (..., K), weight (N, K), residual (..., N).
    Under torch.autocast the GEMM runs in the autocast dtype (x, weight, bias cast), the LayerNorm in fp32, and
    the output has the promoted dtype of the GEMM's and the residual's (ops/amp.py)."""
    dt = amp.autocast_dtype(x.device)
    if dt is not None:
        x, weight, bias = amp.cast(dt, x, weight, bias)
        with amp.disabled(x.device):
            return _linear_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p)
    return _linear_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p)


def _linear_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p):
    backend = resolve(x.device)
    if implemented("linear_layer_norm", backend):
        return lookup("linear_layer_norm", x.device)(x, weight, bias, residual, ln_weight, ln_bias, eps,
                                                     dropout_p=dropout_p)
    if backend == "torch":
        return layer_norm(F.linear(x, weight, bias), ln_weight, ln_bias, eps, residual, dropout_p=dropout_p)
    return layer_norm(F.linear(x, weight), ln_weight, ln_bias, eps, residual, input_bias=bias, dropout_p=dropout_p)
