"""Tensors derived from a module's parameters and cached on it: the fused QKV weight, oneDNN-prepacked weights.

They live in a :class:`DerivedCache` in the module's ``__dict__``, which ``copy.deepcopy`` and pickling (``torch.save``
of a whole module) see as empty: oneDNN's prepacked tensors cannot be saved at all ("Cannot access storage of
OpaqueTensorImpl"), and a copy must rebuild from its own parameters rather than carry the original's. They are not
parameters or buffers, so ``state_dict`` never sees them.
"""
from __future__ import annotations

import torch

_ATTR = "_fastdistil_derived"


class DerivedCache(dict):
    """A dict that copies and pickles as an empty one."""

    def __deepcopy__(self, memo):
        return DerivedCache()

    def __reduce__(self):
        return DerivedCache, ()


def derived_cache(owner) -> DerivedCache:
    """The DerivedCache of `owner` (a module or any object with a ``__dict__``), made on first use."""
    cache = owner.__dict__.get(_ATTR)
    if cache is None:
        cache = owner.__dict__[_ATTR] = DerivedCache()
    return cache


def fused_qkv(owner, ps):
    """W_qkv (3d, d) and b_qkv (3d,) from ps = (W_q, W_k, W_v, b_q, b_k, b_v): one GEMM for the three projections.

    Concatenated per call when autograd needs the graph, under torch.compile, and when any of the six is an inference
    tensor: inference_mode updates those in place without a version bump (``load_state_dict`` under
    ``torch.inference_mode()``), so no key could tell a stale copy, and they have no version counter to read.
    Otherwise cached in `owner`'s DerivedCache while the same six tensors keep their storage and version counters.
    """
    if (torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in ps))
            or any(p.is_inference() for p in ps)):
        return torch.cat(ps[:3]), torch.cat(ps[3:])
    key = [(p.data_ptr(), p._version, p.dtype, p.device) for p in ps]
    cache = derived_cache(owner)
    hit = cache.get("qkv")
    if hit is None or any(a is not b for a, b in zip(hit[0], ps)) or hit[1] != key:
        with torch.no_grad(), torch.inference_mode(False):  # a normal tensor even when made under inference_mode
            hit = cache["qkv"] = (tuple(ps), key, torch.cat(ps[:3]), torch.cat(ps[3:]))
    return hit[2], hit[3]
