"""End to end: every stage on a tiny model and a few arith questions, checking each artifact's content."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cdpo.data import load_problems
from cdpo.errors import StaleInputError
from cdpo.io import read_jsonl, write_jsonl
from cdpo.models import load_tokenizer
from cdpo.pipeline import run_pipeline
from cdpo.pipeline.artifacts import RunPaths, accept, run_sharded
from cdpo.pipeline.select import EmptySelectionError, select_question


def _logged(caplog) -> str:
    """What the pipeline logged since the last call (the records are cleared)."""
    text = caplog.text
    caplog.clear()
    return text


REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data.train_limit=4", "data.test_limit=3", "sample.n=3", "sample.shard_size=2",
        "generation.max_new_tokens=8", "generation.batch_size=8", "ce.batch_size=4", "ce.shard_size=3",
        "align.epochs=1", "align.grad_accum=1", "align.batch_size=2", "logger=csv"]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, f"run_dir={tmp_path}", *overrides])
    return cfg


def _inject_correct_samples(paths: RunPaths, tok):
    """A tiny random model never solves a question: add each gold solution as a correct sample and a
    frequent wrong answer, as a model that sometimes succeeds would produce."""
    gold = {p.id: p for p in load_problems("arith", "train", limit=4)}  # the library defaults = the config's
    records = read_jsonl(paths.trajectories)
    for r in records:
        sol = gold[r["id"]].solution
        ids = tok(sol, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        r["samples"].append({"response": sol, "response_ids": ids, "finish_reason": "stop",
                             "extracted": r["answers"][0], "correct": True})
        wrong = "The answer is 12345."
        for _ in range(3):
            r["samples"].append({"response": wrong, "response_ids": tok(wrong, add_special_tokens=False)["input_ids"],
                                 "finish_reason": "stop", "extracted": "12345", "correct": False})
    write_jsonl(paths.trajectories, records)
    if paths.marker("sample").exists():  # edited on purpose: the sample stage's result from now on
        accept(paths, "sample")


def test_every_stage_on_a_tiny_model(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cdpo")
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    cfg = _cfg(tmp_path)
    paths = RunPaths(cfg)

    # sample: 4 questions x 3 graded samples, ids that decode to the stored text
    run_pipeline(_cfg(tmp_path, "stage=sample"))
    traj = read_jsonl(paths.trajectories)
    assert [len(r["samples"]) for r in traj] == [3, 3, 3, 3]
    assert len(list(paths.shards("sample").glob("shard-*.jsonl"))) == 2
    for r in traj:
        assert tok.decode(r["prompt_ids"]) == r["prompt"] and r["prompt"].endswith("Answer: ")
        for s in r["samples"]:
            assert tok.decode(s["response_ids"], skip_special_tokens=True) == s["response"]
            assert s["correct"] is False  # a random model
    # select on all-wrong samples stops with an explanation and a hint
    with pytest.raises(EmptySelectionError, match="Raise sample.temperature or sample.n"):
        run_pipeline(_cfg(tmp_path, "stage=select"))

    _inject_correct_samples(paths, tok)
    result = run_pipeline(cfg)
    stages = result["stages"]
    assert stages["sample"]["questions"] == 4  # skipped: the marker exists

    positives, negatives, pairs = (read_jsonl(p) for p in (paths.positives, paths.negatives, paths.pairs))
    assert len(positives) == 4 and all(p["extracted"] == p["answers"][0] for p in positives)
    # the most frequent wrong answer (12345, 3 times) covers half of the 6 wrong samples
    assert [n["extracted"] for n in negatives] == ["12345"] * 4
    assert all(p["rejected_answer"] == "12345" and p["chosen_ids"] == positives[i]["response_ids"]
               for i, p in enumerate(pairs))

    for adapter in (paths.pos_adapter, paths.neg_adapter, paths.aligned_adapter):
        assert (adapter / "adapter_model.safetensors").exists()
    assert (paths.pos_adapter / "adapter_model.safetensors").read_bytes() != (
        paths.neg_adapter / "adapter_model.safetensors").read_bytes()

    scored = read_jsonl(paths.scored_pairs)
    assert len(scored) == 4 and len(list(paths.shards("score").glob("*.jsonl"))) == 2
    for s, p in zip(scored, pairs):
        assert s["chosen_ids"] == p["chosen_ids"] and s["rejected_ids"] == p["rejected_ids"]
        assert len(s["rejected_p_ce"]) == len(s["rejected_ids"]) and len(s["chosen_p_ce"]) == len(s["chosen_ids"])
        assert all(0.0 <= x <= 1.0 for x in s["rejected_p_ce"] + s["chosen_p_ce"])
        assert s["rejected_p_ce"][s["critical_index"]] == min(s["rejected_p_ce"])

    align = json.loads(paths.marker("align").read_text())
    assert align["steps"] == 2 and align["trainable_params"] < align["total_params"]
    assert (paths.run / "align.config.yaml").exists() is False and (paths.method / "align.config.yaml").exists()

    results = stages["eval"]["results"]
    assert set(results) == {"base", "sft", "cdpo"}
    for label, key in (("base", "base"), ("sft", "sft"), ("cdpo", "aligned")):
        graded = read_jsonl(paths.eval_file(key))
        assert len(graded) == 3 == results[label]["questions"]
        assert results[label]["correct"] == sum(r["samples"][0]["correct"] for r in graded)
        saved = json.loads(paths.eval_file(key).with_suffix(".json").read_text())
        assert saved["config"]["model"]["name"] == "tiny"
    out = _logged(caplog)
    assert "| base |" in out and "| cdpo |" in out and str(paths.run) in out

    # a second run skips every finished stage and reuses the shared evaluations
    again = run_pipeline(cfg)
    assert again["seconds"].keys() == {"eval"}
    assert "WARNING" not in _logged(caplog)
    # ... and refuses to run a stage on an input made with other settings (it would mix the two)
    with pytest.raises(StaleInputError, match=r"select.top_p: 0.5 -> 0.9\).*run stage=select first"):
        run_pipeline(_cfg(tmp_path, "stage=score", "select.top_p=0.9"))


def test_other_methods_reuse_shared_artifacts(tmp_path):
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    run_pipeline(_cfg(tmp_path, "stage=sample"))
    paths = RunPaths(_cfg(tmp_path))
    _inject_correct_samples(paths, tok)
    for method in ("dpo", "tokendpo", "rpo", "sft"):
        cfg = _cfg(tmp_path, f"method={method}", "compare=[base]", "stage=all")
        result = run_pipeline(cfg)
        assert "score" not in result["stages"], method  # only cDPO needs the CE scores
        assert (Path(cfg.method_dir) / "adapter" / "adapter_model.safetensors").exists()
        assert set(result["stages"]["eval"]["results"]) == {"base", method}
    assert not paths.scored_pairs.exists()


def test_sharded_stage_resumes_without_duplicates(tmp_path):
    items = list(range(10))
    calls, interrupt = [], [True]
    kw = dict(key=str, signature={"sample": {"n": 8}})

    def work(shard):
        calls.append(list(shard))
        if shard[0] == 6 and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt  # interrupted once, while working on the fourth shard
        return [{"key": str(i), "x": i} for i in shard]

    with pytest.raises(KeyboardInterrupt):
        run_sharded(items, 2, tmp_path / "shards", work, tmp_path / "out.jsonl", **kw)
    assert not (tmp_path / "out.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "shards").glob("shard-*")) == [f"shard-0000{i}.jsonl" for i in range(3)]
    calls.clear()
    records = run_sharded(items, 2, tmp_path / "shards", work, tmp_path / "out.jsonl", **kw)
    assert calls == [[6, 7], [8, 9]]  # finished shards were not redone
    assert [r["x"] for r in records] == items == [r["x"] for r in read_jsonl(tmp_path / "out.jsonl")]

    # other items in a shard's place (e.g. a different question list): that shard is redone
    calls.clear()
    run_sharded([0, 1, 2, 99, 4, 5, 6, 7, 8, 9], 2, tmp_path / "shards", work, tmp_path / "out.jsonl", **kw)
    assert calls == [[2, 99]]
    # other settings: every shard is redone
    calls.clear()
    run_sharded(items, 2, tmp_path / "shards", work, tmp_path / "out.jsonl", key=str, signature={"sample": {"n": 4}})
    assert len(calls) == 5


def test_selection_rule_top_p():
    def s(ans, ok):
        return {"response": ans, "response_ids": [1], "extracted": ans, "correct": ok}

    record = {"id": "q", "question": "?", "answers": ["1"], "prompt": "", "prompt_ids": [0],
              "samples": [s("1", True), s("1", True)] + [s("7", False)] * 4 + [s("8", False)] * 3
              + [s("9", False)] * 2 + [s(None, False)] * 1}
    pos, neg, pairs = select_question(record, top_k=1, top_p=0.5)
    assert len(pos) == 1 and [n["extracted"] for n in neg] == ["7", "8"]  # 4/10 < 0.5, 7/10 >= 0.5
    assert pairs[0]["rejected_answer"] == "7"
    _, neg, _ = select_question(record, top_k=1, top_p=1.0)
    assert [n["extracted"] for n in neg] == ["7", "8", "9", None]  # no-answer ranks last


def test_train_py_cli_runs_a_stage(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"run_dir={tmp_path}", "stage=sample",
                          "hydra.run.dir=" + str(tmp_path / "hydra")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[sample] finished" in out.stdout and len(read_jsonl(tmp_path / "trajectories.jsonl")) == 4
    bad = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"run_dir={tmp_path}", "stage=select",
                          "hydra.run.dir=" + str(tmp_path / "hydra")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and "Raise sample.temperature" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
