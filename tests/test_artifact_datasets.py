"""Every JSONL artifact a run writes is a dataset: `datasets.load_dataset("json", ...)` reads it as it is,
one row per line, every column of one type (no mixed int / str, no Json fallback)."""
import json
import logging

import datasets

from cdpo.models import load_tokenizer
from cdpo.pipeline import run_pipeline
from cdpo.pipeline.artifacts import RunPaths
from test_pipeline import _cfg, _inject_correct_samples


def _untyped(feature) -> list[str]:
    """Paths of the columns (nested too) that datasets could only read as Json: types that mix."""
    if isinstance(feature, datasets.Json):
        return ["<json>"]
    if isinstance(feature, dict):
        return [f"{k}.{p}" for k, v in feature.items() for p in _untyped(v)]
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return [f"[].{p}" for p in _untyped(feature.feature)]
    return []


def assert_loads_as_datasets(root, expect=()) -> list[str]:
    """Load every *.jsonl under `root` with datasets; returns their names relative to `root`."""
    files = sorted(root.rglob("*.jsonl"))
    names = [f.relative_to(root).as_posix() for f in files]
    assert set(expect) <= set(names), set(expect) - set(names)
    for f, name in zip(files, names):
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        ds = datasets.load_dataset("json", data_files=str(f), split="train", cache_dir=str(root / ".hf-cache"))
        assert ds.num_rows == len(lines) > 0, name
        assert _untyped(ds.features) == [], (name, _untyped(ds.features))
        assert set(ds.column_names) == set().union(*(json.loads(line) for line in lines)), name
    return names


def test_json_with_mixed_types_is_caught(tmp_path):
    """The check itself: a column that is sometimes an int and sometimes a string is reported."""
    (tmp_path / "mixed.jsonl").write_text('{"answer": 18}\n{"answer": "18"}\n')
    try:
        assert_loads_as_datasets(tmp_path)
    except AssertionError as e:
        assert "mixed.jsonl" in str(e)
    else:
        raise AssertionError("a column of mixed types passed")


def test_every_artifact_of_a_run_loads_as_a_dataset(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cdpo")
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    run_pipeline(_cfg(tmp_path, "stage=sample"))
    paths = RunPaths(_cfg(tmp_path))
    _inject_correct_samples(paths, tok)  # a random model is never right: some correct and wrong samples
    run_pipeline(_cfg(tmp_path))  # every stage, cDPO, with eval
    # a fit that logs no row (fewer steps than log_every_n_steps) writes no empty history
    run_pipeline(_cfg(tmp_path, "method=sft", "compare=[base]", "trainer.log_every_n_steps=1000"))
    names = assert_loads_as_datasets(tmp_path, expect=(
        "trajectories.jsonl", "positives.jsonl", "negatives.jsonl", "pairs.jsonl", "scored_pairs.jsonl",
        "ref_logps.jsonl", "eval/base.jsonl", "eval/sft.jsonl", "cdpo-seed0/eval.jsonl", "cdpo-seed0/metrics.jsonl",
        "sft-seed0/eval.jsonl", "shards/sample/shard-00000.jsonl", "shards/score/shard-00000.jsonl"))
    assert len(names) >= 13
