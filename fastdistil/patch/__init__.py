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
- the base model's ``_create_attention_masks`` hands the encoder the 2D key mask instead of a (B, 1, L, L) one
  (transformers 5); on 4.x, where the base model builds the 4D mask inline, the encoder reads the key mask back
  from it (checked exactly; under ``torch.compile`` 4.x batches with a mask run transformers' layers).

A module is patched only when its class's ``forward`` has exactly the bytecode of transformers' BERT module
(RoBERTa, ELECTRA and other "Copied from Bert" classes qualify by that test, whatever their names) and its config
is supported: absolute positions, no decoder / cross-attention, a GELU activation (erf, or the tanh variants). Anything
else is left unpatched with a warning naming it. At run time, calls the fused path cannot serve exactly
(a cache, ``encoder_hidden_states``, a 4D attention mask, ``output_attentions``, a head mask) run the original forward.
The fused forwards follow the installed release's forward signatures (read with ``inspect`` at patch time, renamed
arguments mapped: 5.24's ``cache`` / ``cache_length`` and the older ``past_key_values`` / ``past_key_values_length``);
a keyword argument this module does not know runs the original forward for that call, with a warning naming it.
Linear layers that are not plain ``nn.Linear`` (PEFT LoRA wrappers, quantised layers) or carry hooks are called as
modules, so adapters keep working; plain ones go to the fused ``linear_*`` ops with their weight and bias.

Differences from the unpatched model, both by design: (1) positions that are padding hold zeros in
``last_hidden_state`` on the padding-free route (transformers computes values there from the pad tokens; no
correct consumer reads them), except position 0 of left-padded rows, which poolers and [CLS] heads read: it is
computed as transformers computes it (fastdistil/leftpad.py), and calls whose loss reads padded positions run the
padded route (see ``heads._loss_reads_padding``); (2) dropout draws other random numbers (same distribution).
Needs transformers >= 4.57 (``MIN_TRANSFORMERS``; on older releases ``patch`` warns and leaves the model as it is);
CI tests the newest 4.x and the pinned 5.x (constraints/).

Layout: this module holds the public API and the fused classes (their ``__module__`` is ``fastdistil.patch``);
``hf`` what it imports from transformers and the release probe, ``masks`` the attention masks, ``calls`` call binding
and the fallback to transformers' forward, ``forwards`` the fused forwards, ``heads`` the padded-loss head forwards,
``checks`` which modules qualify.
"""
from __future__ import annotations

import types

import torch.nn as nn

from .calls import _own_forward, _params
from .checks import (_REPLACED_FORWARD, _check_device_dtype, _embeddings_problem, _gelu_mode, _is_fused,
                     _layer_problem, _looks_like_layer, _same_code)
from .forwards import _FORWARDS, _create_attention_masks
from .heads import _HEAD_ARGS, _HEAD_FORWARDS, _head_forward, _takes_any
from .hf import _HF, _ORIGINAL, MIN_TRANSFORMERS, _load_transformers, _original, _warn

__all__ = ["patch", "unpatch", "patch_sentence_transformer", "is_patched", "MIN_TRANSFORMERS"]

_INSTANCE_ATTRS = ("_fastdistil_gelu", "_fastdistil_padding_free", "_fastdistil_report")
_FUSED: dict[tuple[type, str], type] = {}  # (original class, role) -> fused subclass
_ARCH_PREPARE: dict = {}  # role -> per-instance setup of another architecture's fused module (padding_free, GELU)


def _arch_patches() -> list:
    """The patch pieces of architectures whose classes are not BERT's code, named by the registry (Arch.patch in
    fastdistil/arch/): each module offers role(module) -> (role, why) | None, and FORWARDS / PREPARE by role."""
    import importlib

    from ..arch import ARCHS
    mods = [importlib.import_module(f"..arch.{n}", __package__)
            for n in dict.fromkeys(a.patch for a in ARCHS.values() if a.patch)]
    for mod in mods:
        _FORWARDS.update(mod.FORWARDS)
        _ARCH_PREPARE.update(mod.PREPARE)
    return mods


def _fused_class(cls: type, role: str) -> type:
    """A subclass of `cls` with the fused forward: same __name__ (so _no_split_modules, reprs and class-name
    checks still match); __module__ fastdistil.patch and a unique __qualname__ registered here, so instances pickle
    in this process."""
    key = (cls, role)
    if key not in _FUSED:
        qual = f"_Fused_{cls.__module__}_{cls.__qualname__}".replace(".", "_")
        fused = type(cls.__name__, (cls,), {"forward": _FORWARDS[role], _ORIGINAL: cls, "__module__": __name__,
                                            "__qualname__": qual,
                                            "__doc__": f"{cls.__name__} running on fastdistil's fused ops."})
        globals()[qual] = fused
        _FUSED[key] = fused
    return _FUSED[key]


# ----------------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    """Whether any submodule of `model` runs a fastdistil fused forward."""
    return any(_is_fused(m) for m in model.modules())


def patch(model: nn.Module, *, padding_free: bool = True, exact_padded_loss: bool = True) -> nn.Module:
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
        exact_padded_loss: calls of heads whose loss reads logits at padded positions (question answering's start /
            end positions; token labels other than -100 at padding) run the padded route, so the loss equals
            transformers' (which scores the pad tokens' hidden states). False keeps them padding-free: faster
            (1.8-2.5x per QA training step at 41% padding, docs/patching.md), but the loss then ignores padded
            positions.
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
        _warn(f"the fused path needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (installed: "
              f"{transformers.__version__}); the model is left unpatched")
        return model
    bert = _HF["bert"]
    archs = _arch_patches()

    plan: list[tuple[str, nn.Module, str]] = []  # (name, module, role)
    skipped: dict[str, str] = {}
    layers_ok: dict[int, bool] = {}
    for name, m in model.named_modules():
        hit = next((h for h in (a.role(m) for a in archs) if h is not None), None)
        if hit is not None:  # another architecture's own classes (fastdistil/arch/*_patch.py)
            role, why = hit
        elif hasattr(m, "word_embeddings") and hasattr(m, "LayerNorm") and hasattr(m, "position_embeddings"):
            why, role = _embeddings_problem(m), "embeddings"
        elif _looks_like_layer(m):
            why, role = _layer_problem(m), "layer"
            layers_ok[id(m)] = why is None
        else:
            continue
        if why is None and not _own_forward(m):
            why = _REPLACED_FORWARD
            layers_ok[id(m)] = False
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
            elif not _own_forward(m):
                skipped.setdefault(name, _REPLACED_FORWARD)
            else:
                plan.append((name, m, "encoder"))
    encoders = {id(m) for _, m, role in plan if role.endswith("encoder")}
    bases = [(n, m) for n, m in model.named_modules()
             if id(getattr(m, "encoder", None)) in encoders and hasattr(type(m), "_create_attention_masks")
             and _same_code(type(m)._create_attention_masks, bert.BertModel._create_attention_masks)
             and _same_code(type(m).forward, bert.BertModel.forward)]
    based, partial = {id(m.encoder) for _, m in bases}, {}
    for name, m, role in plan:
        if role == "encoder" and id(m) not in based and not _HF["legacy"]:  # 4.x: the encoder reads 4D key masks
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
        if role in _ARCH_PREPARE:
            _ARCH_PREPARE[role](m, padding_free)
        _params(type(m).forward)  # read the signature now: never inside torch.compile's trace
        m.__dict__.pop("forward", None)  # only ever the class's own forward, bound (_own_forward): it would shadow ours
        m.__class__ = _fused_class(type(m), role)
    for _, m in bases:  # bound per instance: the base model's class (and transformers' registries) stays as is
        _params(type(m)._create_attention_masks)
        m.__dict__["_create_attention_masks"] = types.MethodType(_create_attention_masks, m)
    for name, m in model.named_modules():  # heads whose loss may read padded positions (question answering, ...)
        if (exact_padded_loss and _takes_any(type(m).forward, _HEAD_ARGS)
                and any(id(x) in encoders for x in m.modules())):
            if "forward" in m.__dict__:
                _warn(f"{name or type(m).__name__}.forward is replaced on the instance; its losses that read padded "
                      f"positions (question answering, token labels at padding) will differ from transformers'")
            else:
                m.__dict__["forward"] = types.MethodType(_head_forward(type(m)), m)
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
            if _own_forward(m):  # a fused forward bound on the instance (5.0's capture) must not outlive the patch
                m.__dict__.pop("forward", None)
            m.__class__ = _original(m)
            found = True
        if isinstance(m.__dict__.get("_create_attention_masks"), types.MethodType):
            del m.__dict__["_create_attention_masks"]
            found = True
        if getattr(m.__dict__.get("forward"), "__func__", None) in _HEAD_FORWARDS.values():
            del m.__dict__["forward"]
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
