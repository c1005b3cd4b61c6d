"""Bias + GELU: GELU(x + bias), BERT's exact erf form unless approximate="tanh" is asked for."""
from __future__ import annotations

from .. import reference
from .checks import check_float, check_shape
from .dispatch import kernel_module, lookup, register
from .eager import fast


def bias_gelu(x, bias, *, approximate: str = "none"):
    """GELU(x + bias).

    Args:
        x: (..., N), typically the bias-free output of the FFN's first GEMM.
        bias: (N,); cast to x's dtype when it differs (under autocast a bf16 GEMM output meets an fp32 bias, as
            F.linear's bias would be cast; see ops/amp.py).
        approximate: "none" (exact erf, BERT's `gelu`) or "tanh" (only when the model asks for it).
    Returns:
        (..., N) in x's dtype.
    """
    check_float("x", x)
    check_shape("bias", bias, (x.shape[-1],))
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias.dtype != x.dtype:
        check_float("bias", bias)
        bias = bias.to(x.dtype)
    return lookup("bias_gelu", x.device)(x, bias, approximate=approximate)


@register("bias_gelu", "torch")
def _bias_gelu_torch(x, bias, *, approximate):
    return reference.bias_gelu(x, bias, approximate)


# ------------------------------------------------------------------------------------------------ triton
# torch.library registration (compiles with fullgraph=True); kernels/gelu.py is imported on first call.
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ._common import needs_grad, rows as _rows  # noqa: E402


@torch.library.custom_op("fastdistil::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    K = kernel_module("gelu")
    return K.bias_gelu_fwd(x, bias, approximate)


@_bias_gelu_fwd_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@torch.library.custom_op("fastdistil::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dh: Tensor, x: Tensor, bias: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    """(dx, dbias) with dbias in bias's dtype."""
    K = kernel_module("gelu")
    dx, db = K.bias_gelu_bwd(dh, x, bias, approximate)
    return dx, db.to(bias.dtype)


@_bias_gelu_bwd_op.register_fake
def _(dh, x, bias, approximate):
    return torch.empty_like(x), torch.empty_like(bias)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, dh):
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_bwd(dh, x, bias, ctx.approximate)
    return dx, db, None


_bias_gelu_fwd_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)
_bias_gelu_fwd = fast(_bias_gelu_fwd_op, _bias_gelu_setup, _bias_gelu_backward)  # eager fast path (ops/eager.py)
_bias_gelu_bwd = fast(_bias_gelu_bwd_op)


@register("bias_gelu", "triton")
def _bias_gelu_triton(x, bias, *, approximate):
    if x.dtype == torch.float64:  # the kernels compute in fp32: float64 stays exact on the reference
        return _bias_gelu_torch(x, bias, approximate=approximate)
    return _bias_gelu_fwd(_rows(x, x.shape[-1]), bias, approximate).view(x.shape)


# ------------------------------------------------------------------------------------------------ native (CPU)
# C++ forward and backward (csrc/, fastdistil._C) for float32/bfloat16 CPU tensors; any other dtype runs the torch
# reference. Registered only once the extension imports.
from ._common import EXT, _C, native_ok  # noqa: E402


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, tanh):
        ctx.save_for_backward(x, bias)
        ctx.tanh = tanh
        return _C.bias_gelu_fwd(x, bias, tanh)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = _C.bias_gelu_bwd(dy.contiguous(), x, bias, ctx.tanh)
        return dx, db.to(bias.dtype), None


@register("bias_gelu", "native", needs=EXT)
def _bias_gelu_native(x, bias, *, approximate="none"):
    if not native_ok(x):
        return _bias_gelu_torch(x, bias, approximate=approximate)
    tanh = approximate == "tanh"
    if needs_grad(x, bias):
        return _BiasGelu.apply(x, bias, tanh)
    return _C.bias_gelu_fwd(x, bias, tanh)
