"""The one reference module: plain-PyTorch versions of every op, float64-capable.

Tests, benchmarks and the `torch` backend import from here; no copy of these lives anywhere else.
"""
from .core import attention, bias_gelu, embed_layer_norm, gelu, layer_norm, linear_tanh, seq_ids, varlen_attention

__all__ = ["attention", "bias_gelu", "embed_layer_norm", "gelu", "layer_norm", "linear_tanh", "seq_ids",
           "varlen_attention"]
from .losses import kd_kl_rows, relation_kl_rows, relation_logits  # noqa: E402
__all__ += ["kd_kl_rows", "relation_kl_rows", "relation_logits"]
