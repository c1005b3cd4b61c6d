"""The two GEMM-plus-epilogue blocks of a BERT layer, as ops a backend can fuse whole.

    linear_gelu(x, W, b)                    = GELU(x W^T + b)                                   (FFN in)
    linear_layer_norm(x, W, b, r, g, beta)  = LayerNorm(dropout(x W^T + b) + r) * g + beta      (attention out, FFN out)

The triton backend fuses the epilogue into its matmul (kernels/matmul.py) and the native one runs ATen's GEMM,
then its C++ epilogue kernel (both below). Otherwise: the `torch` backend runs transformers' exact op order (bias
inside the GEMM, which makes it bit-exact with transformers.BertModel in fp32), and any other backend runs a
bias-free GEMM followed by its fused `bias_gelu` / `layer_norm(input_bias=...)` kernel, which move the same bytes
in as many launches.
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


# ------------------------------------------------------------------------------------------------ triton
# torch.library registration (compiles with fullgraph=True); kernels/matmul.py is imported on first call.
from typing import Optional  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ._common import needs_grad, rows as _rows  # noqa: E402
from .dispatch import kernel_module, register  # noqa: E402
from .eager import fast  # noqa: E402
from .rng import dropout_seed  # noqa: E402


# Linear + bias + GELU in one launch (kernels/matmul.py, EPILOGUE 1): the triton implementation of
# fastdistil.ops.linear_gelu.
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


# Linear + bias + dropout + residual + LayerNorm in one launch (kernels/matmul.py, EPILOGUE 2): the triton
# implementation of fastdistil.ops.linear_layer_norm.
@torch.library.custom_op("fastdistil::linear_layer_norm_fwd", mutates_args=())
def _lin_ln_fwd_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                   eps: float, dropout_p: float, seed: Optional[Tensor],
                   save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mean, rstd); z and the statistics are empty unless `save`; y and z in the promoted dtype of x and
    residual."""
    K = kernel_module("matmul")
    y, z, mean, rstd = K.linear_layer_norm_fwd(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p, seed,
                                               save)
    return y, (z if save else x.new_empty(0)), mean, rstd


@_lin_ln_fwd_op.register_fake
def _(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p, seed, save):
    m, n = x.shape[0], weight.shape[0]
    y = x.new_empty(m, n, dtype=torch.promote_types(x.dtype, residual.dtype))
    z = torch.empty_like(y) if save else x.new_empty(0)
    stats = x.new_empty(m if save else 0, dtype=torch.float32)
    return y, z, stats, torch.empty_like(stats)


@torch.library.custom_op("fastdistil::linear_layer_norm_bwd", mutates_args=())
def _lin_ln_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, ln_weight: Tensor,
                   dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual, dln_weight, dln_bias): the LayerNorm backward kernel gives d(x W^T + b)
    (through the regenerated dropout mask, written in the GEMM's dtype) and dresidual; two library GEMMs give dx
    and dweight."""
    K = kernel_module("layer_norm")
    dpre, dres, dlw, dlb, db = K.layer_norm_bwd(dy, z, mean, rstd, ln_weight, True, dropout_p, seed,
                                                dx_dtype=weight.dtype)
    dx = dpre @ weight                          # (M, N) @ (N, K)
    dw = dpre.t() @ x                           # (N, M) @ (M, K)
    return dx, dw, db.to(weight.dtype), dres, dlw, dlb


@_lin_ln_bwd_op.register_fake
def _(dy, x, weight, z, mean, rstd, ln_weight, dropout_p, seed):
    return (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0]), torch.empty_like(z),
            torch.empty_like(ln_weight), torch.empty_like(ln_weight))


def _lin_ln_setup(ctx, inputs, output):
    x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p, seed, save = inputs
    ctx.p, ctx.res_dtype = dropout_p, residual.dtype
    ctx.save_for_backward(x, weight, output[1], output[2], output[3], ln_weight, seed)


def _lin_ln_backward(ctx, dy, _dz, _dmean, _drstd):
    x, weight, z, mean, rstd, ln_weight, seed = ctx.saved_tensors
    dx, dw, db, dres, dlw, dlb = _lin_ln_bwd(dy, x, weight, z, mean, rstd, ln_weight, ctx.p, seed)
    return dx, dw, db, dres.to(ctx.res_dtype), dlw, dlb, None, None, None, None


_lin_ln_fwd_op.register_autograd(_lin_ln_backward, setup_context=_lin_ln_setup)
_lin_ln_fwd = fast(_lin_ln_fwd_op, _lin_ln_setup, _lin_ln_backward)  # eager fast path (ops/eager.py)
_lin_ln_bwd = fast(_lin_ln_bwd_op)


@register("linear_layer_norm", "triton")
def _linear_layer_norm_triton(x, weight, bias, residual, ln_weight, ln_bias, eps, *, dropout_p):
    if torch.compiler.is_compiling():  # dynamo traces import statements, not importlib (kernel_module)
        from ..kernels.matmul import use_fused_epilogue
    else:  # eagerly: the cached module, no import statement per call
        use_fused_epilogue = kernel_module("matmul").use_fused_epilogue
    n = weight.shape[0]
    rows = x.numel() // max(1, x.shape[-1])
    # unfused (a library GEMM, then the LN kernel): float64, mixed dtypes, widths beyond the epilogue's, and many
    # rows, where cuBLAS's GEMM beats the full-row-tile epilogue GEMM (kernels/matmul.py, use_fused_epilogue)
    if (x.dtype == torch.float64 or weight.dtype != x.dtype
            or not use_fused_epilogue(rows, n, x.shape[-1], "layer_norm")):
        return layer_norm(F.linear(x, weight), ln_weight, ln_bias, eps, residual, input_bias=bias,
                          dropout_p=dropout_p)
    save = needs_grad(x, weight, bias, residual, ln_weight, ln_bias)
    seed = dropout_seed(x.device) if dropout_p > 0 else None
    y = _lin_ln_fwd(_rows(x, x.shape[-1]), weight.contiguous(), bias, _rows(residual, n), ln_weight, ln_bias,
                       float(eps), float(dropout_p), seed, save)[0]
    return y.view(residual.shape)


# ------------------------------------------------------------------------------------------------ native (CPU)
# ATen's GEMM, then the C++ epilogue kernel. The bias stays inside the GEMM (addmm), as in transformers and the
# torch backend: the same fp32 rounding, so six layers of real weights stay within 1e-5 of transformers (a bias
# added after the GEMM drifts to ~1.5e-5). Registered only once the extension imports.
from ._common import EXT, zeros  # noqa: E402
from .gelu import _bias_gelu_native  # noqa: E402
from .layer_norm import _layer_norm_native  # noqa: E402


@register("linear_gelu", "native", needs=EXT)
def _linear_gelu_native(x, weight, bias, *, approximate="none"):
    h = F.linear(x, weight, bias)  # (..., N)
    return _bias_gelu_native(h, zeros(h.shape[-1], h.dtype), approximate=approximate)


@register("linear_layer_norm", "native", needs=EXT)
def _linear_layer_norm_native(x, weight, bias, residual, ln_weight, ln_bias, eps=1e-12, *, dropout_p=0.0):
    return _layer_norm_native(F.linear(x, weight, bias), ln_weight, ln_bias, eps, residual, dropout_p=dropout_p)
