"""Everything that goes through the output head, in two implementations with one signature each.

`loss_impl=torch` (`TorchHead`): chunked torch in this package, each chunk's logits recomputed in
backward. `loss_impl=fused` (`FusedHead`): the kernels of `cdpo_kernels` — Triton on CUDA; on a
machine without CUDA their chunked torch tiles (the same tiling arithmetic), which is said once.
`head_ops(loss_impl)` is the one place that chooses; nothing else tests the name.

The torch implementation's math lives here too (`token_logprobs_from_hidden`, `sequential_kl_from_logits`);
the losses on the log-probs it returns are `cdpo.losses`'. Conventions (those of `cdpo.losses`):
`hidden[:, t]` scores `targets[:, t]`; `mask` [B, T] marks response positions; results are float32 with
0 at masked-out positions.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cdpo.contrastive import contrastive_token_probs_from_hidden
from cdpo.losses import _mask, _scatter_rows, _selected_rows

IMPLS = ("torch", "fused")
KL_CHUNK = 256  # response rows whose [rows, V] logits are alive at once in the TDPO KL

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the torch implementation's math


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


def sequential_kl_from_logits(
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


def _kl_of_rows(ref_rows, pol_rows, weight, bias):
    """Per-row KL(p_ref || pi) over the vocabulary, in fp32 (also under bf16 autocast)."""
    with torch.autocast(device_type=pol_rows.device.type, enabled=False):
        ref = F.linear(ref_rows.float(), weight.float(), None if bias is None else bias.float())
        pol = F.linear(pol_rows.float(), weight.float(), None if bias is None else bias.float())
        ones = torch.ones(ref.shape[0], 1, dtype=torch.bool, device=ref.device)
        return sequential_kl_from_logits(ref[:, None], pol[:, None], ones)  # each row is a one-token "sequence"


class TorchHead:
    name = "torch"

    @staticmethod
    def token_logprobs(hidden, weight, targets, mask, *, bias=None) -> torch.Tensor:
        """[B, T] log softmax(hidden W^T + bias)[targets] on the mask."""
        return token_logprobs_from_hidden(hidden, weight, targets, mask, bias=bias)

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
