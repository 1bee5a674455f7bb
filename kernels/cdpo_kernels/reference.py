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
