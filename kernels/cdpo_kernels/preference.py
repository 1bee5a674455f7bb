"""Token-weighted preference loss (DPO, RPO, cDPO) from hidden states in one fused call.

Chosen and rejected rows are selected by their masks, stacked, and scored by a single
:class:`LinearLogprobFunction` call (one pass over the head for the whole pair batch). The
per-token log-probs then go through the reference formulas in :mod:`cdpo.losses`, so the fused
and the pure-torch training paths share one definition of every loss and metric.
"""

from __future__ import annotations

import torch

from .logprob import linear_logprobs, token_logprobs
from .tiling import scatter_rows, select_rows, select_values

METHODS = ("dpo", "rpo", "cdpo")


def policy_logprobs_pair(hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected,
                         mask_chosen, mask_rejected, *, bias=None, backend=None):
    """([B, Tc], [B, Tr]) per-token policy log-probs from one stacked fused call."""
    xc, sel_c = select_rows(hidden_chosen, mask_chosen)
    xr, sel_r = select_rows(hidden_rejected, mask_rejected)
    targets = torch.cat([select_values(labels_chosen, sel_c), select_values(labels_rejected, sel_r)])
    lp = linear_logprobs(torch.cat([xc, xr]), weight, targets, bias=bias, backend=backend)
    lp_c, lp_r = lp.split([xc.shape[0], xr.shape[0]])
    return (scatter_rows(lp_c, sel_c, tuple(mask_chosen.shape)),
            scatter_rows(lp_r, sel_r, tuple(mask_rejected.shape)))


def _check(method, weights_chosen, weights_rejected):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "cdpo" and weights_rejected is None:
        raise ValueError("cdpo needs weights_rejected (1 - p_ce of the rejected tokens)")
    if method == "rpo" and (weights_chosen is not None or weights_rejected is not None):
        raise ValueError("rpo takes no token weights")


def _score(method, pol_c, pol_r, ref_c, ref_r, mask_c, mask_r, *, beta, label_smoothing, alpha,
           weights_chosen, weights_rejected):
    from cdpo import losses  # the reference formulas; imported lazily (cdpo imports us lazily too)

    args = (pol_c, pol_r, ref_c, ref_r, mask_c, mask_r)
    if method == "rpo":
        return losses.rpo_loss(*args, beta=beta, alpha=alpha)
    return losses.dpo_loss(*args, beta=beta, label_smoothing=label_smoothing,
                           weights_chosen=weights_chosen, weights_rejected=weights_rejected)


def preference_loss(method, hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected,
                    mask_chosen, mask_rejected, ref_chosen, ref_rejected, *, bias=None, beta=0.1,
                    label_smoothing=0.0, alpha=1.0, weights_chosen=None, weights_rejected=None,
                    backend=None):
    """(loss, metrics) of ``method`` in {"dpo", "rpo", "cdpo"}; chosen and rejected may differ in T.

    ``ref_chosen`` / ``ref_rejected`` are precomputed per-token reference log-probs [B, T];
    ``weights_*`` per-token weights (cDPO: weights_rejected = 1 - p_ce; None = all ones). Metric
    keys are TRL's: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
    logps/chosen, logps/rejected, nll. The selected rows of both sides are concatenated (one
    copy of the hidden states); when the model already ran chosen and rejected as one batch,
    :func:`stacked_preference_loss` avoids that copy.
    """
    _check(method, weights_chosen, weights_rejected)
    pol_c, pol_r = policy_logprobs_pair(hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected,
                                        mask_chosen, mask_rejected, bias=bias, backend=backend)
    return _score(method, pol_c, pol_r, ref_chosen, ref_rejected, mask_chosen, mask_rejected, beta=beta,
                  label_smoothing=label_smoothing, alpha=alpha, weights_chosen=weights_chosen,
                  weights_rejected=weights_rejected)


def stacked_preference_loss(method, hidden, weight, labels, mask, ref_logps, *, weights=None, bias=None,
                            beta=0.1, label_smoothing=0.0, alpha=1.0, backend=None):
    """Same as :func:`preference_loss` for one concatenated batch: rows [0, B) chosen, [B, 2B) rejected
    (the layout of TRL's / Liger's concatenated forward). ``hidden [2B, T, H]``, everything else
    [2B, T]; ``weights`` covers both halves (cDPO "only_neg": ones on the chosen half). With a
    full mask the hidden states are not copied at all.
    """
    if hidden.shape[0] % 2:
        raise ValueError(f"stacked batch needs an even number of rows, got {hidden.shape[0]}")
    half = hidden.shape[0] // 2
    w_c, w_r = (weights[:half], weights[half:]) if weights is not None else (None, None)
    _check(method, w_c, w_r)
    lp = token_logprobs(hidden, weight, labels, mask, bias=bias, backend=backend)
    return _score(method, lp[:half], lp[half:], ref_logps[:half], ref_logps[half:], mask[:half], mask[half:],
                  beta=beta, label_smoothing=label_smoothing, alpha=alpha, weights_chosen=w_c, weights_rejected=w_r)
