"""The one model-facing log-prob function: per-token log-probs of response tokens.

It runs the decoder to the last hidden state and scores only the masked-in targets against the
output head, so the [B, T, V] logits tensor is never built (`cdpo.head`: chunked torch, or the fused
kernels when `impl="fused"`). Every training and scoring path goes through here.
"""
from __future__ import annotations

import torch

from cdpo.head import head_ops


def backbone_and_head(model):
    """(decoder returning last_hidden_state, output head) for a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state [B, L, H]. Position ids follow the attention mask so that left padding
    gives the same result as right padding."""
    decoder, _ = backbone_and_head(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def response_logps(model, batch: dict[str, torch.Tensor], *, impl: str = "torch",
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs [B, L-1] of `batch["targets"]` where `batch["mask"]`, 0 elsewhere.

    `batch` comes from `cdpo.data.collate.collate_sequences`.
    """
    ops = head_ops(impl)
    if hidden is None:
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    hidden = hidden[:, :-1]
    _, head = backbone_and_head(model)
    return ops.token_logprobs(hidden, head.weight, batch["targets"], batch["mask"], bias=getattr(head, "bias", None))
