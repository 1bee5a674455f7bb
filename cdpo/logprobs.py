"""The one model-facing log-prob function: per-token log-probs of response tokens.

It runs the decoder to the last hidden state and scores only the masked-in targets against the
output head, so the [B, T, V] logits tensor is never built (`cdpo.head`: chunked torch, or the fused
kernels when `impl="fused"`). Every training and scoring path goes through here.

That needs logits = hidden @ lm_head.weight^T (+ bias). `backbone_and_head` makes it so, or
refuses the model: a constant logit scale (Cohere's `logit_scale`, Granite's `logits_scaling`)
is folded into the hidden states the decoder returns; logit soft-capping (Gemma-2's
`final_logit_softcapping`) and a head that is not a plain linear layer (a LoRA or a
modules_to_save copy on lm_head, whose `.weight` is not what its forward applies) raise
UnsupportedHeadError.
"""
from __future__ import annotations

import torch

from cdpo.errors import UserError
from cdpo.head import head_ops


class UnsupportedHeadError(UserError, ValueError):
    """The model's logits are not hidden @ lm_head.weight^T (+ bias), and cannot be made so here."""


def logit_scale(config) -> float:
    """The constant the model multiplies its logits by: Cohere's logit_scale, Granite's 1 / logits_scaling."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    return scale


def check_head(base) -> float:
    """The logit scale of `base` (a transformers causal LM), or UnsupportedHeadError naming why
    its logits cannot be computed from the last hidden state and lm_head.weight."""
    name = f"model.path={getattr(base.config, '_name_or_path', '') or type(base).__name__}"
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        raise UnsupportedHeadError(
            f"{name}: final_logit_softcapping={cap} (logits = cap * tanh(logits / cap), e.g. Gemma-2) is not "
            "supported: log-probs here come from the last hidden state and lm_head.weight without the logits "
            "tensor, and a soft cap is not linear in them")
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "base_layer"):
        raise UnsupportedHeadError(
            f"{name}: the output head is a {type(head).__name__}, not a plain linear layer (a LoRA or modules_to_save "
            "on lm_head?): its .weight is not what it applies. Leave lm_head out of peft.target_modules and "
            "modules_to_save")
    scale = logit_scale(config)
    if scale != 1.0 and head.bias is not None:
        raise UnsupportedHeadError(f"{name}: a logit scale ({scale:g}) with a biased head is not supported")
    return scale


class _ScaledDecoder:
    """The decoder, with its last hidden state times the model's logit scale: (s h) W^T = s (h W^T)."""

    def __init__(self, decoder, scale: float):
        self.decoder, self.scale = decoder, scale

    def __call__(self, *args, **kwargs):
        out = self.decoder(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * self.scale
        return out


def backbone_and_head(model):
    """(decoder returning last_hidden_state, output head) for a causal LM, PEFT-wrapped or not,
    such that logits = last_hidden_state @ head.weight^T (+ head.bias); see the module doc."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, scale = base.get_decoder(), check_head(base)
    return (decoder if scale == 1.0 else _ScaledDecoder(decoder, scale)), base.get_output_embeddings()


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
