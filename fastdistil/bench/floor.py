"""The GEMM floor of an inference workload: the encoder's GEMMs alone, timed in the same run as the engines.

A padding-free encoder cannot be faster than the matrix products it must do: per layer, on the T real tokens of
the batch, x W_qkv^T (T x d -> 3d), ctx W_o^T (d -> d), x W_1^T (d -> f) and h W_2^T (f -> d), with the model's
own weights. ``gemm-floor-fp32`` (and ``-bf16``) runs exactly those 4 x layers products and nothing else, on the
best CPU GEMM the native backend may use for that dtype here: oneDNN's prepacked matmul when it runs on this CPU,
else ATen's addmm (MKL / oneDNN through ATen); each is tried and the faster route is kept. Everything the real
encoder adds (attention, LayerNorm, GELU, embeddings, packing, Python) is what separates an engine from the floor;
`fastdistil bench` prints each fastdistil engine's share of it ("% of GEMM floor").

The floor has no output to check against the reference, so its row says "n/a" there.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .engines import Engine, Skip


def _layer_weights(state: dict, n: int, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(W, b)] of layer n's four GEMMs (QKV concatenated, as every fastdistil backend runs it)."""
    p = f"encoder.layer.{n}."
    g = lambda k: state[p + k].to(dtype).contiguous()  # noqa: E731
    qkv_w = torch.cat([g(f"attention.self.{x}.weight") for x in ("query", "key", "value")])
    qkv_b = torch.cat([g(f"attention.self.{x}.bias") for x in ("query", "key", "value")])
    return [(qkv_w, qkv_b), (g("attention.output.dense.weight"), g("attention.output.dense.bias")),
            (g("intermediate.dense.weight"), g("intermediate.dense.bias")),
            (g("output.dense.weight"), g("output.dense.bias"))]


def _onednn_linears(weights, dtype):
    """The same products as oneDNN prepacked linears (what the native backend runs), or None where that route
    is unavailable or refuses this dtype on this CPU (checked with one tiny call, never at timing time)."""
    mk = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and hasattr(mk, "_reorder_linear_weight")
            and hasattr(mk, "_linear_pointwise")):
        return None
    try:
        packed = [(torch.ops.mkldnn._reorder_linear_weight(w, 32), b) for w, b in weights]
        x = torch.zeros(2, weights[0][0].shape[1], dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, packed[0][0], packed[0][1], "none", [], "")
    except RuntimeError:
        return None
    return packed


class GemmFloorEngine(Engine):
    """The workload's encoder GEMMs on its real tokens, nothing else (see the module docstring)."""
    family = "floor"

    def setup(self, ctx):
        super().setup(ctx)
        if ctx.device.type != "cpu":
            raise Skip("the GEMM floor is a CPU measure (on a GPU see `fastdistil model-perf`)")
        cfg = ctx.hf_config
        layers = [_layer_weights(ctx.state, n, self.dtype) for n in range(cfg.num_hidden_layers)]
        t = ctx.real_tokens
        d, f = cfg.hidden_size, cfg.intermediate_size
        g = torch.Generator().manual_seed(0)
        self.inputs = [torch.randn(t, k, generator=g).to(self.dtype) for k in (d, d, d, f)]  # per GEMM's K
        with torch.inference_mode():
            routes = {"aten": [lambda ws=ws: [F.linear(x, w, b) for x, (w, b) in zip(self.inputs, ws)]
                               for ws in layers]}
            packed = [_onednn_linears(ws, self.dtype) for ws in layers]
            if all(p is not None for p in packed):
                routes["onednn"] = [lambda ps=ps: [torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                                                   for x, (w, b) in zip(self.inputs, ps)] for ps in packed]
            best = None
            for name, fns in routes.items():  # the faster route, by the best of 3 warm calls
                run = lambda fns=fns: [fn() for fn in fns]  # noqa: E731
                run()
                dt = min(_timed(run) for _ in range(3))
                if best is None or dt < best[0]:
                    best = (dt, name, run)
        self.route, self.fn = best[1], best[2]
        self.extra["gemm_route"] = self.route
        self.extra["gemm_flops"] = 2.0 * t * cfg.num_hidden_layers * (4 * d * d + 2 * d * f)

    def __call__(self):
        with torch.inference_mode():
            return self.fn()

    def check(self):
        return None  # nothing to compare: these are the encoder's GEMMs alone


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
