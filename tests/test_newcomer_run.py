"""What a newcomer meets after a run (issue 19, item 6): eval results named per method, the pipeline's own
prediction files regraded, an adapter evaluated as its run asked and graded, the evaluation data set named in
the model card and the report, and files put in place readable by others (0644 under umask 022)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from cdpo.grading import grade_file


def test_each_method_dirs_adapter_gets_its_own_results_file(tmp_path):
    import eval as eval_py

    labels = {eval_py.result_label(tmp_path / f"runs/smollm2-arith/{m}/adapter") for m in ("cdpo-seed0", "dpo-seed0")}
    assert labels == {"cdpo-seed0", "dpo-seed0"}  # both were "adapter": one results file for every method
    assert eval_py.result_label(tmp_path / "my-lora") == "my-lora" and eval_py.result_label(None) == "base"


def test_the_pipelines_own_prediction_files_can_be_regraded(tmp_path):
    """eval_*.jsonl as the eval stage writes them: no `response` key, the samples under `samples`."""
    rows = [{"id": "q1", "question": "2+3?", "answers": ["5"], "prompt": "Q", "samples": [
                {"response": "The answer is 5.", "correct": True, "extracted": "5"},
                {"response": "The answer is 6.", "correct": False, "extracted": "6"}]},
            {"id": "q2", "question": "2+2?", "answers": ["4"], "prompt": "Q", "samples": [
                {"response": "The answer is 3.", "correct": False, "extracted": "3"}]}]
    path = tmp_path / "eval_aligned.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = grade_file(path)
    assert (summary["graded"], summary["correct"]) == (2, 1)  # the first sample, as the eval stage counts


def test_files_put_in_place_are_readable_by_others(tmp_path):
    """transformers writes model.safetensors through a private temporary file (0600): the merged export held one
    file the others could not read."""
    from cdpo.io import replace_dir, staging_dir

    old = os.umask(0o022)
    try:
        new = staging_dir(tmp_path / "out")
        (new / "model.safetensors").write_bytes(b"w")
        (new / "model.safetensors").chmod(0o600)
        (new / "config.json").write_text("{}")
        replace_dir(new, tmp_path / "out")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {
        "model.safetensors": "0o644", "config.json": "0o644"}


def test_the_model_card_and_the_report_name_the_evaluation_data_set():
    from cdpo import model_card
    from cdpo.report.collect import _identity

    prefs = {"name": "preference", "kind": "preference", "eval_source": "gsm8k"}
    for data, named in ((prefs, "preference, evaluated on gsm8k"), ({"name": "arith"}, "arith")):
        result = {"model": "cdpo", "split": "test", "grading": "flexible", "accuracy": 0.5, "correct": 1,
                  "questions": 2, "config": {"data": data}}
        run = {"stage": "align", "dir": Path("."), "settings": {}, "summary": {}, "results": [result]}
        card = model_card.render(name="me/x", base="org/base", merged=False, run=run, notes=[])
        assert f"On the `test` split of {named}, graded `flexible`" in card
        config = {"model": {"name": "m"}, "data": data, "seed": 0}
        assert _identity(config, "seed", "x")[1] == named


def test_an_adapter_is_evaluated_as_its_run_asked_and_graded(tmp_path):
    """eval.py data=<set> adapter=<a run's adapter> asked in data=<set>'s defaults whatever the run used: now it
    takes the run's prompt and grading settings (those not given on the command line), or says which it uses."""
    import eval as eval_py
    from cdpo.pipeline import identity

    method = tmp_path / "run" / "cdpo-seed0"
    adapter = method / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    trained = {"name": "gsm8k", "prompt_style": "chat", "n_shot": 4, "grading": "flexible"}
    OmegaConf.save(OmegaConf.create({"data": trained, "method": {"name": "cdpo"}}), method / "align.config.yaml")
    (method / "align.done.json").write_text(json.dumps({"artifacts": {"adapter": identity.describe(adapter)}}))

    def cfg(**data):
        return OmegaConf.create({"adapter": str(adapter), "data": {"name": "gsm8k", "prompt_style": "gsm8k",
                                                                   "n_shot": 0, "grading": "strict", **data}})

    c = cfg()
    line = eval_py.adopt_run_settings(c, adapter)
    assert (c.data.prompt_style, c.data.n_shot, c.data.grading) == ("chat", 4, "flexible")
    assert "as the adapter's run" in line and "data.prompt_style=chat" in line
    c = cfg()
    eval_py.adopt_run_settings(c, adapter, given={"data.grading"})  # the command line wins
    assert (c.data.prompt_style, c.data.grading) == ("chat", "strict")
    c = cfg(name="math500")
    line = eval_py.adopt_run_settings(c, adapter)
    assert c.data.prompt_style == "gsm8k" and "trained on data=gsm8k" in line and "data.grading=strict" in line


def test_a_preference_run_on_a_cpu_prints_a_forecast_before_training(tmp_path, caplog):
    """data=preference on a CPU: before the first training stage, one line forecasts how long the stages left take
    at this size, from the model's own rate on one batch of the run's pairs."""
    import logging

    from test_preferences import _pref_cfg, _write_user_file

    from cdpo.io import read_jsonl
    from cdpo.pipeline import estimate, run_pipeline

    caplog.set_level(logging.INFO, logger="cdpo")
    path = tmp_path / "prefs.jsonl"
    _write_user_file(path)
    run_pipeline(_pref_cfg(tmp_path, path, "stage=select"))
    cfg = _pref_cfg(tmp_path, path, "stage=sft_pos", "+trainer.limit_train_batches=1")
    pairs = read_jsonl(tmp_path / "run" / "pairs.jsonl")
    tokens = estimate.stage_tokens(cfg, pairs)
    assert tokens["sft_pos"][0] == cfg.ce.epochs * sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs)
    assert tokens["align"] == (cfg.align.epochs * sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) +
                                                      len(p["rejected_ids"]) for p in pairs),) * 2
    caplog.clear()
    run_pipeline(cfg)
    messages = [r.getMessage() for r in caplog.records]
    [line] = [m for m in messages if m.startswith("[estimate]")]
    assert messages.index(line) < messages.index("[sft_pos] running")
    assert f"{len(pairs)} pairs; this machine ran the model at " in line and "sft_pos will take" in line
