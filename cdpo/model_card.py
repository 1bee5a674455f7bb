"""The model card (README.md) of an exported adapter or merged model: Hugging Face front matter, how to
load it, the settings of the cdpo run that trained it and its evaluation results.

The run is found through the stage markers beside the adapter (`<method_dir>/align.done.json` lists
`<method_dir>/adapter`, `<run_dir>/sft_pos.done.json` lists `<run_dir>/adapters/pos`); the settings are
that stage's saved config, the results those of the eval stage whose signature holds this adapter's hash.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from cdpo.data.preferences import eval_dataset
from cdpo.pipeline import identity as ident
from cdpo.pipeline.artifacts import stage_signature

log = logging.getLogger(__name__)

# The sections of a stage's settings the card shows, in this order, with their headings.
_SECTIONS = {"method": "method", "data": "data", "sample": "sampling", "select": "selection",
             "ce": "contrastive estimation", "ce_lora": "CE models' LoRA", "peft": "LoRA",
             "align": "training", "seed": "seed", "model": "base model (cdpo config)"}


def run_record(adapter: Path) -> dict | None:
    """{"stage", "dir", "settings", "summary", "results"} of the cdpo stage that wrote `adapter`, or None
    for an adapter made elsewhere (or edited since: its run's settings would not describe it)."""
    adapter = Path(adapter).resolve()
    for folder in (adapter.parent, adapter.parent.parent):
        for marker_path in sorted(folder.glob("*.done.json")):
            try:
                marker = json.loads(marker_path.read_text())
            except (OSError, ValueError):
                continue
            for name, expected in (marker.get("artifacts") or {}).items():
                if (folder / name).resolve() != adapter:
                    continue
                stage = marker_path.name.removesuffix(".done.json")
                problem = ident.verify(adapter, expected)
                if problem:
                    log.warning(f"{adapter}: {problem}: the model card leaves out the settings of its run")
                    return None
                config = OmegaConf.load(folder / f"{stage}.config.yaml")
                return {"stage": stage, "dir": folder, "settings": stage_signature(config, stage),
                        "summary": {k: v for k, v in marker.items() if k not in ("identity", "artifacts")},
                        "results": _results(folder, adapter)}
    return None


def _results(folder: Path, adapter: Path) -> list[dict]:
    """Evaluation results of `adapter` (an eval JSON whose signature names its hash), then those the same
    eval stage compared it with (base, sft)."""
    sha = ident.describe(adapter)["sha256"]
    own = None
    for path in [folder / "eval.json", *sorted((folder / "eval").glob("*.json"))]:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (result.get("signature") or {}).get("adapter") == sha:
            own = result
            break
    if own is None:
        return []
    rows = [{**own, "model": f"this model ({own['model']})"}]
    try:  # the method's eval marker holds every model it evaluated, on the same questions
        compared = json.loads((folder / "eval.done.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        compared = {}
    rows += [{**r, "model": label} for label, r in compared.items() if label != own["model"]]
    return rows


def render(*, name: str, base: str, merged: bool, run: dict | None, notes: list[str] = ()) -> str:
    """README.md for an export named `name` of an adapter on `base` (a hub id or a path)."""
    settings = (run or {}).get("settings") or {}
    method = (settings.get("method") or {}).get("name")
    front = {"library_name": "transformers" if merged else "peft", "pipeline_tag": "text-generation",
             "tags": list(dict.fromkeys(["cdpo", *([method] if method else []), "lora",
                                         *(["merged"] if merged else [])]))}
    if _is_hub_id(base):  # the hub accepts only a repo id here; a local path is named in the text
        front = {"base_model": base, **front}
    kind = f"`{base}` with a LoRA adapter merged into its weights" if merged else f"A LoRA adapter for `{base}`"
    trained = f"trained with cdpo's `{method}` objective" if method else "trained with cdpo"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"{kind}, {trained} ([Critical Tokens Matter](https://arxiv.org/abs/2411.19943), cDPO and its "
             "baselines).", "", *[f"{n}\n" for n in notes], "## Use", "", "```python", *_usage(name, base, merged),
             "```", ""]
    if run:
        lines += ["## Training", "", f"Stage `{run['stage']}` of a cdpo run; its settings:", "",
                  "| setting | values |", "|---|---|"]
        lines += [f"| {title} | {_flat(settings[key])} |" for key, title in _SECTIONS.items() if key in settings]
        summary = run["summary"]
        done = {k: summary[k] for k in ("steps", "records", "seconds", "processes") if k in summary}
        if done:
            lines.append(f"| run | {_flat(done)} |")
        if summary.get("final"):
            lines.append(f"| final metrics | {_flat(summary['final'])} |")
        lines.append("")
    else:
        lines += ["## Training", "", "The adapter was not found in a cdpo run directory: its settings are unknown.", ""]
    if run and run["results"]:
        data = (run["results"][0].get("config") or {}).get("data") or (run.get("settings") or {}).get("data") or {}
        lines += ["## Evaluation", "", f"On the `{run['results'][0].get('split', 'test')}` split of "
                  f"{eval_dataset(data) if data else 'the run data set'}, graded "
                  f"`{run['results'][0].get('grading', '')}`; accuracy of the first answer.", "",
                  "| model | accuracy | correct / questions | pass@k | no answer |", "|---|---|---|---|---|"]
        for r in run["results"]:
            passk = ", ".join(f"pass@{k} {100 * v:.1f}%" for k, v in (r.get("pass_at_k") or {}).items())
            lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {r['correct']} / {r['questions']} | "
                         f"{passk} | {r.get('no_answer', '')} |")
        lines.append("")
    return "\n".join(lines)


def _usage(name: str, base: str, merged: bool) -> list[str]:
    if merged:
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")']
    return ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{name}")']


def _flat(value) -> str:
    """One table cell: a section's settings as `key value, ...` (nested keys dotted)."""
    if not isinstance(value, dict):
        return _cell(value)
    items = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if k == "_target_":
                continue
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                items.append(f"{prefix}{k} {_cell(v)}")

    walk(value)
    return ", ".join(items)


def _cell(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).is_absolute() or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False
