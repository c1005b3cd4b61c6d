"""LayerNorm with the residual, the preceding linear's bias and dropout fused in:
y = LayerNorm(dropout(x + input_bias) + residual). Statistics in float32."""
from __future__ import annotations

from .. import reference
from .checks import check_float, check_same, check_shape
from .dispatch import lookup, register


def layer_norm(x, weight, bias, eps: float = 1e-12, residual=None, *, input_bias=None, dropout_p: float = 0.0):
    """LayerNorm(dropout(x + input_bias) + residual) over the last dimension.

    Args:
        x: (..., N).
        weight, bias: (N,) affine parameters.
        eps: variance epsilon (BERT: 1e-12).
        residual: optional (..., N) skip connection, added after dropout.
        input_bias: optional (N,) bias of the GEMM that produced x.
        dropout_p: dropout probability on x + input_bias (0 in eval mode).
    Returns:
        (..., N) in x's dtype.
    """
    check_float("x", x)
    n = x.shape[-1]
    check_shape("weight", weight, (n,))
    check_shape("bias", bias, (n,))
    if residual is not None:
        check_shape("residual", residual, tuple(x.shape))
        check_same("x, residual", x, residual)
    if input_bias is not None:
        check_shape("input_bias", input_bias, (n,))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return lookup("layer_norm", x.device)(x, weight, bias, eps, residual, input_bias=input_bias, dropout_p=dropout_p)


@register("layer_norm", "torch")
def _layer_norm_torch(x, weight, bias, eps, residual, *, input_bias, dropout_p):
    return reference.layer_norm(x, weight, bias, eps, residual, input_bias=input_bias, dropout_p=dropout_p,
                                training=True)
