"""Bias + GELU: GELU(x + bias), BERT's exact erf form unless approximate="tanh" is asked for."""
from __future__ import annotations

from .. import reference
from .checks import check_float, check_shape
from .dispatch import lookup, register


def bias_gelu(x, bias, *, approximate: str = "none"):
    """GELU(x + bias).

    Args:
        x: (..., N), typically the bias-free output of the FFN's first GEMM.
        bias: (N,).
        approximate: "none" (exact erf, BERT's `gelu`) or "tanh" (only when the model asks for it).
    Returns:
        (..., N) in x's dtype.
    """
    check_float("x", x)
    check_shape("bias", bias, (x.shape[-1],))
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return lookup("bias_gelu", x.device)(x, bias, approximate=approximate)


@register("bias_gelu", "torch")
def _bias_gelu_torch(x, bias, *, approximate):
    return reference.bias_gelu(x, bias, approximate)
