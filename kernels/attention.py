"""Flash-style attention for small encoders: forward and backward, padded (B, H, L, D) and packed varlen (T, H, D).

What it fuses: S = scale * Q K^T, the key-padding mask, an online (streaming) softmax, dropout on the
probabilities and P V, in one kernel per (query block, batch x head); the L x L matrices never reach memory.
The backward recomputes P from the saved log-sum-exp (no stored probabilities) and regenerates the dropout mask
from the same counter-based RNG (Philox, ``tl.philox``): nothing of size L x L is ever stored.

Layout assumptions:
- q, k, v may be any strided views whose last (head_dim) stride is 1, e.g. the model's ``qkv.view(T, 3, H, D)
  .unbind(1)``: batch, head and token strides are kernel arguments, so no copy is made. Outputs (o, dq, dk, dv) are
  fresh contiguous tensors of the input's shape.
- padded form: q (B, H, L, D), optional key mask (B, L) int8 (nonzero = real key); a query row attends to the real
  keys of its batch row (padded query rows included, as in transformers and the reference).
- varlen form: q (T, H, D) packed, ``cu_seqlens`` (B+1,) int32 prefix sums; sequence b is tokens
  cu_seqlens[b]:cu_seqlens[b+1]; grids are sized by ``max_seqlen``; programs past their sequence's end return.
- LSE and delta are fp32, stored as (B, H, L) (padded) or (H, T) (varlen), in log2 units (the kernels use exp2):
  lse2 = m2 + log2(l) with m2 the running max of S*log2(e). A row without any real key stores +inf, so that
  exp2(s - lse2) = 0 in the backward: its output and all its gradients are exactly zero, never NaN.
- padded form: the kernels always take the key mask (the launcher passes ones when there is none: B*L bytes),
  which halves the number of builds; the varlen form never reads one.
- Dropout keeps probability (b, h, i, j) when uniform(r) >= p, r one of the four words of Philox-4x32-10 with
  counter (i * ceil(L/4) + j // 4, b*H + h, 0, 0) and the 64-bit seed as key (word j % 4): one Philox call per
  four probabilities, 32-bit counters (L < 65536 when dropping out; L is the padded length or max_seqlen, i, j
  positions within the sequence). Kept values are scaled by 1/(1-p). :func:`dropout_keep_mask` materialises the
  same mask for tests.

Grid: (batch x heads, sequence blocks) for every kernel (:func:`grid`): batch x heads on axis 0, which CUDA allows
up to 2^31 - 1 blocks (axis 1 stops at 65,535, which 5,462 sequences of 12 heads would pass).

Block sizes (``_fwd_config`` / ``_bwd_config`` / ``_delta_config``), chosen per head_dim and dtype so that no
configuration spills on sm_80 or sm_90 (``fastdistil check-kernels`` proves it; the tables say which neighbour
spilled): forward 64 x 64 tiles for head_dim <= 64 in fp16 and bf16 (BERT's L=128 gives 2 query blocks per head; a
128-row block would halve the grid at small batch), 64 x 32 at 128; backward 64 x 64 up to head_dim 32, then 32;
fp32 (ieee FMA dots hold whole operand tiles in registers) 32 x 32, 16 x 16 for the head_dim 128 backward.

Precision: statistics, accumulators and the softmax are fp32; P and dS are cast to the input dtype before their
GEMMs (as in FlashAttention). fp32 inputs use ``input_precision="ieee"`` (full fp32 FMA, no TF32 tensor cores), so
the fp32 accuracy the tests claim holds on a GPU too.
Interpreter workaround (Triton 3.9): bf16 ``tl.dot`` is wrong under TRITON_INTERPRET=1 (it multiplies the raw bit
patterns; triton-lang/triton#11584), so when interpreting, bf16 launches set the constexpr ``DOT_F32`` that upcasts
the dot operands to fp32. GPU builds never set it; the bf16 GPU code is the fp16 code with another element type.

Limits: head_dim in {16, 32, 64, 128}; fp16, bf16, fp32 (the op layer sends other head dims and fp64 to the
torch reference); non-causal only (encoders); int32 token indices within a sequence (L < 2^31), int64 addresses.
Triton versions: developed against 3.9; uses tl.join (3.0+) and tl.dot(input_precision=...) (3.0+), nothing newer.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


from .launch import cdiv, check_grid, interpreting, on_tensor_device
from .spec import CompileSpec, Cost, spec

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b; DOT_F32 upcasts the operands (interpreter-only bf16 workaround, see the file header)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _keep(seed, bh, offs_i, j0, L, dropout_p, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Dropout keep-mask (BLOCK_I, BLOCK_J) of query rows offs_i x keys j0 .. j0+BLOCK_J of head bh.

    One Philox-4x32 call yields the four keys 4g .. 4g+3 of a row: counter (i * ceil(L/4) + g, bh, 0, 0), key =
    the 64-bit seed; uniform u = uint_to_uniform_float(r), kept when u >= p. 32-bit counters: needs L < 2^16 when
    dropping out (the launcher checks). j0 must be a multiple of 4 (block starts are).
    """
    offs_g = j0 // 4 + tl.arange(0, BLOCK_J // 4)
    c0 = offs_i[:, None] * ((L + 3) // 4) + offs_g[None, :]                      # (BLOCK_I, BLOCK_J // 4)
    r0, r1, r2, r3 = tl.philox(seed, c0, bh, 0, 0)
    k01 = tl.join(tl.uint_to_uniform_float(r0) >= dropout_p, tl.uint_to_uniform_float(r1) >= dropout_p)
    k23 = tl.join(tl.uint_to_uniform_float(r2) >= dropout_p, tl.uint_to_uniform_float(r3) >= dropout_p)
    return tl.reshape(tl.join(k01, k23), (BLOCK_I, BLOCK_J))                       # key 4g + 2x + y <- r_(2x+y)


@triton.jit
def _attn_fwd(
    Q, K, V,                                  # *T   inputs, head_dim stride 1
    O,                                        # *T   output, strides stride_o*
    LSE,                                      # *fp32 (B, H, L) or (H, T): log2-sum-exp per query row
    KeyMask,                                  # *i8  (B, L) nonzero = real key (HAS_MASK) or None
    CuSeqlens,                                # *i32 (B+1,) (VARLEN) or None
    Seed,                                     # *i64 (1,) dropout seed (DROPOUT) or None
    stride_qb, stride_qh, stride_qm,          # i32/i64 element strides of Q (batch stride 0 when VARLEN)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,                     # LSE strides (the token stride is 1)
    stride_mb,                                # KeyMask batch stride
    H,                                        # i32 heads
    L,                                        # i32 padded length, or max_seqlen when VARLEN
    qk_scale,                                 # fp32 softmax_scale * log2(e)
    dropout_p,                                # fp32
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One (BLOCK_M query rows) x (batch b, head h) tile: O = softmax(S) V with the online softmax.

    Args: see the comments on each argument. Returns: nothing; writes O and LSE for its rows.
    """
    bh = tl.program_id(0)                     # batch x head on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    if VARLEN:
        start = tl.load(CuSeqlens + b).to(tl.int64)
        seqlen = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
    else:
        start = tl.zeros((), tl.int64)
        seqlen = L
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + (start + offs_m[:, None]) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)                       # (BLOCK_M, D)
    k_base = K + b64 * stride_kb + h64 * stride_kh + start * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + start * stride_vn
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)                        # running max of S*log2(e)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                                      # running sum of exp2(S - m)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        offs_n = n0 + offs_n0
        col_ok = offs_n < seqlen
        if HAS_MASK:
            km = tl.load(KeyMask + b64 * stride_mb + offs_n, mask=col_ok, other=0)
            col_ok = col_ok & (km != 0)
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                     mask=(offs_n < seqlen)[None, :], other=0.0)                # (D, BLOCK_N)
        s = _dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PRECISION, DOT_F32) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                   # no real key yet: avoid inf-inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, n0, L, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                    mask=(offs_n < seqlen)[:, None], other=0.0)                 # (BLOCK_N, D)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, DOT_F32)
        m_i = m_new

    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    o_ptrs = O + b64 * stride_ob + h64 * stride_oh + (start + offs_m[:, None]) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + start + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(
    O, DO,                                    # *T   forward output and its gradient
    Delta,                                    # *fp32 rowsum(dO * O), laid out like LSE
    CuSeqlens,                                # *i32 (B+1,) (VARLEN) or None
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    stride_lb, stride_lh,                     # Delta strides (token stride 1)
    H, L,                                     # i32
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    """Backward preprocessing: delta_i = sum_d dO_id O_id (fp32), one value per query row."""
    bh = tl.program_id(0)                     # batch x head on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    if VARLEN:
        start = tl.load(CuSeqlens + b).to(tl.int64)
        seqlen = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
    else:
        start = tl.zeros((), tl.int64)
        seqlen = L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = (start + offs_m[:, None])
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + rows * stride_om + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + rows * stride_dm + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + start + offs_m, tl.sum(o * do, 1), mask=row_ok)


# Backward maths (per batch x head; s = scale, Z the 0/1 keep mask, r = 1/(1-p)):
#   S = s Q K^T,  P = softmax(S) row-wise (recomputed as exp2(S log2e - lse2)),  Pd = r Z * P,  O = Pd V
#   dV  = Pd^T dO
#   dPd = dO V^T,   dP = r Z * dPd
#   dS  = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_j Pd_ij dPd_ij = rowsum(dO * O)_i
#   dQ  = s dS K,   dK = s dS^T Q
# Masked keys have P = 0, so their dK, dV are 0 and they add nothing to dQ; rows with no real key have lse2 = +inf,
# P = 0 and delta = 0 (O = 0), so every gradient they touch is 0.
# One program owns key block j (dK_j, dV_j: a loop over all query blocks) and query block j (dQ_j: a loop over all
# key blocks), so no atomics are needed and the result is deterministic; S and P are recomputed in both loops.
@triton.jit
def _attn_bwd(
    Q, K, V, DO,                              # *T   inputs and dO (head_dim stride 1)
    DQ, DK, DV,                               # *T   outputs, strides stride_dq* (shared by DQ, DK, DV)
    LSE, Delta,                               # *fp32 laid out as in the forward
    KeyMask,                                  # *i8  (B, L) (HAS_MASK) or None
    CuSeqlens,                                # *i32 (B+1,) (VARLEN) or None
    Seed,                                     # *i64 (1,) (DROPOUT) or None
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,          # dO strides
    stride_gb, stride_gh, stride_gm,          # dQ / dK / dV strides
    stride_lb, stride_lh,                     # LSE / Delta strides (token stride 1)
    stride_mb,                                # KeyMask batch stride
    H, L,                                     # i32 heads, padded length or max_seqlen
    softmax_scale,                            # fp32
    qk_scale,                                 # fp32 softmax_scale * log2(e)
    dropout_p,                                # fp32
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dK, dV of key block `program_id(1)` and dQ of query block `program_id(1)` for batch x head `program_id(0)`.

    Args: see the comments on each argument. Returns: nothing; writes DQ, DK, DV for its rows.
    """
    bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = bh // H
    h = bh % H
    if VARLEN:
        start = tl.load(CuSeqlens + b).to(tl.int64)
        seqlen = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
    else:
        start = tl.zeros((), tl.int64)
        seqlen = L
    j0 = pid * BLOCK
    if j0 >= seqlen:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = tl.arange(0, BLOCK)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + start * stride_qm
    k_base = K + b64 * stride_kb + h64 * stride_kh + start * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + start * stride_vn
    do_base = DO + b64 * stride_db + h64 * stride_dh + start * stride_dm
    g_off = b64 * stride_gb + h64 * stride_gh + start * stride_gm
    l_base = b64 * stride_lb + h64 * stride_lh + start
    if DROPOUT:
        seed = tl.load(Seed)
        r = 1.0 / (1.0 - dropout_p)

    # ---- dK, dV of keys j0 .. j0+BLOCK (transposed tiles: rows = keys, columns = queries) ----
    offs_n = j0 + offs_b
    key_in = offs_n < seqlen
    key_ok = key_in
    if HAS_MASK:
        km = tl.load(KeyMask + b64 * stride_mb + offs_n, mask=key_in, other=0)
        key_ok = key_ok & (km != 0)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=key_in[:, None],
                other=0.0)                                                      # (BLOCK_N, D)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=key_in[:, None],
                other=0.0)
    dk = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    for m0 in range(0, seqlen, BLOCK):
        offs_m = m0 + offs_b
        q_in = offs_m < seqlen
        qt = tl.load(q_base + offs_m[None, :].to(tl.int64) * stride_qm + offs_d[:, None], mask=q_in[None, :],
                     other=0.0)                                                 # (D, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :], mask=q_in[:, None],
                     other=0.0)                                                 # (BLOCK_M, D)
        lse = tl.load(LSE + l_base + offs_m, mask=q_in, other=float("inf"))
        delta = tl.load(Delta + l_base + offs_m, mask=q_in, other=0.0)
        st = _dot(k, qt, tl.zeros((BLOCK, BLOCK), tl.float32), PRECISION, DOT_F32)        # S^T (BLOCK_N, BLOCK_M)
        pt = tl.where(key_ok[:, None], tl.exp2(st * qk_scale - lse[None, :]), 0.0)
        dpt = _dot(v, tl.trans(do), tl.zeros((BLOCK, BLOCK), tl.float32), PRECISION, DOT_F32)  # dPd^T
        if DROPOUT:
            keep = tl.trans(_keep(seed, bh, offs_m, j0, L, dropout_p, BLOCK, BLOCK))
            pdt = tl.where(keep, pt * r, 0.0)
            dpt = tl.where(keep, dpt * r, 0.0)
        else:
            pdt = pt
        dv = _dot(pdt.to(do.dtype), do, dv, PRECISION, DOT_F32)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, PRECISION, DOT_F32)
    g_rows = g_off + offs_n[:, None].to(tl.int64) * stride_gm + offs_d[None, :]
    tl.store(DK + g_rows, (dk * softmax_scale).to(DK.dtype.element_ty), mask=key_in[:, None])
    tl.store(DV + g_rows, dv.to(DV.dtype.element_ty), mask=key_in[:, None])

    # ---- dQ of queries j0 .. j0+BLOCK ----
    offs_m = j0 + offs_b
    q_in = offs_m < seqlen
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=q_in[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :], mask=q_in[:, None],
                 other=0.0)
    lse = tl.load(LSE + l_base + offs_m, mask=q_in, other=float("inf"))
    delta = tl.load(Delta + l_base + offs_m, mask=q_in, other=0.0)
    dq = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    for n0 in range(0, seqlen, BLOCK):
        offs_n = n0 + offs_b
        k_in = offs_n < seqlen
        k_ok = k_in
        if HAS_MASK:
            km = tl.load(KeyMask + b64 * stride_mb + offs_n, mask=k_in, other=0)
            k_ok = k_ok & (km != 0)
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None], mask=k_in[None, :],
                     other=0.0)                                                 # (D, BLOCK_N)
        vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vn + offs_d[:, None], mask=k_in[None, :],
                     other=0.0)
        s = _dot(q, kt, tl.zeros((BLOCK, BLOCK), tl.float32), PRECISION, DOT_F32)
        p = tl.where(k_ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = _dot(do, vt, tl.zeros((BLOCK, BLOCK), tl.float32), PRECISION, DOT_F32)
        if DROPOUT:
            keep = _keep(seed, bh, offs_m, n0, L, dropout_p, BLOCK, BLOCK)
            dp = tl.where(keep, dp * r, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, PRECISION, DOT_F32)
    tl.store(DQ + g_off + offs_m[:, None].to(tl.int64) * stride_gm + offs_d[None, :],
             (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_in[:, None])


@triton.jit
def _dropout_mask_kernel(
    Seed,                                     # *i64 (1,)
    Out,                                      # *i8  (B, H, L, L) keep mask, contiguous
    L,                                        # i32
    dropout_p,                                # fp32
    BLOCK: tl.constexpr,
):
    """Debug/test helper: writes the forward's keep mask for rows program_id(1) of head program_id(0)."""
    bh = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(Seed)
    for j0 in range(0, L, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        keep = _keep(seed, bh, offs_i, j0, L, dropout_p, BLOCK, BLOCK)
        ptrs = Out + (bh.to(tl.int64) * L + offs_i[:, None].to(tl.int64)) * L + offs_j[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(offs_i[:, None] < L) & (offs_j[None, :] < L))


# ----------------------------------------------------------------------------------------------------------------
# Configurations (every one of them is built by `fastdistil check-kernels`)
# ----------------------------------------------------------------------------------------------------------------

def _fwd_config(head_dim: int, dtype: str, dropout: bool = False) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the forward for head_dim, dtype ('fp16', 'bf16', 'fp32') and
    dropout.

    fp16/bf16: 64 x 64 tiles (64 x 32 at head_dim 128) with 4 warps; the dropout variants take 8 (with 4, the
    Philox state plus the fp32 64 x 64 score tile spilled on sm_80). fp32 runs ieee FMA dots, which hold whole
    operand tiles in registers: 32 x 32 tiles, 8 warps (head_dim 64 with 4 warps spilled 2 registers at 255 on
    sm_90 once the JIT's divisibility hints applied: measured on H100, Triton 3.6, 2026-11-27,
    docs/gpu-runs/2026-11-27-h100-shared-harness/kernels_attn.json). `fastdistil check-kernels` builds every entry
    (aligned and unaligned) for sm_80 and sm_90 spill-free.
    """
    if dtype == "fp32":
        bm, bn, warps = 32, 32, 8
    else:
        bm, bn = (64, 64) if head_dim <= 64 else (64, 32)
        # 4 warps only at head_dim <= 32 without dropout: at 64 and 128 the unaligned (no divisibility hint)
        # varlen builds spilled 8-496 bytes at 255 registers with 4 (sm_80 and sm_90, Triton 3.6 and 3.9)
        warps = 8 if dropout or head_dim >= 64 else 4
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": 2}


def _bwd_config(head_dim: int, dtype: str, dropout: bool = False) -> dict:
    """BLOCK (query and key tile), num_warps, num_stages of the backward, which holds k, v, dk, dv of its key
    block and two BLOCK x BLOCK fp32 tiles at once: 64 up to head_dim 32, then 32 (16 for fp32 at 128).
    The dropout variants also hold the Philox state of a tile: smaller tiles or more warps there (fp16/bf16 at
    head_dim 32/64/128 spilled 8-88 bytes on sm_80 or sm_90 with the plain variants' tiles, aligned or not;
    Triton 3.9, 2026-11-27). Warps as check-kernels found spill-free on sm_80 and sm_90."""
    if dtype == "fp32":
        blk, warps = {16: (32, 8), 32: (32, 4), 64: (32, 8), 128: (16, 8)}[head_dim]
    elif dropout:
        blk, warps = {16: (64, 4), 32: (32, 8), 64: (32, 8), 128: (16, 8)}[head_dim]
    else:
        blk, warps = {16: (64, 4), 32: (64, 8), 64: (32, 4), 128: (16, 8)}[head_dim]
    return {"BLOCK": blk, "num_warps": warps, "num_stages": 2}


def _delta_config(head_dim: int) -> dict:
    """Rows per program of the delta preprocessing (4 warps, no loop): 64, or 16 at head_dim 128 (32 spilled on
    sm_80)."""
    return {"BLOCK_M": 64 if head_dim <= 64 else 16, "num_warps": 4, "num_stages": 1}


_MASK_CFG = {"BLOCK": 32, "num_warps": 4, "num_stages": 2}


def grid(batch_heads: int, seqlen: int, block: int) -> tuple[int, int]:
    """The launch grid of every attention kernel: (batch x heads, blocks along the sequence). batch x heads goes on
    axis 0 (CUDA allows 2^31 - 1 blocks there, 65,535 on axes 1 and 2), so `encode` of a large batch of short texts
    launches; the sequence blocks on axis 1 allow sequences up to 65,535 blocks long."""
    return check_grid((batch_heads, cdiv(seqlen, block)))


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer of the launchers (tests patch it to fill NaN, proving each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) element strides of a (B, H, L, D) or (T, H, D) tensor (batch stride 0 for packed)."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(1), t.stride(0)


def _lowest_stride_1(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _geometry(q: torch.Tensor, cu_seqlens, max_seqlen: int):
    """(batch, heads, L, lse shape, lse (batch, head) strides)."""
    if q.dim() == 4:
        B, H, Lq, _ = q.shape
        return B, H, Lq, (B, H, Lq), (H * Lq, Lq)
    T, H, _ = q.shape
    return cu_seqlens.shape[0] - 1, H, max_seqlen, (H, T), (0, T)


def _key_mask(key_mask, varlen: bool, B: int, L: int, device):
    """(mask, HAS_MASK): the padded form always runs the masked kernel (ones when no mask is given: B*L bytes,
    which halves the number of builds); varlen never has one."""
    if varlen:
        return None, False
    if key_mask is None:
        return torch.ones((B, L), dtype=torch.int8, device=device), True
    if key_mask.dtype != torch.int8:
        key_mask = (key_mask != 0).to(torch.int8)
    return _lowest_stride_1(key_mask), True


def _check(q: torch.Tensor) -> tuple[str, int]:
    if q.dtype not in DTYPES:
        raise TypeError(f"triton attention supports float16, bfloat16 and float32, got {q.dtype}")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"triton attention supports head_dim in {HEAD_DIMS}, got {D}")
    return DTYPES[q.dtype], D


def _precision(dt: str) -> tuple[str, bool]:
    """(PRECISION, DOT_F32) for a dtype name: ieee for fp32; the bf16 upcast only under the interpreter."""
    return ("ieee" if dt == "fp32" else "tf32"), (dt == "bf16" and interpreting())


@on_tensor_device
def attention_fwd(q, k, v, key_mask=None, cu_seqlens=None, seed=None, max_seqlen: int = 0, dropout_p: float = 0.0,
                  softmax_scale: float | None = None):
    """Forward of padded or varlen attention.

    Args:
        q, k, v: (B, H, L, D) (padded) or (T, H, D) (varlen), one of fp16/bf16/fp32, head_dim stride 1 preferred
            (anything else is copied once).
        key_mask: optional (B, L), nonzero = real key (padded form only; int8 is used as is, other dtypes
            converted).
        cu_seqlens: (B+1,) int32 prefix sums (varlen form only); max_seqlen: the longest sequence (varlen; it
            sizes the grid and the RNG counters, so it must not be smaller than any length: not checked, which
            would need a host sync).
        seed: (1,) int64 tensor on q's device; required when dropout_p > 0.
        dropout_p: dropout on the probabilities; softmax_scale: defaults to 1/sqrt(D).
    Returns:
        (o, lse): o contiguous in q's shape and dtype; lse fp32 (B, H, L) or (H, T) in log2 units (+inf for a row
        with no real key).
    """
    dt, D = _check(q)
    q, k, v = (_lowest_stride_1(t) for t in (q, k, v))
    varlen = q.dim() == 3
    if varlen and cu_seqlens is None:
        raise ValueError("packed (T, H, D) inputs need cu_seqlens")
    if varlen:
        cu_seqlens = cu_seqlens.to(torch.int32)
    B, H, L, lse_shape, (slb, slh) = _geometry(q, cu_seqlens, max_seqlen)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    o = _empty(q.shape, q.dtype, q.device)
    lse = _empty(lse_shape, torch.float32, q.device)
    if o.numel() == 0 or L == 0:
        lse.fill_(float("inf"))
        return o.zero_(), lse
    dropout = dropout_p > 0.0
    if dropout and seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    if dropout and L >= 2 ** 16:
        raise ValueError(f"dropout needs sequences shorter than 65536 (32-bit RNG counters), got {L}")
    key_mask, has_mask = _key_mask(key_mask, varlen, B, L, q.device)
    cfg = _fwd_config(D, dt, dropout)
    prec, dot_f32 = _precision(dt)
    _attn_fwd[grid(B * H, L, cfg["BLOCK_M"])](
        q, k, v, o, lse, key_mask if has_mask else None, cu_seqlens if varlen else None,
        seed if dropout else None,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), slb, slh,
        key_mask.stride(0) if has_mask else 0,
        H, L, scale * LOG2E, float(dropout_p),
        HEAD_DIM=D, VARLEN=varlen, HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=prec, DOT_F32=dot_f32, **cfg)
    return o, lse


@on_tensor_device
def attention_bwd(do, q, k, v, o, lse, key_mask=None, cu_seqlens=None, seed=None, max_seqlen: int = 0,
                  dropout_p: float = 0.0, softmax_scale: float | None = None):
    """Backward of :func:`attention_fwd`: two launches (delta = rowsum(dO * O), then dQ, dK, dV).

    Args:
        do: gradient of the output, q's shape (any strides with head_dim stride 1).
        q, k, v, key_mask, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale: as given to the forward.
        o, lse: the forward's outputs.
    Returns:
        (dq, dk, dv), contiguous, in q's shape and dtype.
    """
    dt, D = _check(q)
    q, k, v, o, do = (_lowest_stride_1(t) for t in (q, k, v, o, do))
    varlen = q.dim() == 3
    if varlen:
        cu_seqlens = cu_seqlens.to(torch.int32)
    B, H, L, lse_shape, (slb, slh) = _geometry(q, cu_seqlens, max_seqlen)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    dq, dk, dv = (_empty(q.shape, q.dtype, q.device) for _ in range(3))
    if q.numel() == 0 or L == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _empty(lse_shape, torch.float32, q.device)
    dropout = dropout_p > 0.0
    key_mask, has_mask = _key_mask(key_mask, varlen, B, L, q.device)
    cu = cu_seqlens if varlen else None
    dcfg = _delta_config(D)
    _attn_bwd_delta[grid(B * H, L, dcfg["BLOCK_M"])](
        o, do, delta, cu, *_strides(o), *_strides(do), slb, slh, H, L, HEAD_DIM=D, VARLEN=varlen, **dcfg)
    cfg = _bwd_config(D, dt, dropout)
    prec, dot_f32 = _precision(dt)
    _attn_bwd[grid(B * H, L, cfg["BLOCK"])](
        q, k, v, do, dq, dk, dv, lse, delta, key_mask if has_mask else None, cu, seed if dropout else None,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), slb, slh,
        key_mask.stride(0) if has_mask else 0,
        H, L, scale, scale * LOG2E, float(dropout_p),
        HEAD_DIM=D, VARLEN=varlen, HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=prec, DOT_F32=dot_f32, **cfg)
    return dq, dk, dv


@on_tensor_device
def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, seqlen: int, dropout_p: float) -> torch.Tensor:
    """The keep mask the kernels draw for `seed`: bool (batch, heads, seqlen, seqlen), True = kept.

    For the varlen form, seqlen is max_seqlen and sequence b's mask is [b, :, :len_b, :len_b]. A test and debugging
    aid (it materialises L x L), never used by the kernels themselves.
    """
    out = torch.empty((batch, heads, seqlen, seqlen), dtype=torch.int8, device=seed.device)
    if out.numel():
        _dropout_mask_kernel[grid(batch * heads, seqlen, _MASK_CFG["BLOCK"])](
            seed, out, seqlen, float(dropout_p), **_MASK_CFG)
    return out.to(torch.bool)


# ----------------------------------------------------------------------------------------------------------------
# Protocol: compile_specs() and cost()
# ----------------------------------------------------------------------------------------------------------------

def _ptr(dt: str) -> str:
    return "*" + dt


def compile_specs() -> list[CompileSpec]:
    """Every configuration the launchers can choose (GPU builds: DOT_F32 is never set there).

    Forward and backward: head_dim x dtype x {padded, varlen} x dropout on/off (the padded form always runs the
    masked kernel); the delta preprocessing per head_dim x dtype x {padded, varlen}; the dropout-mask helper.
    Strides, H and L are i32 (the launchers pass Python ints below 2^31).
    """
    specs = []
    forms = (("padded", False, True), ("varlen", True, False))
    for D in HEAD_DIMS:
        for dt in DTYPES.values():
            prec = "ieee" if dt == "fp32" else "tf32"
            tc = dt != "fp32"
            for form, varlen, has_mask in forms:
                for dropout in (False, True):
                    label = f"hd={D} {dt} {form}{' dropout' if dropout else ''}"
                    opt = {
                        "KeyMask": "*i8" if has_mask else "constexpr", "CuSeqlens": "*i32" if varlen else "constexpr",
                        "Seed": "*i64" if dropout else "constexpr"}
                    none = {n: None for n, s in opt.items() if s == "constexpr"}
                    sig = {"Q": _ptr(dt), "K": _ptr(dt), "V": _ptr(dt), "O": _ptr(dt), "LSE": "*fp32", **opt}
                    sig.update({n: "i32" for n in ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh",
                                                   "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_ob",
                                                   "stride_oh", "stride_om", "stride_lb", "stride_lh", "stride_mb",
                                                   "H", "L")})
                    sig.update({"qk_scale": "fp32", "dropout_p": "fp32"})
                    flags = {"HEAD_DIM": D, "VARLEN": varlen, "HAS_MASK": has_mask, "DROPOUT": dropout,
                             "PRECISION": prec, "DOT_F32": False, **none}
                    cfg = _fwd_config(D, dt, dropout)
                    sig.update({n: "constexpr" for n in (*flags, "BLOCK_M", "BLOCK_N")})
                    specs.append(spec("attention_fwd", _attn_fwd, sig, flags, cfg, label + " fwd",
                                      expect_tensor_cores=tc, extra={"ieee": not tc}))
                    sig = {"Q": _ptr(dt), "K": _ptr(dt), "V": _ptr(dt), "DO": _ptr(dt), "DQ": _ptr(dt),
                           "DK": _ptr(dt), "DV": _ptr(dt), "LSE": "*fp32", "Delta": "*fp32", **opt}
                    sig.update({n: "i32" for n in (
                        "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                        "stride_vh", "stride_vn", "stride_db", "stride_dh", "stride_dm", "stride_gb", "stride_gh",
                        "stride_gm", "stride_lb", "stride_lh", "stride_mb", "H", "L")})
                    sig.update({"softmax_scale": "fp32", "qk_scale": "fp32", "dropout_p": "fp32"})
                    cfg = _bwd_config(D, dt, dropout)
                    sig.update({n: "constexpr" for n in (*flags, "BLOCK")})
                    specs.append(spec("attention_bwd", _attn_bwd, sig, flags, cfg, label + " bwd",
                                      expect_tensor_cores=tc, extra={"ieee": not tc}))
            for form, varlen in (("padded", False), ("varlen", True)):
                sig = {"O": _ptr(dt), "DO": _ptr(dt), "Delta": "*fp32", "CuSeqlens": "*i32" if varlen else "constexpr"}
                sig.update({n: "i32" for n in ("stride_ob", "stride_oh", "stride_om", "stride_db", "stride_dh",
                                               "stride_dm", "stride_lb", "stride_lh", "H", "L")})
                flags = {"HEAD_DIM": D, "VARLEN": varlen}
                if not varlen:
                    flags["CuSeqlens"] = None
                sig.update({n: "constexpr" for n in (*flags, "BLOCK_M")})
                specs.append(spec("attention_bwd_delta", _attn_bwd_delta, sig, flags, _delta_config(D),
                                  f"hd={D} {dt} {form}"))
    sig = {"Seed": "*i64", "Out": "*i8", "L": "i32", "dropout_p": "fp32", "BLOCK": "constexpr"}
    specs.append(spec("attention_dropout_mask", _dropout_mask_kernel, sig, {}, _MASK_CFG, "debug helper"))
    return specs


def cost(seqlens: list[int], heads: int, head_dim: int, elem_bytes: int, backward: bool = False,
         dropout: bool = False) -> list[Cost]:
    """FLOPs and minimum HBM bytes of the attention kernels for sequences of the given lengths.

    FLOPs are the GEMM work the kernels execute (2 per multiply-add): forward S = QK^T and PV, 4 n^2 D per head and
    sequence; backward 14 n^2 D (the dK/dV loop recomputes S and computes dV, dPd, dK: 8; the dQ loop recomputes S
    and dPd and computes dQ: 6; the algorithmic minimum is 10). They run on tensor cores except in fp32
    (elem_bytes 4: ieee FMA). Bytes are each input read once and each output written once (the kernels re-read
    K/V per query block, which the L2 cache absorbs at these sizes): q, k, v, o (elem_bytes each), the fp32 LSE and
    delta. The padded form's key mask (B*L bytes) and cu_seqlens are negligible and left out. With `dropout`, a
    row `*.rng` (launches=0: work inside the kernel above it) counts the Philox integer work, ~(10 rounds x 6
    ops) per probability element and pass, at the vector rate; softmax exponentials are not counted.

    Args:
        seqlens: real length of each sequence (for the padded form, pass [L] * B).
        heads, head_dim: H and D.
        elem_bytes: bytes per element of q, k, v (2 for fp16/bf16, 4 for fp32).
        backward: also return the backward's two kernels (delta preprocessing and dQ/dK/dV).
        dropout: add the RNG rows.
    Returns:
        list of Cost, forward first.
    """
    T = sum(seqlens)
    sq = sum(n * n for n in seqlens)
    H, D, e = heads, head_dim, elem_bytes
    tc = e < 4
    rng_ops = 60.0
    out = [Cost("attention.fwd", 4.0 * sq * H * D, e * 4 * T * H * D + 4 * T * H, 1, tc)]
    if dropout:
        out.append(Cost("attention.fwd.rng", rng_ops * sq * H, 0.0, 0, False))
    if backward:
        out.append(Cost("attention.bwd.delta", 2.0 * T * H * D, e * 2 * T * H * D + 4 * T * H, 1, False))
        out.append(Cost("attention.bwd", 14.0 * sq * H * D, e * 7 * T * H * D + 8 * T * H, 1, tc))
        if dropout:
            out.append(Cost("attention.bwd.rng", 2 * rng_ops * sq * H, 0.0, 0, False))
    return out
