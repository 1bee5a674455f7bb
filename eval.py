"""Evaluate: grade model predictions.

    python eval.py predictions=preds.jsonl [output=preds.graded.jsonl]

grades an existing predictions file (no model is loaded, nothing heavy is imported on this path),
writes the graded JSONL and a summary JSON beside it, and prints the accuracy. Model-based
evaluation (generate, then grade) is `python train.py stage=eval`.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig


def summary_path(graded_path: str | Path) -> Path:
    """preds.graded.jsonl -> preds.graded.summary.json"""
    graded_path = Path(graded_path)
    return graded_path.with_name(f"{graded_path.stem}.summary.json")


def format_summary(summary: dict) -> str:
    acc = summary["accuracy"]
    acc_text = "n/a" if acc is None else f"{100 * acc:.1f}%"
    line = (f"accuracy {acc_text} ({summary['correct']}/{summary['graded']}); "
            f"{summary['no_answer']} without an answer; "
            f"{summary['gold_unparseable']} gold unparseable")
    if summary.get("timeouts"):
        line += f"; {summary['timeouts']} timed out"
    return f"{line} -> {summary['output']}"


def grade_predictions(cfg: DictConfig) -> dict:
    from cdpo.grading import grade_file  # math-verify/sympy only: no torch, no transformers
    from cdpo.io import write_json

    # to_absolute_path: relative paths mean the directory the command was run from, even if a
    # config sets hydra.job.chdir.
    predictions = Path(to_absolute_path(str(cfg.predictions)))
    output = Path(to_absolute_path(str(cfg.output))) if cfg.get("output") else None
    summary = grade_file(predictions, output, response_key=cfg.response_key,
                         answer_key=cfg.answer_key, timeout_s=cfg.timeout_s)
    summary["timeout_s"] = cfg.timeout_s
    write_json(summary_path(summary["output"]), summary)
    print(format_summary(summary))
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from cdpo.io import DataError

    if not cfg.get("predictions"):
        raise SystemExit("eval.py: give predictions=<file.jsonl> to grade a predictions file; "
                         "model-based evaluation comes with the pipeline: python train.py stage=eval")
    try:
        grade_predictions(cfg)
    except (FileNotFoundError, DataError) as e:
        # Bad input is the user's to fix: one clear line (file and line), not a traceback.
        raise SystemExit(f"eval.py: error: {e}") from None


if __name__ == "__main__":
    main()
