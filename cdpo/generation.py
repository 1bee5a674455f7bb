"""Batched sampling through HF `generate` with KV cache, stop strings and a tokens/s progress bar
(or through vLLM: `generation=vllm`, see cdpo.generation_vllm).

Each completion keeps the response token ids the model produced (cut at the stop string), so
later stages train and score on exactly these ids instead of re-tokenising text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cdpo.kv_cache import CACHE_ARG, preallocated_cache, prefix_cache, shared_prefix_ids
from cdpo.progress import Progress


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    # "stop": hit a stop string, "eos": the model ended, "length": ran out of max_new_tokens
    finish_reason: str


@dataclass
class GenerationStats:
    sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    per_batch: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _response_ids(tokenizer, ids: list[int], text: str) -> list[int]:
    """Token ids that decode to `text`: the generated ids as far as they stay a prefix of it,
    then the tail (the piece of the token that straddled the stop string) re-tokenised."""
    keep = len(ids)
    while keep and not text.startswith(tokenizer.decode(ids[:keep], skip_special_tokens=True)):
        keep -= 1
    tail = text[len(tokenizer.decode(ids[:keep], skip_special_tokens=True)):]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    return ids[:keep] + tail_ids


def _finish(tokenizer, new_ids: list[int], stop: list[str]) -> Completion:
    eos = set(_eos_ids(tokenizer))
    ended_by_eos = False
    for i, tok in enumerate(new_ids):
        if tok in eos:
            new_ids, ended_by_eos = new_ids[:i], True
            break
    new_ids = [t for t in new_ids if t != tokenizer.pad_token_id]
    full = tokenizer.decode(new_ids, skip_special_tokens=True)
    text, stopped = _cut_at_stop(full, stop)
    ids = new_ids if not stopped else _response_ids(tokenizer, new_ids, text)
    if stopped or ended_by_eos:
        # A finished response ends with EOS, so SFT teaches the model to stop.
        return Completion(text, ids + [tokenizer.eos_token_id], "stop" if stopped else "eos")
    return Completion(text, ids, "length")


def _eos_ids(tokenizer) -> list[int]:
    ids = tokenizer.eos_token_id
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def generate(model, tokenizer, prompts: list[str], *, add_special_tokens: bool = True, **kwargs) -> list[list[Completion]]:
    """Sample completions of text prompts: tokenise them, then `generate_ids` (its keyword arguments)."""
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    return generate_ids(model, tokenizer, ids, **kwargs)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    n: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
    stats: GenerationStats | None = None,
    share_prefix: bool = True,
    bar: Progress | None = None,
) -> list[list[Completion]]:
    """Sample `n` completions per prompt given as token ids (greedy when temperature == 0).

    A prompt may end inside a response (a rollout continues a trajectory's prefix): the completion
    holds only the new tokens. Prompts are repeated n times and packed into batches of `batch_size`
    rows; each batch's seed is derived from `seed` and the batch index, so a resumed run reproduces
    it. With `share_prefix`, the tokens every prompt starts with (few-shot exemplars, a trajectory's
    prefix) are encoded once and each batch continues their KV cache; rows are laid out as
    [prefix | left padding | rest of the prompt].
    `bar`: the stage's progress bar to advance (sequences, generated tokens/s); else one of its own.
    """
    stop = list(stop or [])
    if temperature == 0 and n > 1:
        raise ValueError("n > 1 with greedy decoding (temperature=0) gives n identical completions")
    ids = [list(p) for p in prompt_ids]
    stats = stats if stats is not None else GenerationStats()
    engine = hasattr(model, "complete")  # an inference engine (cdpo.generation_vllm, generation=vllm) batches itself
    own = bar is None
    # an engine's own bar follows its requests; a stage's bar moves once per call
    bar = (Progress(desc, len(ids) * n, "seq", disable=not progress or engine) if own else bar).start()
    if engine:
        before = stats.new_tokens
        out = model.complete(tokenizer, ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop=stop, seed=seed, progress=progress and own, stats=stats)
        bar.advance(len(ids) * n, stats.new_tokens - before)
        if own:
            bar.close()
        return out
    rows = [row for row in ids for _ in range(n)]
    prefix = shared_prefix_ids(ids) if share_prefix else []
    out: list[Completion] = []
    device = next(model.parameters()).device
    cache = prefix_cache(model, prefix) if prefix else None
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = [row[len(prefix):] for row in rows[start:start + batch_size]]
        width = max(map(len, batch))
        input_ids = torch.tensor([prefix + [tokenizer.pad_token_id] * (width - len(r)) + r for r in batch], device=device)
        attention = torch.tensor([[1] * len(prefix) + [0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
        torch.manual_seed(seed * 1_000_003 + start)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=tokenizer)
        kwargs[CACHE_ARG] = preallocated_cache(model, len(batch), input_ids.shape[1] + max_new_tokens, cache)
        t0 = time.perf_counter()
        seqs = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        dt = time.perf_counter() - t0
        new = seqs[:, input_ids.shape[1]:].tolist()
        done = [_finish(tokenizer, ids, stop) for ids in new]
        out.extend(done)
        stats.sequences += len(batch)
        stats.new_tokens += sum(len(c.token_ids) for c in done)
        stats.seconds += dt
        stats.per_batch.append(dt)
        bar.advance(len(batch), sum(len(c.token_ids) for c in done))
    if own:
        bar.close()
    return [out[i * n:(i + 1) * n] for i in range(len(ids))]
