"""Public fused ops. Each dispatches on the selected backend (see fastdistil.backend)."""
from .attention import attention, varlen_attention
from .embedding import embed_layer_norm
from .fused import linear_gelu, linear_layer_norm
from .gelu import bias_gelu
from .layer_norm import layer_norm
from .pooler import linear_tanh

__all__ = ["attention", "varlen_attention", "embed_layer_norm", "bias_gelu", "layer_norm", "linear_gelu",
           "linear_layer_norm", "linear_tanh"]
from .kd import kd_kl_rows  # noqa: E402
from .relation import relation_kl_rows  # noqa: E402
from . import encoder  # noqa: E402,F401  (registers the whole-layer ops encoder_layer and encoder)
__all__ += ["kd_kl_rows", "relation_kl_rows"]
