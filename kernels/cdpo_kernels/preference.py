"""Preference losses (DPO, RPO, cDPO, IPO, SimPO, ...) from hidden states in one fused call.

Chosen and rejected rows are selected by their masks, stacked, and scored by a single
:class:`LinearLogprobFunction` call (one pass over the head for the whole pair batch). The
per-token log-probs then go to the objective (``cdpo.objectives``), so the fused and the
pure-torch training paths share one definition of every loss and metric.
"""

from __future__ import annotations

import torch

from .logprob import linear_logprobs, token_logprobs
from .tiling import scatter_rows, select_rows, select_values


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


def _objective_loss(objective, pol_c, pol_r, ref_c, ref_r, mask_c, mask_r, weights_c, weights_r):
    from cdpo.objectives import PairLogps  # imported lazily (cdpo imports us lazily too)

    return objective.loss(PairLogps(pol_c, pol_r, mask_c, mask_r, ref_chosen=ref_c, ref_rejected=ref_r,
                                    weights_chosen=weights_c, weights_rejected=weights_r))


def preference_loss(objective, hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected,
                    mask_chosen, mask_rejected, ref_chosen=None, ref_rejected=None, *, bias=None,
                    weights_chosen=None, weights_rejected=None, backend=None):
    """(loss, metrics) of a pair objective (``cdpo.objectives``: DPO, RPO, cDPO, IPO, SimPO, ...) whose
    inputs are token log-probs; chosen and rejected may differ in T.

    ``ref_chosen`` / ``ref_rejected`` are precomputed per-token reference log-probs [B, T];
    ``weights_*`` per-token weights (cDPO: weights_rejected = 1 - p_ce; None = all ones). Metric
    keys are TRL's: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
    logps/chosen, logps/rejected, nll. The selected rows of both sides are concatenated (one
    copy of the hidden states); when the model already ran chosen and rejected as one batch,
    :func:`stacked_preference_loss` avoids that copy.
    """
    pol_c, pol_r = policy_logprobs_pair(hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected,
                                        mask_chosen, mask_rejected, bias=bias, backend=backend)
    return _objective_loss(objective, pol_c, pol_r, ref_chosen, ref_rejected, mask_chosen, mask_rejected,
                           weights_chosen, weights_rejected)


def stacked_preference_loss(objective, hidden, weight, labels, mask, ref_logps=None, *, weights=None, bias=None,
                            backend=None):
    """Same as :func:`preference_loss` for one concatenated batch: rows [0, B) chosen, [B, 2B) rejected
    (the layout of TRL's / Liger's concatenated forward). ``hidden [2B, T, H]``, everything else
    [2B, T]; ``weights`` covers both halves (cDPO "only_neg": ones on the chosen half). With a
    full mask the hidden states are not copied at all.
    """
    if hidden.shape[0] % 2:
        raise ValueError(f"stacked batch needs an even number of rows, got {hidden.shape[0]}")
    half = hidden.shape[0] // 2
    w_c, w_r = (weights[:half], weights[half:]) if weights is not None else (None, None)
    ref_c, ref_r = (ref_logps[:half], ref_logps[half:]) if ref_logps is not None else (None, None)
    lp = token_logprobs(hidden, weight, labels, mask, bias=bias, backend=backend)
    return _objective_loss(objective, lp[:half], lp[half:], ref_c, ref_r, mask[:half], mask[half:], w_c, w_r)
