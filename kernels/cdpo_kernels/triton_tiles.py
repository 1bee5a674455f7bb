"""Triton path: same functions and signatures as ``torch_tiles``.

Forward kernels never write a logit: each program owns a block of BM rows and a contiguous
segment of the vocabulary, computes [BM, BN] logit tiles with ``tl.dot`` (bf16/fp16 inputs, fp32
accumulation, K-loop over the hidden size) and folds them into an online log-sum-exp kept in
registers. Splitting the vocabulary across programs keeps the GPU busy when there are few rows;
each split writes its partial (max, sum-exp) and a tiny torch reduction merges the splits.

The backward kernel recomputes a tile and writes dL/dz for one vocabulary chunk into a bounded
buffer; cuBLAS then does the two gradient GEMMs (``tiling.linear_backward``). This costs one
extra pass over the tile compared with fully fused atomics, but is deterministic and exact.

Under ``TRITON_INTERPRET=1`` these run on CPU tensors (slowly) for tests. The interpreter in
Triton 3.9 computes bf16 ``tl.dot`` wrongly, so tiles are upcast to fp32 there (``UPCAST``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tiling import linear_backward

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# dL/dz chunk buffer of the backward: at most this many elements (64 MiB in bf16).
GRAD_TILE_ELEMENTS = 1 << 25
# Interpreter only: how many vocabulary splits to use (>1 so tests exercise the merge).
INTERPRET_SPLITS = 3


@triton.jit
def _round_tf32(x):
    # Interpreter only. The PTX hands fp32 registers to the TF32 MMA without a cvt.rna.tf32, so
    # emulate the coarser of the two possible roundings: drop the 13 low mantissa bits.
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot_tile(x_ptr, w_ptr, stride_x, stride_w, rows, cols, row_ok, col_ok, K,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    # [BM, BN] fp32 tile of x[rows] @ w[cols]^T, K-loop over the hidden size.
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if ROUND_TF32:  # interpreter only: the operand rounding a TF32 tensor core applies
            xt = _round_tf32(xt)
            wt = _round_tf32(wt)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _head_tile(x_ptr, w_ptr, x2_ptr, w2_ptr, b_ptr, sx, sw, sx2, sw2, a1, a2,
               rows, cols, row_ok, col_ok, K,
               HAS_BIAS: tl.constexpr, TWO_HEADS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    # z = x W^T (+ bias), or a1 x W^T + a2 x2 W2^T (+ bias) for two-head contrastive scoring.
    z = _dot_tile(x_ptr, w_ptr, sx, sw, rows, cols, row_ok, col_ok, K, BM, BN, BK, UPCAST, PRECISION, ROUND_TF32)
    if TWO_HEADS:
        z2 = _dot_tile(x2_ptr, w2_ptr, sx2, sw2, rows, cols, row_ok, col_ok, K, BM, BN, BK,
                       UPCAST, PRECISION, ROUND_TF32)
        z = a1 * z + a2 * z2
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _lse_fwd_kernel(x_ptr, w_ptr, x2_ptr, w2_ptr, b_ptr, y_ptr, m_ptr, s_ptr, tgt_ptr,
                    N, V, K, seg_len, sx, sw, sx2, sw2, a1, a2,
                    HAS_BIAS: tl.constexpr, TWO_HEADS: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    split = tl.program_id(1)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    v_lo = split * seg_len
    v_hi = tl.minimum(v_lo + seg_len, V)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    tgt = tl.zeros((BM,), tl.float32)
    for v0 in range(v_lo, v_hi, BN):
        cols = (v0 + tl.arange(0, BN)).to(tl.int64)
        col_ok = cols < v_hi
        z = _head_tile(x_ptr, w_ptr, x2_ptr, w2_ptr, b_ptr, sx, sw, sx2, sw2, a1, a2, rows, cols, row_ok,
                       col_ok, K, HAS_BIAS, TWO_HEADS, BM, BN, BK, UPCAST, PRECISION, ROUND_TF32)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # Online log-sum-exp: every tile has a valid column, so m_new is finite.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    # Exactly one split owns each target: no race on tgt.
    tl.store(tgt_ptr + rows, tgt, mask=row_ok & (y >= v_lo) & (y < v_hi))


@triton.jit
def _kl_fwd_kernel(xr_ptr, xp_ptr, w_ptr, b_ptr, y_ptr, mr_ptr, sr_ptr, e_ptr, mp_ptr, sp_ptr, tgt_ptr,
                   N, V, K, seg_len, sxr, sxp, sw,
                   HAS_BIAS: tl.constexpr, HAS_TGT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    split = tl.program_id(1)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < N
    v_lo = split * seg_len
    v_hi = tl.minimum(v_lo + seg_len, V)
    mr = tl.full((BM,), float("-inf"), tl.float32)
    mp = tl.full((BM,), float("-inf"), tl.float32)
    sr = tl.zeros((BM,), tl.float32)
    sp = tl.zeros((BM,), tl.float32)
    e = tl.zeros((BM,), tl.float32)  # sum exp(z_ref - mr) * (z_ref - z_pol)
    tgt = tl.zeros((BM,), tl.float32)
    if HAS_TGT:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    for v0 in range(v_lo, v_hi, BN):
        cols = (v0 + tl.arange(0, BN)).to(tl.int64)
        col_ok = cols < v_hi
        zr = _head_tile(xr_ptr, w_ptr, xr_ptr, w_ptr, b_ptr, sxr, sw, sxr, sw, 1.0, 0.0, rows, cols, row_ok,
                        col_ok, K, HAS_BIAS, False, BM, BN, BK, UPCAST, PRECISION, ROUND_TF32)
        zp = _head_tile(xp_ptr, w_ptr, xp_ptr, w_ptr, b_ptr, sxp, sw, sxp, sw, 1.0, 0.0, rows, cols, row_ok,
                        col_ok, K, HAS_BIAS, False, BM, BN, BK, UPCAST, PRECISION, ROUND_TF32)
        d = tl.where(col_ok[None, :], zr - zp, 0.0)
        zr = tl.where(col_ok[None, :], zr, float("-inf"))
        zp = tl.where(col_ok[None, :], zp, float("-inf"))
        mr_new = tl.maximum(mr, tl.max(zr, axis=1))
        er = tl.exp(zr - mr_new[:, None])
        scale = tl.exp(mr - mr_new)
        sr = sr * scale + tl.sum(er, axis=1)
        e = e * scale + tl.sum(er * d, axis=1)
        mr = mr_new
        mp_new = tl.maximum(mp, tl.max(zp, axis=1))
        sp = sp * tl.exp(mp - mp_new) + tl.sum(tl.exp(zp - mp_new[:, None]), axis=1)
        mp = mp_new
        if HAS_TGT:
            tgt += tl.sum(tl.where(cols[None, :] == y[:, None], zp, 0.0), axis=1)
    out = split * N + rows
    tl.store(mr_ptr + out, mr, mask=row_ok)
    tl.store(sr_ptr + out, sr, mask=row_ok)
    tl.store(e_ptr + out, e, mask=row_ok)
    tl.store(mp_ptr + out, mp, mask=row_ok)
    tl.store(sp_ptr + out, sp, mask=row_ok)
    if HAS_TGT:
        tl.store(tgt_ptr + rows, tgt, mask=row_ok & (y >= v_lo) & (y < v_hi))


@triton.jit
def _grad_tile_kernel(xp_ptr, xr_ptr, w_ptr, b_ptr, y_ptr, lse_p_ptr, lse_r_ptr, g_lp_ptr, g_kl_ptr, dz_ptr,
                      N, K, c0, c1, sxp, sxr, sw, sdz,
                      HAS_BIAS: tl.constexpr, HAS_LP: tl.constexpr, HAS_KL: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    # dL/dz for vocabulary columns [c0, c1): g_lp (onehot - pi) + g_kl (pi - p_ref).
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (c0 + tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < c1
    zp = _head_tile(xp_ptr, w_ptr, xp_ptr, w_ptr, b_ptr, sxp, sw, sxp, sw, 1.0, 0.0, rows, cols, row_ok,
                    col_ok, K, HAS_BIAS, False, BM, BN, BK, UPCAST, PRECISION, ROUND_TF32)
    pi = tl.exp(zp - tl.load(lse_p_ptr + rows, mask=row_ok, other=0.0)[:, None])
    dz = tl.zeros((BM, BN), tl.float32)
    if HAS_LP:
        g = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        dz += g[:, None] * ((cols[None, :] == y[:, None]).to(tl.float32) - pi)
    if HAS_KL:
        zr = _head_tile(xr_ptr, w_ptr, xr_ptr, w_ptr, b_ptr, sxr, sw, sxr, sw, 1.0, 0.0, rows, cols, row_ok,
                        col_ok, K, HAS_BIAS, False, BM, BN, BK, UPCAST, PRECISION, ROUND_TF32)
        p_ref = tl.exp(zr - tl.load(lse_r_ptr + rows, mask=row_ok, other=0.0)[:, None])
        gk = tl.load(g_kl_ptr + rows, mask=row_ok, other=0.0)
        dz += gk[:, None] * (pi - p_ref)
    tl.store(dz_ptr + rows[:, None] * sdz + (cols[None, :] - c0), dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# launch configuration


def tf32_requested() -> bool:
    """Whether the user asked torch for TF32 in fp32 CUDA matmuls: fp32 heads use it only then.

    torch >= 2.9 has ``fp32_precision`` switches (``allow_tf32`` follows them, but reading it
    raises once the new API was used); older torch only has the flag.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _config(dtype: torch.dtype, two_tiles: bool = False) -> dict:
    """Block sizes and launch options; ``kernels/aot_check.py`` checks that none of them spills.

    ``two_tiles``: the kernel keeps two [BM, BN] fp32 logit tiles live (KL forward and backward,
    two-head contrastive scoring), so it gets half the rows of a one-tile kernel.
    """
    fp32 = dtype == torch.float32
    tf32 = fp32 and tf32_requested()
    common = dict(UPCAST=INTERPRET and not fp32, PRECISION="tf32" if tf32 or not fp32 else "ieee",
                  ROUND_TF32=INTERPRET and tf32)
    if INTERPRET:
        return dict(BM=16, BN=32, BK=32, **common)
    if fp32:
        # IEEE fp32 has no tensor-core instruction: the dots run as FMA on CUDA cores (the slow
        # path), whose operand slices sit in registers; BK 8 keeps them from spilling.
        return dict(BM=64, BN=64, BK=32 if tf32 else 8, num_warps=4, num_stages=3, **common)
    return dict(BM=64 if two_tiles else 128, BN=128, BK=64, num_warps=8, num_stages=3, **common)


def _split_vocab(n: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(number of vocabulary splits, columns per split); splits feed idle SMs when n is small."""
    row_blocks = triton.cdiv(max(n, 1), cfg["BM"])
    col_tiles = triton.cdiv(vocab, cfg["BN"])
    if INTERPRET or device.type != "cuda":
        wanted = INTERPRET_SPLITS
    else:
        wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, row_blocks)
    per_split = triton.cdiv(col_tiles, max(1, min(wanted, col_tiles)))
    return triton.cdiv(col_tiles, per_split), per_split * cfg["BN"]


def _merge(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log-sum-exp from per-split (max, sum exp(z - max)), shape [splits, n] -> [n]."""
    top = m.amax(0)
    return top + torch.log((s * torch.exp(m - top)).sum(0))


def _prepare(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _as_head_dtype(weight, *xs):
    """tl.dot needs both operands in one dtype: hidden states follow the head (as under autocast)."""
    return [x.to(weight.dtype) if x is not None else None for x in xs]


# ---------------------------------------------------------------------------------------------
# public tile functions (see torch_tiles for the semantics)


def lse_forward(x, weight, targets, bias=None, x2=None, weight2=None, a1=1.0, a2=0.0):
    x, weight, targets, bias, x2, weight2 = _prepare(x, weight, targets, bias, x2, weight2)
    x, x2 = _as_head_dtype(weight, x, x2)
    if weight2 is not None and weight2.dtype != weight.dtype:
        raise ValueError(f"both heads must share a dtype, got {weight.dtype} and {weight2.dtype}")
    n, K = x.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    tgt = torch.zeros(n, **f32)
    if n == 0:
        return torch.zeros(0, **f32), tgt
    two = x2 is not None
    cfg = _config(x.dtype, two_tiles=two)
    splits, seg_len = _split_vocab(n, V, cfg, x.device)
    m = torch.empty(splits, n, **f32)
    s = torch.empty(splits, n, **f32)
    grid = (triton.cdiv(n, cfg["BM"]), splits)
    _lse_fwd_kernel[grid](
        x, weight, x2 if two else x, weight2 if two else weight, bias if bias is not None else x, targets,
        m, s, tgt, n, V, K, seg_len, x.stride(0), weight.stride(0),
        (x2 if two else x).stride(0), (weight2 if two else weight).stride(0), float(a1), float(a2),
        HAS_BIAS=bias is not None, TWO_HEADS=two, **cfg,
    )
    return _merge(m, s), tgt


def _grad_chunk_cols(n: int, vocab: int, bn: int) -> int:
    cols = max(bn, GRAD_TILE_ELEMENTS // max(n, 1))
    return min(vocab, triton.cdiv(cols, bn) * bn)


def _backward(x_pol, x_ref, weight, bias, targets, lse_p, lse_r, g_lp, g_kl, needs):
    x_pol, x_ref, weight, bias, targets = _prepare(x_pol, x_ref, weight, bias, targets)
    x_pol, x_ref = _as_head_dtype(weight, x_pol, x_ref)
    n, K = x_pol.shape
    V = weight.shape[0]
    cfg = _config(x_pol.dtype, two_tiles=g_kl is not None)
    cols = _grad_chunk_cols(n, V, cfg["BN"])
    # dz in the inputs' dtype, like the logits a cuBLAS GEMM would see; one buffer reused per chunk.
    buf = torch.empty(n, cols, dtype=x_pol.dtype, device=x_pol.device)
    dummy = lse_p
    g_lp = g_lp.float().contiguous() if g_lp is not None else None
    g_kl = g_kl.float().contiguous() if g_kl is not None else None

    def make_dz(r0, r1, c0, c1):
        dz = buf[:, : c1 - c0]
        grid = (triton.cdiv(n, cfg["BM"]), triton.cdiv(c1 - c0, cfg["BN"]))
        _grad_tile_kernel[grid](
            x_pol, x_ref if x_ref is not None else x_pol, weight, bias if bias is not None else dummy,
            targets if targets is not None else dummy, lse_p, lse_r if lse_r is not None else dummy,
            g_lp if g_lp is not None else dummy, g_kl if g_kl is not None else dummy, dz,
            n, K, c0, c1, x_pol.stride(0), (x_ref if x_ref is not None else x_pol).stride(0),
            weight.stride(0), dz.stride(0),
            HAS_BIAS=bias is not None, HAS_LP=g_lp is not None, HAS_KL=g_kl is not None, **cfg,
        )
        return dz

    # All rows in one chunk: each grad_W chunk is one GEMM over every token.
    return linear_backward(x_pol, weight, bias, needs, make_dz, max(n, 1), cols)


def logprob_backward(x, weight, bias, targets, lse, grad, needs):
    return _backward(x, None, weight, bias, targets, lse, None, grad, None, needs)


def kl_forward(x_ref, x_pol, weight, bias=None, targets=None):
    x_ref, x_pol, weight, bias, targets = _prepare(x_ref, x_pol, weight, bias, targets)
    x_ref, x_pol = _as_head_dtype(weight, x_ref, x_pol)
    n, K = x_pol.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=x_pol.device)
    tgt = torch.zeros(n, **f32) if targets is not None else None
    if n == 0:
        z = torch.zeros(0, **f32)
        return z, z, z, tgt
    cfg = _config(x_pol.dtype, two_tiles=True)
    splits, seg_len = _split_vocab(n, V, cfg, x_pol.device)
    mr, sr, e, mp, sp = (torch.empty(splits, n, **f32) for _ in range(5))
    grid = (triton.cdiv(n, cfg["BM"]), splits)
    _kl_fwd_kernel[grid](
        x_ref, x_pol, weight, bias if bias is not None else mr, targets if targets is not None else mr,
        mr, sr, e, mp, sp, tgt if tgt is not None else mr,
        n, V, K, seg_len, x_ref.stride(0), x_pol.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, HAS_TGT=targets is not None, **cfg,
    )
    lse_p = _merge(mp, sp)
    top = mr.amax(0)
    scale = torch.exp(mr - top)
    sum_r = (sr * scale).sum(0)
    lse_r = top + torch.log(sum_r)
    expect = (e * scale).sum(0) / sum_r
    return expect - lse_r + lse_p, lse_r, lse_p, tgt


def kl_backward(x_ref, x_pol, weight, bias, targets, lse_r, lse_p, grad_kl, grad_lp, needs):
    if grad_kl is None:  # only the log-prob output carries a gradient
        return _backward(x_pol, None, weight, bias, targets, lse_p, None, grad_lp, None, needs)
    return _backward(x_pol, x_ref, weight, bias, targets, lse_p, lse_r, grad_lp, grad_kl, needs)
