"""fastdistil.patch for transformers' RoBERTa / XLM-R embeddings (their layers, encoder and base model are BERT's code
under other names, which fastdistil/patch/ accepts already): positions as transformers computes them (from the
input ids, counted from padding_idx + 1), then BERT's fused embeddings (patch/forwards.py
_embed). Found through the registry (Arch.patch); imported by the patch only, after transformers."""
from __future__ import annotations

import torch.nn as nn

from ..patch.calls import _fallback, _read, _unknown
from ..patch.checks import _same_code
from ..patch.forwards import _embed
from ..patch.hf import _original
from .roberta import embeds_position_ids, position_ids

EMB = "roberta.embeddings"


def role(m: nn.Module) -> tuple[str, str | None] | None:
    """(role, why it cannot be patched or None) for RoBERTa's / XLM-R's embeddings; None for any other module."""
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings
    if not type(m).__name__.endswith("RobertaEmbeddings"):
        return None
    if not _same_code(getattr(type(m), "forward", None), RobertaEmbeddings.forward):
        return EMB, f"{type(m).__name__}.forward differs from transformers' RobertaEmbeddings.forward"
    if getattr(m, "position_embedding_type", "absolute") != "absolute":
        return EMB, "relative position embeddings are not supported"
    ln = m.LayerNorm
    if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None:
        return EMB, "its LayerNorm is not an affine nn.LayerNorm"
    return EMB, None


def _embeddings_forward(self, *args, **kwargs):
    """RobertaEmbeddings.forward: default positions from the ids (or 0.. + padding_idx + 1 for inputs_embeds), as
    transformers computes them, then the fused embedding op; unknown arguments run transformers' own forward."""
    fn = _original(self).forward
    call = _read(fn, args, kwargs)
    unknown = _unknown(call, "embeddings") if call is not None else []
    if call is None or unknown:
        return _fallback(self, fn, args, kwargs, call, unknown)
    ids, embeds, pos, past = (call.get("input_ids"), call.get("inputs_embeds"), call.get("position_ids"),
                              call.get("cache_length") or 0)
    if pos is None:
        pos = (position_ids(ids, self.padding_idx, past) if ids is not None
               else embeds_position_ids(embeds, self.padding_idx))
    return _embed(self, ids, call.get("token_type_ids"), pos, embeds, past)


FORWARDS = {EMB: _embeddings_forward}
PREPARE: dict = {}
