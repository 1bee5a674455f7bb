"""Every stage marker says where and how long it was made; the report's cost table reads that back,
from run directories or their archive."""
import functools
import json
import logging
import subprocess

from test_pipeline import _cfg

from cdpo import provenance
from cdpo.pipeline import run_pipeline
from cdpo.report import build_report
from cdpo.report.archive import archive
from cdpo.report.cost import cost_markdown, stage_markers


def test_a_stage_marker_records_the_machine_dtype_and_commit(tmp_path):
    run_pipeline(_cfg(tmp_path, "method=baseline"))
    marker = json.loads((tmp_path / "baseline-seed0" / "eval.done.json").read_text())
    made = marker["made_on"]
    assert made["dtype"] == "float32" and made["gpu"] is None and made["cores"] >= 1
    assert made["cpu"] == provenance.cpu_model() and made["cpu"]
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=provenance.REPO, capture_output=True,
                          text=True).stdout.strip()
    assert made["code"].removesuffix("+changes") == (head or made["code"])  # a checkout's commit


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_the_commit_says_when_tracked_files_were_changed(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-qm", "one")
    monkeypatch.setattr(provenance, "REPO", repo)
    version = functools.partial(provenance.code_version.__wrapped__)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert version() == head
    (repo / "notes.txt").write_text("untracked: not the code\n")
    assert version() == head
    (repo / "a.py").write_text("x = 2\n")
    assert version() == head + "+changes"
    monkeypatch.setattr(provenance, "REPO", tmp_path / "not-a-checkout")
    (tmp_path / "not-a-checkout").mkdir()
    assert version().startswith("cdpo ")


def test_the_report_says_what_each_stage_cost_and_where(tmp_path, caplog):
    run = tmp_path / "run"
    run_pipeline(_cfg(run, "method=baseline"))
    (run / "select.done.json").write_text(json.dumps({"seconds": 7.0}))  # a marker of an older version
    (run / "score.done.json").write_text('{"seconds": 3')               # a damaged one
    caplog.set_level(logging.WARNING)
    md = build_report([run], tmp_path / "r" / "t", resamples=100, wandb=False)["markdown"]
    line = next(x for x in md.splitlines() if x.startswith("| eval |"))
    assert f"{provenance.cpu_model()} (" in line and ", float32 |" in line and provenance.code_version() in line
    assert "| select | 1 | 7 s | 7 s | — | — | — |" in md
    assert "score" not in md.split("Wall time per stage")[1] and "score.done.json: unreadable stage marker" in caplog.text
    assert md.index("| select |") < md.index("| eval |")  # pipeline order
    # the archive keeps the markers: the same table without the run
    archive(run, tmp_path / "kept")
    kept = build_report([tmp_path / "kept"], tmp_path / "k" / "t", resamples=100, wandb=False)["markdown"]
    assert kept.split("Wall time per stage")[1] == md.split("Wall time per stage")[1]


def test_an_evaluation_served_from_cache_keeps_what_computing_it_cost(tmp_path):
    run_pipeline(_cfg(tmp_path, "method=baseline"))
    marker = tmp_path / "baseline-seed0" / "eval.done.json"
    first = json.loads(marker.read_text())
    first["seconds"], first["made_on"]["cpu"] = 1234.5, "the machine that evaluated"  # stands for a long eval
    marker.write_text(json.dumps(first))
    run_pipeline(_cfg(tmp_path, "method=baseline"))  # every result cached: nothing computed
    again = json.loads(marker.read_text())
    assert again["evaluated"] == 0 and again["seconds"] == 1234.5 and again["made_on"]["cpu"] == "the machine that evaluated"
    run_pipeline(_cfg(tmp_path, "method=baseline", "eval.limit=2"))  # other questions: evaluated, timed anew
    assert json.loads(marker.read_text())["seconds"] != 1234.5


def test_a_stage_carried_over_or_archived_counts_once(tmp_path):
    main, ablation = tmp_path / "main", tmp_path / "ablation"
    run_pipeline(_cfg(main, "stage=sample"))
    run_pipeline(_cfg(ablation, "stage=sample", f"reuse_from={main}"))
    assert json.loads((ablation / "sample.done.json").read_text())["reused_from"] == str(main)
    archive(main, tmp_path / "kept")
    found = stage_markers([main, ablation, tmp_path / "kept"])
    assert [stage for stage, _ in found] == ["sample"]
    assert "| sample | 1 |" in cost_markdown(found)


def test_the_cpu_time_leaves_out_a_pause_that_the_wall_time_counts(tmp_path, monkeypatch):
    """A stage kept waiting (here 2 s of sleep, as under SIGSTOP or a crowded machine): its wall time grows,
    its CPU time does not, and the cost table shows both."""
    import time

    from cdpo.pipeline import runner

    real = runner.run_stage

    def paused(cfg, paths, stage, objective):
        time.sleep(2.0)
        return real(cfg, paths, stage, objective)

    monkeypatch.setattr(runner, "run_stage", paused)
    run_pipeline(_cfg(tmp_path, "method=baseline"))
    marker = json.loads((tmp_path / "baseline-seed0" / "eval.done.json").read_text())
    assert marker["seconds"] >= 2.0 and 0 < marker["cpu_seconds"] < marker["seconds"] - 1.5
    line = next(x for x in cost_markdown(stage_markers([tmp_path])).splitlines() if x.startswith("| eval |"))
    assert line.split(" | ")[4] == f"{marker['cpu_seconds']:.0f} s"
    older = {**marker, "cpu_seconds": None}  # a marker of a version that did not record it
    mixed = cost_markdown([("eval", marker), ("eval", older)])
    assert f"| {marker['cpu_seconds']:.0f} s (1 of 2 runs) |" in mixed
