"""Collation of stored token ids (and per-token weights) into padded batches.

Every artifact stores `prompt_ids` and `response_ids` (and, for scored responses, one weight per
response token). The collator concatenates them, pads, and returns per-token tensors that are
already aligned with the next-token targets: position t of `targets`, `mask` and `weights` is
the token predicted by logits at input position t. Weight i of a response therefore lands on
response token i whatever the padding side, and no text is ever re-tokenised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class TruncationCounter:
    """Counts sequences cut to `max_length` (reported in the logs)."""

    truncated: int = 0
    seen: int = 0


def truncate(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int, max_prompt_length: int,
             counter: TruncationCounter | None = None) -> tuple[list[int], int]:
    """Keep the end of the prompt (at most max_prompt_length tokens, the question sits there) and the
    start of the response so that the whole fits max_length. Returns the ids and the response length kept."""
    prompt = list(prompt_ids)[-max_prompt_length:] if max_prompt_length else list(prompt_ids)
    room = max(max_length - len(prompt), 1)
    response = list(response_ids)[:room]
    if counter is not None:
        counter.seen += 1
        counter.truncated += int(len(response) < len(response_ids) or len(prompt) < len(prompt_ids))
    return prompt + response, len(response)


def drop_overlong(pairs: Sequence[dict[str, Any]], *, prompt_length: int, length: int) -> list[dict[str, Any]]:
    """The pairs whose prompt has fewer than `prompt_length` tokens and whose prompt + chosen and
    prompt + rejected each have fewer than `length` (the authors' rule: they leave such pairs out
    where truncation would cut them)."""
    return [p for p in pairs if len(p["prompt_ids"]) < prompt_length
            and len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) < length]


def collate_sequences(
    items: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    padding_side: str = "right",
    weights_key: str | None = None,
    max_length: int = 1536,
    max_prompt_length: int = 512,
    counter: TruncationCounter | None = None,
) -> dict[str, torch.Tensor]:
    """items: dicts with `prompt_ids`, `response_ids` and optionally `weights_key` (one float per response id).

    Returns input_ids/attention_mask [B, L] and targets/mask/weights [B, L-1] aligned to the logits
    of positions 0..L-2.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows, resp_lens = [], []
    for item in items:
        ids, kept = truncate(item["prompt_ids"], item["response_ids"], max_length, max_prompt_length, counter)
        rows.append(ids)
        resp_lens.append(kept)
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    response = torch.zeros((batch, width), dtype=torch.bool)
    token_weights = torch.zeros((batch, width), dtype=torch.float32)
    for i, (ids, kept) in enumerate(zip(rows, resp_lens)):
        offset = width - len(ids) if padding_side == "left" else 0
        input_ids[i, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, offset:offset + len(ids)] = 1
        first = offset + len(ids) - kept  # index of the first response token
        response[i, first:first + kept] = True
        if weights_key is not None:
            w = items[i][weights_key]
            # a full list, or one already cut to the kept tokens (e.g. cached reference log-probs)
            if len(w) not in (len(items[i]["response_ids"]), kept):
                raise ValueError(
                    f"record {items[i].get('id', i)}: {len(w)} weights for {len(items[i]['response_ids'])} response tokens"
                )
            token_weights[i, first:first + kept] = torch.tensor(w[:kept], dtype=torch.float32)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention,
        # logits at position t predict input token t+1
        "targets": input_ids[:, 1:].clone(),
        "mask": response[:, 1:].clone(),
    }
    if weights_key is not None:
        out["weights"] = token_weights[:, 1:].clone()
    return out


def collate_pairs(items: Sequence[dict[str, Any]], *, pad_id: int, padding_side: str = "right",
                  max_length: int = 1536, max_prompt_length: int = 512,
                  counter: TruncationCounter | None = None,
                  with_weights: bool = False, with_ref: bool = False) -> dict[str, Any]:
    """Pairs: dicts with prompt_ids, chosen_ids, rejected_ids and optionally chosen_p_ce/rejected_p_ce
    (token weights come from them) and ref_chosen/ref_rejected (cached reference token log-probs)."""
    out: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        seqs = []
        for item in items:
            seq = {"prompt_ids": item["prompt_ids"], "response_ids": item[f"{side}_ids"]}
            if with_weights:
                seq["w"] = item[f"{side}_p_ce"]
            if with_ref:
                seq["ref"] = item[f"ref_{side}"]
            seqs.append(seq)
        kw = dict(pad_id=pad_id, padding_side=padding_side, max_length=max_length,
                  max_prompt_length=max_prompt_length, counter=counter)
        side_batch = collate_sequences(seqs, weights_key="w" if with_weights else None, **kw)
        if with_ref:
            kw["counter"] = None  # already counted above
            side_batch["ref_logps"] = collate_sequences(seqs, weights_key="ref", **kw)["weights"]
        out[side] = side_batch
    return out
