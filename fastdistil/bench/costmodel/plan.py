"""The plan of fastdistil's padding-free forward on the triton backend: the kernels of one encoder layer
(:func:`layer_plan`, the one enumeration), of the whole model (:func:`model_kernels`), and their costs from the
kernels' own cost functions (``kernels/<op>.py: cost``)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ...kernels.spec import Cost, gemm_cost


class KernelCostMissing(RuntimeError):
    """A kernel module (or its cost function) that the model needs does not exist yet."""


@dataclass
class KernelCosts:
    """Where the cost functions come from: by default the kernel modules themselves (fastdistil.kernels.<op>).
    Each attribute is a callable with that module's `cost` signature, or None to resolve it lazily."""
    attention: object = None   # cost(seqlens, heads, head_dim, elem_bytes, backward=False, dropout=False)
    layer_norm: object = None  # cost(rows, width, elem_bytes, residual=True, input_bias=True, dropout=False,
    #                                 backward=False)
    gelu: object = None        # cost(rows, width, elem_bytes, backward=False)
    embedding: object = None   # cost(tokens, width, elem_bytes, backward=False)
    matmul: object = None      # cost(rows, width, k, elem_bytes, epilogue="gelu", backward=False, dropout=False)
    gemm: object = gemm_cost   # gemm_cost(name, m, n, k, elem_bytes, backward=False): a library GEMM

    def get(self, op: str):
        fn = getattr(self, op)
        if fn is not None:
            return fn
        try:
            mod = importlib.import_module(f"fastdistil.kernels.{op}")
        except ModuleNotFoundError as e:
            if e.name != f"fastdistil.kernels.{op}":
                raise
            raise KernelCostMissing(f"kernels/{op}.py does not exist yet, so the fastdistil side cannot be modeled "
                                    f"(its cost() gives the FLOPs, bytes and launches of the {op} kernels)") from None
        fn = getattr(mod, "cost", None)
        if fn is None:
            raise KernelCostMissing(f"kernels/{op}.py has no cost() function yet")
        return fn


COST_MODULES = ("attention", "layer_norm", "gelu", "embedding", "matmul")


def available_kernel_costs() -> dict[str, bool]:
    """{kernel module: whether fastdistil.kernels.<module> exposes cost()} for the modules the model uses."""
    out = {}
    for op in COST_MODULES:
        try:
            KernelCosts().get(op)
            out[op] = True
        except KernelCostMissing:
            out[op] = False
    return out


def fused_epilogues_available(hidden: int = 384, tokens: int | None = None) -> bool:
    """Whether the triton backend runs the attention-output and FFN blocks as GEMMs with fused epilogues (ops
    `linear_gelu` and `linear_layer_norm` registered for triton, LayerNorm width within the epilogue's limit, and,
    when `tokens` is given, at most kernels/matmul.py's FUSED_MAX_ROWS rows: above, the ops run cuBLAS GEMMs and
    the epilogue as its own kernel, as measured faster). Reads the op registry only: no GPU, no kernel compiled."""
    from ...ops.dispatch import implemented
    try:
        from ...kernels.matmul import LN_MAX_WIDTH, use_fused_epilogue
    except ImportError:
        return False
    rows_ok = tokens is None or use_fused_epilogue(tokens, hidden, hidden, "layer_norm")
    return (implemented("linear_gelu", "triton") and implemented("linear_layer_norm", "triton")
            and hidden <= LN_MAX_WIDTH and rows_ok)


def _tag(stage: str, module: str, costs) -> list[tuple[str, str, Cost]]:
    return [(stage, module, c) for c in costs]


def layer_plan(hidden: int, heads: int, intermediate: int, seqlens, elem_bytes: int, *, training: bool = False,
               dropout: bool = False, fused: bool | None = None, source: KernelCosts | None = None
               ) -> list[tuple[str, str, Cost]]:
    """The kernels one FastStudent encoder layer launches on the triton backend, in order, as
    (stage, kernel module, Cost) triples. The single enumeration of the layer (fastdistil/model.py
    `Layer.forward`); `launches_per_layer` and the modeled times both come from it.

    With fused epilogues (the triton backend's `linear_layer_norm` / `linear_gelu`, `fused=True`):
        qkv_gemm     x (T, d) @ W_qkv^T + b_qkv -> (T, 3d)             a library GEMM, bias in its epilogue
        attention    varlen attention over cu_seqlens -> (T, d)         kernels/attention.py
        o_proj_ln1   LN(dropout(ctx W_o^T + b_o) + x)                   kernels/matmul.py, LayerNorm epilogue
        ffn1_gelu    GELU(x W_1^T + b_1) -> (T, f)                      kernels/matmul.py, GELU epilogue
        ffn2_ln2     LN(dropout(h W_2^T + b_2) + x)                     kernels/matmul.py, LayerNorm epilogue
    Unfused (`fused=False`: a backend without them, or widths beyond the epilogue's limit), each fused linear
    becomes a bias-free library GEMM followed by kernels/layer_norm.py's or kernels/gelu.py's kernel.

    Training (`training=True`) adds each op's backward kernels as its cost function reports them, and the
    launches autograd adds around them in model.py: the per-call concatenation of the Q, K, V weights and of
    their biases (2), the QKV GEMM's bias gradient (a column sum), the stack of dq, dk, dv that undoes the
    (T, 3, H, D) unbind, and the two gradient sums where x feeds both a GEMM and a residual.

    Args:
        hidden, heads, intermediate: d, H and f of the layer.
        seqlens: the real lengths of the batch's sequences (T = their sum).
        elem_bytes: bytes per element of activations and weights (2 for bf16/fp16, 4 for fp32).
        training: forward + backward (the optimizer step is not part of a layer).
        dropout: dropout active (training only).
        fused: GEMMs with fused epilogues; None asks the op registry (:func:`fused_epilogues_available`).
        source: where the cost functions come from (default: the kernel modules).
    Returns:
        list of (stage, module, Cost); launches = sum of Cost.launches.
    """
    src = source or KernelCosts()
    if fused is None:
        fused = fused_epilogues_available(hidden, sum(int(n) for n in seqlens))
    seqlens = [int(n) for n in seqlens]
    T, d, f, H = sum(seqlens), hidden, intermediate, heads
    D, eb, bw = d // H, elem_bytes, training
    dr = bool(dropout and training)
    gemm = src.gemm
    out: list[tuple[str, str, Cost]] = []
    if training:  # one torch.cat of the three weights and the three biases, every call (weight_cache._cat_qkv)
        out += [("qkv_weight_cat", "torch", Cost("cat(W_q, W_k, W_v, b_q, b_k, b_v)", 0.0,
                                                 2.0 * eb * (3 * d * d + 3 * d)))]
    out += _tag("qkv_gemm", "gemm", gemm("qkv_gemm", T, 3 * d, d, eb, backward=bw))
    if training:
        out += [("qkv_gemm", "torch", Cost("qkv_gemm.dbias (column sum)", 1.0 * T * 3 * d, eb * (T * 3 * d + 3 * d))),
                ("qkv_unbind", "torch", Cost("stack(dq, dk, dv)", 0.0, 2.0 * eb * 3 * T * d))]
    out += _tag("attention", "attention", src.get("attention")(seqlens, H, D, eb, backward=bw, dropout=dr))
    if fused:
        mm = src.get("matmul")
        out += _tag("o_proj_ln1", "matmul", mm(T, d, d, eb, epilogue="layer_norm", backward=bw, dropout=dr))
        out += _tag("ffn1_gelu", "matmul", mm(T, f, d, eb, epilogue="gelu", backward=bw, dropout=False))
        out += _tag("ffn2_ln2", "matmul", mm(T, d, f, eb, epilogue="layer_norm", backward=bw, dropout=dr))
    else:
        ln, gelu = src.get("layer_norm"), src.get("gelu")
        out += _tag("o_proj_ln1", "gemm", gemm("o_proj_gemm", T, d, d, eb, backward=bw))
        out += _tag("o_proj_ln1", "layer_norm", ln(T, d, eb, residual=True, input_bias=True, dropout=dr, backward=bw))
        out += _tag("ffn1_gelu", "gemm", gemm("ffn1_gemm", T, f, d, eb, backward=bw))
        out += _tag("ffn1_gelu", "gelu", gelu(T, f, eb, backward=bw))
        out += _tag("ffn2_ln2", "gemm", gemm("ffn2_gemm", T, d, f, eb, backward=bw))
        out += _tag("ffn2_ln2", "layer_norm", ln(T, d, eb, residual=True, input_bias=True, dropout=dr, backward=bw))
    if training:  # x feeds a GEMM and a LayerNorm residual, twice per layer: autograd adds the two gradients
        out += [("grad_accumulate", "torch", Cost("dx + dresidual (autograd)", 2.0 * T * d, 6.0 * eb * T * d, 2))]
    return out


def launches_per_layer(hidden: int = 384, heads: int = 12, intermediate: int = 1536, seqlens=(128,),
                       elem_bytes: int = 2, *, training: bool = False, fused: bool | None = None,
                       source: KernelCosts | None = None) -> int:
    """Kernel launches of one FastStudent layer's forward (or forward + backward with training=True) on the
    triton backend, counted from :func:`layer_plan`: what a launch counter should observe per layer (the QKV
    GEMM counts as one launch, as cuBLAS's addmm is one kernel)."""
    return sum(c.launches for _, _, c in layer_plan(hidden, heads, intermediate, seqlens, elem_bytes,
                                                      training=training, fused=fused, source=source))


def weights_plan(w, seqlens, elem_bytes: int, **kw) -> list[tuple[str, str, Cost]]:
    """:func:`layer_plan` of one layer described by its LayerWeights (fastdistil/layer_weights.py), the structure
    every backend runs: the shapes come from the weights themselves, whatever the architecture."""
    from ...layer_weights import plan_shapes
    return layer_plan(*plan_shapes(w), seqlens, elem_bytes, **kw)


def model_kernels(cfg, seqlens, elem_bytes: int, *, training: bool = False, dropout: bool = False,
                  fused: bool | None = None, source: KernelCosts | None = None, layers=None) -> list[dict]:
    """Every fused kernel of a FastStudent forward (or training forward + backward): the embeddings kernel, then
    one :func:`layer_plan` per layer: from each layer's LayerWeights when `layers` (a list of them, e.g.
    ``[l.weights() for l in model.encoder.layer]``) is given, else `num_hidden_layers` times cfg's shapes.
    Returns rows {layer, stage, module, cost} (layer -1: embeddings)."""
    src = source or KernelCosts()
    T = sum(int(n) for n in seqlens)
    rows = [{"layer": -1, "stage": "embeddings", "module": "embedding", "cost": c}
            for c in src.get("embedding")(T, cfg.hidden_size, elem_bytes, backward=training)]
    kw = dict(training=training, dropout=dropout, fused=fused, source=src)
    if layers is not None:
        plans = [weights_plan(w, seqlens, elem_bytes, **kw) for w in layers]
    else:
        plans = [layer_plan(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, seqlens, elem_bytes,
                            **kw)] * cfg.num_hidden_layers
    for i, per_layer in enumerate(plans):
        rows += [{"layer": i, "stage": s, "module": m, "cost": c} for s, m, c in per_layer]
    return rows
