"""Everything that goes through the output head, in two implementations with one signature each.

`loss_impl=torch` (`TorchHead`): chunked torch in this package, each chunk's logits recomputed in
backward. `loss_impl=fused` (`FusedHead`): the kernels of `cdpo_kernels` — Triton on CUDA; on a
machine without CUDA their chunked torch tiles (the same tiling arithmetic), which is said once.
`head_ops(loss_impl)` is the one place that chooses; nothing else tests the name.

Conventions (those of `cdpo.losses`): `hidden[:, t]` scores `targets[:, t]`; `mask` [B, T] marks
response positions; results are float32 with 0 at masked-out positions.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cdpo import losses
from cdpo.contrastive import contrastive_token_probs_from_hidden

IMPLS = ("torch", "fused")
KL_CHUNK = 256  # response rows whose [rows, V] logits are alive at once in the TDPO KL

log = logging.getLogger(__name__)


def _kl_of_rows(ref_rows, pol_rows, weight, bias):
    """Per-row KL(p_ref || pi) over the vocabulary, in fp32 (also under bf16 autocast)."""
    with torch.autocast(device_type=pol_rows.device.type, enabled=False):
        ref = F.linear(ref_rows.float(), weight.float(), None if bias is None else bias.float())
        pol = F.linear(pol_rows.float(), weight.float(), None if bias is None else bias.float())
        ones = torch.ones(ref.shape[0], 1, dtype=torch.bool, device=ref.device)
        return losses.sequential_kl(ref[:, None], pol[:, None], ones)  # each row is a one-token "sequence"


class TorchHead:
    name = "torch"

    @staticmethod
    def token_logprobs(hidden, weight, targets, mask, *, bias=None) -> torch.Tensor:
        """[B, T] log softmax(hidden W^T + bias)[targets] on the mask."""
        return losses.token_logprobs_from_hidden(hidden, weight, targets, mask, bias=bias)

    @classmethod
    def pair_logprobs(cls, h_chosen, h_rejected, weight, t_chosen, t_rejected, m_chosen, m_rejected, *, bias=None):
        """Token log-probs of a pair batch's chosen and rejected sides."""
        return (cls.token_logprobs(h_chosen, weight, t_chosen, m_chosen, bias=bias),
                cls.token_logprobs(h_rejected, weight, t_rejected, m_rejected, bias=bias))

    @staticmethod
    def sequential_kl(h_ref, h_pol, weight, mask, *, bias=None) -> torch.Tensor:
        """[B] sum over the mask of KL(p_ref || pi) per position (TDPO); gradient through h_pol and W.
        Only response rows reach the vocabulary, KL_CHUNK rows at a time, recomputed in backward."""
        rows = mask.nonzero(as_tuple=True)
        ref_rows, pol_rows = h_ref.detach()[rows], h_pol[rows]
        pieces = [checkpoint(_kl_of_rows, ref_rows[i:i + KL_CHUNK], pol_rows[i:i + KL_CHUNK], weight, bias,
                             use_reentrant=False) for i in range(0, ref_rows.shape[0], KL_CHUNK)]
        per_row = torch.cat(pieces) if pieces else pol_rows.new_zeros(0, dtype=torch.float32)
        return torch.zeros(mask.shape, dtype=per_row.dtype, device=mask.device).index_put(rows, per_row).sum(-1)

    @staticmethod
    def contrastive_token_probs(h_pos, h_neg, weight, targets, mask, *, b, bias=None, weight_neg=None,
                                bias_neg=None) -> torch.Tensor:
        """[B, T] p_ce = softmax((1 + b) z_pos - b z_neg)[targets] on the mask (no autograd)."""
        return contrastive_token_probs_from_hidden(h_pos, h_neg, weight, targets, mask, b=b, bias=bias,
                                                   weight_neg=weight_neg, bias_neg=bias_neg)


class FusedHead:
    name = "fused"

    @staticmethod
    def token_logprobs(hidden, weight, targets, mask, *, bias=None) -> torch.Tensor:
        from cdpo_kernels import token_logprobs

        return token_logprobs(hidden, weight, targets, mask, bias=bias)

    @staticmethod
    def pair_logprobs(h_chosen, h_rejected, weight, t_chosen, t_rejected, m_chosen, m_rejected, *, bias=None):
        """One stacked kernel call for both sides: one pass over the head for the whole pair batch."""
        from cdpo_kernels import policy_logprobs_pair

        return policy_logprobs_pair(h_chosen, h_rejected, weight, t_chosen, t_rejected, m_chosen, m_rejected,
                                    bias=bias)

    @staticmethod
    def sequential_kl(h_ref, h_pol, weight, mask, *, bias=None) -> torch.Tensor:
        from cdpo_kernels import sequential_kl

        return sequential_kl(h_ref, h_pol, weight, mask, bias=bias)

    @staticmethod
    def contrastive_token_probs(h_pos, h_neg, weight, targets, mask, *, b, bias=None, weight_neg=None,
                                bias_neg=None) -> torch.Tensor:
        from cdpo_kernels import contrastive_token_probs

        return contrastive_token_probs(h_pos, h_neg, weight, targets, mask, b=b, bias=bias, weight_neg=weight_neg,
                                       bias_neg=bias_neg)


_said_fallback = False


def head_ops(impl: str = "torch"):
    """The head implementation `loss_impl` names."""
    global _said_fallback
    if impl == "torch":
        return TorchHead
    if impl != "fused":
        raise ValueError(f"loss_impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if not torch.cuda.is_available() and not _said_fallback:
        _said_fallback = True
        log.warning("loss_impl=fused without CUDA: cdpo_kernels runs its chunked torch tiles (the kernels' "
                    "arithmetic, no Triton); on a GPU the Triton kernels run")
    return FusedHead
