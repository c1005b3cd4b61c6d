"""What fastdistil.patch knows about the installed transformers: the objects the fused forwards need (imported on
the first patch, so importing fastdistil never imports transformers), the release probe, the argument names
releases renamed, and the few helpers every part of the patch shares."""
from __future__ import annotations

import inspect
import re
import warnings

import torch.nn as nn

MIN_TRANSFORMERS = (4, 57)  # the oldest transformers release the fused path follows (tested: newest 4.x, pinned 5.x)

_ORIGINAL = "_fastdistil_original_class"  # class attribute of a fused class: the class it replaced
_HF: dict = {}  # transformers objects, imported on the first patch (importing fastdistil never imports transformers)
# Keyword arguments releases renamed (5.24: past_key_values -> cache, past_key_values_length -> cache_length; 5.0
# spelled input_embeds), read by their canonical (right-hand) names.
_ALIASES = {"past_key_values": "cache", "past_key_value": "cache", "past_key_values_length": "cache_length",
            "input_embeds": "inputs_embeds"}


def _original(module: nn.Module) -> type:
    """The transformers class a fused module replaced."""
    return type(module).__dict__[_ORIGINAL]


def _capturing(key: str) -> bool:
    """Whether transformers' output capture (`output_attentions`, `output_hidden_states`) is collecting `key`."""
    collector = _HF.get("collector")
    if collector is None:
        return False
    active = collector.get()
    return bool(active) and key in active


def _warn(msg: str) -> None:
    warnings.warn(f"fastdistil.patch: {msg}", UserWarning, stacklevel=3)


def _transformers_version() -> tuple[int, int]:
    import transformers
    return tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])


def _load_transformers() -> bool:
    """Import what the fused forwards need from transformers; False on releases older than MIN_TRANSFORMERS."""
    if _HF:
        return True
    if _transformers_version() < MIN_TRANSFORMERS:
        return False
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    from transformers.models.bert import modeling_bert
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # capture machinery moved (or 4.x): treat nothing as captured
        _active_collector = None
    # 4.x ("legacy") layers take output_attentions and return tuples, and their base models hand the encoder 4D
    # masks (there is no _create_attention_masks to hook); 5.x layers return tensors and take **kwargs.
    legacy = "output_attentions" in inspect.signature(modeling_bert.BertLayer.forward).parameters
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        create_bidirectional_mask = None
    # 4.x picks the self-attention class by attention implementation (eager / sdpa): both are BERT's code.
    self_attention = (modeling_bert.BertSelfAttention,
                      *getattr(modeling_bert, "BERT_SELF_ATTENTION_CLASSES", {}).values())
    _HF.update(bert=modeling_bert, encoder_output=BaseModelOutputWithPastAndCrossAttentions,
               collector=_active_collector, legacy=legacy, self_attention=self_attention,
               bidirectional_mask=None if legacy else create_bidirectional_mask)
    return True
