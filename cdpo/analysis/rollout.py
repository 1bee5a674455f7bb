"""Rollout verification of critical tokens (the paper's Figure 1).

For an incorrect trajectory y = (y_0 .. y_{T-1}) of prompt x, the success rate at position t is

    s_t = fraction of m continuations sampled from (x, y_<t) whose whole response reaches the gold answer

(token t itself is resampled, so s_0 is the success rate of the prompt alone). The trajectory is
wrong, so s_T = 0. The **critical token** is y_c with

    c = the last position with s_c > 0,

i.e. the earliest position after which the success rate stays at 0: with y_c in the prefix no
continuation succeeds any more, without it some do. When s_t = 0 everywhere the trajectory was
lost from the prompt on and has no critical token. With a stride k > 1 only every k-th position
is sampled first; `refine` then samples the k - 1 positions after the last successful one, so c is
exact (without refinement it is only known to lie in [c, c + k - 1]). With m samples a true rate
below about 1/m often shows as 0, which moves c earlier: m = 64 as in the paper keeps that rare.

With vs without: from (x, y_<=c) n continuations; and n times a replacement token v ~ pi(. | x, y_<c)
with y_c masked out (at the rollout temperature), followed by one continuation from (x, y_<c, v).
Their unbiased pass@k for k = 1..n is what the Figure 1 plot compares. These are fresh samples:
by the definition of c, the rollouts from (x, y_<=c) all failed, which would make "with" 0 by
construction.

The model is the policy that produced the trajectories (the base model, no adapter).
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import torch

from cdpo.errors import UserError
from cdpo.data.collate import collate_sequences
from cdpo.generation import Completion, GenerationStats, _cut_at_stop, _eos_ids, generate_ids
from cdpo.grading import grade
from cdpo.logprobs import backbone_and_head, hidden_states, response_logps


class RolloutConfigError(UserError, ValueError):
    """A rollout setting that cannot work; the message names the key."""


@dataclass
class RolloutSettings:
    m: int = 64                # continuations per position (paper: 64)
    stride: int = 1            # sample every stride-th position first
    refine: bool = True        # then the positions between the last successful one and the next sampled
    compare_n: int = 64        # samples with and without the critical token (pass@k for k <= compare_n)
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 64   # per continuation
    batch_size: int = 32
    stop: list[str] = field(default_factory=list)
    grading: str = "strict"    # answer rule (cdpo.grading.POLICIES), the run's data.grading

    def __post_init__(self):
        if self.temperature <= 0:
            raise RolloutConfigError(f"rollout.temperature must be > 0 (got {self.temperature}): greedy rollouts are all alike")
        for name in ("m", "stride", "compare_n", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise RolloutConfigError(f"rollout.{name} must be >= 1 (got {getattr(self, name)})")


def seed_for(key: str, seed: int) -> int:
    """A per-trajectory seed that does not depend on which shard or run handles the trajectory."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31


def response_text(tokenizer, prefix_ids: list[int], completion: Completion | None, stop: list[str]) -> str:
    """The whole response: prefix + continuation, cut at EOS and at the stop string. (The stop string
    may straddle the two, e.g. a prefix ending in a newline and a continuation starting with one.)"""
    ids = list(prefix_ids) + (list(completion.token_ids) if completion is not None else [])
    eos = set(_eos_ids(tokenizer))
    end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return _cut_at_stop(tokenizer.decode(ids[:end], skip_special_tokens=True), stop)[0]


def _graded(tokenizer, prefixes: list[list[int]], outs: list[list[Completion]], answers, stop,
            policy: str = "strict") -> list[list[bool]]:
    return [[grade(response_text(tokenizer, prefix, c, stop), answers, policy=policy).correct for c in comps]
            for prefix, comps in zip(prefixes, outs)]


def success_counts(model, tokenizer, prompt_ids, response_ids, positions, answers, s: RolloutSettings, *,
                   seed: int, stats: GenerationStats) -> dict[int, int]:
    """Correct continuations out of s.m from (x, y_<t), for every t in `positions`, in one batched call
    (all rows share the prompt and y_<min(positions): that prefix is encoded once)."""
    if not positions:
        return {}
    prefixes = [list(response_ids[:t]) for t in positions]
    outs = generate_ids(model, tokenizer, [list(prompt_ids) + p for p in prefixes], n=s.m, temperature=s.temperature,
                        top_p=s.top_p, max_new_tokens=s.max_new_tokens, stop=s.stop, seed=seed,
                        batch_size=s.batch_size, progress=False, stats=stats)
    return {t: sum(ok) for t, ok in zip(positions, _graded(tokenizer, prefixes, outs, answers, s.stop, s.grading))}


def critical_position(rates: dict[int, float]) -> int | None:
    """The last position with a positive success rate (see the module doc); None when there is none."""
    return max((t for t, r in rates.items() if r > 0), default=None)


@torch.no_grad()
def policy_view(model, prompt_ids, response_ids) -> tuple[list[float], torch.Tensor]:
    """log pi(y_t | x, y_<t) for every response token, and the last hidden states of the sequence
    (the next-token distribution at any response position is one head matmul away)."""
    device = next(model.parameters()).device
    batch = collate_sequences([{"prompt_ids": prompt_ids, "response_ids": response_ids}], pad_id=0,
                              max_length=len(prompt_ids) + len(response_ids), max_prompt_length=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    logps = response_logps(model, batch, hidden=hidden)
    return logps[batch["mask"]].float().tolist(), hidden[0]


@torch.no_grad()
def sample_replacements(model, hidden: torch.Tensor, n_prompt: int, position: int, original: int, n: int, *,
                        temperature: float, seed: int) -> list[int]:
    """n tokens from pi(. | x, y_<position) at `temperature`, the original token masked out."""
    _, head = backbone_and_head(model)
    logits = head(hidden[n_prompt + position - 1]).float() / temperature  # the state that predicts y_position
    logits[original] = float("-inf")
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    return torch.multinomial(torch.softmax(logits, -1), n, replacement=True, generator=generator).tolist()


def rollout_trajectory(model, tokenizer, item: dict, s: RolloutSettings, *, seed: int,
                       stats: GenerationStats | None = None) -> dict:
    """Success rates, the critical token and the with/without comparison of one incorrect trajectory.

    `item`: key, prompt_ids, response_ids, answers (any extra fields are kept)."""
    stats = stats if stats is not None else GenerationStats()
    t0, tokens0 = time.perf_counter(), stats.new_tokens
    prompt, response, answers = list(item["prompt_ids"]), list(item["response_ids"]), item["answers"]
    n_tokens = len(response)
    counts = success_counts(model, tokenizer, prompt, response, list(range(0, n_tokens, s.stride)), answers, s,
                            seed=seed, stats=stats)
    last = critical_position(counts)
    if s.refine and s.stride > 1 and last is not None:
        gap = list(range(last + 1, min(last + s.stride, n_tokens)))
        counts.update(success_counts(model, tokenizer, prompt, response, gap, answers, s, seed=seed + 1, stats=stats))
    positions = sorted(counts)
    rates = {t: counts[t] / s.m for t in positions}
    c = critical_position(rates)
    # exact when the next token's prefix was sampled too (or c is the last token: s_T = 0 is known)
    exact = c is None or c + 1 in rates or c + 1 == n_tokens
    logps, hidden = policy_view(model, prompt, response)
    record = {**item, "m": s.m, "positions": positions, "correct": [counts[t] for t in positions],
              "critical_index": c, "critical_exact": exact, "policy_logp": logps}
    if c is not None:
        replacements = sample_replacements(model, hidden, len(prompt), c, response[c], s.compare_n,
                                           temperature=s.temperature, seed=seed + 2)
        prefixes = [response[:c + 1]] * s.compare_n + [response[:c] + [v] for v in replacements]
        outs = generate_ids(model, tokenizer, [prompt + p for p in prefixes], n=1, temperature=s.temperature,
                            top_p=s.top_p, max_new_tokens=s.max_new_tokens, stop=s.stop, seed=seed + 3,
                            batch_size=s.batch_size, progress=False, stats=stats)
        ok = [o[0] for o in _graded(tokenizer, prefixes, outs, answers, s.stop, s.grading)]
        record["with"] = {"n": s.compare_n, "correct": sum(ok[:s.compare_n])}
        record["without"] = {"n": s.compare_n, "correct": sum(ok[s.compare_n:]), "replacement_ids": replacements,
                             "replacement_correct": ok[s.compare_n:]}
    record["new_tokens"] = stats.new_tokens - tokens0
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def expected_work(items: list[dict], s: RolloutSettings) -> tuple[int, int]:
    """(continuations, new tokens) a run is expected to generate, the refinement and the comparison
    counted at their maximum; a continuation from position t is assumed as long as the rest of the
    trajectory, T - t tokens."""
    continuations = tokens = 0
    for item in items:
        n = len(item["response_ids"])
        coarse = range(0, n, s.stride)
        refine = (s.stride - 1) if s.refine else 0
        continuations += s.m * (len(coarse) + refine) + 2 * s.compare_n
        tokens += s.m * (sum(n - t for t in coarse) + refine * n // 2) + 2 * s.compare_n * (n // 2)
    return continuations, tokens
