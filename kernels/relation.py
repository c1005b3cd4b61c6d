"""Flash-style relation KL: KL(softmax(A_t B_t^T * c_t) || softmax(A_s B_s^T * c_s)) per query row, never
writing an L x L matrix.

What it fuses: for a relation head r of a sequence, the teacher relation logits s_t = a_t b_t^T * c_t and the
student's s_s = a_s b_s^T * c_s (each (L, L)) are produced block by block in registers; for each query row the
kernel keeps the two online logsumexps and the running sum of exp(s_t - m_t) * (s_t - s_s), and writes
    KL_i = sum_j p_t,ij (s_t,ij - s_s,ij) - lse_t,i + lse_s,i
plus lse_t,i and lse_s,i (float32) for the backward, which recomputes both relation matrices block by block.
The same kernel is MiniLM's attention-distribution KL (a = q, b = k) and the self-relations of MiniLM v1
(value relation, a = b = v) and MiniLMv2 (Q-Q, K-K, V-V: a = b = x): relation heads are views that split the
concatenated head dimensions, so teacher and student may have different head counts and head dims.

Layout: each of the four inputs is addressed as x[b, l, r, d] = X + b*s_b + l*s_l + r*s_r + d (the last dim
contiguous; any other strides, e.g. q/k/v views of a fused QKV GEMM output). Two sequence descriptions:
  VARLEN  packed tokens of B sequences (T rows), cu_seqlens (B+1,); s_b unused; outputs (R, T).
  padded  (B, L) with an optional key/query mask (nonzero = real token, any pattern, left padding included);
          outputs (R, B*L), zero at padded query rows.
Statistics are float32. Teacher gradients are not computed: the teacher is a constant target.
Interpreter workaround (Triton 3.9): bf16 `tl.dot` multiplies raw bit patterns in the interpreter (FACTS.md,
triton-lang/triton#11584), so the launchers set DOT_F32=True when TRITON_INTERPRET=1 and the inputs are bf16:
tiles are upcast to fp32 before every dot there. On a GPU DOT_F32 is False (fp16/bf16 tensor-core dots with fp32
accumulation); fp32 inputs use input_precision="ieee" (no TF32) so fp32 results match the reference.
Limits: relation-head widths up to 128 (MAX_HEAD_DIM; one register tile per row block). Tiles by dtype and
width in _CONFIGS, all built spill-free by `fastdistil check-kernels` (sm_80, sm_90).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, check_grid, interpreting, next_power_of_2, on_tensor_device
from .spec import CompileSpec, Cost

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": no inf - inf = nan in the online rescale


@triton.jit
def _seq_bounds(CU, b, L, VARLEN: tl.constexpr):
    """(row of sequence b's first token in the packed / flattened (B*L) order, its length for the loops)."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    else:
        start = b.to(tl.int64) * L
        seqlen = L
    return start, seqlen


@triton.jit
def _base(start, b, r, s_b, s_l, s_r, VARLEN: tl.constexpr):
    """Element offset of relation head r's first row: packed sequences start at token `start`, padded ones at
    batch row b (int64 arithmetic)."""
    if VARLEN:
        off = start * s_l + r * s_r
    else:
        off = b.to(tl.int64) * s_b + r * s_r
    return off


@triton.jit
def _program(CU, L, VARLEN: tl.constexpr):
    """(sequence b, row block, relation head r, first row, length) of this program; sequences on axis 0, so more
    than 65,535 of them launch."""
    b = tl.program_id(0)
    r = tl.program_id(2).to(tl.int64)
    start, seqlen = _seq_bounds(CU, b, L, VARLEN)
    return b, tl.program_id(1), r, start, seqlen


@triton.jit
def _bases(start, b, r, sat_b, sat_l, sat_r, sbt_b, sbt_l, sbt_r, sas_b, sas_l, sas_r, sbs_b, sbs_l, sbs_r,
           VARLEN: tl.constexpr):
    """_base of the four inputs AT, BT, AS, BS."""
    return (_base(start, b, r, sat_b, sat_l, sat_r, VARLEN), _base(start, b, r, sbt_b, sbt_l, sbt_r, VARLEN),
            _base(start, b, r, sas_b, sas_l, sas_r, VARLEN), _base(start, b, r, sbs_b, sbs_l, sbs_r, VARLEN))


@triton.jit
def _real(MASK, start, offs, seqlen, HAS_MASK: tl.constexpr):
    """(inside the sequence, real token) flags of rows `offs` of the sequence starting at `start`."""
    inside = offs < seqlen
    real = inside
    if HAS_MASK:
        real = inside & (tl.load(MASK + start + offs, mask=inside, other=0) != 0)
    return inside, real


@triton.jit
def _logits(a_t, b_t, a_s, b_s, scale_t, scale_s, PREC: tl.constexpr):
    """Teacher and student relation logits of one block: (a b^T) * c, fp32 accumulation."""
    s_t = tl.dot(a_t, tl.trans(b_t), input_precision=PREC) * scale_t
    s_s = tl.dot(a_s, tl.trans(b_s), input_precision=PREC) * scale_s
    return s_t, s_s


@triton.jit
def _row_stats(LSE_T, LSE_S, G, sg_r, sg_n, r, N, start, offs, inside, real, scale_s):
    """The forward's saved logsumexps of rows `offs` and their incoming KL gradient (times c_s, 0 off real rows)."""
    rows = r * N + start + offs
    lse_t = tl.load(LSE_T + rows, mask=inside, other=0.0)
    lse_s = tl.load(LSE_S + rows, mask=inside, other=0.0)
    g = tl.load(G + r * sg_r + (start + offs) * sg_n, mask=inside, other=0.0).to(tl.float32)
    return lse_t, lse_s, tl.where(real, g * scale_s, 0.0)


@triton.jit
def _tile(X, base, rows, ok_rows, s_l, D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """Load rows (BLOCK,) x [0, D) of one relation head, zero outside; fp32 when DOT_F32."""
    d = tl.arange(0, BLOCK_D)
    x = tl.load(X + base + rows[:, None].to(tl.int64) * s_l + d[None, :],
                mask=ok_rows[:, None] & (d[None, :] < D), other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _relation_fwd_kernel(
    AT, BT, AS, BS,              # *fp16|bf16|fp32 teacher a, b and student a, b (see layout above)
    sat_b: tl.int64, sat_l: tl.int64, sat_r: tl.int64,  # strides of AT: batch, token, relation head
    sbt_b: tl.int64, sbt_l: tl.int64, sbt_r: tl.int64,  # strides of BT
    sas_b: tl.int64, sas_l: tl.int64, sas_r: tl.int64,  # strides of AS
    sbs_b: tl.int64, sbs_l: tl.int64, sbs_r: tl.int64,  # strides of BS
    CU,                          # *int32 (B+1,) cu_seqlens (VARLEN)
    MASK,                        # *int8 (B, L) real-token mask, contiguous (HAS_MASK)
    KL, LSE_T, LSE_S,            # *fp32 (R, N) outputs, contiguous
    N: tl.int64,                 # rows per relation head in the outputs (T, or B*L)
    L: tl.int32,                 # padded length (unused when VARLEN)
    scale_t: tl.float32, scale_s: tl.float32,
    DT: tl.constexpr, DS: tl.constexpr,            # relation-head dims of teacher and student
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,  # their power-of-two tiles (>= 16)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    b, pid_m, r, start, seqlen = _program(CU, L, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    bat, bbt, bas, bbs = _bases(start, b, r, sat_b, sat_l, sat_r, sbt_b, sbt_l, sbt_r, sas_b, sas_l, sas_r,
                                sbs_b, sbs_l, sbs_r, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m, real_m = _real(MASK, start, offs_m, seqlen, HAS_MASK)
    a_t = _tile(AT, bat, offs_m, in_m, sat_l, DT, BLOCK_DT, DOT_F32)  # (BLOCK_M, BLOCK_DT)
    a_s = _tile(AS, bas, offs_m, in_m, sas_l, DS, BLOCK_DS, DOT_F32)  # (BLOCK_M, BLOCK_DS)
    m_t = tl.full((BLOCK_M,), _NEG, tl.float32)
    m_s = tl.full((BLOCK_M,), _NEG, tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)  # sum_j exp(s_t,ij - m_t,i) * (s_t,ij - s_s,ij)
    for n0 in range(0, seqlen, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n, real_n = _real(MASK, start, offs_n, seqlen, HAS_MASK)
        b_t = _tile(BT, bbt, offs_n, in_n, sbt_l, DT, BLOCK_DT, DOT_F32)  # (BLOCK_N, BLOCK_DT)
        b_s = _tile(BS, bbs, offs_n, in_n, sbs_l, DS, BLOCK_DS, DOT_F32)
        s_t, s_s = _logits(a_t, b_t, a_s, b_s, scale_t, scale_s, PREC)  # (BLOCK_M, BLOCK_N) fp32
        ok = real_n[None, :]
        s_t_ok = tl.where(ok, s_t, _NEG)  # masked keys: exp(_NEG - m) is 0 (or 1, zeroed below), never inf
        s_s_ok = tl.where(ok, s_s, _NEG)
        m_t_new = tl.maximum(m_t, tl.max(s_t_ok, axis=1))
        m_s_new = tl.maximum(m_s, tl.max(s_s_ok, axis=1))
        e_t = tl.where(ok, tl.exp(s_t_ok - m_t_new[:, None]), 0.0)
        e_s = tl.where(ok, tl.exp(s_s_ok - m_s_new[:, None]), 0.0)
        alpha_t = tl.exp(m_t - m_t_new)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        acc = acc * alpha_t + tl.sum(e_t * (s_t - s_s), axis=1)
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(e_s, axis=1)
        m_t = m_t_new
        m_s = m_s_new
    real_m = real_m & (l_t > 0.0)
    l_t = tl.where(real_m, l_t, 1.0)
    l_s = tl.where(real_m, l_s, 1.0)
    lse_t = m_t + tl.log(l_t)
    lse_s = m_s + tl.log(l_s)
    kl = acc / l_t - lse_t + lse_s
    out = r * N + start + offs_m
    tl.store(KL + out, tl.where(real_m, kl, 0.0), mask=in_m)
    # Padded query rows store lse = +1e30 so that the backward's exp(s - lse) is 0 there, not an overflow.
    tl.store(LSE_T + out, tl.where(real_m, lse_t, -_NEG), mask=in_m)
    tl.store(LSE_S + out, tl.where(real_m, lse_s, -_NEG), mask=in_m)


# Backward (student side only). With s_s = c_s a_s b_s^T and KL_i = sum_j p_t,ij (s_t,ij - s_s,ij) - lse_t,i
# + lse_s,i, dKL_i/ds_s,ij = p_s,ij - p_t,ij. So with g_i the incoming gradient of KL_i,
#     dS_ij = g_i (p_s,ij - p_t,ij) c_s,     dA_s = dS B_s,     dB_s = dS^T A_s,
# p_t = exp(s_t - lse_t), p_s = exp(s_s - lse_s) recomputed from the saved float32 logsumexps. The tensor-core
# dots take p_s - p_t (bounded by 1) in the input dtype and g is applied in fp32 around them (see the dB branch).
# One kernel, two launches: WRT_B=False walks query blocks (dA_s rows, keys streamed), WRT_B=True walks key
# blocks (dB_s rows, queries streamed): no atomics, every gradient row written exactly once.
@triton.jit
def _relation_bwd_kernel(
    AT, BT, AS, BS,
    sat_b: tl.int64, sat_l: tl.int64, sat_r: tl.int64,
    sbt_b: tl.int64, sbt_l: tl.int64, sbt_r: tl.int64,
    sas_b: tl.int64, sas_l: tl.int64, sas_r: tl.int64,
    sbs_b: tl.int64, sbs_l: tl.int64, sbs_r: tl.int64,
    CU, MASK, LSE_T, LSE_S,      # cu_seqlens, mask, and the forward's *fp32 (R, N) logsumexps
    G,                           # *fp32 (R, N) incoming gradient of KL, strides sg_r, sg_n (may be 0)
    sg_r: tl.int64, sg_n: tl.int64,
    DX,                          # *dtype out: gradient of AS (WRT_B False) or BS (True), strides sdx_*
    sdx_b: tl.int64, sdx_l: tl.int64, sdx_r: tl.int64,
    N: tl.int64, L: tl.int32,
    scale_t: tl.float32, scale_s: tl.float32,
    DT: tl.constexpr, DS: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    WRT_B: tl.constexpr,
):
    b, pid, r, start, seqlen = _program(CU, L, VARLEN)
    if WRT_B:
        first = pid * BLOCK_N
    else:
        first = pid * BLOCK_M
    if first >= seqlen:
        return
    bat, bbt, bas, bbs = _bases(start, b, r, sat_b, sat_l, sat_r, sbt_b, sbt_l, sbt_r, sas_b, sas_l, sas_r,
                                sbs_b, sbs_l, sbs_r, VARLEN)
    if WRT_B:
        offs = first + tl.arange(0, BLOCK_N)
        in_n, real_n = _real(MASK, start, offs, seqlen, HAS_MASK)
        b_t = _tile(BT, bbt, offs, in_n, sbt_l, DT, BLOCK_DT, DOT_F32)  # (BLOCK_N, BLOCK_DT)
        b_s = _tile(BS, bbs, offs, in_n, sbs_l, DS, BLOCK_DS, DOT_F32)
        db = tl.zeros((BLOCK_N, BLOCK_DS), tl.float32)
        for m0 in range(0, seqlen, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_m, real_m = _real(MASK, start, offs_m, seqlen, HAS_MASK)
            lse_t, lse_s, g = _row_stats(LSE_T, LSE_S, G, sg_r, sg_n, r, N, start, offs_m, in_m, real_m,
                                         scale_s)
            a_t = _tile(AT, bat, offs_m, in_m, sat_l, DT, BLOCK_DT, DOT_F32)
            a_s = _tile(AS, bas, offs_m, in_m, sas_l, DS, BLOCK_DS, DOT_F32)
            # Transposed relation blocks (keys x queries), as FlashAttention-2 computes dK: the gradient dot then
            # takes dS^T directly, with no transpose of a computed fp32 tile (that spilled heavily for fp32).
            s_tT, s_sT = _logits(b_t, a_t, b_s, a_s, scale_t, scale_s, PREC)  # (BLOCK_N, BLOCK_M)
            okT = real_n[:, None] & real_m[None, :]
            p_tT = tl.where(okT, tl.exp(s_tT - lse_t[None, :]), 0.0)
            p_sT = tl.where(okT, tl.exp(s_sT - lse_s[None, :]), 0.0)
            # g varies along the streamed rows, so it cannot be applied after the dot: normalise it by the block's
            # largest |g| (a mean's 1/(R*N) would underflow fp16 times small dp) and scale back in fp32.
            g_ref = tl.max(tl.abs(g), axis=0)
            g_ref = tl.where(g_ref > 0.0, g_ref, 1.0)
            dsT = (g / g_ref)[None, :] * (p_sT - p_tT)  # (BLOCK_N, BLOCK_M)
            db += g_ref * tl.dot(dsT.to(a_s.dtype), a_s, input_precision=PREC)
        dx, inside = db, in_n
    else:
        offs = first + tl.arange(0, BLOCK_M)
        in_m, real_m = _real(MASK, start, offs, seqlen, HAS_MASK)
        lse_t, lse_s, g = _row_stats(LSE_T, LSE_S, G, sg_r, sg_n, r, N, start, offs, in_m, real_m, scale_s)
        a_t = _tile(AT, bat, offs, in_m, sat_l, DT, BLOCK_DT, DOT_F32)
        a_s = _tile(AS, bas, offs, in_m, sas_l, DS, BLOCK_DS, DOT_F32)
        da = tl.zeros((BLOCK_M, BLOCK_DS), tl.float32)
        for n0 in range(0, seqlen, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_n, real_n = _real(MASK, start, offs_n, seqlen, HAS_MASK)
            b_t = _tile(BT, bbt, offs_n, in_n, sbt_l, DT, BLOCK_DT, DOT_F32)
            b_s = _tile(BS, bbs, offs_n, in_n, sbs_l, DS, BLOCK_DS, DOT_F32)
            s_t, s_s = _logits(a_t, b_t, a_s, b_s, scale_t, scale_s, PREC)
            ok = real_m[:, None] & real_n[None, :]
            p_t = tl.where(ok, tl.exp(s_t - lse_t[:, None]), 0.0)
            p_s = tl.where(ok, tl.exp(s_s - lse_s[:, None]), 0.0)
            dp = p_s - p_t  # (BLOCK_M, BLOCK_N), |dp| <= 1: safe to round to fp16 (g_i * dp could underflow)
            da += tl.dot(dp.to(b_s.dtype), b_s, input_precision=PREC)
        dx, inside = da * g[:, None], in_m
    d = tl.arange(0, BLOCK_DS)
    bdx = _base(start, b, r, sdx_b, sdx_l, sdx_r, VARLEN)
    tl.store(DX + bdx + offs[:, None].to(tl.int64) * sdx_l + d[None, :], dx.to(DX.dtype.element_ty),
             mask=inside[:, None] & (d[None, :] < DS))


# ----------------------------------------------------------------------------------------------- launchers
def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


# Tile configurations (BLOCK_M, BLOCK_N, num_warps) by dtype class, kernel and the summed padded relation-head
# widths S = BLOCK_DT + BLOCK_DS. Chosen from spill-free builds for sm_80 and sm_90 with Triton 3.9: this kernel
# keeps two relation tiles (teacher and student) live where FlashAttention keeps one, so its tiles are smaller;
# fp32 uses ieee FMA dots whose operands live in registers, hence the smallest tiles.
_TIERS = (96, 128, 256)  # S at most; relation-head widths are capped at 128 (BLOCK_D <= 128)
_CONFIGS = {
    ("16bit", "fwd"): ((64, 64, 4), (64, 64, 4), (32, 32, 4)),
    ("16bit", "bwd"): ((32, 64, 4), (32, 32, 4), (32, 32, 8)),
    ("fp32", "fwd"): ((32, 32, 8), (32, 32, 8), (16, 16, 4)),
    ("fp32", "bwd"): ((32, 32, 8), (32, 32, 8), (16, 16, 4)),
}
MAX_HEAD_DIM = 128
NUM_STAGES = 2  # every relation kernel, launched and built alike


def _config(dt: int, ds: int, dtype_class: str, kind: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for relation-head widths dt, ds; dtype_class "16bit" or "fp32";
    kind "fwd" or "bwd" (both backward kernels share one configuration)."""
    width = _block_d(dt) + _block_d(ds)
    tier = next(i for i, t in enumerate(_TIERS) if width <= t)
    return _CONFIGS[(dtype_class, kind)][tier]


def _dtype_class(dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_f32(dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def _strides(x):
    """(s_b, s_l, s_r) of a (T, R, D) packed or (B, L, R, D) padded view with a contiguous last dim."""
    if x.dim() == 3:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _aux(cu_seqlens, mask, device):
    """CU (int32) and MASK (int8) pointers; 1-element stand-ins of the same types when a mode does not use one."""
    cu = cu_seqlens if cu_seqlens is not None else torch.empty(1, dtype=torch.int32, device=device)
    mk = mask if mask is not None else torch.empty(1, dtype=torch.int8, device=device)
    return cu, mk


def _geometry(a_s, cu_seqlens, max_seqlen):
    if a_s.dim() == 3:
        return cu_seqlens.shape[0] - 1, int(max_seqlen), a_s.shape[0], True
    B, L = a_s.shape[0], a_s.shape[1]
    return B, L, B * L, False


@on_tensor_device
def relation_forward(a_s, b_s, a_t, b_t, scale_s: float, scale_t: float, cu_seqlens=None, max_seqlen=None,
                     mask=None):
    """Per-row relation KL and the two logsumexps, without an L x L buffer.

    Args:
        a_s, b_s: student (T, R, Ds) packed or (B, L, R, Ds) padded views, last dim contiguous.
        a_t, b_t: teacher (T, R, Dt) or (B, L, R, Dt), same dtype and device as the student's.
        scale_s, scale_t: the multipliers c_s, c_t of the relation logits.
        cu_seqlens: (B+1,) int32 for packed inputs; max_seqlen: their longest length (int).
        mask: optional (B, L) int8 real-token mask for padded inputs.
    Returns:
        kl, lse_t, lse_s: (R, N) float32, N = T or B*L; kl is 0 at padded query rows.
    """
    B, L, N, varlen = _geometry(a_s, cu_seqlens, max_seqlen)
    R, Ds, Dt = a_s.shape[-2], a_s.shape[-1], a_t.shape[-1]
    kl = torch.empty((R, N), dtype=torch.float32, device=a_s.device)
    lse_t, lse_s = torch.empty_like(kl), torch.empty_like(kl)
    if N == 0 or B == 0 or L == 0:
        return kl.zero_(), lse_t.zero_(), lse_s.zero_()
    if max(Dt, Ds) > MAX_HEAD_DIM:
        raise ValueError(f"relation-head widths up to {MAX_HEAD_DIM} are supported, got teacher {Dt}, student {Ds}")
    bm, bn, warps = _config(Dt, Ds, _dtype_class(a_s.dtype), "fwd")
    cu, mk = _aux(cu_seqlens if varlen else None, mask, a_s.device)
    grid = check_grid((B, cdiv(L, bm), R))
    _relation_fwd_kernel[grid](
        a_t, b_t, a_s, b_s, *_strides(a_t), *_strides(b_t), *_strides(a_s), *_strides(b_s),
        cu, mk, kl, lse_t, lse_s, N, L,
        scale_t, scale_s, DT=Dt, DS=Ds, BLOCK_DT=_block_d(Dt), BLOCK_DS=_block_d(Ds), BLOCK_M=bm, BLOCK_N=bn,
        VARLEN=varlen, HAS_MASK=mask is not None, DOT_F32=_dot_f32(a_s.dtype), PREC=_prec(a_s.dtype),
        num_warps=warps, num_stages=NUM_STAGES)
    return kl, lse_t, lse_s


@on_tensor_device
def relation_backward(grad_kl, a_s, b_s, a_t, b_t, lse_t, lse_s, scale_s: float, scale_t: float,
                      cu_seqlens=None, max_seqlen=None, mask=None, need_a: bool = True, need_b: bool = True):
    """Gradients of sum(grad_kl * KL) w.r.t. the student's a_s and b_s (recomputing the relations).

    Args:
        grad_kl: (R, N) incoming gradient, any strides (a reduction's expanded gradient works).
        a_s, b_s, a_t, b_t, scale_s, scale_t, cu_seqlens, max_seqlen, mask: as given to the forward.
        lse_t, lse_s: (R, N) float32 from :func:`relation_forward`.
        need_a, need_b: which gradients to compute.
    Returns:
        (d_a_s or None, d_b_s or None), contiguous, in the student's dtype, zero at padded rows.
    """
    B, L, N, varlen = _geometry(a_s, cu_seqlens, max_seqlen)
    R, Ds, Dt = a_s.shape[-2], a_s.shape[-1], a_t.shape[-1]
    g = grad_kl if grad_kl.dtype == torch.float32 else grad_kl.float()
    bm, bn, warps = _config(Dt, Ds, _dtype_class(a_s.dtype), "bwd")
    consts = dict(DT=Dt, DS=Ds, BLOCK_DT=_block_d(Dt), BLOCK_DS=_block_d(Ds), BLOCK_M=bm, BLOCK_N=bn,
                  VARLEN=varlen, HAS_MASK=mask is not None, DOT_F32=_dot_f32(a_s.dtype), PREC=_prec(a_s.dtype),
                  num_warps=warps, num_stages=NUM_STAGES)
    cu, mk = _aux(cu_seqlens if varlen else None, mask, a_s.device)
    common = (a_t, b_t, a_s, b_s, *_strides(a_t), *_strides(b_t), *_strides(a_s), *_strides(b_s), cu, mk, lse_t, lse_s,
              g, g.stride(0), g.stride(1))
    empty = N == 0 or B == 0 or L == 0
    da = db = None
    if need_a:
        da = torch.empty(a_s.shape, dtype=a_s.dtype, device=a_s.device)  # every row is written (padded: 0)
        if empty:
            da.zero_()
        else:
            _relation_bwd_kernel[check_grid((B, cdiv(L, bm), R))](*common, da, *_strides(da), N, L, scale_t,
                                                                         scale_s, WRT_B=False, **consts)
    if need_b:
        db = torch.empty(b_s.shape, dtype=b_s.dtype, device=b_s.device)
        if empty:
            db.zero_()
        else:
            _relation_bwd_kernel[check_grid((B, cdiv(L, bn), R))](*common, db, *_strides(db), N, L, scale_t,
                                                                         scale_s, WRT_B=True, **consts)
    return da, db


# ------------------------------------------------------------------------------------------- protocol
_TY = ("fp16", "bf16", "fp32")
# (teacher, student) relation-head widths: MiniLM v1 / MiniLMv2 with 12 relation heads on a base teacher and a
# 384-wide student (64, 32); 48 relation heads (16, 8); equal widths (32, 32), (64, 64); wide heads (128, 128),
# (128, 32). Together they reach every tile configuration of every tier in _CONFIGS.
_DIMS = ((64, 32), (32, 32), (16, 8), (64, 64), (128, 128), (128, 32))


def _signature(ty: str, kind: str) -> dict:
    sig = {n: f"*{ty}" for n in ("AT", "BT", "AS", "BS")}
    for x in ("at", "bt", "as", "bs"):
        for s in ("b", "l", "r"):
            sig[f"s{x}_{s}"] = "i64"
    sig.update({"CU": "*i32", "MASK": "*i8"})
    if kind == "fwd":
        sig.update({"KL": "*fp32", "LSE_T": "*fp32", "LSE_S": "*fp32"})
    else:
        sig.update({"LSE_T": "*fp32", "LSE_S": "*fp32", "G": "*fp32", "sg_r": "i64", "sg_n": "i64",
                    "DX": f"*{ty}", "sdx_b": "i64", "sdx_l": "i64", "sdx_r": "i64"})
    sig.update({"N": "i64", "L": "i32", "scale_t": "fp32", "scale_s": "fp32"})
    for c in ("DT", "DS", "BLOCK_DT", "BLOCK_DS", "BLOCK_M", "BLOCK_N", "VARLEN", "HAS_MASK", "DOT_F32", "PREC"):
        sig[c] = "constexpr"
    if kind != "fwd":
        sig["WRT_B"] = "constexpr"
    return sig


# Arguments the JIT launcher sees 16-divisible for aligned tensors of the model's shapes (pointers, row strides:
# 3*d of a fused QKV view or H*D; relation-head strides of 16-wide multiples).
_ALIGNED = {k: ("AT", "BT", "AS", "BS", "LSE_T", "LSE_S", "sat_l", "sbt_l", "sas_l", "sbs_l")
            + (("KL",) if k == "fwd" else ("DX", "sdx_l")) for k in ("fwd", "da", "db")}


def compile_specs() -> list[CompileSpec]:
    """dtype x (Dt, Ds) x {varlen, padded+mask} x {fwd, dA, dB}, with the launchers' own tile choice."""
    kernels = {"fwd": _relation_fwd_kernel, "da": _relation_bwd_kernel, "db": _relation_bwd_kernel}
    specs = []
    for ty in _TY:
        for dt, ds in _DIMS:
            for varlen, has_mask in ((True, False), (False, True), (False, False)):
                for kind, fn in kernels.items():
                    cls = "fp32" if ty == "fp32" else "16bit"
                    bm, bn, warps = _config(dt, ds, cls, "fwd" if kind == "fwd" else "bwd")
                    consts = {"DT": dt, "DS": ds, "BLOCK_DT": _block_d(dt), "BLOCK_DS": _block_d(ds),
                              "BLOCK_M": bm, "BLOCK_N": bn, "VARLEN": varlen, "HAS_MASK": has_mask,
                              "DOT_F32": False, "PREC": "ieee" if ty == "fp32" else "tf32"}
                    if kind != "fwd":
                        consts["WRT_B"] = kind == "db"
                    specs.append(CompileSpec(
                        fn.__name__, fn, _signature(ty, kind), consts,
                        f"{ty} Dt={dt} Ds={ds} {'varlen' if varlen else 'padded+mask' if has_mask else 'padded'} "
                        f"{kind}",
                        num_warps=warps, num_stages=NUM_STAGES, expect_tensor_cores=ty != "fp32",
                        extra={"ieee": ty == "fp32", "divisible_by_16": _ALIGNED[kind]}))
    return specs


def cost(seqlens, relation_heads: int, dt: int, ds: int, elem_bytes: int = 2, backward: bool = True) -> list[Cost]:
    """One relation KL over sequences of lengths `seqlens` (packed; a padded batch: its padded lengths).

    Forward: two relation GEMMs per head and sequence (2 * L^2 * (Dt + Ds) FLOPs, tensor cores) plus ~12 vector
    ops per L x L element (exp, max, sums; listed as a separate zero-byte entry at the vector rate); it reads the
    four inputs once (re-reads per query block hit L2 at these sizes) and writes 3 x R x T fp32. Backward: the dA
    and dB kernels each recompute both relation GEMMs, add one gradient GEMM, and write one input gradient.
    """
    lens = [int(x) for x in seqlens]
    n = float(sum(lens))
    e = float(relation_heads) * sum(x * x for x in lens)  # L x L elements over all heads and sequences
    io = elem_bytes * n * relation_heads * 2 * (dt + ds)
    stats = 4.0 * relation_heads * n
    out = [Cost("relation.fwd", 2.0 * e * (dt + ds), io + 3 * stats, 1, True),
           Cost("relation.fwd.vector", 12.0 * e, 0.0, 0, False)]
    if backward:
        for k in ("dA", "dB"):
            out.append(Cost(f"relation.bwd.{k}", 2.0 * e * (dt + 2 * ds),
                            io + elem_bytes * n * relation_heads * ds + 3 * stats, 1, True))
            out.append(Cost(f"relation.bwd.{k}.vector", 10.0 * e, 0.0, 0, False))
    return out
