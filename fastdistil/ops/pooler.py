"""BERT's pooler, tanh(x W^T + b), as one op: one launch on the triton backend (kernels/matmul.py, EPILOGUE 3).

Inference only on the triton path (no backward kernel): with autograd recording, under autocast, or for float64
it runs the torch form, transformers' own op order (bit-identical there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import kernel_module, lookup, register


def linear_tanh(x, weight, bias):
    """tanh(x @ weight.T + bias). x (B, K) (any row stride), weight (N, K), bias (N,) -> (B, N)."""
    return lookup("linear_tanh", x.device)(x, weight, bias)


@register("linear_tanh", "torch")
def _linear_tanh_torch(x, weight, bias):
    return torch.tanh(F.linear(x, weight, bias))


@torch.library.custom_op("fastdistil::linear_tanh", mutates_args=())
def _linear_tanh_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return kernel_module("matmul").linear_tanh_fwd(x, weight, bias)


@_linear_tanh_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@register("linear_tanh", "triton")
def _linear_tanh_triton(x, weight, bias):
    if (x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dim() != 2 or x.stride(-1) != 1
            or not (x.dtype == weight.dtype == bias.dtype) or torch.is_autocast_enabled(x.device.type)
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
        return _linear_tanh_torch(x, weight, bias)
    return _linear_tanh_op(x, weight.contiguous(), bias)
