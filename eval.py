"""Evaluate: grade model predictions.

    python eval.py predictions=preds.jsonl [output=preds.graded.jsonl]

grades an existing predictions file (no model is loaded, nothing heavy is imported on this path),
writes the graded JSONL and a summary JSON beside it, and prints the accuracy.

    python eval.py model=smollm2_135m data=arith [adapter=<dir>] [eval.n=8 eval.temperature=0.7 eval.pass_k=[1,4,8]]

generates on the test split (greedy by default, or n samples with pass@k), grades, and writes a
results JSON (accuracy, pass@k, counts, the config) with the graded predictions beside it.
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
    line += f"; grading {summary['policy']}"
    return f"{line} -> {summary['output']}"


def _command_line_keys() -> set[str]:
    """The keys set on the command line (they win over a run's settings)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not under Hydra
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def result_label(adapter) -> str:
    """The name of an evaluated model in its results file: base, or the adapter's directory, or for a run's
    <method_dir>/adapter the method directory (every run's adapter directory is called `adapter`)."""
    if not adapter:
        return "base"
    path = Path(to_absolute_path(str(adapter)))
    return path.parent.name if path.name == "adapter" and path.parent.name else path.name


def grade_predictions(cfg: DictConfig) -> dict:
    from cdpo.grading import grade_file  # math-verify/sympy only: no torch, no transformers
    from cdpo.io import write_json

    # to_absolute_path: relative paths mean the directory the command was run from, even if a
    # config sets hydra.job.chdir.
    predictions = Path(to_absolute_path(str(cfg.predictions)))
    output = Path(to_absolute_path(str(cfg.output))) if cfg.get("output") else None
    summary = grade_file(predictions, output, response_key=cfg.response_key,
                         answer_key=cfg.answer_key, timeout_s=cfg.timeout_s, policy=cfg.grading)
    summary["timeout_s"] = cfg.timeout_s
    write_json(summary_path(summary["output"]), summary)
    print(format_summary(summary))
    return summary


# How a question is put and its answer graded: an adapter is evaluated as its run trained and evaluated it
PROMPT_KEYS = ("prompt_style", "n_shot", "exemplars", "prompt_format", "prompt_template", "stop", "grading")


def adopt_run_settings(cfg: DictConfig, adapter, given: set[str] = frozenset()) -> str:
    """With the adapter of a cdpo run on the same data set, take the run's PROMPT_KEYS (those not `given` on
    the command line) into cfg.data; returns the line that says which prompt format and grading are used."""
    from omegaconf import OmegaConf, open_dict

    from cdpo.model_card import run_record

    run = run_record(Path(to_absolute_path(str(adapter))))
    data = cfg.data
    if run is not None:
        trained = OmegaConf.load(run["dir"] / f"{run['stage']}.config.yaml").data
        if trained.get("name") == data.get("name"):
            taken = {k: trained[k] for k in PROMPT_KEYS
                     if k in trained and f"data.{k}" not in given and trained[k] != data.get(k)}
            with open_dict(cfg):
                for k, v in taken.items():
                    cfg.data[k] = v
    used = ", ".join(f"data.{k}={data[k]}" for k in PROMPT_KEYS if data.get(k) is not None)
    if run is None:
        return f"{adapter} is not from a cdpo run: questions asked and graded as data={data.name} sets them ({used})"
    if trained.get("name") != data.get("name"):
        return (f"the adapter's run trained on data={trained.get('name')}: questions asked and graded as "
                f"data={data.name} sets them ({used})")
    return f"questions asked and graded as the adapter's run ({run['dir']}) did: {used}"


def evaluate_model(cfg: DictConfig) -> dict:
    from cdpo.validation import validate

    if cfg.adapter:
        print(adopt_run_settings(cfg, cfg.adapter, _command_line_keys()))
    validate(cfg, training=False)  # before torch and the model are loaded
    from cdpo.pipeline import context
    from cdpo.pipeline.evaluate import evaluate_model as run_eval

    label = result_label(cfg.adapter)
    results = Path(to_absolute_path(str(cfg.results or f"outputs/eval/{cfg.model.name}-{cfg.data.name}-{label}.json")))
    with context.generation_models(cfg, merge=cfg.eval.get("merge_adapter", False)) as model_for:  # vllm: served by vLLM
        model = model_for(to_absolute_path(str(cfg.adapter)) if cfg.adapter else None, "adapter")
        out = run_eval(cfg, model, context.tokenizer(cfg), results.with_suffix(".jsonl"), label)
    passk = ", ".join(f"pass@{k} {100 * v:.1f}%" for k, v in out["pass_at_k"].items())
    print(f"{label}: accuracy {100 * out['accuracy']:.1f}% ({out['correct']}/{out['questions']}); {passk}; "
          f"{out['no_answer']} without an answer -> {results}")
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from cdpo.cli import run_entry

    # bad input is the user's to fix: one clear line (file and line), not a traceback
    run_entry("eval.py", lambda: grade_predictions(cfg) if cfg.get("predictions") else evaluate_model(cfg))


if __name__ == "__main__":
    main()
