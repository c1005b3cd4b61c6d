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
Host synchronisations: operators that copy a device value to the host or size an output by data
(_local_scalar_dense behind .item()/int()/.tolist(), nonzero, equal, is_nonzero, unique, masked_select).
Limit: PyTorch operators called *inside* a custom op's implementation are invisible to the dispatch mode; the
Triton launches inside it are still counted (fastdistil's forward launchers only allocate besides launching).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "matmul", "linear", "_scaled_mm"}
_SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "unique_consecutive", "_unique2",
          "masked_select", "item"}
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
         "lift_fresh", "_to_copy_noop", "set_", "resize_", "_reshape_alias", "view", "_unsafe_view"}


class LaunchCounts:
    """Launches seen in a `count_launches` region."""

    def __init__(self):
        self.triton: Counter = Counter()   # kernel name -> launches
        self.gemm: Counter = Counter()     # aten GEMM op -> launches
        self.other: Counter = Counter()    # other aten compute op -> launches
        self.syncs: Counter = Counter()    # aten op that synchronises with the host -> calls

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
            if name in _SYNCS:
                self.counts.syncs[name] += 1
            if ns == "fastdistil" or func.is_view or name in _FREE:
                pass
            elif name in _GEMMS:
                self.counts.gemm[name] += 1
            else:
                self.counts.other[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """Context manager yielding a LaunchCounts filled with the launches made inside the block."""
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
        with _Mode(counts, state):
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
