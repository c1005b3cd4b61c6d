"""Whole inference layers as ops: ``encoder_layer`` (one layer) and ``encoder`` (every layer of a forward).

Both take LayerWeights (fastdistil/layer_weights.py) and packed hidden states x (T, d) with their Packing p (any
object with ``cu_seqlens`` and ``max_seqlen``); they run in eval mode, without autograd or taps (the caller checks
that, and otherwise runs ``layer_ops`` itself). Called through the registry, ``dispatch.lookup("encoder", device)``:

- torch: each layer's op sequence, ``layer_weights.layer_ops`` (every op inside dispatches on its own).
- native: one C++ call per layer (csrc/layer.cpp), or one for every layer, QKV as one GEMM over the concatenated
  weight; per-layer Python, argument checks and workspace setup then happen once per forward (the batch-1
  latency). The GEMMs go to oneDNN's prepacked matmul or to ATen's addmm (ops/onednn.py decides).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import layer_weights  # read at call time: layer_weights imports ops
from ..weight_cache import derived
from . import onednn
from ._common import EXT, NATIVE_DTYPES, _C
from .dispatch import register


@register("encoder_layer", "torch")
def _encoder_layer_torch(w, x, p):
    return layer_weights.layer_ops(w, x, p)


@register("encoder", "torch")
def _encoder_torch(ws, x, p):
    for w in ws:
        x = layer_weights.layer_ops(w, x, p)
    return x


# ------------------------------------------------------------------------------------------------ native (CPU)
def _layer_ok(w, x) -> bool:
    """Whether the C++ layer can take LayerWeights w and x: one native dtype, every tensor contiguous."""
    return (x.dtype in NATIVE_DTYPES and x.is_contiguous() and x.device.type == "cpu"
            and all(t.dtype == x.dtype and t.is_contiguous() for t in w.tensors()))


@register("encoder_layer", "native", needs=EXT)
def _encoder_layer_native(w, x, p):
    """One inference layer in one C++ call; the torch op sequence where the C++ layer cannot take it."""
    if _storage_only_bf16(x):
        return _encoder_layer_native(_as_fp32(w), x.float(), p).to(torch.bfloat16)
    if not _layer_ok(w, x):
        return layer_weights.layer_ops(w, x, p)
    pk = onednn.prepacked((w,), x)
    return _C.encoder_layer(x, w, p.cu_seqlens, p.max_seqlen, None if pk is None else pk[0])


def _as_fp32(w):
    """LayerWeights w with float32 copies of its tensors: made once and cached beside the bfloat16 ones
    (fastdistil/weight_cache.py; rebuilt when a weight changes), per call for inference tensors (no version to
    key a cache on)."""
    ts = w.tensors()
    if any(t.is_inference() for t in ts):
        f32 = [t.float() for t in ts]
    else:
        f32 = derived("fp32", ts, lambda src: [t.float() for t in src])
    return dataclasses.replace(w, **dict(zip(layer_weights.TENSOR_FIELDS, f32)))


def _storage_only_bf16(x) -> bool:
    """bfloat16 activations on a CPU without native bf16 dot products (AVX2-only parts such as AMD Zen 2/3): the
    layers then run in float32 on float32 copies of the weights and the result is rounded back to bfloat16.
    ATen's bf16 GEMMs there convert the operands on every call: 3.7x slower than fp32 on workload A (measured with
    the AVX2 path forced on the project's AMD EPYC, 2026-11-27). Costs one fp32 copy of the layer weights."""
    if x.dtype != torch.bfloat16 or onednn.native_bf16():
        return False
    onednn.note_bf16()
    return True


@register("encoder", "native", needs=EXT)
def _encoder_native(ws, x, p):
    """Every inference layer (a list of LayerWeights) in one C++ call; layer by layer where one cannot go to C++."""
    if _storage_only_bf16(x):  # layer by layer, activations rounded to bf16 between layers as a bf16 model's are
        for w in ws:
            x = _encoder_layer_native(w, x, p)
        return x
    if not all(_layer_ok(w, x) for w in ws):
        for w in ws:
            x = _encoder_layer_native(w, x, p)
        return x
    return _C.encoder(x, ws, p.cu_seqlens, p.max_seqlen, onednn.prepacked(ws, x))
