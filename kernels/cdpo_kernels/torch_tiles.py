"""Chunked torch path: the CPU (and fallback) twin of ``triton_tiles``, same functions, same numerics.

Logits are built one [rows, cols] fp32 tile at a time (inputs upcast to fp32, exactly what a
bf16 ``tl.dot`` with fp32 accumulation computes), folded into a running log-sum-exp, and
dropped. Tile size is bounded by ``TILE_ELEMENTS`` so peak extra memory does not grow with the
vocabulary. Every function takes already-selected rows ``x [n, H]`` and returns fp32 per-row values.
"""

from __future__ import annotations

import torch

from .tiling import chunks, linear_backward

# At most this many fp32 logits per tile (8 MiB); rows per tile at most ROW_CHUNK.
TILE_ELEMENTS = 1 << 21
ROW_CHUNK = 2048
MIN_COLS = 256


def plan(n: int, vocab: int) -> tuple[int, int]:
    rows = max(1, min(n, ROW_CHUNK))
    cols = min(vocab, max(MIN_COLS, TILE_ELEMENTS // rows))
    return rows, cols


def _tile(x32: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, c0: int, c1: int) -> torch.Tensor:
    w = weight[c0:c1].float()  # a view for fp32 heads
    if bias is None:
        return x32 @ w.t()
    return torch.addmm(bias[c0:c1].float(), x32, w.t())


def _pick_targets(z: torch.Tensor, local: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = z[i, local[i]] for rows whose target falls inside this tile."""
    hit = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
    out[hit] = z[hit, local[hit]]


def _add_at_targets(dz: torch.Tensor, local: torch.Tensor, g: torch.Tensor) -> None:
    hit = ((local >= 0) & (local < dz.shape[1])).nonzero().squeeze(1)
    dz[hit, local[hit]] += g[hit]


# ---------------------------------------------------------------------------------------------
# log-probs (also contrastive scoring: two heads combined as a1 * z1 + a2 * z2)


def lse_forward(x, weight, targets, bias=None, x2=None, weight2=None, a1=1.0, a2=0.0):
    """(lse [n], target logit [n]) of z = a1 x W^T [+ a2 x2 W2^T] + bias, in fp32."""
    n, V = x.shape[0], weight.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    tgt = torch.zeros(n, dtype=torch.float32, device=x.device)
    rows, cols = plan(n, V)
    x32 = x.float()
    x2_32 = x2.float() if x2 is not None else None
    for r0, r1 in chunks(n, rows):
        for c0, c1 in chunks(V, cols):
            z = _tile(x32[r0:r1], weight, None if x2 is not None else bias, c0, c1)
            if x2 is not None:
                z.mul_(a1).add_(_tile(x2_32[r0:r1], weight2, None, c0, c1), alpha=a2)
                if bias is not None:
                    z.add_(bias[c0:c1].float())
            lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(z, dim=1))
            _pick_targets(z, targets[r0:r1] - c0, tgt[r0:r1])
    return lse, tgt


def logprob_backward(x, weight, bias, targets, lse, grad, needs):
    """Gradients of sum_i grad_i * log softmax(x_i W^T + b)[y_i]: dz = g (onehot - softmax)."""
    rows, cols = plan(x.shape[0], weight.shape[0])
    x32 = x.float()
    grad = grad.float()

    def make_dz(r0, r1, c0, c1):
        dz = _tile(x32[r0:r1], weight, bias, c0, c1)
        g = grad[r0:r1]
        dz.sub_(lse[r0:r1, None]).exp_().mul_(-g[:, None])
        _add_at_targets(dz, targets[r0:r1] - c0, g)
        return dz

    return linear_backward(x32, weight, bias, needs, make_dz, rows, cols)


# ---------------------------------------------------------------------------------------------
# sequential KL (TDPO): KL_i = sum_v p_ref (log p_ref - log pi), shared head, reference frozen


def kl_forward(x_ref, x_pol, weight, bias=None, targets=None):
    """(kl [n], lse_ref [n], lse_pol [n], policy target logit [n] or None).

    KL = E_ref[z_ref - z_pol] - lse_ref + lse_pol; the expectation is kept normalised by the
    running reference log-sum-exp, so nothing overflows and p_ref = 0 never meets a log.
    """
    n, V = x_pol.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=x_pol.device)
    lse_r = torch.full((n,), float("-inf"), **f32)
    lse_p = torch.full((n,), float("-inf"), **f32)
    expect = torch.zeros(n, **f32)
    tgt = torch.zeros(n, **f32) if targets is not None else None
    rows, cols = plan(n, V)
    xr32, xp32 = x_ref.float(), x_pol.float()
    for r0, r1 in chunks(n, rows):
        for c0, c1 in chunks(V, cols):
            zr = _tile(xr32[r0:r1], weight, bias, c0, c1)
            zp = _tile(xp32[r0:r1], weight, bias, c0, c1)
            if tgt is not None:
                _pick_targets(zp, targets[r0:r1] - c0, tgt[r0:r1])
            lse_p[r0:r1] = torch.logaddexp(lse_p[r0:r1], torch.logsumexp(zp, dim=1))
            new_r = torch.logaddexp(lse_r[r0:r1], torch.logsumexp(zr, dim=1))
            d = zp.neg_().add_(zr)  # z_ref - z_pol, in zp's buffer
            contrib = zr.sub_(new_r[:, None]).exp_().mul_(d).sum(1)
            expect[r0:r1] = expect[r0:r1] * torch.exp(lse_r[r0:r1] - new_r) + contrib
            lse_r[r0:r1] = new_r
    return expect - lse_r + lse_p, lse_r, lse_p, tgt


def kl_backward(x_ref, x_pol, weight, bias, targets, lse_r, lse_p, grad_kl, grad_lp, needs):
    """Gradients w.r.t. x_pol, W, b of sum_i gk_i KL_i + gl_i log pi_i(y_i); the reference is frozen.

    dKL/dz_pol = pi - p_ref and dlog pi(y)/dz_pol = onehot - pi.
    """
    if grad_kl is None:  # only the log-prob output carries a gradient: no reference tiles needed
        return logprob_backward(x_pol, weight, bias, targets, lse_p, grad_lp, needs)
    rows, cols = plan(x_pol.shape[0], weight.shape[0])
    xr32, xp32 = x_ref.float(), x_pol.float()
    n = x_pol.shape[0]
    zero = torch.zeros(n, dtype=torch.float32, device=x_pol.device)
    gk = grad_kl.float()
    gl = grad_lp.float() if grad_lp is not None else zero

    def make_dz(r0, r1, c0, c1):
        pi = _tile(xp32[r0:r1], weight, bias, c0, c1).sub_(lse_p[r0:r1, None]).exp_()
        p_ref = _tile(xr32[r0:r1], weight, bias, c0, c1).sub_(lse_r[r0:r1, None]).exp_()
        dz = pi.mul_((gk[r0:r1] - gl[r0:r1])[:, None]).sub_(p_ref.mul_(gk[r0:r1, None]))
        if grad_lp is not None:
            _add_at_targets(dz, targets[r0:r1] - c0, gl[r0:r1])
        return dz

    return linear_backward(xp32, weight, bias, needs, make_dz, rows, cols)
