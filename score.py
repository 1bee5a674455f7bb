"""Contrastive estimation on a pairs file with given positive and negative models.

    python score.py pairs=runs/x/pairs.jsonl pos=runs/x/adapters/pos neg=runs/x/adapters/neg [ce.b=1.0]

Each of pos / neg is a LoRA adapter directory (loaded on model.path) or a full model directory.
Writes the scored pairs: every response's token ids next to their p_ce, and the critical token.
"""
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="score")
def main(cfg: DictConfig) -> None:
    from cdpo.cli import run_entry

    run_entry("score.py", lambda: score(cfg))


def score(cfg: DictConfig) -> None:
    from cdpo.validation import validate

    validate(cfg, training=False)  # before torch and the models are loaded
    from cdpo.io import DataError, iter_jsonl, write_jsonl
    from cdpo.pipeline import context
    from cdpo.pipeline.score import score_pairs, scorer_for

    pairs_path = Path(to_absolute_path(cfg.pairs))
    output = Path(to_absolute_path(cfg.output)) if cfg.output else pairs_path.with_name(f"{pairs_path.stem}.scored.jsonl")
    pairs = []
    for lineno, p in iter_jsonl(pairs_path):
        missing = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k not in p]
        if missing:
            raise DataError(f"{pairs_path}:{lineno}: missing {', '.join(missing)}")
        pairs.append(p)
    scorer = scorer_for(cfg, to_absolute_path(cfg.pos), to_absolute_path(cfg.neg))
    scored = score_pairs(cfg, scorer, pairs, context.tokenizer(cfg))
    write_jsonl(output, scored)
    low = [min(s["rejected_p_ce"]) for s in scored if s["rejected_p_ce"]]
    print(f"scored {len(scored)} pairs -> {output}; mean lowest p_ce in rejected responses "
          f"{sum(low) / max(len(low), 1):.3f}")


if __name__ == "__main__":
    main()
