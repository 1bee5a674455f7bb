"""Contrastive estimation of critical tokens (docs/design.md §1, step 3).

    p_ce(y_t) = softmax((1 + b) z^pos_t - b z^neg_t)[y_t]

z are the positive and negative models' logits at the position that scores y_t (alignment done
by the caller, as in :mod:`cdpo.losses`). Only masked-in positions are computed, a chunk of rows
at a time, so at most one chunk of vocabulary-sized values per model is alive. Low p_ce on a
rejected trajectory marks a critical token; cDPO weights it by 1 - p_ce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdpo.losses import _mask, _scatter_rows, _selected_rows


def _combine(z_pos: torch.Tensor, z_neg: torch.Tensor, b: float) -> torch.Tensor:
    """(1 + b) z_pos - b z_neg in float32; b = 0 is exactly z_pos (no 0 * inf)."""
    if b == 0:
        return z_pos.float()
    z = (1.0 + b) * z_pos.float() - b * z_neg.float()
    # -inf in both models (a token neither can produce) gives inf - inf: it stays impossible.
    return torch.nan_to_num(z, nan=float("-inf"))


def _prob_of_target(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax(z)[y] per row via log-sum-exp, without a full softmax copy."""
    return torch.exp(z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1))


@torch.no_grad()
def contrastive_token_probs_from_hidden(
    h_pos: torch.Tensor,
    h_neg: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    b: float = 1.0,
    bias: torch.Tensor | None = None,
    weight_neg: torch.Tensor | None = None,
    bias_neg: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """p_ce from final hidden states [B, T, H] and output head(s) [V, H], never building [B, T, V].

    Shared head (``weight_neg`` None, the LoRA case): the combination is linear, so one matmul
    ((1 + b) h_pos - b h_neg) W^T + ((1 + b) bias - b bias_neg) per chunk, where bias_neg defaults
    to bias and the bias term then reduces to bias. Two heads: two matmuls per chunk.
    """
    if h_pos.shape != h_neg.shape:
        raise ValueError(f"shape mismatch: {tuple(h_pos.shape)} vs {tuple(h_neg.shape)}")
    B, T, H = h_pos.shape
    mask = _mask(mask, (B, T))
    rows = _selected_rows(mask)
    targets = labels.reshape(-1).index_select(0, rows).long()
    hp_flat, hn_flat = h_pos.reshape(B * T, H), h_neg.reshape(B * T, H)
    w_pos = weight.float()
    b_pos = bias.float() if bias is not None else None
    shared = weight_neg is None
    if shared:
        if bias_neg is not None:
            zero = torch.zeros((), device=w_pos.device)
            b_comb = (1.0 + b) * (b_pos if b_pos is not None else zero) - b * bias_neg.float()
        else:
            b_comb = b_pos
    else:
        w_neg = weight_neg.float()
        b_neg = bias_neg.float() if bias_neg is not None else None
    out = torch.empty(rows.numel(), dtype=torch.float32, device=h_pos.device)
    # fp32 logits even when called inside a bf16 autocast region (Lightning's bf16-mixed predict)
    with torch.autocast(device_type=h_pos.device.type, enabled=False):
        for s in range(0, rows.numel(), chunk_size):
            r = rows[s : s + chunk_size]
            hp, hn = hp_flat.index_select(0, r).float(), hn_flat.index_select(0, r).float()
            if shared:
                z = F.linear(hp if b == 0 else (1.0 + b) * hp - b * hn, w_pos, b_comb)
            else:
                z = _combine(F.linear(hp, w_pos, b_pos), F.linear(hn, w_neg, b_neg), b)
            out[s : s + chunk_size] = _prob_of_target(z, targets[s : s + chunk_size])
    return _scatter_rows(out, rows, (B, T))


def scored_responses(labels: torch.Tensor, mask: torch.Tensor, p_ce: torch.Tensor) -> list[dict]:
    """Per row {"token_ids": [...], "p_ce": [...]} over the masked-in positions, in order.

    Ids and weights come from the same positions of the same tensors, so what is stored in a
    scored-pair file cannot drift out of alignment (docs/design.md §3: token ids are stored with their scores).
    """
    mask = _mask(mask, labels.shape)
    if p_ce.shape != labels.shape:
        raise ValueError(f"p_ce has shape {tuple(p_ce.shape)}, expected {tuple(labels.shape)}")
    out = []
    for ids_row, m_row, p_row in zip(labels.cpu(), mask.cpu(), p_ce.detach().float().cpu()):
        out.append({"token_ids": ids_row[m_row].tolist(), "p_ce": p_row[m_row].tolist()})
    return out
