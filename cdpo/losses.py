"""Pure-torch reference losses on per-token log-probs (docs/design.md §1, Table 1 of the paper).

Conventions shared by everything here:
- alignment is done by the caller: ``logits[:, t]`` scores ``labels[:, t]``;
- ``mask`` [B, T] is True on response tokens only. Masked positions never influence a result:
  they are excluded by row selection or ``torch.where`` (never by multiplying with the mask, which
  would turn a NaN/inf in a masked slot into NaN) and their labels are never used as indices;
- computation is float32 (bf16/fp16 inputs are upcast), outputs are float32.

These functions are the numerical references for the Triton kernels in ``kernels/`` and are
what the training modules call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Metrics = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------
# helpers


def _mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    mask = mask.bool()
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask


def _selected_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the masked-in positions of a [B, T] mask, in row-major order."""
    return mask.reshape(-1).nonzero().squeeze(1)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Place per-row values back into a zero [B, T] float32 tensor (differentiable in values)."""
    out = values.new_zeros(shape[0] * shape[1])
    return out.index_copy(0, rows, values).view(shape)


def sequence_logps(
    token_logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """[B] sum over the mask of (weights *) per-token values; masked slots may hold anything."""
    mask = _mask(mask, token_logps.shape)
    zero = torch.zeros((), device=token_logps.device)
    # Select before multiplying: a NaN weight or log-prob in a masked slot must not leak, not even
    # into the gradient (0 * NaN would).
    values = torch.where(mask, token_logps.float(), zero)
    if weights is not None:
        values = values * torch.where(mask, weights.float(), zero)
    return values.sum(-1)


# --------------------------------------------------------------------------------------------
# per-token log-probs


def _head_logprob_chunk(h, weight, bias, targets):
    # fp32 logits even inside a bf16 autocast region (Lightning's bf16-mixed): the reference
    # log-probs, computed outside autocast, must use the same numerics as the policy's
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """[B, T] float32 log softmax(hidden @ weight.T + bias)[labels] on the mask, 0 elsewhere, without
    building [B, T, V]; garbage (inf/NaN) in masked-out rows and invalid labels there are harmless.

    Only masked-in rows go through the head, ``chunk_size`` rows at a time. Under autograd each
    chunk is checkpointed (its logits are recomputed in backward), so memory stays one chunk.
    """
    B, T, H = hidden.shape
    mask = _mask(mask, (B, T))
    rows = _selected_rows(mask)
    targets = labels.reshape(-1).index_select(0, rows).long()
    h_all = hidden.reshape(B * T, H)
    # Upcast the head once, not per chunk (a no-op for float32 weights).
    w = weight.float()
    b = bias.float() if bias is not None else None
    need_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    pieces = []
    for s in range(0, rows.numel(), chunk_size):
        h = h_all.index_select(0, rows[s : s + chunk_size]).float()
        t = targets[s : s + chunk_size]
        if need_grad:
            pieces.append(checkpoint(_head_logprob_chunk, h, w, b, t, use_reentrant=False))
        else:
            pieces.append(_head_logprob_chunk(h, w, b, t))
    lp = torch.cat(pieces) if pieces else h_all.new_zeros(0, dtype=torch.float32)
    return _scatter_rows(lp.float(), rows, (B, T))


# --------------------------------------------------------------------------------------------
# SFT and DPO-family losses


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Token-mean NLL over all response tokens of the batch."""
    mask = _mask(mask, token_logps.shape)
    n_tokens = mask.sum().clamp(min=1)
    loss = -sequence_logps(token_logps, mask).sum() / n_tokens
    return loss, {"nll": loss.detach()}


def _chosen_nll(policy_chosen: torch.Tensor, mask_chosen: torch.Tensor) -> torch.Tensor:
    return sft_loss(policy_chosen, mask_chosen)[0].detach()


def _preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
) -> Metrics:
    """TRL's metric names; every value a detached batch mean."""
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": sequence_logps(policy_chosen.detach(), mask_chosen).mean(),
        "logps/rejected": sequence_logps(policy_rejected.detach(), mask_rejected).mean(),
        "nll": _chosen_nll(policy_chosen, mask_chosen),
    }


def _log_ratio_sums(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask_chosen, mask_rejected,
    weights_chosen=None, weights_rejected=None,
):
    """[B] sums of (w *) Delta for chosen and rejected; Delta = policy - reference log-prob."""
    delta_c = policy_chosen.float() - ref_chosen.float()
    delta_r = policy_rejected.float() - ref_rejected.float()
    return (
        sequence_logps(delta_c, mask_chosen, weights_chosen),
        sequence_logps(delta_r, mask_rejected, weights_rejected),
    )


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    weights_chosen: torch.Tensor | None = None,
    weights_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """(Token-weighted) DPO: -(1-ls) logsig(beta h) - ls logsig(-beta h), h = sum w^c D^c - sum w^r D^r."""
    s_c, s_r = _log_ratio_sums(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask_chosen, mask_rejected,
        weights_chosen, weights_rejected,
    )
    z = beta * (s_c - s_r)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-z)
    metrics = _preference_metrics(
        beta * s_c, beta * s_r, policy_chosen, policy_rejected, mask_chosen, mask_rejected
    )
    return losses.mean(), metrics


def cdpo_weights(
    p_ce_rejected: torch.Tensor,
    p_ce_chosen: torch.Tensor | None = None,
    chosen_weighting: str = "only_neg",
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(w_c, w_r) of cDPO: w_r = 1 - p_ce(rejected); w_c = None (all ones) or p_ce(chosen).

    ``only_neg`` is the paper's default; with ``p_ce`` the chosen tokens are weighted by their own
    contrastive probability.
    """
    w_r = 1.0 - p_ce_rejected.float()
    if chosen_weighting == "only_neg":
        return (torch.ones_like(p_ce_chosen, dtype=torch.float32) if p_ce_chosen is not None else None), w_r
    if chosen_weighting == "p_ce":
        if p_ce_chosen is None:
            raise ValueError("chosen_weighting='p_ce' needs p_ce_chosen")
        return p_ce_chosen.float(), w_r
    raise ValueError(f"unknown chosen_weighting {chosen_weighting!r}; expected 'only_neg' or 'p_ce'")


def cdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    *,
    weights_rejected: torch.Tensor,
    weights_chosen: torch.Tensor | None = None,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """cDPO (docs/design.md §1, step 4): token-weighted DPO with w^r = 1 - p_ce (see :func:`cdpo_weights`)."""
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask_chosen, mask_rejected,
        beta=beta, weights_chosen=weights_chosen, weights_rejected=weights_rejected,
    )


def _response_aligned(values: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] float32: row b's masked-in values in order from column 0 (the k-th response token in
    column k), zeros after; only masked-in slots are read."""
    B = mask.shape[0]
    rows, cols = mask.nonzero(as_tuple=True)
    index = (mask.long().cumsum(-1) - 1)[rows, cols]
    return values.new_zeros(B, width, dtype=torch.float32).index_put((rows, index), values[rows, cols].float())


def cdpo_per_position_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    *,
    weights_rejected: torch.Tensor,
    weights_chosen: torch.Tensor | None = None,
    beta: float = 0.1,
) -> torch.Tensor:
    """cDPO in the form of the authors' training code: a sigmoid per position, not per sequence.

    The k-th response token of the chosen and of the rejected response are paired (in the authors'
    right-padded batches they sit at the same position, the prompt being shared), and each pair gives
    -log sigmoid(beta (w^c_k D^c_k - w^r_k D^r_k)), with D = 0 past a response's end. The mean runs over
    every position of the padded pair batch, B x max(Tc, Tr): prompt and padding positions count as
    -log sigmoid(0) = log 2 (no gradient), as in the authors' mean over [B, L - 1].
    """
    mask_chosen = _mask(mask_chosen, policy_chosen.shape)
    mask_rejected = _mask(mask_rejected, policy_rejected.shape)
    n_c, n_r = mask_chosen.sum(-1), mask_rejected.sum(-1)
    K = int(torch.maximum(n_c, n_r).max().clamp(min=1))
    zero = torch.zeros((), device=policy_chosen.device)
    d_c = _response_aligned(torch.where(mask_chosen, policy_chosen.float() - ref_chosen.float(), zero), mask_chosen, K)
    d_r = _response_aligned(torch.where(mask_rejected, policy_rejected.float() - ref_rejected.float(), zero),
                            mask_rejected, K)
    w_r = _response_aligned(weights_rejected, mask_rejected, K)
    if weights_chosen is not None:
        d_c = d_c * _response_aligned(weights_chosen, mask_chosen, K)
    z = beta * (d_c - w_r * d_r)
    paired = torch.arange(K, device=z.device)[None, :] < torch.maximum(n_c, n_r)[:, None]
    total = policy_chosen.shape[0] * max(policy_chosen.shape[1], policy_rejected.shape[1])
    unpaired = total - int(paired.sum())
    return (torch.where(paired, -F.logsigmoid(z), zero).sum() + unpaired * math.log(2.0)) / total


def rpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """RPO (Pang et al. 2024): DPO + alpha * mean_b NLL(chosen_b) / |chosen_b|."""
    loss, metrics = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask_chosen, mask_rejected, beta=beta
    )
    mask_chosen = _mask(mask_chosen, policy_chosen.shape)
    lengths = mask_chosen.sum(-1).clamp(min=1)
    nll_per_seq = -sequence_logps(policy_chosen, mask_chosen) / lengths
    return loss + alpha * nll_per_seq.mean(), metrics


# --------------------------------------------------------------------------------------------
# TDPO (Zeng et al. 2024)


def _kl_rows(ref_rows: torch.Tensor, pol_rows: torch.Tensor) -> torch.Tensor:
    """Per-row sum_v p_ref (log p_ref - log pi); 0 * log 0 counts as 0, also for -inf logits."""
    log_ref = F.log_softmax(ref_rows.float(), dim=-1)
    log_pol = F.log_softmax(pol_rows.float(), dim=-1)
    p_ref = log_ref.exp()
    support = p_ref > 0
    zero = torch.zeros((), device=log_ref.device)
    # Select before multiplying so that neither value nor gradient sees 0 * inf.
    diff = torch.where(support, log_ref, zero) - torch.where(support, log_pol, zero)
    return torch.where(support, p_ref * diff, zero).sum(-1)


def sequential_kl(
    ref_logits: torch.Tensor,
    policy_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """[B] sequential forward KL: sum_t on the mask sum_v p_ref (log p_ref - log pi)."""
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(ref_logits.shape)} vs {tuple(policy_logits.shape)}")
    B, T, V = policy_logits.shape
    mask = _mask(mask, (B, T))
    rows = _selected_rows(mask)
    ref_flat = ref_logits.reshape(B * T, V)
    pol_flat = policy_logits.reshape(B * T, V)
    step = chunk_size or max(rows.numel(), 1)
    pieces = [
        _kl_rows(ref_flat.index_select(0, rows[s : s + step]), pol_flat.index_select(0, rows[s : s + step]))
        for s in range(0, rows.numel(), step)
    ]
    kl = torch.cat(pieces) if pieces else pol_flat.new_zeros(0, dtype=torch.float32)
    return _scatter_rows(kl, rows, (B, T)).sum(-1)


def tdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    kl_chosen: torch.Tensor,
    kl_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 2,
) -> tuple[torch.Tensor, Metrics]:
    """TDPO1: -logsig(beta((m_c-m_r) - (KL_r-KL_c))); TDPO2: alpha-scaled, no gradient via KL_c."""
    m_c, m_r = _log_ratio_sums(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask_chosen, mask_rejected
    )
    kl_c, kl_r = kl_chosen.float(), kl_rejected.float()
    if variant == 1:
        z = (m_c - m_r) - (kl_r - kl_c)
    elif variant == 2:
        z = (m_c - m_r) - alpha * (kl_r - kl_c.detach())
    else:
        raise ValueError(f"TDPO variant must be 1 or 2, got {variant!r}")
    loss = -F.logsigmoid(beta * z).mean()
    metrics = _preference_metrics(
        beta * m_c, beta * m_r, policy_chosen, policy_rejected, mask_chosen, mask_rejected
    )
    metrics["kl/chosen"] = kl_c.detach().mean()
    metrics["kl/rejected"] = kl_r.detach().mean()
    return loss, metrics
