"""Sequential forward KL for TDPO from hidden states, shared head, tiled over the vocabulary.

KL_t = sum_v p_ref(v) (log p_ref(v) - log pi(v)) with logits h_ref W^T + b and h_pol W^T + b.
The same pass also yields the policy's target log-probs (its log-sum-exp is computed anyway),
so TDPO gets m = sum Delta and KL from one sweep over the head. Backward: gradients w.r.t. the
policy hidden states, W and b through the policy logits only (the reference side is frozen).
"""

from __future__ import annotations

import torch

from . import backend as _backend
from .tiling import scatter_rows, select_rows, select_values


class SequentialKLFunction(torch.autograd.Function):
    """(kl [n], policy target log-prob [n] or empty) for selected rows."""

    @staticmethod
    def forward(ctx, x_ref, x_pol, weight, bias, targets, impl):
        with torch.autocast(x_pol.device.type, enabled=False):  # keep the torch path's tiles in fp32
            kl, lse_r, lse_p, tgt = impl.kl_forward(x_ref, x_pol, weight, bias, targets)
        ctx.save_for_backward(x_ref, x_pol, weight, bias, targets, lse_r, lse_p)
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        lp = tgt - lse_p if tgt is not None else kl.new_zeros(0)
        if tgt is None:
            ctx.mark_non_differentiable(lp)
        return kl, lp

    @staticmethod
    def backward(ctx, grad_kl, grad_lp):
        x_ref, x_pol, weight, bias, targets, lse_r, lse_p = ctx.saved_tensors
        if targets is None:
            grad_lp = None
        if grad_kl is None and grad_lp is None:
            return None, None, None, None, None, None
        needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3])
        with torch.autocast(x_pol.device.type, enabled=False):
            gx, gw, gb = ctx.impl.kl_backward(x_ref, x_pol, weight, bias, targets, lse_r, lse_p,
                                              grad_kl.contiguous() if grad_kl is not None else None,
                                              grad_lp.contiguous() if grad_lp is not None else None, needs)
        return None, (gx.to(x_pol.dtype) if gx is not None else None), gw, gb, None, None


def _kl_rows(h_ref, h_pol, weight, labels, mask, bias, backend):
    if h_ref.shape != h_pol.shape:
        raise ValueError(f"shape mismatch: {tuple(h_ref.shape)} vs {tuple(h_pol.shape)}")
    impl = _backend.implementation(h_pol.device, backend)
    xp, sel = select_rows(h_pol, mask)
    xr, _ = select_rows(h_ref.detach(), mask)
    targets = select_values(labels, sel).long() if labels is not None else None
    kl, lp = SequentialKLFunction.apply(xr, xp, weight, bias, targets, impl)
    return kl, lp, sel


def sequential_kl(h_ref, h_pol, weight, mask, *, bias=None, backend=None) -> torch.Tensor:
    """[B] sum over the mask of per-token KL(p_ref || pi) (same value as ``cdpo.head.sequential_kl_from_logits``
    of the full logits)."""
    kl, _, sel = _kl_rows(h_ref, h_pol, weight, None, mask, bias, backend)
    return scatter_rows(kl, sel, tuple(mask.shape)).sum(-1)


def sequential_kl_and_logprobs(h_ref, h_pol, weight, labels, mask, *, bias=None, backend=None):
    """([B] sequential KL, [B, T] policy log-probs of ``labels``) from one pass over the head."""
    kl, lp, sel = _kl_rows(h_ref, h_pol, weight, labels, mask, bias, backend)
    shape = tuple(mask.shape)
    return scatter_rows(kl, sel, shape).sum(-1), scatter_rows(lp, sel, shape)
