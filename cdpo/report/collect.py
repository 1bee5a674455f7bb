"""Results of finished runs: from run directories, and from wandb when it is online.

A result is one method (or ablation value) and seed evaluated on one model x data set: its accuracy,
its per-question correctness (for the paired tests) and its training curves (for the plot). Local
files are read from `<method_dir>/eval.json` (+ `eval.jsonl`, `metrics.jsonl`); wandb runs fill in
what no run directory holds.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cdpo.data.preferences import eval_dataset
from cdpo.io import DataError, iter_jsonl, read_jsonl

CURVES = ("logps/chosen", "logps/rejected")  # the paper's Figure 6
# Rows of the evaluations shared by a run_dir's methods (eval/base.json, eval/sft.json), whatever `rows` is
SHARED_ROWS = {"base": "Baseline (base model)", "sft_pos": "SFT (positive CE model)"}
log = logging.getLogger(__name__)


@dataclass
class Result:
    model: str
    data: str
    row: str                                   # the value of the report's `rows` key, e.g. the method name
    seed: int
    accuracy: float
    questions: int
    correct: dict[str, int] | None = None      # question id -> 1 if its (first) answer is right
    history: list[dict] = field(default_factory=list)  # logged training metrics, one dict per step
    source: str = ""
    label: str | None = None                   # the report's label of its method (from its objective)
    trains: bool = True                        # False: the base model as it is (the baseline objective)
    test: dict | None = None                   # the test it was evaluated on (collect._test_of)
    samples: tuple | None = None               # its sample set: (sample.seed, ce.seed), None where not recorded

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.model, self.data, self.row, self.seed


def select(config: dict, dotted: str) -> Any:
    """config["a"]["b"] for "a.b" (a flat "a.b" key also counts: wandb may store configs flat)."""
    if dotted in config:
        return config[dotted]
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _identity(config: dict, rows: str | None, where: str) -> tuple[str, str, str | None, int]:
    """(model, data, row, seed); rows=None: no row key (the shared evaluations have a fixed row)."""
    values = {k: select(config, k) for k in ("model.name", "data.name", rows or "seed", "seed")}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise DataError(f"{where}: its config has no {', '.join(missing)}")
    data = eval_dataset(select(config, "data")) if select(config, "data.kind") == "preference" else values["data.name"]
    return values["model.name"], data, rows and str(values[rows]), int(values["seed"])


def _stored(path: Path) -> Path | None:
    """`path`, or its gzipped copy as cdpo.report.archive keeps it, or None."""
    return next((p for p in (path, path.with_name(path.name + ".gz")) if p.exists()), None)


def _history(path: Path) -> list[dict]:
    path = _stored(path)
    return [r for _, r in iter_jsonl(path)] if path else []


def collect_local(roots: Iterable[str | os.PathLike], rows: str = "method.name") -> list[Result]:
    """Every `eval.json` of a method dir under `roots` (run dirs or folders holding them), and the base and
    SFT evaluations of their run_dirs (see _shared_rows)."""
    roots = [Path(root) for root in roots]
    results: dict[tuple, Result] = {}
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run directory")
        for path in sorted(root.rglob("eval.json")):
            summary = json.loads(path.read_text())
            config = summary.get("config") or {}
            model, data, row, seed = _identity(config, rows, str(path))
            result = Result(model, data, row, seed, summary["accuracy"], summary["questions"],
                            _correct(path, summary), _history(path.parent / "metrics.jsonl"),
                            str(path.parent), *_objective_facts(config, rows),
                            test=_test_of(summary), samples=sample_set(config))
            _add(results, result)
    found = [*results.values(), *_shared_rows(roots, list(results.values()), rows)]
    _one_test_per_column(found)
    return found


def sample_set(config: dict) -> tuple | None:
    """(sample.seed, ce.seed): what a result's samples and CE models were made from; None where the config
    does not say (results of older versions: taken as one sample set)."""
    found = (select(config, "sample.seed"), select(config, "ce.seed"))
    return None if found == (None, None) else found


# what makes two evaluations the same test (the adapter and the speed settings aside)
_SPEED = ("batch_size", "merge_adapter")


def _test_of(summary: dict) -> dict | None:
    """The questions, base model, grading and decoding an evaluation used, from its signature (None:
    a summary of a version that wrote none)."""
    sig = summary.get("signature")
    if not isinstance(sig, dict):
        return None
    return {"questions": sig.get("questions"), "model_identity": sig.get("model_identity"),
            "grading": (sig.get("data") or {}).get("grading"),
            "eval": {k: v for k, v in (sig.get("eval") or {}).items() if k not in _SPEED}}


def _one_test_per_column(results: list[Result]) -> None:
    """The results of one model x data set must come from the same test: an archive keeps every result it
    was given, so a result of an earlier setting (another test split, grading or decoding) would otherwise
    sit in the table and its paired tests beside the current ones."""
    first: dict[tuple, Result] = {}
    for r in results:
        if r.test is None:
            continue
        seen = first.setdefault((r.model, r.data), r)
        if seen.test != r.test:
            differ = ", ".join(k for k in sorted(seen.test) if seen.test[k] != r.test[k])
            raise DataError(f"{r.model} / {r.data}: {seen.source} and {r.source} were evaluated on different tests "
                            f"(they differ in {differ}). Remove the stale result (an archive keeps every result "
                            "it was given) or point runs= at one setting")


def _objective_facts(config: dict, rows: str) -> tuple[str | None, bool]:
    """(row label, trains) of the objective a result's method section builds: asked of the object (a user's own
    class too); (None, True) when rows are not methods or its class cannot be imported here."""
    method = config.get("method")
    if not isinstance(method, dict):  # wandb may store the config flat
        method = {k.removeprefix("method."): v for k, v in config.items() if k.startswith("method.")}
    if rows != "method.name" or not method:
        return None, True
    from omegaconf import OmegaConf

    from cdpo.objectives import METHODS, build, from_config

    try:
        objective = from_config(OmegaConf.create(method))
    except Exception as e:  # noqa: BLE001 (a class of another environment: the row keeps its name)
        if method.get("name") not in METHODS:
            log.info(f"report: method {method.get('_target_')!r} not built here ({str(e)[:80]}): labelled by name")
            return None, True
        objective = build(method["name"])  # a config without its class (a hand-written or older one)
    return objective.row_label, objective.trains


def _correct(summary_path: Path, summary: dict) -> dict[str, int] | None:
    """Per question, whether the first answer is right, from the predictions beside the summary; refused when
    they do not add up to the summary (a copy of one evaluation's summary beside another's predictions)."""
    predictions = _stored(summary_path.with_suffix(".jsonl"))
    if predictions is None:
        return None
    correct = {r["id"]: int(r["samples"][0]["correct"]) for r in read_jsonl(predictions)}
    told = summary.get("correct", round(summary["accuracy"] * summary["questions"]))
    if (len(correct), sum(correct.values())) != (summary["questions"], told):
        raise DataError(f"{predictions}: {sum(correct.values())} of {len(correct)} questions right, but its summary "
                        f"{summary_path} says {told} of {summary['questions']}: the two files come from different "
                        "evaluations (copy or archive them again)")
    return correct


def _shared_rows(roots: list[Path], methods: list[Result], rows: str) -> list[Result]:
    """The base and SFT evaluations the eval stage stores once per run_dir (`compare`: eval/base.json,
    eval/sft.json) as the rows of SHARED_ROWS, once per model x data set: run_dirs that evaluated the
    same model (the same eval signature) count once. Left out: the base row where method=baseline rows
    are there (the same evaluation), and a row whose run_dirs evaluated different models (an ablation
    that changes the SFT model: which would it be?)."""
    found: dict[tuple, dict[str, Result]] = defaultdict(dict)  # (model, data, row) -> signature -> result
    for root in roots:
        for path in sorted(root.rglob("eval/*.json")):
            row = {"base": "base", "sft": "sft_pos"}.get(path.stem)
            if row is None:
                continue
            summary = json.loads(path.read_text())
            model, data, _, seed = _identity(summary.get("config") or {}, None, str(path))
            signature = json.dumps(summary.get("signature") or str(path), sort_keys=True)
            found[(model, data, row)].setdefault(signature, (Result(
                model, data, row, seed, summary["accuracy"], summary["questions"], _correct(path, summary),
                source=str(path), test=_test_of(summary), samples=sample_set(summary.get("config") or {})), summary))
    baseline = {(r.model, r.data) for r in methods if not r.trains}
    out = []
    for (model, data, row), by_signature in found.items():
        if row == "base" and (model, data) in baseline:
            continue
        made = list(by_signature.values())
        if len(made) > 1 and not _replicates(made):
            log.info(f"report: row {SHARED_ROWS[row]!r} left out for {model} / {data}: its run directories "
                     f"evaluated {len(by_signature)} different models")
            continue
        out.extend(result for result, _ in made)
    return out


REPLICATE_KEYS = ("seed", "sample.seed", "ce.seed")  # what may differ between the replicates of one row


def _replicates(made: list[tuple[Result, dict]]) -> bool:
    """Whether different shared models are one row's seeds: each made under its own seed from its own
    samples and CE seed (a grid whose seed is a whole replicate, conf/sweep/embedded.yaml), with the same
    evaluation and the same settings otherwise; not an ablation that changed the model on the same
    samples or with other settings."""
    def without(summary: dict, keys: tuple) -> str:
        config = json.loads(json.dumps(summary.get("config") or {}))
        for key in keys:
            *parents, last = key.split(".")
            node = config
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(last, None)
        signature = {k: v for k, v in (summary.get("signature") or {}).items() if k != "adapter"}
        return json.dumps({"signature": signature, **{k: config.get(k) for k in SETTINGS}}, sort_keys=True)

    seeds = [tuple(select(s.get("config") or {}, k) for k in REPLICATE_KEYS) for _, s in made]
    return (None not in seeds[0] and all(len({s[i] for s in seeds}) == len(made) for i in range(len(REPLICATE_KEYS)))
            and len({without(s, REPLICATE_KEYS) for _, s in made}) == 1)


# the settings that make the shared SFT model (the job's own method and its seed-level dirs may differ)
SETTINGS = ("model", "data", "sample", "select", "ce", "ce_lora", "eval", "generation")


def _add(results: dict, result: Result) -> None:
    other = results.get(result.key)
    if other is not None:
        raise DataError(f"two results for {result.model} / {result.data} / {result.row} / seed {result.seed}: "
                        f"{other.source} and {result.source}. Point runs= at one of them, or set rows= to the "
                        "setting that tells them apart (e.g. rows=ce.b for an ablation)")
    results[result.key] = result


def wandb_online() -> bool:
    return bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE", "online") not in (
        "offline", "disabled", "dryrun")


def collect_wandb(api, path: str, rows: str = "method.name") -> list[Result]:
    """Results logged to wandb project `path` ("entity/project" or "project"): the eval stage's runs
    (job_type "eval": eval/accuracy, eval/questions, eval/per_question) and the align runs' curves.
    `api` is a `wandb.Api()` (or anything with the same `runs`)."""
    evals: dict[tuple, Result] = {}
    curves: dict[tuple, list[dict]] = {}
    for run in api.runs(path):  # newest first: a rerun's result wins
        job = run.job_type or ""
        if job != "eval" and not job.startswith("align_"):
            continue
        config = dict(run.config)
        key = _identity(config, rows, f"wandb run {path}/{run.id}")
        if job == "eval" and key not in evals:
            s = run.summary
            per_question = s.get("eval/per_question")
            evals[key] = Result(*key, accuracy=float(s["eval/accuracy"]), questions=int(s["eval/questions"]),
                                correct={str(k): int(v) for k, v in dict(per_question).items()} if per_question else None,
                                source=f"wandb:{path}/{run.id}", samples=sample_set(config),
                                **dict(zip(("label", "trains"),
                                                                            _objective_facts(config, rows))))
        elif job.startswith("align_") and key not in curves:
            curves[key] = [{"step": r.get("trainer/global_step", r.get("_step")), **{k: r[k] for k in CURVES if k in r}}
                           for r in run.scan_history(keys=["trainer/global_step", *CURVES])]
    for key, result in evals.items():
        result.history = curves.get(key, [])
    return list(evals.values())


def merge(local: list[Result], remote: list[Result]) -> list[Result]:
    """Local results, plus the remote ones for which no run directory was found."""
    have = {r.key for r in local}
    return [*local, *(r for r in remote if r.key not in have)]
