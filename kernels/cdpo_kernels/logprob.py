"""Fused linear log-prob: log softmax(h W^T + b)[y] per token, without the [N, V] logits.

Forward keeps one fp32 log-sum-exp per token; backward recomputes logit tiles and returns exact
grad_hidden / grad_W / grad_bias for any upstream per-token gradient (token weights included).
Masked positions are dropped before the matmul.
"""

from __future__ import annotations

import torch

from . import backend as _backend
from .tiling import scatter_rows, select_rows, select_values


class LinearLogprobFunction(torch.autograd.Function):
    """[n] fp32 log-probs of ``targets`` under ``x @ weight.T + bias`` for selected rows ``x [n, H]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, impl):
        # Autocast must not turn the fp32 tile GEMMs of the torch path into bf16 ones.
        with torch.autocast(x.device.type, enabled=False):
            lse, tgt = impl.lse_forward(x, weight, targets, bias)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.impl = impl
        return tgt - lse

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, targets, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with torch.autocast(x.device.type, enabled=False):
            gx, gw, gb = ctx.impl.logprob_backward(x, weight, bias, targets, lse, grad.contiguous(), needs)
        return (gx.to(x.dtype) if gx is not None else None), gw, gb, None, None


def linear_logprobs(x, weight, targets, *, bias=None, backend=None) -> torch.Tensor:
    """Per-row log-probs for already-selected rows ``x [n, H]``, targets ``[n]`` (fp32 result)."""
    impl = _backend.implementation(x.device, backend)
    return LinearLogprobFunction.apply(x, weight, bias, targets.long(), impl)


def token_logprobs(hidden, weight, labels, mask, *, bias=None, backend=None) -> torch.Tensor:
    """[B, T] fp32 log softmax(hidden W^T + bias)[labels] on the mask, 0 elsewhere.

    Same contract as ``cdpo.head.token_logprobs_from_hidden``: ``hidden[:, t]`` scores
    ``labels[:, t]``; labels at masked positions are never read (e.g. -100 is fine).
    """
    x, sel = select_rows(hidden, mask)
    targets = select_values(labels, sel)
    lp = linear_logprobs(x, weight, targets, bias=bias, backend=backend)
    return scatter_rows(lp, sel, tuple(mask.shape))


def weighted_logprob_sums(hidden, weight, labels, mask, weights=None, *, bias=None, backend=None):
    """([B] sum_t w_t log p_t over the mask, [B, T] per-token log-probs).

    The weighting is applied to the selected rows only, so NaN weights at masked positions never
    reach the result or its gradient. Without weights the sum is unweighted.
    """
    x, sel = select_rows(hidden, mask)
    targets = select_values(labels, sel)
    lp = linear_logprobs(x, weight, targets, bias=bias, backend=backend)
    per_token = scatter_rows(lp, sel, tuple(mask.shape))
    if weights is None:
        return per_token.sum(-1), per_token
    w = select_values(weights.float(), sel)
    return scatter_rows(lp * w, sel, tuple(mask.shape)).sum(-1), per_token
