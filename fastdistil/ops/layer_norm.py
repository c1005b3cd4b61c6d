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
from torch import Tensor  # noqa: E402

from ._common import needs_grad, rows as _rows  # noqa: E402
from .rng import dropout_seed  # noqa: E402,F401  (re-exported: tests and the GPU harness import it from here)


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


# ------------------------------------------------------------------------------------------------ native (CPU)
# C++ forward and backward (csrc/, fastdistil._C) for float32/bfloat16 CPU tensors with a residual of x's dtype;
# anything else runs the torch reference. Registered only once the extension imports.
from ._common import EXT, _C, native_ok  # noqa: E402
from .rng import host_seed  # noqa: E402


class _LayerNorm(torch.autograd.Function):
    """y = LN(dropout(x + input_bias) + residual); saves the pre-norm sum s and fp32 mean/rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, input_bias, eps, dropout_p, seed):
        y, s, mean, rstd = _C.layer_norm_fwd(x, weight, bias, eps, residual, input_bias, dropout_p, seed, True)
        ctx.save_for_backward(s, mean, rstd, weight)
        ctx.cfg = (dropout_p, seed, residual is not None, input_bias is not None, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        s, mean, rstd, weight = ctx.saved_tensors
        dropout_p, seed, has_res, has_ib, pdtype = ctx.cfg
        ds, dx, dw, db, dib = _C.layer_norm_bwd(dy.contiguous(), s, mean, rstd, weight, dropout_p, seed)
        return (dx, dw.to(weight.dtype), db.to(pdtype), ds if has_res else None,
                dib.to(pdtype) if has_ib else None, None, None, None)


@register("layer_norm", "native", needs=EXT)
def _layer_norm_native(x, weight, bias, eps, residual, *, input_bias=None, dropout_p=0.0):
    if not native_ok(x) or (residual is not None and residual.dtype != x.dtype):
        return _layer_norm_torch(x, weight, bias, eps, residual, input_bias=input_bias, dropout_p=dropout_p)
    seed = host_seed() if dropout_p > 0.0 else 0
    if needs_grad(x, weight, bias, residual, input_bias):
        return _LayerNorm.apply(x, weight, bias, residual, input_bias, float(eps), dropout_p, seed)
    return _C.layer_norm_fwd(x, weight, bias, float(eps), residual, input_bias, dropout_p, seed, False)[0]
