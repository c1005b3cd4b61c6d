"""Drop-in for existing code: run a transformers / sentence-transformers BERT model on fastdistil's fused ops.

    model = AutoModelForSequenceClassification.from_pretrained(...)
    fastdistil.patch(model)        # in place; returns the model
    ...                            # Trainer, save_pretrained, torch.compile, gradient checkpointing as before
    fastdistil.unpatch(model)      # back to the original classes

How: every supported submodule keeps its object, its Parameters and its state-dict keys; only its class is swapped
for a subclass (same ``__name__``) whose ``forward`` calls the same ops as FastStudent through the backend seam, so
whatever backend is selected (torch, triton, native) runs here unchanged:

- embeddings  -> ``ops.embed_layer_norm`` (word + position + type gather, sum, LayerNorm in one op);
- each layer  -> in inference on the packed route, the ``encoder_layer`` op as FastStudent calls it (native runs
  the whole layer in one C++ call); otherwise one QKV GEMM, ``ops.attention`` (padded, key mask) or
  ``ops.varlen_attention`` (packed), ``ops.linear_layer_norm`` (GEMM + bias + dropout + residual + LayerNorm)
  after attention and FFN, ``ops.linear_gelu`` (GEMM + bias + GELU) into the FFN, fused where the backend fuses;
- the encoder -> padding-free: unpad once at entry, every layer on the (T, d) real tokens, pad once at exit
  (fastdistil/padding.py). It takes the padded route instead (same ops, (B, L, d), key mask) under
  ``torch.compile`` (static shapes), when the batch has no mask, or when forward hooks on the layers (e.g.
  ``output_hidden_states``) must see (B, L, d) tensors;
- the base model's ``_create_attention_masks`` hands the encoder the 2D key mask instead of a (B, 1, L, L) one.

A module is patched only when its class's ``forward`` has exactly the bytecode of transformers' BERT module
(RoBERTa, ELECTRA and other "Copied from Bert" classes qualify by that test, whatever their names) and its config
is supported: absolute positions, no decoder / cross-attention, a GELU activation (erf, or the tanh variants). Anything
else is left unpatched with a warning naming it. At run time, calls the fused path cannot serve exactly
(``past_key_values``, ``encoder_hidden_states``, a 4D attention mask, ``output_attentions``) run the original forward.
Linear layers that are not plain ``nn.Linear`` (PEFT LoRA wrappers, quantised layers) or carry hooks are called as
modules, so adapters keep working; plain ones go to the fused ``linear_*`` ops with their weight and bias.

Differences from the unpatched model, both by design: (1) positions that are padding hold zeros in
``last_hidden_state`` on the padding-free route (transformers computes values there from the pad tokens; no
correct consumer reads them); (2) dropout draws other random numbers (same distribution). Needs transformers >= 5
(on 4.x, ``patch`` warns and leaves the model as it is).
"""
from __future__ import annotations

import inspect
import itertools
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops.checks import FLOAT_DTYPES
from .ops.dispatch import lookup
from .padding import Packing, gather, pad, unpad

__all__ = ["patch", "unpatch", "patch_sentence_transformer", "is_patched"]

_ORIGINAL = "_fastdistil_original_class"
_SUPPORTED_DEVICES = ("cpu", "cuda")
_GELU = {"GELUActivation": "none", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh", "NewGELUActivation": "tanh",
         "FastGELUActivation": "tanh"}
_INSTANCE_ATTRS = ("_fastdistil_gelu", "_fastdistil_qkv", "_fastdistil_padding_free", "_fastdistil_report",
                   "_fastdistil_view")
_FUSED: dict[tuple[type, str], type] = {}  # (original class, role) -> fused subclass
_HF: dict = {}  # transformers objects, imported on the first patch (importing fastdistil never imports transformers)


# ----------------------------------------------------------------------------------------------------------------
# The fused forwards. Each reads the HF module's own Parameters; none copies a weight.
# ----------------------------------------------------------------------------------------------------------------

def _plain(lin: nn.Module) -> bool:
    """A bare nn.Linear with a bias and no hooks: its weight and bias may go straight into a fused op."""
    return type(lin) is nn.Linear and lin.bias is not None and not (lin._forward_hooks or lin._forward_pre_hooks)


def _drop(dropout: nn.Module) -> float:
    """The probability an HF nn.Dropout module would apply now (0 in eval mode)."""
    return dropout.p if dropout.training else 0.0


def _qkv_weight(sa: nn.Module):
    """W_qkv (3d, d), b_qkv (3d,) from the three projections: concatenated per call when a gradient is needed or
    under torch.compile, otherwise cached on the module, keyed on the parameters' storage and version counters."""
    ps = (sa.query.weight, sa.key.weight, sa.value.weight, sa.query.bias, sa.key.bias, sa.value.bias)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in ps)):
        return torch.cat(ps[:3]), torch.cat(ps[3:])
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in ps)
    cache = sa.__dict__.get("_fastdistil_qkv")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, torch.cat(ps[:3]), torch.cat(ps[3:]))
        sa.__dict__["_fastdistil_qkv"] = cache
    return cache[1], cache[2]


def _qkv(sa: nn.Module, x: torch.Tensor):
    """q, k, v each (..., H, D) from x (..., d): one GEMM when the three projections are plain linears."""
    H, D = sa.num_attention_heads, sa.attention_head_size
    if _plain(sa.query) and _plain(sa.key) and _plain(sa.value):
        w, b = _qkv_weight(sa)
        return F.linear(x, w, b).unflatten(-1, (3, H, D)).unbind(-3)  # 3 x (..., H, D)
    return tuple(lin(x).unflatten(-1, (H, D)) for lin in (sa.query, sa.key, sa.value))


def _attend(q, k, v, where, dropout_p: float):
    """Attention on either layout. Packed: q, k, v (T, H, D), `where` a Packing. Padded: (B, L, H, D), `where` a
    (B, L) key mask or None. Returns the layout it was given."""
    if isinstance(where, Packing):
        return ops.varlen_attention(q, k, v, where.cu_seqlens, where.max_seqlen, dropout_p=dropout_p)  # (T, H, D)
    ctx = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), where,
                        dropout_p=dropout_p)  # (B, H, L, D)
    return ctx.transpose(1, 2)  # (B, L, H, D)


def _dense_layer_norm(block: nn.Module, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """BertSelfOutput / BertOutput: LayerNorm(dropout(h W^T + b) + residual) as FastStudent computes it."""
    ln, p = block.LayerNorm, _drop(block.dropout)
    if _plain(block.dense):
        return ops.linear_layer_norm(h, block.dense.weight, block.dense.bias, residual, ln.weight, ln.bias, ln.eps,
                                     dropout_p=p)
    return ops.layer_norm(block.dense(h), ln.weight, ln.bias, ln.eps, residual=residual, dropout_p=p)


def _dense_gelu(block: nn.Module, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """BertIntermediate: GELU(x W^T + b) as FastStudent computes it."""
    if _plain(block.dense):
        return ops.linear_gelu(x, block.dense.weight, block.dense.bias, approximate=approximate)
    return block.intermediate_act_fn(block.dense(x))


def _layer_compute(layer: nn.Module, x: torch.Tensor, where) -> torch.Tensor:
    """One post-LN BERT layer on the fused ops. x: (T, d) with a Packing, or (B, L, d) with a key mask / None."""
    sa = layer.attention.self
    q, k, v = _qkv(sa, x)  # (..., H, D) each
    ctx = _attend(q, k, v, where, _drop(sa.dropout)).flatten(-2)  # (..., d)
    x = _dense_layer_norm(layer.attention.output, ctx, x)  # (..., d)
    h = _dense_gelu(layer.intermediate, x, layer._fastdistil_gelu)  # (..., 4d)
    return _dense_layer_norm(layer.output, h, x)  # (..., d)


class _LayerView:
    """FastStudent's Layer, as the ``encoder_layer`` op sees it (a backend may run a whole inference layer in one
    call: native does), over an HF layer's own modules. Kept on the layer (see :func:`_layer_view`) so the backend's
    per-layer caches (native's prepacked oneDNN weights) survive between calls; nothing is copied (the fused QKV
    weight is the cached one of :func:`_qkv_weight`)."""

    training = False

    def __init__(self, layer: nn.Module):
        a = layer.attention
        self.hf = layer
        self.attention = {"self": {"query": a.self.query, "key": a.self.key, "value": a.self.value},
                          "output": {"dense": a.output.dense, "LayerNorm": a.output.LayerNorm}}
        self.intermediate = {"dense": layer.intermediate.dense}
        self.output = {"dense": layer.output.dense, "LayerNorm": layer.output.LayerNorm}
        self.n_head, self.head_dim = a.self.num_attention_heads, a.self.attention_head_size
        self.gelu_approximate = layer._fastdistil_gelu

    def qkv_weight(self):
        return _qkv_weight(self.hf.attention.self)

    def forward_ops(self, x, p: Packing, tap=None):
        return _layer_compute(self.hf, x, p)


def _layer_view(layer: nn.Module) -> _LayerView:
    """The layer's _LayerView, rebuilt only when one of its submodules was swapped since it was made."""
    a = layer.attention
    parts = (a.self.query, a.self.key, a.self.value, a.output.dense, a.output.LayerNorm, layer.intermediate.dense,
             layer.output.dense, layer.output.LayerNorm)
    cached = layer.__dict__.get("_fastdistil_view")
    if cached is None or any(x is not y for x, y in zip(cached[0], parts)):
        cached = layer.__dict__["_fastdistil_view"] = (parts, _LayerView(layer))
    return cached[1]


def _whole_layer_ok(layer: nn.Module) -> bool:
    """Inference with every linear plain: the layer may go to ``encoder_layer`` as one op."""
    sa = layer.attention.self
    return (not layer.training and not torch.is_grad_enabled()
            and all(_plain(x) for x in (sa.query, sa.key, sa.value, layer.attention.output.dense,
                                        layer.intermediate.dense, layer.output.dense)))


def _original(module: nn.Module) -> type:
    return type(module).__dict__[_ORIGINAL]


def _capturing(key: str) -> bool:
    """Whether transformers' output capture (`output_attentions`, `output_hidden_states`) is collecting `key`."""
    collector = _HF.get("collector")
    if collector is None:
        return False
    active = collector.get()
    return bool(active) and key in active


def _embeddings_forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                        past_key_values_length: int = 0):
    """BertEmbeddings.forward on ops.embed_layer_norm (same defaults for token types and positions)."""
    B, L = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
    if position_ids is None:
        position_ids = self.position_ids[:, past_key_values_length:L + past_key_values_length]  # (1, L)
    if token_type_ids is None:
        if hasattr(self, "token_type_ids"):  # transformers' zero buffer (helps tracing), gathered like it does
            buffered = self.token_type_ids.expand(position_ids.shape[0], -1)
            token_type_ids = torch.gather(buffered, dim=1, index=position_ids)
        else:
            token_type_ids = torch.zeros(B, L, dtype=torch.long, device=position_ids.device)
    position_ids, token_type_ids = position_ids.expand(B, L), token_type_ids.expand(B, L)
    word, ln = self.word_embeddings, self.LayerNorm
    plain = all(type(e) is nn.Embedding and not (e._forward_hooks or e._forward_pre_hooks)
                for e in (word, self.position_embeddings, self.token_type_embeddings))
    if inputs_embeds is None and plain:
        x = ops.embed_layer_norm(input_ids, token_type_ids, position_ids, word.weight,
                                 self.position_embeddings.weight, self.token_type_embeddings.weight, ln.weight,
                                 ln.bias, ln.eps, padding_idx=word.padding_idx)  # (B, L, d)
    else:  # caller's embeddings, or embedding modules that are not plain lookups: the op fuses the rest
        if inputs_embeds is None:
            inputs_embeds = word(input_ids)
        rest = self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        x = ops.layer_norm(inputs_embeds, ln.weight, ln.bias, ln.eps, residual=rest)  # (B, L, d)
    return self.dropout(x)


def _layer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                   encoder_attention_mask=None, past_key_values=None, **kwargs):
    """BertLayer.forward on the fused ops. `attention_mask` is a Packing (packed route, from the patched encoder),
    a (B, L) key mask or None; anything else (transformers' 4D masks) runs the original forward."""
    if isinstance(attention_mask, Packing):
        if _whole_layer_ok(self):  # as FastStudent: inference layers go through the encoder_layer op
            return lookup("encoder_layer", hidden_states.device)(_layer_view(self), hidden_states, attention_mask)
        return _layer_compute(self, hidden_states, attention_mask)
    if ((attention_mask is None or attention_mask.dim() == 2) and encoder_hidden_states is None
            and past_key_values is None and not _capturing("attentions")):
        return _layer_compute(self, hidden_states, attention_mask)
    return _original(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                                   **kwargs)


def _hooks_need_padded(layers) -> bool:
    """Forward hooks on the layers expect (B, L, d) tensors: keep the padded route while any could fire.
    transformers' own capture hooks count only while a capture is active."""
    capture = False
    for layer in layers:
        for h in itertools.chain(layer._forward_hooks.values(), layer._forward_pre_hooks.values()):
            if getattr(h, "__name__", "") != "output_capturing_hook":
                return True
            capture = True
    return capture and _capturing("hidden_states")


def _encoder_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
    """BertEncoder.forward, padding-free: unpad once, N fused layers on (T, d), pad once."""
    if not ((attention_mask is None or attention_mask.dim() == 2) and encoder_hidden_states is None
            and past_key_values is None):
        return _original(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                       encoder_attention_mask, past_key_values, use_cache, **kwargs)
    packed = (attention_mask is not None and self._fastdistil_padding_free and not torch.compiler.is_compiling()
              and not _hooks_need_padded(self.layer))
    if packed:
        B, L, _ = hidden_states.shape
        p = unpad(attention_mask, B, L, hidden_states.device)  # one host sync per batch
        x = gather(hidden_states, p)  # (T, d)
        for layer in self.layer:
            x = layer(x, p)  # positional: gradient checkpointing replays it
        hidden_states = pad(x, p)  # (B, L, d), zeros at padding
    else:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)  # (B, L, d)
    return _HF["encoder_output"](last_hidden_state=hidden_states, past_key_values=None)


def _create_attention_masks(self, attention_mask, encoder_attention_mask, embedding_output, encoder_hidden_states,
                            past_key_values, **kwargs):
    """Bound onto a patched base model: the fused encoder takes the (B, L) key mask itself, so the (B, 1, L, L)
    mask is never built. Calls the fused path cannot serve get transformers' masks (and the original forwards)."""
    if ((attention_mask is None or attention_mask.dim() == 2) and encoder_attention_mask is None
            and encoder_hidden_states is None and past_key_values is None and not _capturing("attentions")):
        return attention_mask, None
    return type(self)._create_attention_masks(self, attention_mask=attention_mask,
                                              encoder_attention_mask=encoder_attention_mask,
                                              embedding_output=embedding_output,
                                              encoder_hidden_states=encoder_hidden_states,
                                              past_key_values=past_key_values, **kwargs)


_FORWARDS = {"embeddings": _embeddings_forward, "layer": _layer_forward, "encoder": _encoder_forward}


# ----------------------------------------------------------------------------------------------------------------
# Which modules qualify.
# ----------------------------------------------------------------------------------------------------------------

def _code_key(code: types.CodeType, doc=None):
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else c for c in code.co_consts
                   if not (doc is not None and c == doc))
    return code.co_code, code.co_names, code.co_varnames, consts


def _same_code(a, b) -> bool:
    """Whether two functions compile to the same bytecode (transformers' "Copied from Bert" classes do)."""
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    if not (hasattr(a, "__code__") and hasattr(b, "__code__")):
        return False
    return _code_key(a.__code__, a.__doc__) == _code_key(b.__code__, b.__doc__)


def _load_transformers() -> bool:
    """Import what the fused forwards need from transformers; False on transformers < 5."""
    if _HF:
        return True
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        return False
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    from transformers.models.bert import modeling_bert
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # capture machinery moved: treat nothing as captured
        _active_collector = None
    _HF.update(bert=modeling_bert, encoder_output=BaseModelOutputWithPastAndCrossAttentions,
               collector=_active_collector)
    return True


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
    checks = ((layer, bert.BertLayer, ("forward", "feed_forward_chunk")), (att, bert.BertAttention, ("forward",)),
              (sa, bert.BertSelfAttention, ("forward",)), (att.output, bert.BertSelfOutput, ("forward",)),
              (layer.intermediate, bert.BertIntermediate, ("forward",)), (layer.output, bert.BertOutput, ("forward",)))
    for mod, ref, names in checks:
        for name in names:
            if not _same_code(getattr(type(mod), name, None), getattr(ref, name)):
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


def _fused_class(cls: type, role: str) -> type:
    """A subclass of `cls` with the fused forward: same __name__ (so _no_split_modules, reprs and class-name
    checks still match); a unique __qualname__ registered in this module so instances pickle in this process."""
    key = (cls, role)
    if key not in _FUSED:
        qual = f"_Fused_{cls.__module__}_{cls.__qualname__}".replace(".", "_")
        fused = type(cls.__name__, (cls,), {"forward": _FORWARDS[role], _ORIGINAL: cls, "__module__": __name__,
                                            "__qualname__": qual,
                                            "__doc__": f"{cls.__name__} running on fastdistil's fused ops."})
        globals()[qual] = fused
        _FUSED[key] = fused
    return _FUSED[key]


def _warn(msg: str) -> None:
    warnings.warn(f"fastdistil.patch: {msg}", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    """Whether any submodule of `model` runs a fastdistil fused forward."""
    return any(_is_fused(m) for m in model.modules())


def patch(model: nn.Module, *, padding_free: bool = True) -> nn.Module:
    """Run a transformers BERT-family model (or a SentenceTransformer holding one) on fastdistil's fused ops, in place.

    Embeddings, layers and encoders whose code is transformers' BERT code are switched to fused forwards; their
    Parameters, state-dict keys, hooks, requires_grad flags and gradient checkpointing are untouched, so optimizers
    built before or after, ``save_pretrained``, ``Trainer`` and PEFT-style freezing keep working. Unsupported parts
    (decoders, cross-attention, relative positions, non-GELU activations, classes with other code) stay unpatched
    with a warning naming them.

    Args:
        model: any nn.Module; every BERT-shaped part inside it is considered (several encoders are fine).
        padding_free: run the encoder on the real tokens only (unpad once, pad once) when a batch carries an
            attention mask. False keeps the padded (B, L, d) layout everywhere (same ops, key-masked attention).
    Returns:
        `model` itself.
    Raises:
        ValueError: a part to be patched has weights on a device other than cpu / cuda or of a non-float dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdistil.patch expects a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        _warn(f"{type(model).__name__} is already patched; patch() again is a no-op (unpatch() first to re-patch)")
        return model
    if not _load_transformers():
        import transformers
        _warn(f"the fused path needs transformers >= 5 (installed: {transformers.__version__}); the model is left "
              f"unpatched")
        return model
    bert = _HF["bert"]

    plan: list[tuple[str, nn.Module, str]] = []  # (name, module, role)
    skipped: dict[str, str] = {}
    layers_ok: dict[int, bool] = {}
    for name, m in model.named_modules():
        if hasattr(m, "word_embeddings") and hasattr(m, "LayerNorm") and hasattr(m, "position_embeddings"):
            why, role = _embeddings_problem(m), "embeddings"
        elif _looks_like_layer(m):
            why, role = _layer_problem(m), "layer"
            layers_ok[id(m)] = why is None
        else:
            continue
        if why is None:
            plan.append((name, m, role))
        else:
            skipped[name] = why
    for name, m in model.named_modules():  # encoders: only when every layer is fused (the packed route needs it)
        stack = getattr(m, "layer", None)
        if isinstance(stack, nn.ModuleList) and len(stack) and all(id(x) in layers_ok for x in stack):
            if not all(layers_ok[id(x)] for x in stack):
                skipped.setdefault(name, "some of its layers are unsupported, so it stays padded and unfused")
            elif not _same_code(type(m).forward, bert.BertEncoder.forward):
                skipped.setdefault(name, f"{type(m).__name__}.forward differs from transformers' BertEncoder.forward")
            else:
                plan.append((name, m, "encoder"))
    encoders = {id(m) for _, m, role in plan if role == "encoder"}
    bases = [(n, m) for n, m in model.named_modules()
             if id(getattr(m, "encoder", None)) in encoders and hasattr(type(m), "_create_attention_masks")
             and _same_code(type(m)._create_attention_masks, bert.BertModel._create_attention_masks)
             and _same_code(type(m).forward, bert.BertModel.forward)]
    based, partial = {id(m.encoder) for _, m in bases}, {}
    for name, m, role in plan:
        if role == "encoder" and id(m) not in based:
            partial[name] = (
                "its base model's forward is not BertModel's, so batches with padding arrive as transformers' 4D "
                "masks and run the original layers; unpadded batches and the embeddings are fused")
    for name, m, _ in plan:
        _check_device_dtype(name, m)  # before anything changes: a failed patch leaves the model as it was

    for name, why in skipped.items():
        _warn(f"left {name or type(model).__name__} ({type(model.get_submodule(name)).__name__}) unpatched: {why}")
    for name, why in partial.items():
        _warn(f"{name or type(model).__name__} is only partly fused: {why}")
    if not plan:
        _warn(f"found no supported BERT embeddings or layers in {type(model).__name__}; nothing was patched")
        return model
    for name, m, role in plan:
        if role == "layer":
            m._fastdistil_gelu = _gelu_mode(m.intermediate.intermediate_act_fn)
        if role == "encoder":
            m._fastdistil_padding_free = bool(padding_free)
        m.__class__ = _fused_class(type(m), role)
    for _, m in bases:  # bound per instance: the base model's class (and transformers' registries) stays as is
        m.__dict__["_create_attention_masks"] = types.MethodType(_create_attention_masks, m)
    model.__dict__["_fastdistil_report"] = {"patched": [n for n, _, _ in plan] + [f"{n}._create_attention_masks"
                                                                                  for n, _ in bases],
                                            "skipped": skipped, "partial": partial}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every fused module gets its original class back and the patch's caches are dropped.

    Args:
        model: a model given to :func:`patch` (unpatching an unpatched model warns and does nothing).
    Returns:
        `model` itself.
    """
    found = False
    for m in model.modules():
        if _is_fused(m):
            m.__class__ = _original(m)
            found = True
        if isinstance(m.__dict__.get("_create_attention_masks"), types.MethodType):
            del m.__dict__["_create_attention_masks"]
            found = True
        for attr in _INSTANCE_ATTRS:
            m.__dict__.pop(attr, None)
    if not found:
        _warn(f"{type(model).__name__} is not patched; unpatch() did nothing")
    return model


def patch_sentence_transformer(st_model: nn.Module, *, padding_free: bool = True) -> nn.Module:
    """:func:`patch` for a sentence_transformers.SentenceTransformer whose first module wraps a BERT model.

    Args:
        st_model: the SentenceTransformer; `encode` keeps its results (within float tolerance).
        padding_free: as in :func:`patch`.
    Returns:
        `st_model` itself.
    Raises:
        ValueError: the first module holds no transformers model (``auto_model``) or nothing in it could be patched.
    """
    try:
        first = st_model[0]
    except (TypeError, IndexError, KeyError):
        first = None
    inner = getattr(first, "auto_model", None)
    if inner is None:
        raise ValueError(f"expected a SentenceTransformer whose first module wraps a transformers model "
                         f"(`.auto_model`), got {type(st_model).__name__}")
    if not is_patched(inner):
        patch(inner, padding_free=padding_free)
        if not is_patched(inner):
            raise ValueError(f"nothing in {type(inner).__name__} could be patched (see the warnings above)")
    else:
        _warn(f"{type(inner).__name__} is already patched; patch() again is a no-op")
    return st_model
