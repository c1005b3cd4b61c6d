"""BERT's pooler, tanh(x W^T + b), as one op: one launch on the triton backend (kernels/matmul.py, EPILOGUE 3),
forward, with a torch backward (so a training forward's pooler is one launch too). Under autocast or for float64 it
runs the torch form, transformers' own op order (bit-identical there).

Backward, with y = tanh(x W^T + b):  dz = dy (1 - y^2) (in fp32),  dx = dz W,  dW = dz^T x,  db = sum_rows dz.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .dispatch import kernel_module, lookup, register
from .eager import fast


def linear_tanh(x, weight, bias):
    """tanh(x @ weight.T + bias). x (B, K) (any row stride), weight (N, K), bias (N,) -> (B, N)."""
    return lookup("linear_tanh", x.device)(x, weight, bias)


@register("linear_tanh", "torch")
def _linear_tanh_torch(x, weight, bias):
    return reference.linear_tanh(x, weight, bias)


@torch.library.custom_op("fastdistil::linear_tanh", mutates_args=())
def _linear_tanh_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return kernel_module("matmul").linear_tanh_fwd(x, weight, bias)


@_linear_tanh_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _lin_tanh_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output)


def _lin_tanh_backward(ctx, dy):
    x, weight, y = ctx.saved_tensors
    if dy is None:
        return None, None, None
    dz = (dy.float() * (1.0 - y.float().square())).to(y.dtype)  # (B, N)
    need = ctx.needs_input_grad
    return (dz @ weight if need[0] else None, dz.t() @ x if need[1] else None,
            dz.sum(0) if need[2] else None)


_linear_tanh_op.register_autograd(_lin_tanh_backward, setup_context=_lin_tanh_setup)
_linear_tanh = fast(_linear_tanh_op, _lin_tanh_setup, _lin_tanh_backward)  # eager fast path (ops/eager.py)


@register("linear_tanh", "triton")
def _linear_tanh_triton(x, weight, bias):
    if (x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dim() != 2 or x.stride(-1) != 1
            or not (x.dtype == weight.dtype == bias.dtype) or torch.is_autocast_enabled(x.device.type)):
        return _linear_tanh_torch(x, weight, bias)
    return _linear_tanh(x, weight.contiguous(), bias)
