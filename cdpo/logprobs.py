"""The one model-facing log-prob function: per-token log-probs of response tokens.

It runs the decoder to the last hidden state and scores only the masked-in targets against the
output head, so the [B, T, V] logits tensor is never built (chunked torch, or the fused kernels
from `cdpo_kernels` when `impl="fused"`). Every training and scoring path goes through here.

That needs logits = hidden @ lm_head.weight^T (+ bias). `backbone_and_head` makes it so, or
refuses the model: a constant logit scale (Cohere's `logit_scale`, Granite's `logits_scaling`)
is folded into the hidden states the decoder returns; logit soft-capping (Gemma-2's
`final_logit_softcapping`) and a head that is not a plain linear layer (a LoRA or a
modules_to_save copy on lm_head, whose `.weight` is not what its forward applies) raise
UnsupportedHeadError.
"""
from __future__ import annotations

import copy
import inspect

import torch

from cdpo.losses import token_logprobs_from_hidden

IMPLS = ("torch", "fused")


def _cache_argument() -> str:
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_ARG = _cache_argument()  # the KV-cache keyword of decoder forwards (renamed in transformers 5)


class UnsupportedHeadError(ValueError):
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


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens shared by the start of every sequence (few-shot exemplars, a system prompt)."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


MIN_SHARED_PREFIX = 16  # tokens; shorter shared prefixes are not worth a cache copy per batch


def shared_prefix_ids(sequences: list[list[int]], min_length: int = MIN_SHARED_PREFIX) -> list[int]:
    """The tokens every sequence starts with, kept one short of the shortest sequence (its last token
    stays in the batch: its output predicts what follows); empty when shorter than `min_length`."""
    if not sequences:
        return []
    n = min(common_prefix_length(sequences), min(map(len, sequences)) - 1)
    return list(sequences[0][:n]) if n >= min_length else []


def repeat_cache(cache, batch: int):
    """A copy of a batch-1 prefix cache for `batch` rows (forwards extend the cache they are given)."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(batch)
    return cache


def preallocated_cache(model, batch: int, max_length: int, prefix=None):
    """A KV cache allocated once for `batch` rows and `max_length` positions, optionally starting
    with a batch-1 `prefix` cache copied into every row. Decoding writes each step in place; a
    growing DynamicCache instead copies the whole cache at every step, which is most of a batched
    decode step's time on a CPU."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_length)
    if prefix is not None:
        for layer, source in zip(cache.layers, prefix.layers):
            keys, values = (t.expand(batch, -1, -1, -1) for t in (source.keys, source.values))
            layer.update(keys, values)  # allocates, then writes positions [0, prefix length)
    return cache


@torch.no_grad()
def prefix_cache(model, prefix_ids: list[int]):
    """KV cache of a prefix shared by many sequences, computed once (per adapter)."""
    decoder, _ = backbone_and_head(model)
    ids = torch.tensor([prefix_ids], device=next(model.parameters()).device)
    out = decoder(input_ids=ids, use_cache=True)
    return out["cache"] if "cache" in out else out.past_key_values  # transformers >= 5.2 renamed it


def hidden_states_after_prefix(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state [B, S, H] of right-padded suffixes that continue the cached prefix."""
    decoder, _ = backbone_and_head(model)
    batch, prefix_len = input_ids.shape[0], cache.get_seq_length()
    cache = repeat_cache(cache, batch)
    mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)
    position_ids = prefix_len + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                  **{CACHE_ARG: cache})
    return out.last_hidden_state


def grouped_response_hidden_states(model, cache, prompts: list[list[int]], responses: list[list[int]],
                                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states that score responses sharing a prompt, each prompt encoded once.

    `responses` holds len(responses) // len(prompts) responses per prompt, grouped in prompt order
    (a pair's chosen and rejected share their question). Prompts (what follows the cached prefix,
    or everything when `cache` is None) are left-padded and encoded once; their KV cache is then
    repeated for each response and the right-padded responses continue it. Returns (hidden [R, L, H],
    targets [R, L], mask [R, L]): position t predicts response token t.
    """
    if not prompts or len(responses) % len(prompts):
        raise ValueError(f"{len(responses)} responses do not split evenly over {len(prompts)} prompts")
    if min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token after the shared prefix (its output predicts the response)")
    decoder, _ = backbone_and_head(model)
    device = next(model.parameters()).device
    group, width = len(responses) // len(prompts), max(map(len, prompts))
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    prefix_len = cache.get_seq_length() if cache is not None else 0
    cache = repeat_cache(cache, len(prompts)) if cache is not None else None
    mask = torch.cat([prompt_mask.new_ones(len(prompts), prefix_len), prompt_mask], dim=1)
    out = decoder(input_ids=prompt_ids, attention_mask=mask, position_ids=mask.cumsum(-1)[:, prefix_len:] - 1,
                  use_cache=True, **({CACHE_ARG: cache} if cache is not None else {}))
    cache = out["cache"] if "cache" in out else out.past_key_values
    last = out.last_hidden_state[:, -1:].repeat_interleave(group, dim=0)  # predicts each response's first token
    length = max(map(len, responses))
    targets = torch.tensor([r + [pad_id] * (length - len(r)) for r in responses], device=device)
    response_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in responses], device=device)
    if length <= 1:
        return last[:, :length], targets, response_mask.bool()
    cache.batch_repeat_interleave(group)
    mask = torch.cat([mask.repeat_interleave(group, dim=0), response_mask[:, :-1]], dim=1)
    out = decoder(input_ids=targets[:, :-1], attention_mask=mask, position_ids=mask.cumsum(-1)[:, -(length - 1):] - 1,
                  use_cache=True, **{CACHE_ARG: cache})
    return torch.cat([last, out.last_hidden_state], dim=1), targets, response_mask.bool()


def response_logps(model, batch: dict[str, torch.Tensor], *, impl: str = "torch", chunk_size: int = 1024,
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs [B, L-1] of `batch["targets"]` where `batch["mask"]`, 0 elsewhere.

    `batch` comes from `cdpo.data.collate.collate_sequences`.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown log-prob implementation {impl!r}; choose one of {IMPLS}")
    if hidden is None:
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    hidden = hidden[:, :-1]
    _, head = backbone_and_head(model)
    bias = getattr(head, "bias", None)
    if impl == "fused":
        from cdpo_kernels import token_logprobs as fused_token_logprobs

        return fused_token_logprobs(hidden, head.weight, batch["targets"], batch["mask"], bias=bias)
    return token_logprobs_from_hidden(hidden, head.weight, batch["targets"], batch["mask"], bias=bias,
                                      chunk_size=chunk_size)
