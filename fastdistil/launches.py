"""Count kernel launches and host synchronisations of a region of code, on any device, without a profiler.

    with count_launches() as c:
        layer(x, packing)
    c.total, c.triton, c.gemm, c.other, c.syncs

What counts as a launch:
- every Triton kernel launch (a compiled JIT launch on a GPU or a launch in the interpreter), by kernel name;
- every PyTorch operator that would launch a kernel on a GPU, seen through a TorchDispatchMode: GEMMs
  (mm, addmm, bmm, baddbmm, linear's decompositions) separately, everything else as `other`. View ops (a
  stride change), allocations (empty*), and fastdistil's own torch.library ops (counted by the Triton launches
  they make) are not launches.
Host synchronisations (:func:`sync_name`, shared with the cost model's op recorder): operators that copy a device
value to the host or size an output by data (_local_scalar_dense behind .item()/int(), nonzero, equal, is_nonzero,
unique, masked_select) and device-to-host copies (`_to_copy` or `copy_` from a non-CPU tensor into a CPU one:
`.cpu()`, `.to("cpu")`, `.tolist()` of a CUDA tensor). On CPU tensors `.tolist()`, `.numpy()` and `.cpu()` never
reach the dispatcher; with `count_launches(host=...)` a function mode counts them too (:class:`HostReads`): the CPU
run then stands in for the same code on a GPU, where each of them is a sync, except reads of the `host` tensors
(inputs that stay on the host on a GPU run too). Without `host`, reads a CPU run makes only because its tensors are
on the CPU (the value checks of ops/checks.py) are not counted. (`.to(device)` is never counted on CPU: its target
is a variable that is the GPU on a GPU run.)
Limit: PyTorch operators called *inside* a custom op's implementation are invisible to the dispatch mode; the
Triton launches inside it are still counted (fastdistil's forward launchers only allocate besides launching).

:func:`graph_capture_available` says whether fastdistil's inference forward can be captured in a CUDA graph; the
cost model labels its graph-replay column with it.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Whether the inference forward can be captured in a CUDA graph (no host sync, static shapes). False until the
# sync-free forward of issue 14 exists; the change that makes it capturable (fastdistil/graphs.py, with its
# no-sync test) sets this to True, and the cost model's "graph replay" column follows.
GRAPH_CAPTURE = True  # fastdistil/graphs.py (GraphRunner); no-sync proof: tests/test_sync_free.py


def graph_capture_available() -> bool:
    """Whether fastdistil's inference forward can be captured in a CUDA graph today (see GRAPH_CAPTURE)."""
    return GRAPH_CAPTURE


GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "matmul", "linear", "_scaled_mm"})
# aten ops that make the host wait for the device (a value read, or an output sized by data)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "nonzero_static_noop", "equal", "is_nonzero", "unique",
                      "unique_consecutive", "unique_dim", "_unique", "_unique2", "masked_select", "item"})
# aten ops that launch no kernel: allocations, metadata, aliases (view ops are recognised from their schema)
NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach", "alias",
    "lift_fresh", "set_", "resize_", "_reshape_alias", "view", "_to_copy_noop", "unbind", "split",
    "split_with_sizes", "chunk", "unsafe_split", "as_strided", "expand", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "slice", "select", "_unsafe_index_put_noop", "sym_size", "sym_stride", "sym_numel", "is_same_size",
    "_has_compatible_shallow_copy_type", "record_stream"})
# Tensor methods that read values on the host and never reach the dispatcher for a CPU tensor
HOST_READS = frozenset({"tolist", "numpy", "cpu"})
_GEMMS, _SYNCS, _FREE = GEMM_OPS, SYNC_OPS, NO_KERNEL_OPS  # the names this module used before


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def sync_name(func, args, kwargs) -> str | None:
    """The name to count when aten op `func` synchronises the host with the device, else None: the SYNC_OPS, and
    device-to-host copies (`_to_copy` to the CPU or `copy_` into a CPU tensor, from a tensor on another device)."""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return name
    if name == "_to_copy" and args and _on_device(args[0]):
        dev = (kwargs or {}).get("device")
        if dev is not None and torch.device(dev).type == "cpu":
            return "_to_copy(device->host)"
    if name == "copy_" and len(args) > 1 and isinstance(args[0], torch.Tensor) and not _on_device(args[0]) \
            and _on_device(args[1]):
        return "copy_(device->host)"
    return None


class HostReads(TorchFunctionMode):
    """Calls `on_read(name)` for each `.tolist()`, `.numpy()` and `.cpu()` of a CPU tensor: they never reach the
    dispatcher, but on a GPU run of the same code each one is a host sync. Device tensors are left to
    :func:`sync_name` (their reads are dispatched). Nothing is counted for the tensors in `host` (inputs that
    live on the host in the modeled run too: tokenizer output read with numpy is no sync), nor while
    `state["in_triton"]` (the Triton interpreter reads its tensors through numpy)."""

    def __init__(self, on_read, state: dict | None = None, host=()):
        super().__init__()
        self.on_read, self.state, self.host = on_read, ({} if state is None else state), tuple(host)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name in HOST_READS and not self.state.get("in_triton") and args and isinstance(args[0], torch.Tensor)
                and not _on_device(args[0]) and not any(args[0] is h for h in self.host)):
            self.on_read(name)
        return func(*args, **(kwargs or {}))


class LaunchCounts:
    """Launches seen in a `count_launches` region."""

    def __init__(self):
        self.triton: Counter = Counter()   # kernel name -> launches
        self.gemm: Counter = Counter()     # aten GEMM op -> launches
        self.other: Counter = Counter()    # other aten compute op -> launches
        self.syncs: Counter = Counter()    # host sync (aten op, device->host copy, host read) -> calls

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.gemm.values()) + sum(self.other.values())

    def __repr__(self) -> str:
        return (f"LaunchCounts(total={self.total}, triton={dict(self.triton)}, gemm={dict(self.gemm)}, "
                f"other={dict(self.other)}, syncs={dict(self.syncs)})")


class _Mode(TorchDispatchMode):
    def __init__(self, counts: LaunchCounts, state: dict):
        super().__init__()
        self.counts, self.state = counts, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.state["in_triton"]:
            name = func.overloadpacket.__name__
            ns = func.namespace
            sync = sync_name(func, args, kwargs)
            if sync:
                self.counts.syncs[sync] += 1
            if ns == "fastdistil" or func.is_view or name in NO_KERNEL_OPS:
                pass
            elif name in GEMM_OPS:
                self.counts.gemm[name] += 1
            else:
                self.counts.other[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches(host=None):
    """Context manager yielding a LaunchCounts filled with the launches made inside the block.

    Args:
        host: None counts the syncs the dispatcher sees. A tuple (possibly empty) makes a CPU run stand in for a
            GPU run: `.tolist()`/`.numpy()`/`.cpu()` of CPU tensors count too, except of the tensors in `host`
            (host inputs, e.g. a tokenizer's output, whose reads are no sync on a GPU run either).
    """
    counts = LaunchCounts()
    state = {"in_triton": False}
    patched = []
    try:
        import triton.runtime.jit as jit
        classes = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        except ImportError:  # pragma: no cover - older triton
            pass
    except ImportError:
        classes = []
    for cls in classes:
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            if kwargs.get("warmup"):
                return _orig(self, *args, **kwargs)
            counts.triton[getattr(self, "__name__", None) or self.fn.__name__] += 1
            prev, state["in_triton"] = state["in_triton"], True
            try:
                return _orig(self, *args, **kwargs)
            finally:
                state["in_triton"] = prev

        cls.run = run
        patched.append((cls, orig))
    try:
        reads = (contextlib.nullcontext() if host is None
                 else HostReads(lambda name: counts.syncs.update((name,)), state, host))
        with reads, _Mode(counts, state):
            yield counts
    finally:
        for cls, orig in patched:
            cls.run = orig


class ByteCounts:
    """Distinct bytes loaded and stored by Triton kernels run in the interpreter (each address counted once per
    region: the HBM traffic when every re-read hits in cache)."""

    def __init__(self):
        self._loads: list = []
        self._stores: list = []

    @staticmethod
    def _distinct(chunks) -> int:
        import numpy as np
        if not chunks:
            return 0
        addrs = np.concatenate([a for a, _ in chunks])
        sizes = np.concatenate([s for _, s in chunks])
        _, first = np.unique(addrs, return_index=True)
        return int(sizes[first].sum())

    @property
    def read(self) -> int:
        return self._distinct(self._loads)

    @property
    def written(self) -> int:
        return self._distinct(self._stores)

    @property
    def total(self) -> int:
        return self.read + self.written


@contextlib.contextmanager
def count_bytes():
    """Context manager yielding ByteCounts of the Triton loads/stores inside the block (TRITON_INTERPRET=1 only).

    Records every unmasked element address of tl.load / tl.store with its element size, then counts distinct
    addresses: the bytes a kernel must move between HBM and the chip if nothing is fetched twice."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder as IB

    counts = ByteCounts()

    def record(dest, ptrs, mask):
        addrs = np.asarray(ptrs.data).reshape(-1).astype(np.uint64)
        if mask is not None:
            addrs = addrs[np.asarray(mask.data).reshape(-1).astype(bool)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        dest.append((addrs, np.full(addrs.shape, size, dtype=np.int64)))

    orig = {n: getattr(IB, n) for n in ("create_load", "create_store", "create_masked_load", "create_masked_store")}

    def load(self, ptr, *a, **k):
        record(counts._loads, ptr, None)
        return orig["create_load"](self, ptr, *a, **k)

    def store(self, ptr, val, *a, **k):
        record(counts._stores, ptr, None)
        return orig["create_store"](self, ptr, val, *a, **k)

    def masked_load(self, ptrs, mask, *a, **k):
        record(counts._loads, ptrs, mask)
        return orig["create_masked_load"](self, ptrs, mask, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        record(counts._stores, ptrs, mask)
        return orig["create_masked_store"](self, ptrs, value, mask, *a, **k)

    IB.create_load, IB.create_store = load, store
    IB.create_masked_load, IB.create_masked_store = masked_load, masked_store
    try:
        yield counts
    finally:
        for n, f in orig.items():
            setattr(IB, n, f)
