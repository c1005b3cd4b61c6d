"""Softmax-KL with temperature over the class / vocabulary dimension: the logit-KD loss, forward and backward.

What it fuses: for each row i of student logits s (N, V) and teacher logits t (N, V) at temperature T,
    KL_i = KL(softmax(t_i / T) || softmax(s_i / T))
in ONE pass over V (online logsumexp of both rows plus the running sum of p_t * (t - s) / T), and the gradient
w.r.t. the student in one more pass that recomputes both softmaxes from the two saved per-row logsumexps.
Nothing of size (N, V) is written except the student gradient (in the logits' own dtype): no float32 copy of
the logits, no log-softmax, no probabilities. That matters for MLM-head distillation (V = 30522).

Layout: rows of `s` and `t` have their own row stride; the class dimension must be contiguous (stride 1).
Statistics (max, sum, logsumexp, the KL accumulator) are float32 whatever the input dtype (fp16, bf16, fp32).
One program per row; the row is streamed in chunks of BLOCK_V columns (128, 1024 or 4096).
Limits: the teacher is a constant target (no gradient to it); rows with row_mask == 0 give KL = 0 and a zero
gradient without reading the row. There is no tl.dot here, so bf16 runs unmodified in Triton 3.9's interpreter
(only its bf16 dot is broken, FACTS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device
from .spec import CompileSpec, Cost, spec

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp(_NEG - m) underflows to 0 without inf - inf = nan


@triton.jit
def _kd_fwd_kernel(
    S,                    # *fp16|bf16|fp32 (N, V) student logits, class dim contiguous
    T,                    # *fp16|bf16|fp32 (N, V) teacher logits, class dim contiguous
    ROW_MASK,             # *int8 (N,) nonzero = real row; read only when HAS_MASK
    KL,                   # *fp32 (N,) out: KL(p_t || p_s) per row, in temperature-scaled units
    LSE_S,                # *fp32 (N,) out: logsumexp(s / T) per row (saved for backward)
    LSE_T,                # *fp32 (N,) out: logsumexp(t / T) per row
    stride_s: tl.int64,   # row stride of S, elements
    stride_t: tl.int64,   # row stride of T, elements
    V: tl.int32,          # number of classes
    inv_temp: tl.float32,  # 1 / temperature
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # KL = sum_j p_t,j (t_j - s_j) - lse_t + lse_s with t, s already divided by the temperature, because
    # log p_t,j - log p_s,j = (t_j - lse_t) - (s_j - lse_s). All three sums are kept online over the chunks.
    row = tl.program_id(0).to(tl.int64)
    n = V
    if HAS_MASK:
        keep = tl.load(ROW_MASK + row) != 0
        n = tl.where(keep, V, 0)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    m_s = tl.full((), _NEG, tl.float32)
    m_t = tl.full((), _NEG, tl.float32)
    l_s = tl.zeros((), tl.float32)
    l_t = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)  # sum_j exp(t_j - m_t) * (t_j - s_j)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n, BLOCK_V):
        c = start + cols
        ok = c < n
        s = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32) * inv_temp
        t = tl.load(t_row + c, mask=ok, other=0.0).to(tl.float32) * inv_temp
        t_ok = tl.where(ok, t, _NEG)
        s_ok = tl.where(ok, s, _NEG)
        m_t_new = tl.maximum(m_t, tl.max(t_ok, axis=0))
        m_s_new = tl.maximum(m_s, tl.max(s_ok, axis=0))
        e_t = tl.where(ok, tl.exp(t_ok - m_t_new), 0.0)
        e_s = tl.where(ok, tl.exp(s_ok - m_s_new), 0.0)
        a_t = tl.exp(m_t - m_t_new)
        l_t = l_t * a_t + tl.sum(e_t, axis=0)
        # p_t = 0 terms contribute 0 (x log x -> 0), also where a teacher logit is -inf (a masked vocabulary entry)
        acc = acc * a_t + tl.sum(e_t * tl.where(e_t > 0.0, t - s, 0.0), axis=0)
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(e_s, axis=0)
        m_t = m_t_new
        m_s = m_s_new
    real = l_t > 0.0  # false only for a masked row (or V == 0)
    l_t_safe = tl.where(real, l_t, 1.0)
    l_s_safe = tl.where(real, l_s, 1.0)
    lse_t = m_t + tl.log(l_t_safe)
    lse_s = m_s + tl.log(l_s_safe)
    kl = acc / l_t_safe - lse_t + lse_s
    tl.store(KL + row, tl.where(real, kl, 0.0))
    # Masked rows store lse = +1e30: the backward's exp(x - lse) is then 0 there, never an overflow.
    tl.store(LSE_S + row, tl.where(real, lse_s, -_NEG))
    tl.store(LSE_T + row, tl.where(real, lse_t, -_NEG))


# Backward. With u = s / T, dKL_i/du_ij = p_s,ij - p_t,ij (softmax minus target), so
#     dL/ds_ij = g_i * (p_s,ij - p_t,ij) / T,   p_s = exp(s/T - lse_s), p_t = exp(t/T - lse_t),
# g_i the incoming gradient of KL_i (any stride: a mean's gradient is an expanded stride-0 tensor).
@triton.jit
def _kd_bwd_kernel(
    S,                    # *fp16|bf16|fp32 (N, V) student logits
    T,                    # *fp16|bf16|fp32 (N, V) teacher logits
    ROW_MASK,             # *int8 (N,) read only when HAS_MASK
    LSE_S,                # *fp32 (N,)
    LSE_T,                # *fp32 (N,)
    G,                    # *fp32 (N,) incoming gradient of KL
    DS,                   # *fp16|bf16|fp32 (N, V) out: gradient w.r.t. S, contiguous
    stride_s: tl.int64,
    stride_t: tl.int64,
    stride_g: tl.int64,   # element stride of G (0 for an expanded scalar)
    V: tl.int32,
    inv_temp: tl.float32,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(G + row * stride_g).to(tl.float32) * inv_temp
    n_read = V
    if HAS_MASK:  # a masked row is not read (its logits may be anything): its gradient is written as 0
        keep = tl.load(ROW_MASK + row) != 0
        g = tl.where(keep, g, 0.0)
        n_read = tl.where(keep, V, 0)
    lse_s = tl.load(LSE_S + row)
    lse_t = tl.load(LSE_T + row)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    d_row = DS + row * V
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        ok = c < V
        s = tl.load(s_row + c, mask=c < n_read, other=0.0).to(tl.float32) * inv_temp
        t = tl.load(t_row + c, mask=c < n_read, other=0.0).to(tl.float32) * inv_temp
        d = g * (tl.exp(s - lse_s) - tl.exp(t - lse_t))
        tl.store(d_row + c, d.to(DS.dtype.element_ty), mask=ok)


def _no_mask(device):
    """A 1-element int8 stand-in for ROW_MASK when HAS_MASK is False (same pointer type as the real mask)."""
    return torch.empty(1, dtype=torch.int8, device=device)


_BLOCKS_V = (128, 1024, 4096)  # the only chunk widths the launchers use (all built by check-kernels)


def _block_v(V: int) -> int:
    """Smallest of _BLOCKS_V covering the row, else 4096 (rows longer than that are streamed in chunks)."""
    return next((b for b in _BLOCKS_V if V <= b), _BLOCKS_V[-1])


def _warps(block_v: int) -> int:
    # 8 elements per thread at 1024 and 4096 (16-byte fp16 loads). At 4096 the fp16 backward with 8 warps
    # spilled 24 bytes on sm_90 (Triton 3.9); 16 warps build spill-free everywhere.
    return 4 if block_v <= 1024 else 16


def _config(V: int) -> dict:
    """The launch configuration of both kernels for rows of V classes (read by compile_specs() too)."""
    bv = _block_v(V)
    return dict(BLOCK_V=bv, num_warps=_warps(bv), num_stages=2)


@on_tensor_device
def kd_forward(student, teacher, temperature: float, row_mask=None):
    """Per-row KL(softmax(teacher / T) || softmax(student / T)) and the two logsumexps.

    Args:
        student: (N, V) student logits (fp16, bf16 or fp32), class dim contiguous.
        teacher: (N, V) teacher logits, same dtype and device.
        temperature: T > 0.
        row_mask: optional (N,) int8/bool, nonzero = real row; other rows give 0.
    Returns:
        kl (N,) fp32 in temperature-scaled units (not multiplied by T^2), lse_s (N,) fp32, lse_t (N,) fp32.
    """
    N, V = student.shape
    kl = torch.empty(N, dtype=torch.float32, device=student.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    if N == 0:
        return kl, lse_s, lse_t
    mask = row_mask if row_mask is not None else _no_mask(student.device)
    _kd_fwd_kernel[(N,)](student, teacher, mask, kl, lse_s, lse_t, student.stride(0), teacher.stride(0), V,
                         1.0 / temperature, HAS_MASK=row_mask is not None, **_config(V))
    return kl, lse_s, lse_t


@on_tensor_device
def kd_backward(grad_kl, student, teacher, lse_s, lse_t, temperature: float, row_mask=None):
    """Gradient of sum_i grad_kl[i] * KL_i w.r.t. the student logits.

    Args:
        grad_kl: (N,) incoming gradient (any stride, any float dtype).
        student, teacher, temperature, row_mask: as given to :func:`kd_forward`.
        lse_s, lse_t: (N,) fp32 from :func:`kd_forward`.
    Returns:
        (N, V) contiguous, in the student's dtype.
    """
    N, V = student.shape
    ds = torch.empty((N, V), dtype=student.dtype, device=student.device)
    if N == 0:
        return ds
    g = grad_kl if grad_kl.dtype == torch.float32 else grad_kl.float()
    mask = row_mask if row_mask is not None else _no_mask(student.device)
    _kd_bwd_kernel[(N,)](student, teacher, mask, lse_s, lse_t, g, ds, student.stride(0), teacher.stride(0),
                         g.stride(0), V, 1.0 / temperature, HAS_MASK=row_mask is not None, **_config(V))
    return ds


_TY = {"fp16": 2, "bf16": 2, "fp32": 4}


def compile_specs() -> list[CompileSpec]:
    """Every configuration the launchers choose: dtype x mask x BLOCK_V (the V=30522 vocab uses 4096)."""
    specs = []
    for ty in _TY:
        for has_mask in (False, True):
            for V in _BLOCKS_V:
                cfg = _config(V)
                label = f"{ty} BLOCK_V={cfg['BLOCK_V']}{' mask' if has_mask else ''}"
                specs.append(spec(
                    "_kd_fwd_kernel", _kd_fwd_kernel,
                    {"S": f"*{ty}", "T": f"*{ty}", "ROW_MASK": "*i8", "KL": "*fp32", "LSE_S": "*fp32",
                     "LSE_T": "*fp32", "stride_s": "i64", "stride_t": "i64", "V": "i32", "inv_temp": "fp32",
                     "HAS_MASK": "constexpr", "BLOCK_V": "constexpr"},
                    {"HAS_MASK": has_mask}, cfg, label + " fwd"))
                specs.append(spec(
                    "_kd_bwd_kernel", _kd_bwd_kernel,
                    {"S": f"*{ty}", "T": f"*{ty}", "ROW_MASK": "*i8", "LSE_S": "*fp32", "LSE_T": "*fp32",
                     "G": "*fp32", "DS": f"*{ty}", "stride_s": "i64", "stride_t": "i64", "stride_g": "i64",
                     "V": "i32", "inv_temp": "fp32", "HAS_MASK": "constexpr", "BLOCK_V": "constexpr"},
                    {"HAS_MASK": has_mask}, cfg, label + " bwd"))
    return specs


def cost(n_rows: int, vocab: int, elem_bytes: int = 2, backward: bool = True) -> list[Cost]:
    """Logit KD over (n_rows, vocab) logits: forward reads both once; backward reads both and writes dS.

    FLOPs count ~12 vector operations per element and side (scale, max, exp, sums) forward, ~8 backward.
    """
    n = float(n_rows) * vocab
    out = [Cost("kd.fwd", 12.0 * n, 2 * elem_bytes * n + 12.0 * n_rows)]
    if backward:
        out.append(Cost("kd.bwd", 8.0 * n, 3 * elem_bytes * n + 12.0 * n_rows))
    return out
