"""KV caches: a prefix shared by many sequences (few-shot exemplars, a pair's prompt) encoded once,
and a cache preallocated for decoding. Used by generation (`cdpo.generation`) and by contrastive
scoring (`cdpo.modules.scoring`)."""
from __future__ import annotations

import copy
import inspect

import torch

from cdpo.logprobs import backbone_and_head


def _cache_argument() -> str:
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_ARG = _cache_argument()  # the KV-cache keyword of decoder forwards (renamed in transformers 5)


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
