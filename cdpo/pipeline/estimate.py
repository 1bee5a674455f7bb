"""A rough forecast, printed before training on a CPU, of how long the stages left will take at this size:
preference data of one's own can be thousands of rows, which on a CPU means hours, better known up front.

Arithmetic, not a measurement of the stages: the work in FLOPs (a forward pass costs 2 N per token for N
parameters; a LoRA training step about 3x that, the frozen weights' gradients not computed) over this CPU's
float32 matmul rate, measured in a fraction of a second. Real stages reach a fraction of that rate
(attention, the optimiser, data handling), so the forecast is given as a range of 1-4x the arithmetic.
"""
from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from cdpo.pipeline.artifacts import RunPaths, load

log = logging.getLogger(__name__)

STAGES = ("sft_pos", "sft_neg", "score", "align")


def parameters(cfg: DictConfig) -> int:
    """The base model's parameter count from its config (no weights are loaded)."""
    from cdpo.models import load_config, tiny_llama_like_embedded
    from cdpo.pipeline.context import TINY

    c = tiny_llama_like_embedded(seed=0).config if cfg.model.path == TINY else load_config(cfg.model.path)
    d, layers, ffn = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = d * getattr(c, "num_key_value_heads", c.num_attention_heads) // c.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn  # q, o; k, v; gate, up, down
    return layers * per_layer + c.vocab_size * d * (1 if getattr(c, "tie_word_embeddings", True) else 2)


def cpu_flops(seconds: float = 0.3) -> float:
    """This CPU's float32 matmul rate (FLOP/s), measured for about `seconds`."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 512 ** 3 / (time.perf_counter() - t0)


def stage_flops(cfg: DictConfig, pairs: list[dict], n_params: int) -> dict[str, float]:
    """FLOPs of each stage over `pairs` (prompt_ids, chosen_ids, rejected_ids)."""
    chosen = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs)
    rejected = sum(len(p["prompt_ids"]) + len(p["rejected_ids"]) for p in pairs)
    forward = 2 * n_params
    return {"sft_pos": cfg.ce.epochs * chosen * 3 * forward,
            "sft_neg": cfg.ce.epochs * rejected * 3 * forward,
            "score": 2 * (chosen + rejected) * forward,  # both CE models over both responses
            "align": cfg.align.epochs * (chosen + rejected) * 4 * forward}  # the policy's step + the reference


def forecast(cfg: DictConfig, paths: RunPaths, stages: list[str]) -> str | None:
    """The line to print, or None when there is nothing to forecast (no pairs yet, no training stage left)."""
    todo = [s for s in stages if s in STAGES]
    if not todo or not paths.pairs.exists():
        return None
    pairs = load(paths.pairs)
    flops = stage_flops(cfg, pairs, parameters(cfg))
    rate = cpu_flops()
    seconds = {s: flops[s] / rate for s in todo}
    total = sum(seconds.values())
    each = ", ".join(f"{s} {_duration(v)}-{_duration(4 * v)}" for s, v in seconds.items())
    return (f"[estimate] {len(pairs)} pairs on this CPU ({rate / 1e9:.0f} GFLOP/s float32 matmul): about "
            f"{_duration(total)} to {_duration(4 * total)} for {', '.join(todo)} ({each}); a rough forecast "
            "from FLOPs (cdpo/pipeline/estimate.py): fewer rows (data.train_limit) or a GPU shorten it")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
