"""Contrastive scoring p_ce(y) = softmax((1 + b) z_pos - b z_neg)[y] from hidden states.

Shared head (the LoRA case): the combination is linear in the hidden states, so with an fp32 head
one GEMM over h = (1 + b) h_pos - b h_neg, bias unchanged (or (1 + b) bias - b bias_neg); with a
bf16/fp16 head h is not rounded to the head's dtype: the kernel runs a K-loop per model and
combines the fp32 tiles, as it does for two heads. Either way only one fp32
log-sum-exp per token is kept; [N, V] never exists. Scoring only: no autograd.
"""

from __future__ import annotations

import torch

from . import backend as _backend
from .tiling import scatter_rows, select_rows, select_values


def _combined_bias(bias, bias_neg, b):
    if bias_neg is None:
        return bias
    pos = bias.float() if bias is not None else torch.zeros_like(bias_neg, dtype=torch.float32)
    return (1.0 + b) * pos - b * bias_neg.float()


@torch.no_grad()
@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def contrastive_token_probs(h_pos, h_neg, weight, labels, mask, *, b=1.0, bias=None, weight_neg=None,
                            bias_neg=None, backend=None) -> torch.Tensor:
    """[B, T] fp32 p_ce of ``labels`` on the mask, 0 elsewhere (same contract as
    ``cdpo.contrastive.contrastive_token_probs_from_hidden``)."""
    if h_pos.shape != h_neg.shape:
        raise ValueError(f"shape mismatch: {tuple(h_pos.shape)} vs {tuple(h_neg.shape)}")
    impl = _backend.implementation(h_pos.device, backend)
    xp, sel = select_rows(h_pos, mask)
    xn, _ = select_rows(h_neg, mask)
    targets = select_values(labels, sel).long()
    if weight_neg is None and (b == 0 or weight.dtype == torch.float32):
        # One GEMM over the fp32 combination (exact for b = 0 in any dtype).
        x = xp if b == 0 else (1.0 + b) * xp.float() - b * xn.float()
        lse, tgt = impl.lse_forward(x, weight, targets, _combined_bias(bias, bias_neg, b))
    elif weight_neg is None:
        # bf16/fp16 head: rounding (1 + b) h_pos - b h_neg to the head's dtype for the tensor cores
        # would cut it to an 8-bit mantissa; two GEMMs on the exact inputs, combined as fp32 tiles,
        # give the fp32 combination that the torch path (cdpo.contrastive) computes.
        lse, tgt = impl.lse_forward(xp, weight, targets, _combined_bias(bias, bias_neg, b), x2=xn,
                                    weight2=weight, a1=1.0 + b, a2=-b)
    else:
        b_pos = bias.float() if bias is not None else None
        b_neg = bias_neg.float() if bias_neg is not None else None
        if b_pos is None and b_neg is None:
            b_comb = None
        else:
            zero = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            b_comb = (1.0 + b) * (b_pos if b_pos is not None else zero) - b * (b_neg if b_neg is not None else zero)
        lse, tgt = impl.lse_forward(xp, weight, targets, b_comb, x2=xn, weight2=weight_neg, a1=1.0 + b, a2=-b)
    return scatter_rows(torch.exp(tgt - lse), sel, tuple(mask.shape))
