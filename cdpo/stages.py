"""The table of stages: one declaration per stage, read by the runner (order, seeds, what to call), the
identities (the config sections each stage depends on), the markers (run- or method-level) and validation.

A stage's function is `<function>(cfg, paths, objective) -> summary` in `cdpo.pipeline.<module>`. What it reads
(`inputs`: "<upstream stage>.<artifact>") and writes (`outputs`) are named as `RunPaths` names them; two
inputs depend on the run, and `artifacts.input_files` decides them: with preference data (`data=preference`)
select reads the user's rows instead of the samples and also writes `bad_rows`, and align reads what the
objective trains on (`ALIGN_INPUT`). Imports nothing heavy (validation reads it).
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
    inputs: tuple[str, ...]           # "<stage>.<artifact>" it reads
    outputs: tuple[str, ...]          # artifacts it writes (what its marker describes)
    function: str = "run"


ALIGN_INPUT = "by objective"  # align reads the scored pairs, the pairs or the positives: what the objective trains on


STAGES = (
    Stage("sample", "sample", "run", "sample.seed", ("model", "data", "sample", "generation"),
          (), ("trajectories",)),
    Stage("select", "select", "run", "sample.seed", ("select",),
          ("sample.trajectories",), ("positives", "negatives", "pairs")),
    Stage("sft_pos", "sft", "run", "ce.seed", ("ce", "ce_lora"),
          ("select.positives",), ("pos_adapter",), "run_pos"),
    Stage("sft_neg", "sft", "run", "ce.seed", ("ce", "ce_lora"),
          ("select.negatives",), ("neg_adapter",), "run_neg"),
    Stage("score", "score", "run", "ce.seed", ("ce",),
          ("select.pairs", "sft_pos.pos_adapter", "sft_neg.neg_adapter"), ("scored_pairs",)),
    Stage("align", "align", "method", "seed", ("method", "peft", "align", "seed", "loss_impl"),
          (ALIGN_INPUT,), ("aligned_adapter",)),
    # always run: its results are cached per model (eval_signature); reads the aligned adapter when there is one
    Stage("eval", "evaluate", "method", "seed", None, ("align.aligned_adapter",), ()),
)
BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)
