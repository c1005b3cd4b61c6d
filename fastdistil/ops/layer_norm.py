"""LayerNorm with the residual, the preceding linear's bias and dropout fused in:
y = LayerNorm(dropout(x + input_bias) + residual). Statistics in float32."""
from __future__ import annotations

from .. import reference
from .checks import check_float, check_shape
from .dispatch import kernel_module, lookup, register
from .eager import fast


def layer_norm(x, weight, bias, eps: float = 1e-12, residual=None, *, input_bias=None, dropout_p: float = 0.0):
    """LayerNorm(dropout(x + input_bias) + residual) over the last dimension.

    Args:
        x: (..., N).
        weight, bias: (N,) affine parameters.
        eps: variance epsilon (BERT: 1e-12).
        residual: optional (..., N) skip connection, added after dropout; its dtype may differ from x's (under
            autocast a bf16/fp16 GEMM output meets an fp32 residual stream, see ops/amp.py).
        input_bias: optional (N,) bias of the GEMM that produced x.
        dropout_p: dropout probability on x + input_bias (0 in eval mode).
    Returns:
        (..., N) in the promoted dtype of x and residual (x's dtype without a residual). Statistics are fp32.
    """
    check_float("x", x)
    n = x.shape[-1]
    check_shape("weight", weight, (n,))
    check_shape("bias", bias, (n,))
    if residual is not None:
        check_shape("residual", residual, tuple(x.shape))
        check_float("residual", residual)
        if residual.device != x.device:
            raise ValueError(f"x, residual must be on one device, got {x.device} and {residual.device}")
    if input_bias is not None:
        check_shape("input_bias", input_bias, (n,))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return lookup("layer_norm", x.device)(x, weight, bias, eps, residual, input_bias=input_bias, dropout_p=dropout_p)


@register("layer_norm", "torch")
def _layer_norm_torch(x, weight, bias, eps, residual, *, input_bias, dropout_p):
    return reference.layer_norm(x, weight, bias, eps, residual, input_bias=input_bias, dropout_p=dropout_p,
                                training=True)


# ------------------------------------------------------------------------------------------------ triton
# Registered through torch.library (custom_op + register_fake + register_autograd) so torch.compile traces it
# with fullgraph=True; the kernels (kernels/layer_norm.py) are imported on first call, never at import.
from typing import Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from .rng import dropout_seed  # noqa: E402,F401  (re-exported: tests and the GPU harness import it from here)


def needs_grad(*ts) -> bool:
    """Whether autograd will ask for a backward through an op taking `ts` (no host sync)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


@torch.library.custom_op("fastdistil::layer_norm_fwd", mutates_args=())
def _ln_fwd_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Optional[Tensor],
               input_bias: Optional[Tensor], dropout_p: float, seed: Optional[Tensor],
               save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mean, rstd) for 2-D x; z is stored only when saving for a backward and z != x. y and z have the
    promoted dtype of x and residual."""
    K = kernel_module("layer_norm")
    store_z = save and (residual is not None or input_bias is not None or dropout_p > 0)
    y, z, mean, rstd = K.layer_norm_fwd(x, weight, bias, eps, residual, input_bias, dropout_p, seed,
                                        store_z=store_z, store_stats=save)
    return y, (z if store_z else x.new_empty(0)), mean, rstd


@_ln_fwd_op.register_fake
def _(x, weight, bias, eps, residual, input_bias, dropout_p, seed, save):
    store_z = save and (residual is not None or input_bias is not None or dropout_p > 0)
    m = x.shape[0] if save else 0
    y = x.new_empty(x.shape, dtype=x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))
    return (y, torch.empty_like(y) if store_z else x.new_empty(0),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("fastdistil::layer_norm_bwd", mutates_args=())
def _ln_bwd_op(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, has_input_bias: bool,
               dropout_p: float, seed: Optional[Tensor],
               x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dz, dweight, dbias, dinput_bias): dx (in x_dtype) is empty unless it differs from dz (dropout, or x's
    dtype is not z's), dinput_bias (fp32) empty unless has_input_bias."""
    K = kernel_module("layer_norm")
    dx, dz, dw, db, dib = K.layer_norm_bwd(dy, z, mean, rstd, weight, has_input_bias, dropout_p, seed,
                                           dx_dtype=x_dtype)
    return ((dx if _dx_stored(z, dropout_p, x_dtype) else z.new_empty(0)), dz, dw, db,
            (dib if has_input_bias else z.new_empty(0, dtype=torch.float32)))


def _dx_stored(z, dropout_p, x_dtype) -> bool:
    return dropout_p > 0 or x_dtype != z.dtype


@_ln_bwd_op.register_fake
def _(dy, z, mean, rstd, weight, has_input_bias, dropout_p, seed, x_dtype):
    n = z.shape[1]
    dx = z.new_empty(z.shape, dtype=x_dtype) if _dx_stored(z, dropout_p, x_dtype) else z.new_empty(0)
    return (dx, torch.empty_like(z), weight.new_empty(n), weight.new_empty(n),
            z.new_empty(n if has_input_bias else 0, dtype=torch.float32))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps, residual, input_bias, dropout_p, seed, save = inputs
    y, z, mean, rstd = output
    stored = residual is not None or input_bias is not None or dropout_p > 0
    ctx.has_res, ctx.has_ib, ctx.p = residual is not None, input_bias is not None, dropout_p
    ctx.ib_dtype = input_bias.dtype if input_bias is not None else None
    ctx.x_dtype, ctx.res_dtype = x.dtype, residual.dtype if residual is not None else None
    ctx.save_for_backward(z if stored else x, mean, rstd, weight, seed)


def _ln_backward(ctx, dy, _dz, _dmean, _drstd):
    z, mean, rstd, weight, seed = ctx.saved_tensors
    dx, dz, dw, db, dib = _ln_bwd(dy, z, mean, rstd, weight, ctx.has_ib, ctx.p, seed, ctx.x_dtype)
    dx = dx if _dx_stored(z, ctx.p, ctx.x_dtype) else dz
    dres = dz.to(ctx.res_dtype) if ctx.has_res else None
    return (dx, dw, db, None, dres, dib.to(ctx.ib_dtype) if ctx.has_ib else None, None, None, None)


_ln_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup)
_ln_fwd = fast(_ln_fwd_op, _ln_setup, _ln_backward)  # eager fast path (ops/eager.py)
_ln_bwd = fast(_ln_bwd_op)


def _rows(t, n):
    """(..., N) -> (M, N) view with unit column stride (copies only when the last dimension is strided)."""
    if t.dim() != 2:
        t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


@register("layer_norm", "triton")
def _layer_norm_triton(x, weight, bias, eps, residual, *, input_bias, dropout_p):
    if x.dtype == torch.float64:  # the kernels compute in fp32: float64 stays exact on the reference
        return _layer_norm_torch(x, weight, bias, eps, residual, input_bias=input_bias, dropout_p=dropout_p)
    n = x.shape[-1]
    save = needs_grad(x, weight, bias, residual, input_bias)
    seed = dropout_seed(x.device) if dropout_p > 0 else None
    y = _ln_fwd(_rows(x, n), weight, bias, float(eps), None if residual is None else _rows(residual, n),
                   input_bias, float(dropout_p), seed, save)[0]
    return y.view(x.shape)


# Linear + bias + dropout + residual + LayerNorm in one launch (kernels/matmul.py, EPILOGUE 2): the triton
# implementation of fastdistil.ops.linear_layer_norm (see ops/fused.py for the op's contract).
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
