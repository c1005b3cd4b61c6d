"""Logit KD op: per-row KL(softmax(teacher / T) || softmax(student / T)) over the class / vocabulary dimension.

Three implementations behind the backend seam: torch = the materialised reference (fastdistil.reference.kd_kl_rows);
triton (kernels/kd.py, CUDA or the interpreter) streams each row once forward and once backward and never makes a
float32 copy of the (N, V) logits, registered with torch.library (custom_op + register_fake + register_autograd)
so torch.compile traces it; native (CPU) runs the kernel's maths with torch ops over blocks of rows (a few MiB of
temporaries), saving two (N,) logsumexps and recomputing in the backward.
The teacher is a constant target on every backend: it is detached, no gradient reaches it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .checks import check_float
from . import amp
from .dispatch import kernel_module, lookup, register
from .eager import fast


def kd_kl_rows(student_logits, teacher_logits, temperature: float, row_mask=None):
    """Per-row KL(p_teacher || p_student) with p = softmax(logits / temperature) over the last dimension.

    Args:
        student_logits: (..., V) student LOGITS (not log-probs), fp16/bf16/fp32/fp64; gradients flow here.
        teacher_logits: (..., V) teacher LOGITS, same shape and device; treated as a constant (detached) and
            cast to the student's dtype when they differ (e.g. an fp16 cache under a bf16 student).
        temperature: T > 0 (a Python float).
        row_mask: optional (...) bool/int tensor over the leading dims, nonzero = real row; other rows give 0
            and get a zero gradient (padding rows of a (B, L, V) MLM batch, for example).
    Returns:
        (...) float32 (float64 for float64 inputs): the KL of each row in temperature-scaled units, NOT multiplied
        by T^2 and not reduced; :func:`fastdistil.losses.kd_kl_loss` applies T^2 and the reduction.
    """
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits are on {student_logits.device} but teacher_logits on "
                         f"{teacher_logits.device}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty class dimension, got shape {tuple(student_logits.shape)}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = tuple(student_logits.shape[:-1])
    if row_mask is not None:
        if tuple(row_mask.shape) != lead:
            raise ValueError(f"row_mask has shape {tuple(row_mask.shape)}, expected {lead} (the logits' leading "
                             "dimensions)")
        if row_mask.device != student_logits.device:
            raise ValueError(f"row_mask is on {row_mask.device} but the logits are on {student_logits.device}")
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.detach().to(s.dtype).reshape(-1, V)
    m = None if row_mask is None else row_mask.reshape(-1)
    with amp.region(s.device):  # autocast off inside: fp32 statistics on every backend (ops/amp.py)
        out = lookup("kd_kl", s.device)(s, t, float(temperature), m)
    return out.reshape(lead)


@register("kd_kl", "torch")
def _kd_kl_torch(student, teacher, temperature, row_mask):
    return reference.kd_kl_rows(student, teacher, temperature, row_mask)


# ------------------------------------------------------------------------------------------------ triton
@torch.library.custom_op("fastdistil::kd_kl_fwd", mutates_args=())
def _kd_fwd_op(student: Tensor, teacher: Tensor, temperature: float,
               row_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(kl, lse_s, lse_t), each (N,) fp32, for 2-D logits with a contiguous class dim."""
    K = kernel_module("kd")
    return K.kd_forward(student, teacher, temperature, row_mask)


@_kd_fwd_op.register_fake
def _(student, teacher, temperature, row_mask):
    n = student.shape[0]
    return tuple(student.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastdistil::kd_kl_bwd", mutates_args=())
def _kd_bwd_op(grad: Tensor, student: Tensor, teacher: Tensor, lse_s: Tensor, lse_t: Tensor, temperature: float,
               row_mask: Optional[Tensor]) -> Tensor:
    """Gradient w.r.t. the student logits, (N, V) in their dtype."""
    K = kernel_module("kd")
    return K.kd_backward(grad, student, teacher, lse_s, lse_t, temperature, row_mask)


@_kd_bwd_op.register_fake
def _(grad, student, teacher, lse_s, lse_t, temperature, row_mask):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _kd_setup(ctx, inputs, output):
    student, teacher, temperature, row_mask = inputs
    _, lse_s, lse_t = output
    ctx.temperature = temperature
    ctx.has_mask = row_mask is not None
    # Teacher logits from torch.inference_mode() cannot go through save_for_backward; they never need a
    # gradient (nor a version check), so such a tensor is kept as a plain attribute instead of being copied.
    ctx.teacher = teacher if teacher.is_inference() else None
    ctx.save_for_backward(student, None if teacher.is_inference() else teacher, lse_s, lse_t, row_mask)


def _kd_backward(ctx, grad, _g_lse_s, _g_lse_t):
    student, teacher, lse_s, lse_t, row_mask = ctx.saved_tensors
    teacher = ctx.teacher if teacher is None else teacher
    ds = _kd_bwd(grad, student, teacher, lse_s, lse_t, ctx.temperature, row_mask)
    return ds, None, None, None


_kd_fwd_op.register_autograd(_kd_backward, setup_context=_kd_setup)
_kd_fwd = fast(_kd_fwd_op, _kd_setup, _kd_backward)  # eager fast path (ops/eager.py)
_kd_bwd = fast(_kd_bwd_op)


def _contig_rows(x):
    return x if x.stride(-1) == 1 else x.contiguous()


@register("kd_kl", "triton")
def _kd_kl_triton(student, teacher, temperature, row_mask):
    if student.dtype == torch.float64:  # the kernels compute in fp32: float64 stays exact on the reference
        return _kd_kl_torch(student, teacher, temperature, row_mask)
    m = None if row_mask is None else (row_mask != 0).to(torch.int8)
    return _kd_fwd(_contig_rows(student), _contig_rows(teacher), temperature, m)[0]


# ------------------------------------------------------------------------------------------------ native (CPU)
# The CPU backend: the same maths as the kernels with torch ops over blocks of rows, so no float32 copy of the
# whole (N, V) logits exists (the reference makes several: two log-softmaxes, probabilities, products). Saves
# only the two (N,) logsumexps; the backward recomputes each block's softmaxes and writes the gradient.
_CPU_BLOCK_ELEMS = 1 << 20  # 4 MiB per float32 temporary of a block of rows (a handful live at once)


def _row_blocks(n: int, v: int):
    step = max(1, _CPU_BLOCK_ELEMS // max(v, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


class _KDBlocked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, row_mask):
        n, v = student.shape
        c = torch.promote_types(student.dtype, torch.float32)
        kl = student.new_empty(n, dtype=c)
        lse_s, lse_t = torch.empty_like(kl), torch.empty_like(kl)
        for i, j in _row_blocks(n, v):
            s = student[i:j].to(c) / temperature
            t = teacher[i:j].to(c) / temperature
            ls, lt = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
            p_t = torch.exp(t - lt[:, None])
            kl[i:j] = torch.where(p_t > 0, p_t * (t - s), 0.0).sum(-1) - lt + ls  # p_t = 0 terms (t = -inf): 0
            lse_s[i:j], lse_t[i:j] = ls, lt
        if row_mask is not None:
            kl = torch.where(row_mask.to(torch.bool), kl, torch.zeros_like(kl))
        ctx.temperature = temperature
        ctx.teacher = teacher if teacher.is_inference() else None  # see _kd_setup
        ctx.save_for_backward(student, None if teacher.is_inference() else teacher, lse_s, lse_t, row_mask)
        return kl

    @staticmethod
    def backward(ctx, grad):
        student, teacher, lse_s, lse_t, row_mask = ctx.saved_tensors
        teacher = ctx.teacher if teacher is None else teacher
        T = ctx.temperature
        g = grad.to(lse_s.dtype) / T
        if row_mask is not None:
            g = torch.where(row_mask.to(torch.bool), g, torch.zeros_like(g))
        n, v = student.shape
        c = lse_s.dtype
        ds = torch.empty_like(student, memory_format=torch.contiguous_format)
        for i, j in _row_blocks(n, v):
            p_s = torch.exp(student[i:j].to(c) / T - lse_s[i:j, None])
            p_t = torch.exp(teacher[i:j].to(c) / T - lse_t[i:j, None])
            d = g[i:j, None] * (p_s - p_t)
            if row_mask is not None:  # masked rows may hold anything (inf padding logits): never read into ds
                d = torch.where(row_mask[i:j, None].to(torch.bool), d, torch.zeros_like(d))
            ds[i:j] = d.to(student.dtype)
        return ds, None, None, None


@register("kd_kl", "native")
def _kd_kl_native(student, teacher, temperature, row_mask):
    return _KDBlocked.apply(student, teacher, temperature, row_mask)
