"""Pure-torch reference losses on per-token log-probs (docs/design.md §1, Table 1 of the paper).

Conventions shared by everything here:
- alignment is done by the caller: ``logits[:, t]`` scores ``labels[:, t]``;
- ``mask`` [B, T] is True on response tokens only. Masked positions never influence a result:
  they are excluded by row selection or ``torch.where`` (never by multiplying with the mask, which
  would turn a NaN/inf in a masked slot into NaN) and their labels are never used as indices;
- computation is float32 (bf16/fp16 inputs are upcast), outputs are float32.

These functions are what every objective (``cdpo.objectives``) calls, whichever head computed the
log-probs: the log-probs themselves (and TDPO's KL) come from ``cdpo.head``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
# SFT and DPO-family losses


def response_lengths(mask: torch.Tensor) -> torch.Tensor:
    """[B] response tokens per row (at least 1): the length normalisation of SimPO, IPO and RPO's NLL."""
    return mask.bool().sum(-1).clamp(min=1)


def response_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean of per-token values over each row's response tokens."""
    return sequence_logps(values, mask) / response_lengths(mask)


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Token-mean NLL over all response tokens of the batch."""
    mask = _mask(mask, token_logps.shape)
    n_tokens = mask.sum().clamp(min=1)
    loss = -sequence_logps(token_logps, mask).sum() / n_tokens
    return loss, {"nll": loss.detach()}


def _chosen_nll(policy_chosen: torch.Tensor, mask_chosen: torch.Tensor) -> torch.Tensor:
    return sft_loss(policy_chosen, mask_chosen)[0].detach()


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
) -> Metrics:
    """TRL's metric names (rewards/*, logps/*, nll) from the [B] rewards; every value a detached batch mean."""
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


def log_ratio_sums(
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
    s_c, s_r = log_ratio_sums(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask_chosen, mask_rejected,
        weights_chosen, weights_rejected,
    )
    z = beta * (s_c - s_r)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-z)
    metrics = preference_metrics(
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
    return loss - alpha * response_mean(policy_chosen, mask_chosen).mean(), metrics


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024), reference-free: -logsig(beta (avg logp_c - avg logp_r) - gamma), avg over
    each response's tokens; rewards are beta * avg logp (TRL's CPOTrainer, loss_type="simpo")."""
    avg_c, avg_r = response_mean(policy_chosen, mask_chosen), response_mean(policy_rejected, mask_rejected)
    loss = -F.logsigmoid(beta * (avg_c - avg_r) - gamma).mean()
    return loss, preference_metrics(beta * avg_c, beta * avg_r, policy_chosen, policy_rejected, mask_chosen,
                                    mask_rejected)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    mask_chosen: torch.Tensor,
    mask_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, h the difference of the chosen and rejected
    log-ratios each averaged over its response tokens (TRL's loss_type="ipo"; beta is tau). Rewards are
    beta times the summed log-ratios, as TRL logs them."""
    sum_c, sum_r = log_ratio_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask_chosen,
                                  mask_rejected)
    avg_c, avg_r = sum_c / response_lengths(mask_chosen), sum_r / response_lengths(mask_rejected)
    loss = ((avg_c - avg_r - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, preference_metrics(beta * sum_c, beta * sum_r, policy_chosen, policy_rejected, mask_chosen,
                                    mask_rejected)


# --------------------------------------------------------------------------------------------
# TDPO (Zeng et al. 2024)


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
    m_c, m_r = log_ratio_sums(
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
    metrics = preference_metrics(
        beta * m_c, beta * m_r, policy_chosen, policy_rejected, mask_chosen, mask_rejected
    )
    metrics["kl/chosen"] = kl_c.detach().mean()
    metrics["kl/rejected"] = kl_r.detach().mean()
    return loss, metrics
