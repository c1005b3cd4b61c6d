"""A GPU cost model for fastdistil and for transformers, for machines without a GPU. Every number it makes is
*modeled*, never measured, and every line it prints says so.

The model (one formula for both sides):

    time(kernel) = max(FLOPs / rate, bytes / bandwidth) + launches * launch overhead

where `rate` is the GPU's matrix rate for the dtype when the kernel runs on tensor cores (GEMMs, attention) and
its vector rate otherwise, `bytes` is the minimum HBM traffic of the kernel, and the launch overhead is that of
one of two regimes, both reported: *eager* (a host launch per kernel, ~4.5 us on an H100 through PyTorch) and
*graph* (CUDA-graph replay, ~1 us per kernel: the path a user gets from PyTorch's own
``torch.compile(model, mode="reduce-overhead")`` over compile-safe ops). The sum is conservative: it assumes the
GPU waits for each launch, as it does when kernels are short, which is the case for a 6-layer 384-wide student.

**fastdistil side.** The kernels' own cost functions (``kernels/<op>.py: cost(...)`` and ``kernels/spec.py:
gemm_cost``) give FLOPs, minimum bytes and launches for the padding-free path: embeddings + LayerNorm on the
T real tokens, then per layer the enumeration in :func:`layer_plan` (the one source of truth: the launches per
layer reported here are counted from it, and a launch counter on the triton backend compares with
:func:`launches_per_layer`), plus the small glue ops (input checks, unpadding, padding back, pooler), which are
recorded from the real code with the op recorder below.

**transformers side.** :class:`OpRecorder` (a ``TorchDispatchMode``) records every aten op transformers eager
runs for the same batch on CPU, with the sizes of its inputs and outputs; each op that launches a kernel is
modeled as one kernel reading its inputs and writing its outputs (views and allocations launch nothing). The
batch is padded, so padding costs transformers what it costs in reality; fastdistil's path has none.

Ceilings (:class:`GPU`) are parameters. Defaults are measured-style numbers below the datasheet peaks (H100 SXM:
~3.0 TB/s copy bandwidth, ~790 TFLOP/s bf16 dense; A100 SXM 80 GB: ~1.8 TB/s, ~280 TFLOP/s). Both sides get the
same ceilings; small GEMMs rarely reach them on real hardware, so absolute times are optimistic for both.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..kernels.spec import Cost, gemm_cost

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Ceilings


@dataclass(frozen=True)
class GPU:
    """The ceilings of one GPU. Rates in FLOP/s, bandwidth in bytes/s, launch overheads in seconds.

    matrix_flops maps a dtype name to the dense tensor-core rate; "fp32" is PyTorch's default for fp32 GEMMs
    (``torch.backends.cuda.matmul.allow_tf32 = False``: no tensor cores), "tf32" the rate with TF32 allowed.
    """
    name: str
    bandwidth: float
    matrix_flops: dict
    vector_flops: float
    launch_eager: float = 4.5e-6
    launch_graph: float = 1.0e-6

    def matrix_rate(self, dtype: str) -> float:
        if dtype not in self.matrix_flops:
            raise ValueError(f"{self.name}: no matrix rate for dtype {dtype!r}; known: {sorted(self.matrix_flops)}")
        return self.matrix_flops[dtype]

    def describe(self, dtype: str) -> str:
        return (f"{self.name}: {self.bandwidth / 1e12:.2f} TB/s, {self.matrix_rate(dtype) / 1e12:.0f} TFLOP/s "
                f"{dtype} matrix, {self.vector_flops / 1e12:.0f} TFLOP/s vector, launch {self.launch_eager * 1e6:.1f}"
                f" us eager / {self.launch_graph * 1e6:.1f} us graph replay")


GPUS: dict[str, GPU] = {
    # H100 SXM5 80 GB: datasheet 3.35 TB/s and 989 TFLOP/s bf16 dense; measured copy ~3.0 TB/s, GEMM ~790.
    "h100": GPU("H100 SXM (modeled)", 3.0e12, {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 60e12},
                60e12),
    # A100 SXM 80 GB: datasheet 2.04 TB/s and 312 TFLOP/s bf16 dense; measured copy ~1.8 TB/s, GEMM ~280.
    "a100": GPU("A100 SXM 80GB (modeled)", 1.8e12, {"bf16": 280e12, "fp16": 280e12, "tf32": 140e12, "fp32": 18e12},
                18e12),
}


def get_gpu(name: str = "h100", **overrides) -> GPU:
    """A GPU's default ceilings, with any field overridden (bandwidth=, launch_eager=, matrix_flops=...)."""
    if name.lower() not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    gpu = GPUS[name.lower()]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(gpu, **overrides) if overrides else gpu


def kernel_time(c: Cost, gpu: GPU, dtype: str) -> dict:
    """Modeled time of one Cost row (all its launches), in both launch regimes.

    Returns:
        dict with compute_s, memory_s, bound ("compute"/"memory"), time_eager_s, time_graph_s.
    """
    rate = gpu.matrix_rate(dtype) if c.tensor_core else gpu.vector_flops
    compute = c.flops / rate
    memory = c.bytes / gpu.bandwidth
    body = max(compute, memory)
    return {"compute_s": compute, "memory_s": memory, "bound": "compute" if compute > memory else "memory",
            "time_eager_s": body + c.launches * gpu.launch_eager, "time_graph_s": body + c.launches * gpu.launch_graph}


# ---------------------------------------------------------------------------------------------------------------
# fastdistil: the kernels of the padding-free path, from the kernels' own cost functions


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
    from ..ops.dispatch import implemented
    try:
        from ..kernels.matmul import LN_MAX_WIDTH, use_fused_epilogue
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
    if training:  # torch.cat of the three weights and of the three biases, every call
        out += [("qkv_weight_cat", "torch", Cost("cat(W_q, W_k, W_v)", 0.0, 2.0 * eb * 3 * d * d)),
                ("qkv_weight_cat", "torch", Cost("cat(b_q, b_k, b_v)", 0.0, 2.0 * eb * 3 * d))]
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


def model_kernels(cfg, seqlens, elem_bytes: int, *, training: bool = False, dropout: bool = False,
                  fused: bool | None = None, source: KernelCosts | None = None) -> list[dict]:
    """Every fused kernel of a FastStudent forward (or training forward + backward): the embeddings kernel, then
    `num_hidden_layers` times :func:`layer_plan`. Returns rows {layer, stage, module, cost} (layer -1: embeddings).
    """
    src = source or KernelCosts()
    T = sum(int(n) for n in seqlens)
    rows = [{"layer": -1, "stage": "embeddings", "module": "embedding", "cost": c}
            for c in src.get("embedding")(T, cfg.hidden_size, elem_bytes, backward=training)]
    per_layer = layer_plan(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, seqlens, elem_bytes,
                           training=training, dropout=dropout, fused=fused, source=src)
    for i in range(cfg.num_hidden_layers):
        rows += [{"layer": i, "stage": s, "module": m, "cost": c} for s, m, c in per_layer]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The op recorder: what transformers (or any code) runs, op by op, with sizes


@dataclass
class TensorInfo:
    shape: tuple
    dtype: str
    bytes: int  # bytes the op touches: expanded (stride-0) dimensions counted once


@dataclass
class RecordedOp:
    """One aten op as dispatched: its name, tensor inputs/outputs, and the phase it ran in."""
    name: str            # e.g. "aten.addmm.default"
    packet: str          # e.g. "addmm"
    inputs: list = field(default_factory=list)    # TensorInfo of tensors read
    outputs: list = field(default_factory=list)   # TensorInfo of tensors written
    kernel: bool = True  # False for views, aliases and allocations (no kernel launches)
    sync: bool = False   # the op makes the host wait for the device (item(), nonzero, ...)
    phase: str = ""
    flops: float = 0.0
    tensor_core: bool = False  # runs at the matrix rate (GEMMs, attention)


def _touched_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
    return int(min(t.numel(), span) * t.element_size())


def _info(t: torch.Tensor) -> TensorInfo:
    return TensorInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), _touched_bytes(t))


# ops that launch no kernel: allocations, metadata, aliases (views are detected from the schema)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach",
              "alias", "lift_fresh", "set_", "resize_", "_reshape_alias", "view", "_to_copy_noop", "unbind",
              "split", "split_with_sizes", "chunk", "unsafe_split", "as_strided", "expand", "t", "transpose",
              "permute", "unsqueeze", "squeeze", "slice", "select", "_unsafe_index_put_noop", "sym_size",
              "sym_stride", "sym_numel", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream"}
# ops whose first (mutated) argument is only written, not read
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}
# ops that read only the gathered rows of their first argument (a table)
_GATHERS = {"embedding", "index_select", "index", "gather", "_unsafe_index"}
# ops that make the host wait on the device
_SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2"}
# vector FLOPs per output element, roughly (the model is memory-bound for these; the numbers hardly matter)
_VECTOR_FLOPS = {"_softmax": 5, "_log_softmax": 5, "native_layer_norm": 8, "native_layer_norm_backward": 12,
                 "gelu": 10, "gelu_backward": 14, "tanh": 4, "erf": 8, "_softmax_backward_data": 4}


def _is_view(func) -> bool:
    if getattr(func, "is_view", False):
        return True
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    rets = schema.returns
    return bool(rets) and all(r.alias_info is not None for r in rets)


def _matmul_flops(packet: str, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
    """FLOPs of the tensor-core ops (0.0 for anything else)."""
    try:
        if packet in ("mm", "addmm", "_addmm_activation"):
            a, b = (ins[-2], ins[-1]) if packet != "mm" else (ins[0], ins[1])
            return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        if packet in ("bmm", "baddbmm"):
            a, b = ins[-2], ins[-1]
            return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        if packet.startswith("_scaled_dot_product") or packet == "scaled_dot_product_attention":
            q, k = ins[0], ins[1]
            flops = 4.0 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
            return flops * (2.5 if packet.endswith("backward") else 1.0)
    except (IndexError, TypeError):
        return 0.0
    return 0.0


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched inside the `with` block, with the sizes of its inputs and outputs.

    Usage::

        with OpRecorder() as rec:
            model(input_ids, attention_mask=mask)
        print(len(rec.kernel_ops()), rec.counts())

    Ops run normally (on whatever device the tensors are on); set `phase` to label later ops ("forward",
    "backward"). Autograd's backward ops are recorded too when backward runs inside the block.
    """

    def __init__(self):
        super().__init__()
        self.ops: list[RecordedOp] = []
        self.phase = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket.__name__
        schema = func._schema
        write_only = set()
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write and (a.kwarg_only or packet in _WRITE_ONLY_SELF):
                write_only.add(a.name)  # out= arguments, and the destination of copy_/fill_/...
        ins: list[torch.Tensor] = []
        for a, v in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]):
            if a.name in write_only:
                continue
            ins += [t for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        kernel = not (packet in _NO_KERNEL or _is_view(func))
        rec = RecordedOp(str(func), packet, kernel=kernel, sync=packet in _SYNCS, phase=self.phase)
        if kernel:
            if packet in _GATHERS and ins:
                table, rest = ins[0], ins[1:]  # reads the gathered rows only (as many bytes as it writes)
                rows = sum(_touched_bytes(o) for o in outs)
                rec.inputs = [TensorInfo(tuple(table.shape), str(table.dtype).replace("torch.", ""), rows)]
                rec.inputs += [_info(t) for t in rest]
            else:
                rec.inputs = [_info(t) for t in ins]
            rec.outputs = [_info(t) for t in outs]
            rec.flops = _matmul_flops(packet, ins, outs)
            rec.tensor_core = rec.flops > 0
            if not rec.tensor_core:
                n = max((o.numel() for o in outs), default=0)
                rec.flops = float(_VECTOR_FLOPS.get(packet, 1) * n)
        self.ops.append(rec)
        return out

    def kernel_ops(self) -> list[RecordedOp]:
        """The recorded ops that launch a kernel."""
        return [o for o in self.ops if o.kernel]

    def counts(self, kernels_only: bool = True) -> dict[str, int]:
        """{aten op packet: how many times it ran}, most frequent first."""
        c: dict[str, int] = {}
        for o in (self.kernel_ops() if kernels_only else self.ops):
            c[o.packet] = c.get(o.packet, 0) + 1
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    def costs(self) -> list[Cost]:
        """Each kernel op as one Cost: it reads its inputs and writes its outputs."""
        return [op_cost(o) for o in self.kernel_ops()]


def op_cost(o: RecordedOp) -> Cost:
    """One recorded kernel op as a Cost: one launch, bytes = inputs read + outputs written."""
    nbytes = sum(t.bytes for t in o.inputs) + sum(t.bytes for t in o.outputs)
    return Cost(o.packet, float(o.flops), float(nbytes), 1, bool(o.tensor_core))


def record(fn, *args, **kwargs) -> tuple[object, OpRecorder]:
    """Run fn(*args, **kwargs) under an :class:`OpRecorder`; returns (result, recorder)."""
    with OpRecorder() as rec:
        result = fn(*args, **kwargs)
    return result, rec


# ---------------------------------------------------------------------------------------------------------------
# Recording the two sides on CPU


def _hf_model(cfg, attn: str, dtype: torch.dtype, training: bool):
    from transformers import BertModel
    hf_cfg = cfg.to_hf()
    if training:  # dropout modeled off on both sides: CPU dropout decomposes into 3 ops, CUDA's is one kernel
        hf_cfg.hidden_dropout_prob = hf_cfg.attention_probs_dropout_prob = 0.0
    hf_cfg._attn_implementation = attn
    torch.manual_seed(0)
    m = BertModel(hf_cfg).to(dtype)
    return m.train() if training else m.eval()


def record_transformers(cfg, input_ids, attention_mask, dtype: torch.dtype = torch.float32, *,
                        attn: str = "eager", training: bool = False) -> OpRecorder:
    """Record transformers' BertModel (random weights, `attn` attention) on CPU for one padded batch.

    Args:
        cfg: FastStudentConfig (converted to a transformers BertConfig).
        input_ids, attention_mask: (B, L) padded batch.
        dtype: the model's dtype (bytes are recorded as they are in this dtype).
        attn: transformers' attn_implementation ("eager" or "sdpa").
        training: record forward and backward (from the gradients of last_hidden_state and pooler_output).
    Returns:
        the recorder; ops carry phase "forward" or "backward".
    """
    model = _hf_model(cfg, attn, dtype, training)
    # no_grad, not inference_mode: under inference_mode composite ops (linear, matmul, dropout) reach the
    # recorder undecomposed; under no_grad they decompose into the kernels that actually run
    ctx = torch.enable_grad() if training else torch.no_grad()
    with ctx:
        rec = OpRecorder()
        with rec:
            rec.phase = "forward"
            out = model(input_ids=input_ids, attention_mask=attention_mask)
        if training:
            grads = [torch.randn_like(out.last_hidden_state), torch.randn_like(out.pooler_output)]
            with rec:
                rec.phase = "backward"
                torch.autograd.backward([out.last_hidden_state, out.pooler_output], grads)
    return rec


def record_fastdistil_glue(cfg, input_ids, attention_mask, dtype: torch.dtype = torch.float32, *,
                           training: bool = False) -> OpRecorder:
    """Record the ops FastStudent runs outside its fused kernels, on CPU: input checks and unpadding
    (`prepare`), padding the output back and the pooler (and their backward when training).
    The embeddings and layers are not run: the kernels' cost functions model them."""
    from ..model import FastStudent
    from ..padding import pad
    torch.manual_seed(0)
    model = FastStudent(cfg).to(dtype)
    model.train(training)
    rec = OpRecorder()
    with torch.enable_grad() if training else torch.no_grad():
        with rec:
            rec.phase = "forward"
            ids, tt, pos, p = model.prepare(input_ids, attention_mask)
        x = torch.randn(ids.shape[0], cfg.hidden_size, dtype=dtype, requires_grad=training)  # the layers' output
        with rec:
            last = pad(x, p)
            pooled = model.pooler(last[:, 0])
        if training:
            grads = [torch.randn_like(last), torch.randn_like(pooled)]
            with rec:
                rec.phase = "backward"
                torch.autograd.backward([last, pooled], grads)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# The compile report (fastdistil check-kernels): registers and spills next to each kernel


def compile_report_path() -> Path:
    """Where the cached compile report lives: $FASTDISTIL_COMPILE_REPORT, else
    $XDG_CACHE_HOME/fastdistil/compile_report.json (~/.cache/... by default)."""
    env = os.environ.get("FASTDISTIL_COMPILE_REPORT")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastdistil" / "compile_report.json"


def kernels_fingerprint() -> str:
    """A hash of the kernel modules' sources: a cached compile report made from other sources is stale."""
    import hashlib
    from .. import kernels
    h = hashlib.sha256()
    root = Path(kernels.__file__).parent
    for name in sorted(set(kernels.KERNEL_MODULES) | {"spec"}):
        f = root / f"{name}.py"
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def load_compile_report(path=None) -> dict | None:
    """Read a compile report without compiling anything.

    Accepts the cache this module writes ({"fingerprint", "results": [...]}) or the output of
    `fastdistil check-kernels --json` (a list of build results). Returns {"source", "stale", "results"} or None
    when the file does not exist.
    """
    path = Path(path) if path is not None else compile_report_path()
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OSError(f"compile report {path} is not readable JSON ({e}); delete it or rerun with --compile") from None
    if isinstance(data, list):
        return {"source": str(path), "stale": None, "results": data}
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise OSError(f"compile report {path} has no 'results' list")
    stale = data.get("fingerprint") not in (None, kernels_fingerprint())
    return {"source": str(path), "stale": stale, "results": data["results"]}


def build_compile_report(archs=(90,), modules=None, jobs: int = 2, path=None, progress=None) -> dict:
    """Build the kernels' compile specs with fastdistil.compile_check (minutes) and cache the results.

    Args:
        archs: compute capabilities to build for.
        modules: kernel modules to build (default: those the model uses).
        jobs: parallel build processes.
        path: where to write the cache (default :func:`compile_report_path`).
        progress: optional callable(BuildResult) per finished build.
    Returns:
        the report as :func:`load_compile_report` returns it.
    """
    from .. import compile_check as cc
    results = []
    for m in modules or ("embedding", "attention", "matmul", "layer_norm", "gelu"):
        results += [r.as_dict() for r in cc.run_builds(tuple(archs), m, jobs, progress)]
    path = Path(path) if path is not None else compile_report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": kernels_fingerprint(), "archs": list(archs), "results": results}))
    os.replace(tmp, path)
    return {"source": str(path), "stale": False, "results": results}


def summarize_compile_report(report: dict | None, arch: int) -> dict | None:
    """The builds of one arch, and a one-line summary (builds, failures, spill bytes)."""
    if not report:
        return None
    rows = [r for r in report["results"] if int(r.get("arch", -1)) == arch]
    failed = sum(not r.get("ok", False) for r in rows)
    spills = sum(max(int(r.get("spill_bytes", 0)), 0) for r in rows)
    summary = (f"sm_{arch}: {len(rows)} builds, {failed} failed, {spills} spill bytes in all" +
               (" (STALE: the kernels changed since this report; rerun with --compile)" if report["stale"] else ""))
    return {"source": report["source"], "stale": report["stale"], "arch": arch, "summary": summary, "builds": rows}


def _cost_module(name: str, module: str) -> str | None:
    """The kernel module whose compile specs build the kernel of a Cost row (None: a library or torch kernel)."""
    if module in ("gemm", "torch") or name.endswith((".dA", ".dB")):
        return None
    for prefix, mod in (("attention", "attention"), ("layer_norm", "layer_norm"), ("bias_gelu", "gelu"),
                        ("embed_layer_norm", "embedding"), ("linear_", "matmul")):
        if name.startswith(prefix):
            return mod
    return module


def select_builds(builds: list[dict], name: str, module: str, dtype: str = "bf16", training: bool = False,
                  head_dim: int | None = None) -> list[dict]:
    """The builds of the compile report that a Cost row's kernel runs as: same module, then narrowed (each step
    only where it leaves something) by dtype, direction, GEMM epilogue, inference/training variant, head dim and
    the varlen form, without dropout (the model's timings have none) and with the exact erf GELU."""
    mod = _cost_module(name, module)
    cand = [b for b in builds if b.get("module") == mod]
    text = lambda b: f"{b.get('kernel', '')} {b.get('config', '')}"  # noqa: E731
    bwd = any(t in name for t in ("bwd", "scatter"))
    preds = [lambda b: (dtype if dtype != "tf32" else "fp32") in str(b.get("config", "")).split(),
             (lambda b: "bwd" in text(b)) if bwd else (lambda b: "bwd" not in text(b))]
    if mod == "matmul":
        epi = name[len("linear_"):].split(".")[0]
        preds.append({"gelu": lambda b: "gelu" in text(b), "layer_norm": lambda b: "LN" in text(b)}.get(
            epi, lambda b: str(b.get("config", "")).endswith("bias")))
        preds.append(lambda b: ("train" if training else "infer") in text(b))
    if mod == "attention":
        preds += [lambda b: "varlen" in text(b), lambda b: "dropout" not in text(b)]
        if head_dim:
            preds.append(lambda b: f"hd={head_dim}" in text(b))
    if mod == "gelu":
        preds.append(lambda b: "erf" in text(b))
    for pred in preds:
        kept = [b for b in cand if pred(b)]
        if kept:
            cand = kept
    return cand


def _compile_note(summary: dict | None, name: str, module: str, dtype: str = "bf16", training: bool = False,
                  head_dim: int | None = None) -> str:
    mod = _cost_module(name, module)
    if mod is None:
        return "library" if module == "gemm" or name.endswith((".dA", ".dB")) else "torch"
    if not summary:
        return "-"
    bs = select_builds(summary["builds"], name, module, dtype, training, head_dim)
    if not bs:
        return "not built"
    failed = sum(not b.get("ok", False) for b in bs)
    return (f"regs {max(int(b.get('registers', 0)) for b in bs)} spill "
            f"{sum(max(int(b.get('spill_bytes', 0)), 0) for b in bs)}" + (f" FAILED {failed}" if failed else ""))


# ---------------------------------------------------------------------------------------------------------------
# The report


def _row(stage: str, c: Cost, gpu: GPU, dtype: str, layer: int | None = None, note: str = "") -> dict:
    t = kernel_time(c, gpu, dtype)
    row = {"stage": stage, "kernel": c.name, "launches": c.launches, "flops": c.flops, "bytes": c.bytes,
           "tensor_core": c.tensor_core, **t}
    if layer is not None:
        row["layer"] = layer
    if note:
        row["compile"] = note
    return row


def _totals(rows: list[dict]) -> dict:
    return {"launches": sum(r["launches"] for r in rows), "flops": sum(r["flops"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows), "time_eager_s": sum(r["time_eager_s"] for r in rows),
            "time_graph_s": sum(r["time_graph_s"] for r in rows),
            "compute_s": sum(r["compute_s"] for r in rows), "memory_s": sum(r["memory_s"] for r in rows)}


def _recorded_side(rec: OpRecorder, gpu: GPU, dtype: str, top: int = 12) -> dict:
    rows = [_row(o.phase or "op", op_cost(o), gpu, dtype) for o in rec.kernel_ops()]
    by_op: dict[str, dict] = OrderedDict()
    for r in rows:
        a = by_op.setdefault(r["kernel"], {"op": r["kernel"], "count": 0, "flops": 0.0, "bytes": 0.0,
                                           "time_eager_s": 0.0, "time_graph_s": 0.0})
        a["count"] += 1
        for k in ("flops", "bytes", "time_eager_s", "time_graph_s"):
            a[k] += r[k]
    ops = sorted(by_op.values(), key=lambda a: -a["time_eager_s"])
    tot = _totals(rows)
    tot["syncs"] = sum(1 for o in rec.ops if o.sync)
    tot["aten_ops"] = len(rec.ops)
    return {"totals": tot, "by_op": ops[:top] if top else ops}


def model_perf(workload: str = "A", *, gpu: str | GPU = "h100", dtype: str = "bf16", train: bool = False,
               cfg=None, fused: bool | None = None, source: KernelCosts | None = None,
               peers: tuple[str, ...] = ("eager", "sdpa"), inputs=None, compile_report="cache") -> dict:
    """The modeled GPU report for one workload: fastdistil's kernels against transformers' recorded ops.

    Args:
        workload: "A", "B" or "C" (see fastdistil.bench.workloads), or a Workload.
        gpu: "h100", "a100" or a GPU with custom ceilings.
        dtype: "bf16", "fp16", "fp32" (no TF32, PyTorch's default) or "tf32".
        train: also model a training step (forward + backward; optimizer step excluded on both sides).
        cfg: the model config (default: all-MiniLM-L6-v2's shape, 6 x 384, 12 heads, FFN 1536).
        fused: GEMMs with fused epilogues (None: as the triton backend registers them, see layer_plan).
        source: the kernel cost functions (default: fastdistil.kernels.<op>.cost).
        peers: transformers attention implementations to record ("eager", "sdpa").
        inputs: optional (input_ids, attention_mask) replacing the workload's batch (tests use tiny ones).
        compile_report: "cache" reads the cached check-kernels report, None skips it, or a path to one.
    Returns:
        a JSON-ready dict; top level holds `modeled_speedup_vs_transformers` (forward, eager launches, vs
        transformers eager) and `launches_per_layer` (fastdistil forward).
    """
    from ..config import FastStudentConfig
    from .workloads import Workload, get_workload
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    g = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    wl = workload if isinstance(workload, Workload) else get_workload(workload)
    cfg = cfg or FastStudentConfig()
    src = source or KernelCosts()
    eb, tdt = DTYPE_BYTES[dtype], TORCH_DTYPES[dtype]
    if inputs is None:
        ids, mask = wl.inputs(cfg.vocab_size)
    else:
        ids, mask = inputs
    seqlens = [int(n) for n in mask.sum(1).tolist()]
    if fused is None:
        fused = fused_epilogues_available(cfg.hidden_size, sum(seqlens))
    arch = 80 if "A100" in g.name else 90
    comp = None
    if compile_report is not None:
        comp = summarize_compile_report(load_compile_report(None if compile_report == "cache" else compile_report),
                                        arch)
    report: dict = {
        "modeled": True,
        "note": "every number here is modeled from FLOPs, minimum bytes and launch counts; none is measured",
        "gpu": {"name": g.name, "bandwidth_Bps": g.bandwidth, "matrix_flops": g.matrix_rate(dtype),
                "vector_flops": g.vector_flops, "launch_eager_s": g.launch_eager, "launch_graph_s": g.launch_graph},
        "dtype": dtype,
        "workload": {"name": wl.name, "batch": int(ids.shape[0]), "padded_length": int(ids.shape[1]),
                     "real_tokens": sum(seqlens), "padded_tokens": int(ids.numel()), "seqlens": seqlens},
        "config": {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                   "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size},
        "fused_epilogues": fused,
        "compile_report": None if comp is None else {k: v for k, v in comp.items() if k != "builds"},
        "targets": {"speedup_vs_transformers_eager_forward": 3.0, "launches_per_layer_forward": 6},
    }
    modes = [("forward", False)] + ([("training", True)] if train else [])
    for mode, training in modes:
        kern = model_kernels(cfg, seqlens, eb, training=training, fused=fused, source=src)
        hd = cfg.hidden_size // cfg.num_attention_heads
        all_rows = [_row(r["stage"], r["cost"], g, dtype, r["layer"],
                         _compile_note(comp, r["cost"].name, r["module"], dtype, training, hd)) for r in kern]
        layer0 = [r for r in all_rows if r["layer"] == 0]
        glue = record_fastdistil_glue(cfg, ids, mask, tdt, training=training)
        glue_side = _recorded_side(glue, g, dtype, top=0)
        fd_tot = _totals(all_rows)
        whole = {k: fd_tot[k] + glue_side["totals"][k] for k in fd_tot}
        side = {"per_layer": layer0, "per_layer_totals": _totals(layer0),
                "embeddings": [r for r in all_rows if r["layer"] == -1],
                "kernels_totals": fd_tot, "glue": glue_side, "whole_model": whole}
        report.setdefault("fastdistil", {})[mode] = side
        for peer in peers:
            rec = record_transformers(cfg, ids, mask, tdt, attn=peer, training=training)
            report.setdefault("transformers", {}).setdefault(peer, {})[mode] = _recorded_side(rec, g, dtype)
    fwd = report["fastdistil"]["forward"]
    report["launches_per_layer"] = int(fwd["per_layer_totals"]["launches"])
    ref = report["transformers"].get("eager", next(iter(report["transformers"].values()), None)) if peers else None
    speed = {}
    for mode, _ in modes:
        fd = report["fastdistil"][mode]["whole_model"]
        for peer in peers:
            tr = report["transformers"][peer][mode]["totals"]
            speed[f"{mode}_vs_{peer}"] = {"eager": tr["time_eager_s"] / fd["time_eager_s"],
                                          "graph": tr["time_graph_s"] / fd["time_graph_s"]}
    report["speedups"] = speed
    report["modeled_speedup_vs_transformers"] = (speed["forward_vs_eager"]["eager"] if "eager" in peers else
                                                 (speed[f"forward_vs_{peers[0]}"]["eager"] if ref else None))
    return report


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def format_report(report: dict, per_kernel: bool = True) -> list[str]:
    """The report as lines of text; every line says 'modeled'."""
    g, wl = report["gpu"], report["workload"]
    lines = [f"modeled GPU: {g['name']}, {g['bandwidth_Bps'] / 1e12:.2f} TB/s, {g['matrix_flops'] / 1e12:.0f} "
             f"TFLOP/s {report['dtype']} matrix, launch {g['launch_eager_s'] * 1e6:.1f} us eager / "
             f"{g['launch_graph_s'] * 1e6:.1f} us graph replay",
             f"modeled workload {wl['name']}: {wl['batch']} sequence{'s' if wl['batch'] != 1 else ''} padded to "
             f"{wl['padded_length']}, "
             f"{wl['real_tokens']} real tokens of {wl['padded_tokens']} (transformers computes on all of them, "
             f"fastdistil on the real ones)"]
    comp = report.get("compile_report")
    lines.append("modeled with compile report: " + (f"{comp['summary']} ({comp['source']})" if comp else
                 "none cached (`fastdistil model-perf --compile` builds and caches one; or pass --compile-report "
                 "FILE saved from `fastdistil check-kernels --json`)"))
    lines.append("modeled fastdistil layer: " + ("GEMMs with fused epilogues (linear_layer_norm, linear_gelu)"
                                                if report["fused_epilogues"] else
                                                "library GEMMs followed by the LayerNorm / bias+GELU kernels"))
    for mode, side in report["fastdistil"].items():
        if per_kernel:
            lines.append(f"modeled fastdistil {mode}, one layer ({report['dtype']}):")
            lines.append(f"  {'stage':<15} {'kernel':<34} {'launch':>6} {'GFLOP':>8} {'MB':>8} {'bound':>7} "
                         f"{'eager us':>9} {'graph us':>9}  compile  [modeled]")
            for r in side["per_layer"]:
                lines.append(f"  {r['stage']:<15} {r['kernel'][:34]:<34} {r['launches']:>6} {r['flops'] / 1e9:>8.3f}"
                             f" {r['bytes'] / 1e6:>8.2f} {r['bound']:>7} {_us(r['time_eager_s']):>9} "
                             f"{_us(r['time_graph_s']):>9}  {r.get('compile', '-') or '-'}  [modeled]")
        pl = side["per_layer_totals"]
        lines.append(f"modeled fastdistil {mode} per layer: {pl['launches']} launches, {pl['flops'] / 1e9:.2f} GFLOP "
                     f"({_us(pl['compute_s'])} us at the matrix rate), {pl['bytes'] / 1e6:.1f} MB "
                     f"({_us(pl['memory_s'])} us), {_us(pl['time_eager_s'])} us eager / "
                     f"{_us(pl['time_graph_s'])} us graph")
        w, gl = side["whole_model"], side["glue"]["totals"]
        lines.append(f"modeled fastdistil {mode} whole model: {w['launches']} launches ({gl['launches']} of them glue:"
                     f" unpad, pad, pooler), {_us(w['time_eager_s'])} us eager / {_us(w['time_graph_s'])} us graph")
        for peer, sides in report["transformers"].items():
            t = sides[mode]["totals"]
            lines.append(f"modeled transformers {peer} {mode}: {t['launches']} kernel ops of {t['aten_ops']} aten "
                         f"ops (host syncs: {t['syncs']}), {t['flops'] / 1e9:.2f} GFLOP, {t['bytes'] / 1e6:.1f} MB, "
                         f"{_us(t['time_eager_s'])} us eager / {_us(t['time_graph_s'])} us graph")
            if per_kernel and peer == "eager":
                top = ", ".join(f"{a['op']} x{a['count']} {_us(a['time_eager_s'])} us"
                                for a in sides[mode]["by_op"][:6])
                lines.append(f"modeled transformers eager {mode}, costliest ops: {top}")
    for key, s in report["speedups"].items():
        lines.append(f"modeled speedup fastdistil {key.replace('_', ' ')}: {s['eager']:.2f}x with eager launches, "
                     f"{s['graph']:.2f}x with graph replay")
    tg = report["targets"]
    sp, lpl = report["modeled_speedup_vs_transformers"], report["launches_per_layer"]
    goal = tg["speedup_vs_transformers_eager_forward"]
    verdict = ("met" if sp >= goal else "NOT met") if wl["name"] == "A" else "the target is stated for workload A"
    lines.append(f"modeled targets: forward vs transformers eager {sp:.2f}x (target >= {goal:.0f}x on workload A: "
                 f"{verdict}); forward launches per layer {lpl} (target <= {tg['launches_per_layer_forward']}: "
                 f"{'met' if lpl <= tg['launches_per_layer_forward'] else 'NOT met'})")
    return lines


def to_jsonable(obj):
    """The report with dataclasses and tuples turned into JSON types."""
    if dataclasses.is_dataclass(obj):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

