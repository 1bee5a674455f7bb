"""Question sources: the shipped benchmarks, the synthetic task, local JSONL and the HF hub.

Every source ends in the same `Problem` records, so later stages never care where questions
came from. `load_problems("gsm8k", "test")`, `load_problems("jsonl:my.jsonl", fields={...})`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from .. import hub
from ..errors import UserError
from ..io import DataError, iter_jsonl
from . import arith
from .records import Problem

KNOWN_SOURCES = ("gsm8k", "math500", "arith", "jsonl:<path>", "hf:<dataset_id>[:<config>]")
SPLITS = {"gsm8k": ("train", "test"), "math500": ("test",), "arith": arith.SPLITS}
DEFAULT_FIELDS = {"question": "question", "answer": "answer", "id": "id", "solution": "solution"}
_REQUIRED_FIELDS = ("question", "answer")

_CALC_MARK = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations such as <<16-3-4=9>>
_GSM8K_FINAL = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)


def data_dir() -> Path:
    """The shipped `data/` folder beside the package; CDPO_DATA_DIR overrides it."""
    env = os.environ.get("CDPO_DATA_DIR")
    if env:
        return Path(env)
    import cdpo

    return Path(cdpo.__file__).resolve().parents[1] / "data"


def split_gsm8k_answer(text: str) -> tuple[str, str]:
    """GSM8K `answer` text -> (gold, solution).

    The solution loses its calculator marks and ends with "The answer is N." instead of
    "#### N", so SFT targets end the way the paper's prompts do.
    """
    finals = _GSM8K_FINAL.findall(text)
    if not finals:
        raise ValueError("no '#### <answer>' line")
    gold = finals[-1]
    body = text[: text.rfind("####")]
    body = _CALC_MARK.sub("", body).rstrip()
    return gold, f"{body}\nThe answer is {gold}." if body else f"The answer is {gold}."


def _check_split(source: str, split: str) -> None:
    if source == "math500" and split == "train":
        raise ValueError("math500 has no train split (MATH500 is a test set only); for MATH training questions "
                         "use an `hf:<dataset_id>` source, or a local export with `jsonl:<path>`")
    if split not in SPLITS[source]:
        raise ValueError(f"{source}: unknown split {split!r}; known splits: {', '.join(SPLITS[source])}")


def _load_gsm8k(split: str) -> list[Problem]:
    path = data_dir() / "gsm8k" / f"{split}.jsonl"
    problems = []
    for i, (lineno, rec) in enumerate(iter_jsonl(path)):
        try:
            gold, solution = split_gsm8k_answer(rec["answer"])
            problems.append(Problem(id=f"gsm8k-{split}-{i:05d}", question=rec["question"],
                                    answers=(gold,), solution=solution))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: bad GSM8K record ({e})") from None
    return problems


def _load_math500(split: str) -> list[Problem]:
    path = data_dir() / "math500" / f"{split}.jsonl"
    problems = []
    for lineno, rec in iter_jsonl(path):
        try:
            problems.append(Problem(id=f"math500-{rec['id']}", question=rec["question"], answers=rec["answer"]))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: bad MATH500 record ({e})") from None
    return problems


def _resolve_fields(fields: dict | None) -> dict[str, str]:
    fields = dict(fields or {})
    unknown = set(fields) - set(DEFAULT_FIELDS)
    if unknown:
        raise ValueError(f"unknown field mapping keys {sorted(unknown)}; known: {sorted(DEFAULT_FIELDS)}")
    return {**DEFAULT_FIELDS, **fields}


def _record_to_problem(rec: dict[str, Any], fields: dict[str, str], default_id: str, where: str) -> Problem:
    """Map one generic record; `where` ("file:line" or "dataset[row]") goes into every error."""
    for key in _REQUIRED_FIELDS:
        if rec.get(fields[key]) is None:
            raise DataError(f"{where}: missing field {fields[key]!r} (mapped to {key!r}); "
                            f"record has {sorted(rec)}")
    answer, solution = rec[fields["answer"]], rec.get(fields["solution"])
    # A GSM8K-style worked answer ("...\n#### 18") is split into gold and solution, so an
    # export of GSM8K itself (local or from the hub) loads the same way as the shipped copy.
    if isinstance(answer, str) and _GSM8K_FINAL.search(answer):
        answer, worked = split_gsm8k_answer(answer)
        solution = solution if solution is not None else worked
    rec_id = rec.get(fields["id"])
    try:
        return Problem(id=str(rec_id) if rec_id is not None else default_id, question=str(rec[fields["question"]]),
                       answers=answer if isinstance(answer, (list, tuple)) else (answer,), solution=solution)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def _load_jsonl(path_str: str, split: str, fields: dict | None) -> list[Problem]:
    if not path_str:
        raise ValueError("jsonl source needs a path: 'jsonl:<path>'")
    # "{split}" in the path lets one config serve both splits: jsonl:data/mine/{split}.jsonl
    path, fields = Path(path_str.replace("{split}", split)).expanduser(), _resolve_fields(fields)
    return [_record_to_problem(rec, fields, f"{path.stem}-{lineno:05d}", f"{path}:{lineno}")
            for lineno, rec in iter_jsonl(path)]


_JSONL_HINT = "use source 'jsonl:<path>' with the same `fields` mapping"


class HubUnreachableError(UserError, RuntimeError):
    """No hub to load a dataset from (offline, or no connection): one line with what to use instead."""


def _hub_unreachable(dataset_id: str, why: str, hint: str = _JSONL_HINT) -> HubUnreachableError:
    return HubUnreachableError(f"hf:{dataset_id}: the Hugging Face hub is unreachable ({why}). On a machine that is "
                               f"online, export the split to JSONL (e.g. datasets.load_dataset(...).to_json('x.jsonl')) "
                               f"and {hint}.")


def load_hub_dataset(spec: str, split: str, *, hint: str = _JSONL_HINT):
    """One split of a hub dataset `<dataset_id>[:<config>]`; offline or unreachable: one clear line with `hint`
    (what to use instead), rather than a long wait and a traceback."""
    dataset_id, _, config = spec.partition(":")
    if not dataset_id:
        raise ValueError("hf source needs a dataset id: 'hf:<dataset_id>[:<config>]'")
    import datasets

    if hub.offline_env("HF_DATASETS_OFFLINE"):
        # datasets reads the offline flag at import; if it was imported before the flag was set,
        # it would still go to the network, so only a truly offline datasets may try its cache.
        if not (datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE):
            raise _hub_unreachable(dataset_id, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set", hint)
    elif not hub.reachable():
        raise _hub_unreachable(dataset_id, "no connection within a few seconds", hint)
    try:
        return datasets.load_dataset(dataset_id, config or None, split=split)
    except ConnectionError as e:  # includes offline mode with nothing cached
        raise _hub_unreachable(dataset_id, str(e), hint) from None


def _load_hf(spec: str, split: str, fields: dict | None) -> list[Problem]:
    fields = _resolve_fields(fields)
    ds = load_hub_dataset(spec, split)
    name = spec.partition(":")[0].rsplit("/", 1)[-1]
    return [_record_to_problem(rec, fields, f"{name}-{split}-{i:05d}", f"hf:{spec}[{split}][{i}]")
            for i, rec in enumerate(ds)]


def _take(items: Iterable[Problem], limit: int | None) -> list[Problem]:
    items = list(items)
    return items if limit is None else items[:limit]


def load_problems(source: str, split: str = "test", *, limit: int | None = None, fields: dict | None = None,
                  **task_kwargs) -> list[Problem]:
    """Load the problems of one source and split; `limit` keeps the first n (deterministic).

    `fields` maps Problem fields to record keys for `jsonl:` and `hf:` sources; `task_kwargs`
    (n, seed, steps, operand_max) go to the `arith` generator.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if task_kwargs and source != "arith":
        raise TypeError(f"source {source!r} takes no task options (got {sorted(task_kwargs)}); only 'arith' does")
    if fields and not source.startswith(("jsonl:", "hf:")):
        raise ValueError(f"source {source!r} has a fixed layout; `fields` applies to jsonl:/hf: sources only")

    if source in ("gsm8k", "math500"):
        _check_split(source, split)
        return _take(_load_gsm8k(split) if source == "gsm8k" else _load_math500(split), limit)
    if source == "arith":
        _check_split(source, split)
        n = task_kwargs.pop("n", None)
        if n is None:  # generation is sequential: a smaller n is a prefix of a larger one, so a limit asks
            n = arith.DEFAULT_SIZES[split] if limit is None else limit  # for exactly that many (also beyond the default)
        return _take(arith.generate_arith(n, split=split, **task_kwargs), limit)
    if source.startswith("jsonl:"):
        return _take(_load_jsonl(source[len("jsonl:"):], split, fields), limit)
    if source.startswith("hf:"):
        return _take(_load_hf(source[len("hf:"):], split, fields), limit)
    raise ValueError(f"unknown data source {source!r}; known sources: {', '.join(KNOWN_SOURCES)}")
