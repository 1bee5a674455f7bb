"""Per-token policy log-probs of a preference pair batch in one fused call.

Chosen and rejected rows are selected by their masks, stacked, and scored by a single
:class:`LinearLogprobFunction` call (one pass over the head for the whole pair batch). What a loss
does with them is the caller's (the kernels know no objective): cdpo's `FusedHead.pair_logprobs`
hands them to the same objective as the pure-torch path, so both share one definition of every loss.
"""

from __future__ import annotations

import torch

from .logprob import linear_logprobs
from .tiling import scatter_rows, select_rows, select_values


def policy_logprobs_pair(hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected,
                         mask_chosen, mask_rejected, *, bias=None, backend=None):
    """([B, Tc], [B, Tr]) per-token policy log-probs from one stacked fused call (Tc and Tr may differ)."""
    xc, sel_c = select_rows(hidden_chosen, mask_chosen)
    xr, sel_r = select_rows(hidden_rejected, mask_rejected)
    targets = torch.cat([select_values(labels_chosen, sel_c), select_values(labels_rejected, sel_r)])
    lp = linear_logprobs(torch.cat([xc, xr]), weight, targets, bias=bias, backend=backend)
    lp_c, lp_r = lp.split([xc.shape[0], xr.shape[0]])
    return (scatter_rows(lp_c, sel_c, tuple(mask_chosen.shape)),
            scatter_rows(lp_r, sel_r, tuple(mask_rejected.shape)))
