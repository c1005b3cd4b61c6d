"""The device code of kernels/attention.py: the forward, the backward's two kernels and the dropout-mask helper.

Layouts, the dropout RNG, precision and limits are described in kernels/attention.py's header, which also holds
the launchers, block sizes, compile specs and cost. The kernels share their prologue (:func:`_program`, which
sequence and head a program owns), addressing (:func:`_at`, :func:`_base`, :func:`_rows`, :func:`_cols`), key flags
(:func:`_keys`), dot and dropout mask, so each one states only its own maths.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b; DOT_F32 upcasts the operands (interpreter-only bf16 workaround: kernels/attention.py header)."""
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
def _program(CuSeqlens, H, L, VARLEN: tl.constexpr):
    """(bh, block index, b, h, first token, length) of this program. Batch x head is on grid axis 0 (up to
    2^31 - 1; axis 1 stops at 65,535); b and h are int64 for the addresses; a padded sequence starts at token 0
    of its batch row and is L long."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    if VARLEN:
        start = tl.load(CuSeqlens + b).to(tl.int64)
        seqlen = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
    else:
        start = tl.zeros((), tl.int64)
        seqlen = L
    return bh, tl.program_id(1), b.to(tl.int64), h.to(tl.int64), start, seqlen


@triton.jit
def _base(X, b64, h64, start, stride_b, stride_h, stride_t):
    """Pointer to token `start` of head h64 of batch row b64 of X (batch stride 0 for packed inputs)."""
    return X + b64 * stride_b + h64 * stride_h + start * stride_t


@triton.jit
def _at(X, b64, h64, start, offs, stride_b, stride_h, stride_t, offs_d):
    """Pointers (len(offs), D) to tokens start + offs of head h64 of batch row b64 of X."""
    return X + b64 * stride_b + h64 * stride_h + (start + offs[:, None]) * stride_t + offs_d[None, :]


@triton.jit
def _rows(base, offs, ok, stride_t, offs_d):
    """Tile (len(offs), D) of tokens `offs` (token stride stride_t, head_dim stride 1) from base; 0 where not ok."""
    return tl.load(base + offs[:, None].to(tl.int64) * stride_t + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _cols(base, offs, ok, stride_t, offs_d):
    """The transposed tile (D, len(offs)) of :func:`_rows`."""
    return tl.load(base + offs[None, :].to(tl.int64) * stride_t + offs_d[:, None], mask=ok[None, :], other=0.0)


@triton.jit
def _keys(KeyMask, b64, stride_mb, offs_n, seqlen, HAS_MASK: tl.constexpr):
    """(inside the sequence, real key) flags of keys offs_n."""
    inside = offs_n < seqlen
    real = inside
    if HAS_MASK:
        km = tl.load(KeyMask + b64 * stride_mb + offs_n, mask=inside, other=0)
        real = real & (km != 0)
    return inside, real


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
    bh, pid_m, b64, h64, start, seqlen = _program(CuSeqlens, H, L, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    q = tl.load(_at(Q, b64, h64, start, offs_m, stride_qb, stride_qh, stride_qm, offs_d), mask=row_ok[:, None],
                other=0.0)                                                      # (BLOCK_M, D)
    k_base = _base(K, b64, h64, start, stride_kb, stride_kh, stride_kn)
    v_base = _base(V, b64, h64, start, stride_vb, stride_vh, stride_vn)
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)                        # running max of S*log2(e)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                                      # running sum of exp2(S - m)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        offs_n = n0 + offs_n0
        col_in, col_ok = _keys(KeyMask, b64, stride_mb, offs_n, seqlen, HAS_MASK)
        kt = _cols(k_base, offs_n, col_in, stride_kn, offs_d)                   # (D, BLOCK_N)
        s = _dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PRECISION, DOT_F32) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                   # no real key yet: avoid inf-inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, n0, L, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        v = _rows(v_base, offs_n, col_in, stride_vn, offs_d)                    # (BLOCK_N, D)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, DOT_F32)
        m_i = m_new

    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    o_ptrs = _at(O, b64, h64, start, offs_m, stride_ob, stride_oh, stride_om, offs_d)
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
    bh, pid_m, b64, h64, start, seqlen = _program(CuSeqlens, H, L, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    o = tl.load(_at(O, b64, h64, start, offs_m, stride_ob, stride_oh, stride_om, offs_d), mask=row_ok[:, None],
                other=0.0).to(tl.float32)
    do = tl.load(_at(DO, b64, h64, start, offs_m, stride_db, stride_dh, stride_dm, offs_d), mask=row_ok[:, None],
                 other=0.0).to(tl.float32)
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
    bh, pid, b64, h64, start, seqlen = _program(CuSeqlens, H, L, VARLEN)
    j0 = pid * BLOCK
    if j0 >= seqlen:
        return
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = tl.arange(0, BLOCK)
    q_base = _base(Q, b64, h64, start, stride_qb, stride_qh, stride_qm)
    k_base = _base(K, b64, h64, start, stride_kb, stride_kh, stride_kn)
    v_base = _base(V, b64, h64, start, stride_vb, stride_vh, stride_vn)
    do_base = _base(DO, b64, h64, start, stride_db, stride_dh, stride_dm)
    g_off = b64 * stride_gb + h64 * stride_gh + start * stride_gm
    l_base = b64 * stride_lb + h64 * stride_lh + start
    if DROPOUT:
        seed = tl.load(Seed)
        r = 1.0 / (1.0 - dropout_p)

    # ---- dK, dV of keys j0 .. j0+BLOCK (transposed tiles: rows = keys, columns = queries) ----
    offs_n = j0 + offs_b
    key_in, key_ok = _keys(KeyMask, b64, stride_mb, offs_n, seqlen, HAS_MASK)
    k = _rows(k_base, offs_n, key_in, stride_kn, offs_d)                        # (BLOCK_N, D)
    v = _rows(v_base, offs_n, key_in, stride_vn, offs_d)
    dk = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    for m0 in range(0, seqlen, BLOCK):
        offs_m = m0 + offs_b
        q_in = offs_m < seqlen
        qt = _cols(q_base, offs_m, q_in, stride_qm, offs_d)                     # (D, BLOCK_M)
        do = _rows(do_base, offs_m, q_in, stride_dm, offs_d)                    # (BLOCK_M, D)
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
    q = _rows(q_base, offs_m, q_in, stride_qm, offs_d)
    do = _rows(do_base, offs_m, q_in, stride_dm, offs_d)
    lse = tl.load(LSE + l_base + offs_m, mask=q_in, other=float("inf"))
    delta = tl.load(Delta + l_base + offs_m, mask=q_in, other=0.0)
    dq = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    for n0 in range(0, seqlen, BLOCK):
        offs_n = n0 + offs_b
        k_in, k_ok = _keys(KeyMask, b64, stride_mb, offs_n, seqlen, HAS_MASK)
        kt = _cols(k_base, offs_n, k_in, stride_kn, offs_d)                     # (D, BLOCK_N)
        vt = _cols(v_base, offs_n, k_in, stride_vn, offs_d)
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
