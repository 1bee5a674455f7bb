"""Test oracles: log-prob and contrastive-estimation formulas on full [B, T, V] logits.

The package computes both from hidden states without building the logits (`cdpo.head`); these
logits forms are the simple references the tests compare it with. They were the package's own
until only tests called them.
"""
from __future__ import annotations

import torch

from cdpo.contrastive import _combine, _prob_of_target
from cdpo.losses import _mask, _scatter_rows, _selected_rows


class _ChunkedGatherLogProb(torch.autograd.Function):
    """log_softmax(x)[y] for selected rows of a [N, V] matrix, one row chunk at a time.

    Plain autograd would keep every chunk's float32 copy alive until backward; this saves only
    the input (already alive) and the per-row log-sum-exp, and recomputes the softmax per chunk
    in backward: d lp / d x = onehot(y) - softmax(x).
    """

    @staticmethod
    def forward(ctx, flat_logits, rows, targets, chunk_size):
        n = rows.numel()
        out = torch.empty(n, dtype=torch.float32, device=flat_logits.device)
        lse = torch.empty_like(out)
        for s in range(0, n, chunk_size):
            x = flat_logits.index_select(0, rows[s : s + chunk_size]).float()
            lse[s : s + chunk_size] = torch.logsumexp(x, dim=-1)
            tgt = x.gather(1, targets[s : s + chunk_size, None]).squeeze(1)
            out[s : s + chunk_size] = tgt - lse[s : s + chunk_size]
        ctx.save_for_backward(flat_logits, rows, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat_logits, rows, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk_size
        grad = torch.zeros_like(flat_logits)
        for s in range(0, rows.numel(), chunk):
            g = grad_out[s : s + chunk, None].float()
            x = flat_logits.index_select(0, rows[s : s + chunk]).float()
            d = -torch.exp(x - lse[s : s + chunk, None]) * g
            d.scatter_add_(1, targets[s : s + chunk, None], g)
            grad.index_copy_(0, rows[s : s + chunk], d.to(grad.dtype))
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """[B, T] float32 log softmax(logits[b, t])[labels[b, t]] on the mask, 0 elsewhere.

    Only masked-in rows are read, so garbage (inf/NaN) in prompt/padding logits and invalid labels
    there (e.g. -100) are harmless. With ``chunk_size`` at most ``chunk_size`` rows of float32
    vocabulary-sized values are alive at a time, in forward and in backward.
    """
    B, T, V = logits.shape
    mask = _mask(mask, (B, T))
    rows = _selected_rows(mask)
    targets = labels.reshape(-1).index_select(0, rows).long()
    flat = logits.reshape(B * T, V)
    if chunk_size is None:
        # Single pass with plain autograd: the simplest form, kept as an independent path.
        x = flat.index_select(0, rows).float()
        lp = x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        lp = _ChunkedGatherLogProb.apply(flat, rows, targets, int(chunk_size))
    return _scatter_rows(lp, rows, (B, T))


@torch.no_grad()
def contrastive_token_probs(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    b: float = 1.0,
    chunk_size: int = 256,
) -> torch.Tensor:
    """[B, T] float32 p_ce of each label on the mask, 0 elsewhere (logits [B, T, V] from each model)."""
    if pos_logits.shape != neg_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(pos_logits.shape)} vs {tuple(neg_logits.shape)}")
    B, T, V = pos_logits.shape
    mask = _mask(mask, (B, T))
    rows = _selected_rows(mask)
    targets = labels.reshape(-1).index_select(0, rows).long()
    pos_flat, neg_flat = pos_logits.reshape(B * T, V), neg_logits.reshape(B * T, V)
    out = torch.empty(rows.numel(), dtype=torch.float32, device=pos_logits.device)
    for s in range(0, rows.numel(), chunk_size):
        r = rows[s : s + chunk_size]
        z = _combine(pos_flat.index_select(0, r), neg_flat.index_select(0, r), b)
        out[s : s + chunk_size] = _prob_of_target(z, targets[s : s + chunk_size])
    return _scatter_rows(out, rows, (B, T))


def dpo_from_logprobs(pol_c, pol_r, ref_c, ref_r, mask_c, mask_r, *, beta=0.1, label_smoothing=0.0,
                      weights_chosen=None, weights_rejected=None, rpo_alpha=None):
    """(loss, metrics) of token-weighted DPO (+ RPO's NLL term when rpo_alpha is set), written out
    independently of ``cdpo.losses`` to cross-check it (moved here from cdpo_kernels.reference: only tests
    call it)."""
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
