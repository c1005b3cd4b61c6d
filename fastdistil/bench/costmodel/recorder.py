"""The op recorder: every aten op a piece of code runs (transformers' BertModel, fastdistil's glue), with the bytes
it touches, its FLOPs, whether it launches a kernel and whether it syncs the host (the classification is
fastdistil/launches.py's, shared with the launch counter: one place)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ...kernels.spec import Cost
from ...launches import NO_KERNEL_OPS, HostReads, sync_name


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


# ops whose first (mutated) argument is only written, not read
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}
# ops that read only the gathered rows of their first argument (a table)
_GATHERS = {"embedding", "index_select", "index", "gather", "_unsafe_index"}
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
    "backward"). Autograd's backward ops are recorded too when backward runs inside the block. Host syncs are
    marked (`sync`), including `.tolist()`/`.numpy()`/`.cpu()` of CPU tensors other than the `host` inputs: the
    recorded CPU tensors stand in for device tensors.
    """

    def __init__(self, host=()):
        super().__init__()
        self.ops: list[RecordedOp] = []
        self.phase = ""
        self.host = tuple(host)  # host inputs: their .numpy()/.tolist() is no sync (launches.HostReads)
        self._reads: list = []

    # A function mode rides along: .tolist()/.numpy()/.cpu() of CPU tensors never reach the dispatcher, but the
    # recorder's CPU tensors stand in for GPU ones, where each is a host sync (fastdistil/launches.py).
    def __enter__(self):
        reads = HostReads(self._host_read, host=self.host)
        reads.__enter__()
        self._reads.append(reads)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._reads.pop().__exit__(*exc)

    def _host_read(self, name: str) -> None:
        self.ops.append(RecordedOp(f"Tensor.{name}", name, kernel=False, sync=True, phase=self.phase))

    def syncs(self) -> dict[str, int]:
        """{op: calls} of the recorded host synchronisations (value reads, data-sized outputs, device->host)."""
        c: dict[str, int] = {}
        for o in self.ops:
            if o.sync:
                c[o.packet] = c.get(o.packet, 0) + 1
        return c

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
        kernel = not (packet in NO_KERNEL_OPS or _is_view(func))
        rec = RecordedOp(str(func), packet, kernel=kernel, sync=sync_name(func, args, kwargs) is not None,
                         phase=self.phase)
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
    The embeddings and layers are not run: the kernels' cost functions model them.

    The inference tail is what the triton backend launches, one kernel each: ``pad_rows`` (kernels/padding.py)
    and the pooler's ``linear_tanh`` (kernels/matmul.py), recorded with their tensors' bytes. Run on the CPU,
    their torch implementations would record 8 aten kernels (index arithmetic, a scatter, addmm, tanh) that the
    GPU never launches. Training: the same two kernels forward (they have backwards since 2026-11-27), and the
    backward as the torch forms run it (index_add for pad, three matmul-class ops for the pooler: the same work
    as the triton ops' torch backwards, within an op or two)."""
    from ...model import FastStudent
    from ...padding import pad
    torch.manual_seed(0)
    model = FastStudent(cfg).to(dtype)
    model.train(training)
    rec = OpRecorder(host=(input_ids, attention_mask))  # the batch comes from the host (tokenizer)
    with torch.enable_grad() if training else torch.no_grad():
        with rec:
            rec.phase = "forward"
            ids, tt, pos, p = model.prepare(input_ids, attention_mask)
        x = torch.randn(ids.shape[0], cfg.hidden_size, dtype=dtype, requires_grad=training)  # the layers' output
        rec.ops += _triton_tail(x, p, model, dtype)
        if not training:
            return rec
        last = pad(x, p)  # not recorded: the torch forms stand in for the kernels to give the backward its graph
        pooled = model.pooler(last[:, 0])
        if training:
            grads = [torch.randn_like(last), torch.randn_like(pooled)]
            with rec:
                rec.phase = "backward"
                torch.autograd.backward([last, pooled], grads)
    return rec


def _triton_tail(x: torch.Tensor, p, model, dtype: torch.dtype) -> list[RecordedOp]:
    """The triton backend's inference glue after the layers, as two recorded kernels: pad_rows scatters the (T, d)
    rows to (B*L, d) with zeros elsewhere; linear_tanh is the pooler on the B [CLS] rows (a GEMM, tensor cores)."""
    T, d = x.shape
    B, L = p.batch, p.seqlen
    esz = torch.empty((), dtype=dtype).element_size()
    info = lambda shape, nbytes: TensorInfo(tuple(shape), str(dtype).replace("torch.", ""), int(nbytes))  # noqa: E731
    pad_rows = RecordedOp("fastdistil.pad_rows", "pad_rows", [info((T, d), T * d * esz), info((T,), 8 * T)],
                          [info((B * L, d), B * L * d * esz)], phase="forward")
    if model.pooler is None:
        return [pad_rows]
    w = model.pooler.dense.weight
    pool = RecordedOp("fastdistil.linear_tanh", "linear_tanh", [info((B, d), B * d * esz),
                      info(tuple(w.shape), w.numel() * esz), info((d,), d * esz)], [info((B, d), B * d * esz)],
                      phase="forward", flops=2.0 * B * d * w.shape[0], tensor_core=True)
    return [pad_rows, pool]

