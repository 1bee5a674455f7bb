"""Naive full-logits formulas: the ground truth for tests and the "naive" row of the benchmark.

They build the whole [N, V] logits tensor on purpose. ``dtype`` picks the compute precision
(tests use float64). Conventions as everywhere: ``hidden[:, t]`` scores ``labels[:, t]``,
masked positions give 0 and never index anything.
"""

from __future__ import annotations

import torch


def logits(hidden, weight, bias=None, dtype=torch.float32):
    z = hidden.to(dtype) @ weight.to(dtype).t()
    return z + bias.to(dtype) if bias is not None else z


def token_logprobs(hidden, weight, labels, mask, *, bias=None, dtype=torch.float32):
    """[B, T] log softmax(hidden W^T + b)[labels] on the mask, 0 elsewhere."""
    logp = torch.log_softmax(logits(hidden, weight, bias, dtype), dim=-1)
    mask = mask.bool()
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    lp = logp.gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def contrastive_token_probs(h_pos, h_neg, weight, labels, mask, *, b=1.0, bias=None, weight_neg=None,
                            bias_neg=None, dtype=torch.float32):
    """softmax((1 + b) z_pos - b z_neg)[labels] from each model's own head (shared if weight_neg is None)."""
    z_pos = logits(h_pos, weight, bias, dtype)
    if weight_neg is None:
        z_neg = logits(h_neg, weight, bias_neg if bias_neg is not None else bias, dtype)
    else:
        z_neg = logits(h_neg, weight_neg, bias_neg, dtype)
    z = (1.0 + b) * z_pos - b * z_neg
    mask = mask.bool()
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    p = torch.softmax(z, dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(mask, p, torch.zeros_like(p))


def sequential_kl(h_ref, h_pol, weight, mask, *, bias=None, dtype=torch.float32):
    """[B] sum_t on the mask sum_v p_ref (log p_ref - log pi); the reference side is detached."""
    log_ref = torch.log_softmax(logits(h_ref.detach(), weight.detach(), bias.detach() if bias is not None else None,
                                       dtype), dim=-1)
    log_pol = torch.log_softmax(logits(h_pol, weight, bias, dtype), dim=-1)
    kl = (log_ref.exp() * (log_ref - log_pol)).sum(-1)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(-1)


def dpo_from_logprobs(pol_c, pol_r, ref_c, ref_r, mask_c, mask_r, *, beta=0.1, label_smoothing=0.0,
                      weights_chosen=None, weights_rejected=None, rpo_alpha=None):
    """(loss, metrics) of token-weighted DPO (+ RPO's NLL term when rpo_alpha is set), written out
    independently of ``cdpo.losses`` to cross-check it."""
    mask_c, mask_r = mask_c.bool(), mask_r.bool()
    w_c = weights_chosen.to(pol_c.dtype) if weights_chosen is not None else torch.ones_like(pol_c)
    w_r = weights_rejected.to(pol_r.dtype) if weights_rejected is not None else torch.ones_like(pol_r)
    zero_c, zero_r = torch.zeros_like(pol_c), torch.zeros_like(pol_r)
    s_c = torch.where(mask_c, w_c * (pol_c - ref_c.to(pol_c.dtype)), zero_c).sum(-1)
    s_r = torch.where(mask_r, w_r * (pol_r - ref_r.to(pol_r.dtype)), zero_r).sum(-1)
    z = beta * (s_c - s_r)
    loss = (-(1 - label_smoothing) * torch.nn.functional.logsigmoid(z)
            - label_smoothing * torch.nn.functional.logsigmoid(-z)).mean()
    sum_c = torch.where(mask_c, pol_c, zero_c).sum(-1)
    sum_r = torch.where(mask_r, pol_r, zero_r).sum(-1)
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * (-sum_c / mask_c.sum(-1).clamp(min=1)).mean()
    metrics = {
        "rewards/chosen": (beta * s_c).mean(),
        "rewards/rejected": (beta * s_r).mean(),
        "rewards/margins": (beta * (s_c - s_r)).mean(),
        "rewards/accuracies": (s_c > s_r).to(pol_c.dtype).mean(),
        "logps/chosen": sum_c.mean(),
        "logps/rejected": sum_r.mean(),
        "nll": -sum_c.sum() / mask_c.sum().clamp(min=1),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}
