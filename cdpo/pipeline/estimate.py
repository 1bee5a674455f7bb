"""A forecast, printed before training on a CPU, of how long the stages left will take at this size:
preference data of one's own can be thousands of rows, which on a CPU means hours, better known up front.

The rate is measured, not assumed: the base model (as the stages load it) runs one batch of this run's
pairs forward, then forward and backward to its inputs (what a LoRA step costs: the frozen weights get no
gradients), and the stages' token counts are divided by those rates. Optimiser steps, data handling and a
busier machine make the stages slower; the forecast is a lower end, given with twice it as the upper.
"""
from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from cdpo.pipeline.artifacts import RunPaths, load
from cdpo.progress import duration

log = logging.getLogger(__name__)

STAGES = ("sft_pos", "sft_neg", "score", "align")


def stage_tokens(cfg: DictConfig, pairs: list[dict]) -> dict[str, tuple[int, int]]:
    """(tokens trained on, tokens only run forward) of each stage over `pairs`."""
    chosen = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs)
    rejected = sum(len(p["prompt_ids"]) + len(p["rejected_ids"]) for p in pairs)
    return {"sft_pos": (cfg.ce.epochs * chosen, 0), "sft_neg": (cfg.ce.epochs * rejected, 0),
            "score": (0, 2 * (chosen + rejected)),  # both CE models over both responses
            "align": (cfg.align.epochs * (chosen + rejected), cfg.align.epochs * (chosen + rejected))}  # + reference


def measure(cfg: DictConfig, pairs: list[dict], batch: int = 4) -> tuple[float, float]:
    """(training tokens/s, forward tokens/s) of the base model on `batch` of the pairs (chosen sides)."""
    import torch

    from cdpo.pipeline import context

    model = context.base_model(cfg)
    model.requires_grad_(False)
    rows = [p["prompt_ids"] + p["chosen_ids"] for p in pairs[:batch]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=model.device)
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        t0 = time.perf_counter()
        model(ids)
        forward = time.perf_counter() - t0
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    t0 = time.perf_counter()
    model(inputs_embeds=embeds).logits.float().logsumexp(-1).mean().backward()
    train = time.perf_counter() - t0
    tokens = ids.numel()
    return tokens / train, tokens / forward


def forecast(cfg: DictConfig, paths: RunPaths, stages: list[str]) -> str | None:
    """The line to print, or None when there is nothing to forecast (no pairs yet, no training stage left)."""
    todo = [s for s in stages if s in STAGES]
    if not todo or not paths.pairs.exists():
        return None
    pairs = load(paths.pairs)
    if not pairs:
        return None
    train_rate, forward_rate = measure(cfg, pairs)
    tokens = stage_tokens(cfg, pairs)
    seconds = {s: tokens[s][0] / train_rate + tokens[s][1] / forward_rate for s in todo}
    total = sum(seconds.values())
    each = ", ".join(f"{s} {duration(v)}" for s, v in seconds.items())
    return (f"[estimate] {len(pairs)} pairs; this machine ran the model at {train_rate:.0f} tokens/s training, "
            f"{forward_rate:.0f} forward: {', '.join(todo)} will take {duration(total)} to {duration(2 * total)} "
            f"({each}); fewer rows (data.train_limit) or a GPU shorten it")
