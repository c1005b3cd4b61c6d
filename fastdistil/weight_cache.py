"""Tensors derived from parameters and cached here, not on the model: the fused QKV weight, oneDNN-prepacked weights.

An entry is keyed on the identity of its source tensors (weak references: the cache never keeps a parameter alive,
and an entry is dropped when its first source dies) and revalidated on every hit against their storage pointer and
version counter, so a replaced parameter, an in-place update (``load_state_dict``, ``mul_``) or a ``.data`` swap is
seen. Nothing lives on the modules, so ``copy.deepcopy``, pickling and ``state_dict`` never see derived tensors
(oneDNN's prepacked tensors cannot be saved at all: "Cannot access storage of OpaqueTensorImpl"), and a copy of a
model builds its own from its own parameters.
"""
from __future__ import annotations

import weakref

import torch

_CACHE: dict = {}  # (tag, id(first source)) -> (weakrefs of the sources, their (data_ptr, _version), value)


def _key(ts) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in ts)


def derived(tag: str, ts, build):
    """``build(ts)`` for the source tensors `ts`, cached while the same tensors keep their storage and version.

    Callers must not pass inference tensors (inference_mode updates them in place without a version bump, so no key
    could tell a stale copy) and must not call this while autograd needs the graph through the sources.
    """
    k = (tag, id(ts[0]))
    hit = _CACHE.get(k)
    if hit is not None and hit[1] == _key(ts) and all(r() is t for r, t in zip(hit[0], ts)):
        return hit[2]
    # A normal tensor even when made under inference_mode; no_grad innermost: inference_mode(False) turns grad mode
    # back on, and a graph would hold the parameters alive through the cached tensor.
    with torch.inference_mode(False), torch.no_grad():
        value = build(ts)

    def drop(ref, k=k, cache=_CACHE):  # the first source died: forget the entry if it is still this one
        e = cache.get(k)  # (`cache` bound here: module globals may already be gone at interpreter exit)
        if e is not None and e[0][0] is ref:
            del cache[k]
    _CACHE[k] = (tuple(weakref.ref(t, drop) if i == 0 else weakref.ref(t) for i, t in enumerate(ts)), _key(ts), value)
    return value


_OWNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> {tag: (weakrefs, key, value)}


def owned(owner, tag: str, ts, settings, build):
    """``build()`` cached for `owner` (held weakly) while the tensors `ts` are the same objects with the same storage
    and versions and `settings` (hashable) is equal: FastStudent's per-forward LayerWeights list, which then costs
    one walk over its parameters instead of a rebuild per layer (the batch-1 forward's Python time). Uncached when
    some tensor is an inference tensor (no version counter to key on)."""
    try:
        key = (_key(ts), settings)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return build()
    entries = _OWNED.get(owner)
    hit = None if entries is None else entries.get(tag)
    if hit is not None and hit[1] == key and len(hit[0]) == len(ts) and all(r() is t for r, t in zip(hit[0], ts)):
        return hit[2]
    value = build()
    if value is not None:
        _OWNED.setdefault(owner, {})[tag] = ([weakref.ref(t) for t in ts], key, value)
    return value


def clear() -> None:
    """Forget every derived tensor (they are rebuilt on the next call)."""
    _CACHE.clear()
    _OWNED.clear()


def fused_qkv(ps):
    """W_qkv (3d, d) and b_qkv (3d,) from ps = (W_q, W_k, W_v, b_q, b_k, b_v): one GEMM for the three projections.

    Concatenated per call when autograd needs the graph, under torch.compile, and when any of the six is an inference
    tensor (see :func:`derived`); otherwise cached while the same six tensors keep their storage and versions.
    """
    if (torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in ps))
            or any(p.is_inference() for p in ps)):
        return _cat_qkv(ps)
    return derived("qkv", ps, _cat_qkv)


def _cat_qkv(ps):
    """One torch.cat (one launch) for weights and biases: the six flattened into one buffer, then split into
    views. Its backward only slices. Two cats when the pieces cannot share a buffer (mixed dtypes)."""
    if len({(p.dtype, p.device) for p in ps}) != 1:
        return torch.cat(ps[:3]), torch.cat(ps[3:])
    w = ps[0]
    n = sum(p.shape[0] for p in ps[:3])
    flat = torch.cat([p.reshape(-1) for p in ps])  # (3d*d + 3d,)
    return flat[:n * w.shape[1]].view(n, w.shape[1]), flat[n * w.shape[1]:]
