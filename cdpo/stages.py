"""The table of stages: one declaration per stage, read by the runner (order, seeds, what to call), the
identities (the config sections each stage depends on), the markers (run- or method-level) and validation.

A stage's function is `<function>(cfg, paths, objective) -> summary` in `cdpo.pipeline.<module>`; what it reads and
writes are `artifacts.input_files` and `RunPaths.artifacts`. Imports nothing heavy (validation reads it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str       # cdpo.pipeline.<module>.<function> runs it
    level: str        # "run": shared by every method and seed of a run_dir; "method": one per method and seed
    seed: str         # the config key that seeds it (shared stages: their own settings' seed)
    settings: tuple[str, ...] | None  # config sections its identity hashes (and its inputs'); None: not hashed
    function: str = "run"


STAGES = (
    Stage("sample", "sample", "run", "sample.seed", ("model", "data", "sample", "generation")),
    Stage("select", "select", "run", "sample.seed", ("select",)),
    Stage("sft_pos", "sft", "run", "ce.seed", ("ce", "ce_lora"), "run_pos"),
    Stage("sft_neg", "sft", "run", "ce.seed", ("ce", "ce_lora"), "run_neg"),
    Stage("score", "score", "run", "ce.seed", ("ce",)),
    Stage("align", "align", "method", "seed", ("method", "peft", "align", "seed", "loss_impl")),
    Stage("eval", "evaluate", "method", "seed", None),  # always run: its results are cached per model (eval_signature)
)
BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)
