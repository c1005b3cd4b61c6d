"""The eager fast path of fastdistil's torch.library custom ops.

Every Triton op is a ``torch.library.custom_op`` with a fake and an autograd implementation, so torch.compile
traces it and CUDA graphs capture it. Called eagerly, though, a custom op goes through the dispatcher, a
``torch._disable_dynamo`` wrapper, alias checks on its outputs and a generated ``autograd.Function``: tens of
microseconds of host time per call (the H100 run of 2026-11-27 measured 75-98 us per fastdistil op call against
10-25 us for the torch op it replaces, docs/gpu-runs/), which a 6-layer, 384-wide student pays ~30 times per
forward. :func:`fast` returns a caller that runs the op's own Python function directly when nothing needs the
dispatcher, and the registered op otherwise:

- under torch.compile tracing, or while any Python dispatch mode is active (fake tensors, FlopCounterMode, the
  launch counters of fastdistil.launches): the registered op, so those see exactly what they always saw;
- when autograd needs a backward: one plain ``autograd.Function`` built from the op's registered setup_context
  and backward (the same functions, so both paths compute the same gradients bit for bit);
- otherwise (inference, no_grad): the op's function itself.

Unlike the generated Function, ours does not materialise zero gradients for the outputs a caller ignores (the
saved statistics, z): fastdistil's callers use output 0 only, and each backward ignores the other grads.
"""
from __future__ import annotations

import torch


def _dispatcher_needed() -> bool:
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def fast(op, setup_context=None, backward=None):
    """A caller equivalent to ``op(*args)`` with less host overhead in eager mode.

    Args:
        op: a ``torch.library.custom_op`` (its positional-argument function is called directly).
        setup_context, backward: the functions given to ``op.register_autograd``, when it has them.
    Returns:
        A function taking the op's positional arguments.
    """
    fn = getattr(op, "_init_fn", None)
    if fn is None:  # a torch without CustomOpDef._init_fn: always the registered op
        return op
    if backward is None:
        def call_no_autograd(*args):
            return op(*args) if _dispatcher_needed() else fn(*args)
        return call_no_autograd

    def _setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    Fn = type(f"Eager_{op._name}", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: fn(*args)),
        "setup_context": staticmethod(_setup),
        "backward": staticmethod(backward),
    })

    def call(*args):
        if _dispatcher_needed():
            return op(*args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Fn.apply(*args)
        return fn(*args)
    return call
