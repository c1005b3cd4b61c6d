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
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from .layer_norm import _rows, needs_grad  # noqa: E402


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


# Linear + bias + GELU in one launch (kernels/matmul.py, EPILOGUE 1): the triton implementation of
# fastdistil.ops.linear_gelu (see ops/fused.py for the op's contract).
@torch.library.custom_op("fastdistil::linear_gelu_fwd", mutates_args=())
def _lin_gelu_fwd_op(x: Tensor, weight: Tensor, bias: Tensor, approximate: str, save: bool) -> tuple[Tensor, Tensor]:
    """(h, pre): pre = x W^T without bias, stored only when `save` (else empty)."""
    K = kernel_module("matmul")
    h, pre = K.linear_gelu_fwd(x, weight, bias, True, approximate, store_pre=save)
    return h, (pre if save else x.new_empty(0))


@_lin_gelu_fwd_op.register_fake
def _(x, weight, bias, approximate, save):
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty(m, n), (x.new_empty(m, n) if save else x.new_empty(0))


@torch.library.custom_op("fastdistil::linear_gelu_bwd", mutates_args=())
def _lin_gelu_bwd_op(dh: Tensor, x: Tensor, weight: Tensor, pre: Tensor, bias: Tensor,
                     approximate: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias): the bias+GELU backward kernel gives d(x W^T + b) and dbias, two GEMMs the rest."""
    K = kernel_module("gelu")
    du, db = K.bias_gelu_bwd(dh, pre, bias, approximate)
    return du @ weight, du.t() @ x, db.to(bias.dtype)


@_lin_gelu_bwd_op.register_fake
def _(dh, x, weight, pre, bias, approximate):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _lin_gelu_setup(ctx, inputs, output):
    x, weight, bias, approximate, save = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x, weight, output[1], bias)


def _lin_gelu_backward(ctx, dh, _dpre):
    x, weight, pre, bias = ctx.saved_tensors
    dx, dw, db = _lin_gelu_bwd(dh, x, weight, pre, bias, ctx.approximate)
    return dx, dw, db, None, None


_lin_gelu_fwd_op.register_autograd(_lin_gelu_backward, setup_context=_lin_gelu_setup)
_lin_gelu_fwd = fast(_lin_gelu_fwd_op, _lin_gelu_setup, _lin_gelu_backward)  # eager fast path (ops/eager.py)
_lin_gelu_bwd = fast(_lin_gelu_bwd_op)


@register("linear_gelu", "triton")
def _linear_gelu_triton(x, weight, bias, *, approximate):
    if torch.compiler.is_compiling():  # dynamo traces import statements, not importlib (kernel_module)
        from ..kernels.matmul import use_fused_epilogue
    else:  # eagerly: the cached module, no import statement per call
        use_fused_epilogue = kernel_module("matmul").use_fused_epilogue
    if x.dtype == torch.float64 or weight.dtype != x.dtype:  # unfused: GEMM, then the bias+GELU kernel
        return bias_gelu(F.linear(x, weight), bias, approximate=approximate)
    if not use_fused_epilogue(x.numel() // max(1, x.shape[-1]), weight.shape[0], x.shape[-1], "gelu"):
        # many rows: cuBLAS's GEMM with the bias in its epilogue, then torch's GELU (kernels/matmul.py says why)
        return F.gelu(F.linear(x, weight, bias), approximate=approximate)
    save = needs_grad(x, weight, bias)
    h = _lin_gelu_fwd(_rows(x, x.shape[-1]), weight.contiguous(), bias, approximate, save)[0]
    return h.view(*x.shape[:-1], weight.shape[0])
