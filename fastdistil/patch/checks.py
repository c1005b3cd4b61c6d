"""Which modules fastdistil.patch fuses: transformers' BERT code recognised by bytecode (and "Copied from Bert"
classes under other names), configs the fused path supports, and the weights' devices and dtypes."""
from __future__ import annotations

import inspect
import types

import torch.nn as nn
import torch.nn.functional as F

from ..ops.checks import FLOAT_DTYPES
from .hf import _HF, _ORIGINAL

_SUPPORTED_DEVICES = ("cpu", "cuda")
_GELU = {"GELUActivation": "none", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh", "NewGELUActivation": "tanh",
         "FastGELUActivation": "tanh"}
_REPLACED_FORWARD = ("its forward is replaced on the instance (an accelerate hook or another wrapper), which would "
                     "run instead of the fused forward")


def _code_key(code: types.CodeType, doc=None, rename=None):
    consts = tuple(_code_key(c, None, rename) if isinstance(c, types.CodeType)
                   else c.replace(*rename) if rename and isinstance(c, str) else c
                   for c in code.co_consts if not (doc is not None and c == doc))
    return code.co_code, code.co_names, code.co_varnames, consts


def _same_code(a, b, rename: tuple[str, str] | None = None) -> bool:
    """Whether two functions compile to the same bytecode (transformers' "Copied from Bert" classes do). `rename`
    (old, new) is applied to a's string constants first: "Copied from Bert with Bert->Roberta" renames the model in
    messages too (4.x's RobertaSdpaSelfAttention warns "RobertaSdpaSelfAttention is used but ...")."""
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    if not (hasattr(a, "__code__") and hasattr(b, "__code__")):
        return False
    return _code_key(a.__code__, a.__doc__, rename) == _code_key(b.__code__, b.__doc__)


def _copied_as(cls: type, ref: type) -> tuple[str, str] | None:
    """(model prefix, "Bert") when cls is ref's class under another model's name (RobertaSdpaSelfAttention for
    BertSdpaSelfAttention), else None."""
    stem = ref.__name__[len("Bert"):]
    if ref.__name__.startswith("Bert") and cls.__name__.endswith(stem) and len(cls.__name__) > len(stem):
        return cls.__name__[:-len(stem)], "Bert"
    return None


def _is_fused(m: nn.Module) -> bool:
    return _ORIGINAL in type(m).__dict__


def _looks_like_layer(m: nn.Module) -> bool:
    att = getattr(m, "attention", None)
    return (isinstance(m, nn.Module) and att is not None and hasattr(att, "self") and hasattr(att, "output")
            and hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(att.self, "query"))


def _gelu_mode(act) -> str | None:
    if isinstance(act, nn.GELU):
        return act.approximate
    if act is F.gelu:
        return "none"
    return _GELU.get(type(act).__name__)


def _layer_problem(layer: nn.Module) -> str | None:
    """Why this BERT-shaped layer cannot take the fused path (None when it can)."""
    bert = _HF["bert"]
    att, sa = layer.attention, layer.attention.self
    if hasattr(layer, "crossattention") or getattr(layer, "add_cross_attention", False):
        return "cross-attention is not supported"
    if getattr(layer, "is_decoder", False) or getattr(sa, "is_causal", False) or getattr(sa, "is_decoder", False):
        return "decoder (causal) self-attention is not supported"
    if getattr(sa, "position_embedding_type", "absolute") != "absolute" or hasattr(sa, "distance_embedding"):
        return "relative position embeddings are not supported"
    sa_ref = next((c for c in _HF["self_attention"]
                   if _same_code(getattr(type(sa), "forward", None), c.forward, _copied_as(type(sa), c))),
                  bert.BertSelfAttention)
    checks = ((layer, bert.BertLayer, ("forward", "feed_forward_chunk")), (att, bert.BertAttention, ("forward",)),
              (sa, sa_ref, ("forward",)), (att.output, bert.BertSelfOutput, ("forward",)),
              (layer.intermediate, bert.BertIntermediate, ("forward",)), (layer.output, bert.BertOutput, ("forward",)))
    for mod, ref, names in checks:
        for name in names:
            if not _same_code(getattr(type(mod), name, None), getattr(ref, name), _copied_as(type(mod), ref)):
                return f"{type(mod).__name__}.{name} differs from transformers' {ref.__name__}.{name}"
    if _gelu_mode(layer.intermediate.intermediate_act_fn) is None:
        return (f"activation {type(layer.intermediate.intermediate_act_fn).__name__} is not supported (GELU: erf, "
                f"or the tanh variants gelu_new / gelu_fast / gelu_pytorch_tanh)")
    for ln in (att.output.LayerNorm, layer.output.LayerNorm):
        if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None:
            return "its LayerNorms are not affine nn.LayerNorm modules"
    return None


def _embeddings_problem(emb: nn.Module) -> str | None:
    ref = _HF["bert"].BertEmbeddings
    if getattr(emb, "position_embedding_type", "absolute") != "absolute":
        return "relative position embeddings are not supported"
    if not _same_code(getattr(type(emb), "forward", None), ref.forward):
        return f"{type(emb).__name__}.forward differs from transformers' BertEmbeddings.forward"
    ln = emb.LayerNorm
    if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None:
        return "its LayerNorm is not an affine nn.LayerNorm"
    return None


def _check_device_dtype(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters():
        if p.device.type not in _SUPPORTED_DEVICES or p.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"fastdistil.patch supports models on {' or '.join(_SUPPORTED_DEVICES)} with float32, float16, "
                f"bfloat16 or float64 weights; {name or 'the model'}.{pname} is {p.dtype} on {p.device}. Move or cast "
                f"the model first (e.g. model.to('cpu', torch.float32)), then patch it.")
