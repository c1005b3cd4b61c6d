"""Flash-style attention for small encoders: forward and backward, padded (B, H, L, D) and packed varlen (T, H, D).

What it fuses: S = scale * Q K^T, the key-padding mask, an online (streaming) softmax, dropout on the
probabilities and P V, in one kernel per (query block, batch x head); the L x L matrices never reach memory.
The backward recomputes P from the saved log-sum-exp (no stored probabilities) and regenerates the dropout mask
from the same counter-based RNG (Philox, ``tl.philox``): nothing of size L x L is ever stored.
This module is the host side (launchers, block sizes, compile specs, cost); the @triton.jit code is in
kernels/attention_kernels.py (re-exported here: ``_attn_fwd``, ``_attn_bwd_delta``, ``_attn_bwd``).

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

from .attention_kernels import _attn_bwd, _attn_bwd_delta, _attn_fwd, _dropout_mask_kernel
from .launch import cdiv, check_grid, interpreting, on_tensor_device
from .spec import CompileSpec, Cost, spec

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOG2E = 1.4426950408889634


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
