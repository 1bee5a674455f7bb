"""The report: significance tests against scipy and naive formulas, Table 1's layout, collection from
run directories and from a (fake) wandb API, and the files it writes."""
import csv
import io
import json
import logging
import math
import os
from statistics import mean, stdev

import numpy as np
import pytest
from scipy import stats as sps

from cdpo.io import DataError, write_json, write_jsonl
from cdpo.report import Result, Table, build_report, collect_local, collect_wandb
from cdpo.report.stats import mcnemar_exact, paired_bootstrap


# --- statistics ----------------------------------------------------------------------------------
def test_mcnemar_matches_scipy_binomtest_and_a_hand_count():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        a, b = rng.random(n) < rng.uniform(0.2, 0.8), rng.random(n) < rng.uniform(0.2, 0.8)
        r = mcnemar_exact(a, b)
        assert r["n10"] == int((a & ~b).sum()) and r["n01"] == int((~a & b).sum())
        if r["n10"] + r["n01"]:
            expected = sps.binomtest(r["n10"], r["n10"] + r["n01"], 0.5).pvalue
            assert r["p"] == pytest.approx(expected, rel=1e-9, abs=1e-15), trial
    # six questions only `a` solved, none only `b`: p = 2 * 0.5**6
    assert mcnemar_exact([1] * 6 + [0] * 4, [0] * 6 + [0] * 4)["p"] == pytest.approx(2 / 64)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p"] == 1.0  # no discordant question
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar_exact([1], [1, 0])


def test_paired_bootstrap_agrees_with_scipy_and_the_normal_approximation():
    rng = np.random.default_rng(1)
    n = 400
    b = (rng.random(n) < 0.5).astype(float)
    a = np.where(rng.random(n) < 0.12, 1.0, b)  # a = b with ~6 % of questions flipped to correct
    r = paired_bootstrap(a, b, resamples=20_000, seed=3)
    d = a - b
    assert r["delta"] == pytest.approx(d.mean())
    ref = sps.bootstrap((a, b), lambda x, y, axis=-1: (x - y).mean(axis=axis), paired=True, vectorized=True,
                        n_resamples=20_000, method="percentile", random_state=np.random.default_rng(4))
    assert r["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert r["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.006)
    se = d.std() / math.sqrt(n)  # the bootstrap's standard error is the plug-in one
    assert r["p"] == pytest.approx(2 * sps.norm.sf(abs(d.mean()) / se), abs=0.01)
    assert 0 < r["p"] < 0.05 and r["ci_low"] > 0
    # identical systems: no difference at all; a sweeping win: the smallest p the resamples resolve
    same = paired_bootstrap(b, b, resamples=500)
    assert (same["delta"], same["p"]) == (0.0, 1.0)
    assert paired_bootstrap(np.ones(50), np.zeros(50), resamples=999)["p"] == pytest.approx(2 / 1000)


# --- fake finished runs --------------------------------------------------------------------------
def _write_run(root, model, data, method, seed, correct, *, curve=None, **cfg_extra):
    method_dir = root / f"{model}-{data}" / f"{method}-seed{seed}"
    config = {"model": {"name": model}, "data": {"name": data}, "method": {"name": method}, "seed": seed, **cfg_extra}
    write_json(method_dir / "eval.json", {"accuracy": mean(correct), "questions": len(correct), "correct": sum(correct),
                                          "config": config})
    write_jsonl(method_dir / "eval.jsonl", [{"id": f"q{i}", "samples": [{"correct": bool(c)}]}
                                            for i, c in enumerate(correct)])
    if curve is not None:
        write_jsonl(method_dir / "metrics.jsonl", [{"step": s, "logps/chosen": c, "logps/rejected": r, "loss": 0.5}
                                                   for s, (c, r) in enumerate(curve)])
    return method_dir


def _grid(tmp_path, n=60):
    """Two models x two data sets; cDPO solves every question, DPO 2/3 of them, the baseline half."""
    root = tmp_path / "runs"
    for model in ("deepseek_math_7b", "llama3_8b"):
        for data in ("math500", "gsm8k"):
            for seed in (0, 1, 2):
                _write_run(root, model, data, "baseline", seed, [i % 2 for i in range(n)])
                _write_run(root, model, data, "dpo", seed, [int((i + seed) % 3 != 0) for i in range(n)],
                           curve=[(-10.0, -12.0), (-10.5, -13.0)])
                _write_run(root, model, data, "cdpo", seed, [1] * (n - seed) + [0] * seed,
                           curve=[(-10.0, -12.0), (-9.5, -15.0)])
    return root


def test_table_layout_cells_averages_and_tests(tmp_path):
    results = collect_local([_grid(tmp_path)])
    assert len(results) == 36
    table = Table(results, resamples=2000)
    md = table.markdown()
    header = md.splitlines()[0]
    assert header == ("| Method | GSM8K Llama-3 8B | GSM8K DeepSeek-math 7B | GSM8K Avg. | MATH500 Llama-3 8B | "
                      "MATH500 DeepSeek-math 7B | MATH500 Avg. |")  # the paper's column order
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()[2:5]]
    assert rows == ["Baseline", "+ DPO", "+ cDPO"]
    cdpo_accs = [100 * (60 - s) / 60 for s in (0, 1, 2)]
    cell = table.cell(("llama3_8b", "gsm8k"), "cdpo")
    assert cell["mean"] == pytest.approx(mean(cdpo_accs)) and cell["std"] == pytest.approx(stdev(cdpo_accs))
    assert f"{mean(cdpo_accs):.1f} ± {stdev(cdpo_accs):.1f}*" in md  # significant against every row
    assert table.cell(("llama3_8b", "gsm8k"), "baseline")["std"] == 0.0
    avg = table.average(table.groups[0][1], "dpo")
    assert avg["mean"] == pytest.approx(mean(table.cell(c, "dpo")["mean"] for c in table.groups[0][1]))

    t = table.tests[(("llama3_8b", "gsm8k"), "baseline")]
    ids = [f"q{i}" for i in range(60)]
    ref = [mean(r.correct[q] for r in table.by_cell[(("llama3_8b", "gsm8k"), "cdpo")]) for q in ids]
    assert t["delta"] == pytest.approx(100 * (mean(ref) - 0.5))
    assert t["p_bootstrap"] < 0.005 and t["questions"] == 60
    # McNemar seed by seed, the largest p: seed 2 (cDPO misses two questions the baseline solves)
    per_seed = [sps.binomtest(sum(c and not b for c, b in zip(cd, bl)), sum(c != b for c, b in zip(cd, bl))).pvalue
                for cd, bl in (([1] * (60 - s) + [0] * s, [i % 2 for i in range(60)]) for s in (0, 1, 2))]
    assert t["p_mcnemar"] == pytest.approx(max(per_seed)) and (t["ref_only"], t["other_only"]) == (29, 1)
    assert table.tests[(("llama3_8b", "gsm8k"), "dpo")]["p_mcnemar"] < 1e-4  # DPO fails a third in every seed
    # each seed's own difference beside the pooled interval: cDPO solves 60 - s, the baseline 30 of 60
    assert t["per_seed"] == pytest.approx([100 * (60 - s - 30) / 60 for s in (0, 1, 2)])
    assert "| +50.0, +48.3, +46.7 |" in table.significance_markdown()

    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert len(rows) == 3 * 4 + 3 * 2  # every cell and every group average
    dpo = next(r for r in rows if (r["model"], r["data"], r["method.name"]) == ("llama3_8b", "gsm8k", "dpo"))
    assert dpo["n_seeds"] == "3" and dpo["seeds"] == "0;1;2" and float(dpo["cdpo_minus_row"]) > 0


def test_no_star_without_significance_and_unequal_seed_counts(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "smollm2_135m", "arith", "cdpo", 0, [1, 0, 1, 0])
    _write_run(root, "smollm2_135m", "arith", "dpo", 0, [1, 0, 0, 0])
    _write_run(root, "smollm2_135m", "arith", "dpo", 1, [1, 1, 0, 0])
    md = Table(collect_local([root]), resamples=500).markdown()
    assert "| + cDPO | 50.0 (n=1) |" in md and "*" not in md.split("\n\n")[0]
    assert "| + DPO | 37.5 ± 17.7 |" in md


def test_collect_local_refuses_ambiguous_results_and_names_them(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "smollm2_135m", "arith", "cdpo", 0, [1, 0], ce={"b": 1.0})
    _write_run(root / "ablations", "smollm2_135m", "arith", "cdpo", 0, [1, 1], ce={"b": 2.0})
    with pytest.raises(DataError, match="two results for smollm2_135m / arith / cdpo / seed 0.*rows=ce.b"):
        collect_local([root])
    by_b = {r.row: r.accuracy for r in collect_local([root], rows="ce.b")}
    assert by_b == {"1.0": 0.5, "2.0": 1.0}
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        collect_local([tmp_path / "missing"])


# --- wandb ----------------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, id, job_type, config, summary=None, history=()):
        self.id, self.job_type, self.config, self.summary, self._history = id, job_type, config, summary or {}, history

    def scan_history(self, keys=None):
        return [r for r in self._history if all(k in r for k in keys)]


class FakeApi:
    def __init__(self, runs):
        self._runs, self.paths = runs, []

    def runs(self, path):
        self.paths.append(path)
        return list(self._runs)


def _wandb_runs():
    def cfg(method, seed):
        return {"model": {"name": "llama3_8b"}, "data": {"name": "gsm8k"}, "method": {"name": method}, "seed": seed}

    runs = []
    for seed in (0, 1):
        for method, correct in (("dpo", [1, 0, 0, 1]), ("cdpo", [1, 1, 1, 1])):
            runs.append(FakeRun(f"e-{method}{seed}", "eval", cfg(method, seed), {
                "eval/accuracy": mean(correct), "eval/questions": 4,
                "eval/per_question": {f"q{i}": c for i, c in enumerate(correct)}}))
            runs.append(FakeRun(f"a-{method}{seed}", f"align_{method}_seed{seed}", cfg(method, seed), history=[
                {"trainer/global_step": s, "_step": s, "logps/chosen": -10.0 + s, "logps/rejected": -12.0 - s}
                for s in range(3)]))
    runs.append(FakeRun("old", "eval", cfg("cdpo", 0), {"eval/accuracy": 0.0, "eval/questions": 4}))  # older rerun
    runs.append(FakeRun("s", "sft_pos", cfg("cdpo", 0)))  # other stages are ignored
    return runs


def test_wandb_results_fill_in_what_run_dirs_lack(tmp_path, monkeypatch):
    api = FakeApi(_wandb_runs())
    remote = collect_wandb(api, "team/cdpo")
    assert api.paths == ["team/cdpo"]
    by_key = {r.key: r for r in remote}
    assert by_key[("llama3_8b", "gsm8k", "cdpo", 0)].accuracy == 1.0  # the newest run of a key wins
    assert by_key[("llama3_8b", "gsm8k", "dpo", 1)].correct == {"q0": 1, "q1": 0, "q2": 0, "q3": 1}
    assert [h["step"] for h in by_key[("llama3_8b", "gsm8k", "dpo", 0)].history] == [0, 1, 2]

    root = tmp_path / "runs"
    _write_run(root, "llama3_8b", "gsm8k", "dpo", 0, [0, 0, 0, 0])  # a run dir overrides wandb's dpo seed 0
    report = build_report([root], tmp_path / "out" / "t", api=FakeApi(_wandb_runs()), resamples=200)
    table = report["table"]
    assert table.cell(("llama3_8b", "gsm8k"), "dpo")["accuracies"] == [0.0, 50.0]
    assert "run directories and wandb" in report["markdown"]
    assert [f.name for f in report["figures"]] == ["t-llama3_8b-gsm8k-logps.png"]

    # offline (no API key): wandb is not asked; wandb=False never
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert len(build_report([root], tmp_path / "o2", resamples=100)["results"]) == 1
    assert len(build_report([root], tmp_path / "o3", wandb=False, api=FakeApi(_wandb_runs()))["results"]) == 1


def test_build_report_writes_markdown_csv_and_the_figure(tmp_path):
    report = build_report([_grid(tmp_path)], tmp_path / "reports" / "table1", resamples=300)
    md, csv_text = ((tmp_path / "reports" / f"table1.{ext}").read_text() for ext in ("md", "csv"))
    assert md == report["markdown"] and "| Method | GSM8K Llama-3 8B |" in md and "p, McNemar exact" in md
    assert csv_text.startswith("model,data,method.name,n_seeds")
    assert len(report["figures"]) == 4  # one per model x data set
    for fig in report["figures"]:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({fig.name})" in md
    with pytest.raises(ValueError, match="wandb="):
        build_report([_grid(tmp_path / "again")], tmp_path / "x", wandb="sometimes")


# --- the shared base / SFT evaluations, the reference check, the smoothed Figure 6 -----------------
def _write_shared(run_dir, model, data, name, correct, *, seed=0, adapter="a1", samples=None, ce_lr=None):
    """What the eval stage writes once per run_dir for `compare`: eval/base.json, eval/sft.json
    (`samples`: the run_dir's sample.seed and ce.seed)."""
    config = {"model": {"name": model}, "data": {"name": data}, "method": {"name": "cdpo"}, "seed": seed}
    if samples is not None:
        config.update(sample={"seed": samples}, ce={"seed": samples, "lr": ce_lr})
    write_json(run_dir / "eval" / f"{name}.json", {
        "accuracy": mean(correct), "questions": len(correct), "correct": sum(correct), "config": config,
        "signature": {"model": model, "adapter": None if name == "base" else adapter}})
    write_jsonl(run_dir / "eval" / f"{name}.jsonl", [{"id": f"q{i}", "samples": [{"correct": bool(c)}]}
                                                     for i, c in enumerate(correct)])


def test_base_and_sft_evaluations_of_each_run_dir_are_rows(tmp_path, caplog):
    root = tmp_path / "runs"
    base, sft = [1, 0, 0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 1, 0, 1, 0]
    for seed in (0, 1):
        _write_run(root, "smollm2_135m", "arith", "cdpo", seed, [1, 1, 1, 0, 1, 1, 1, seed])
    _write_shared(root / "smollm2_135m-arith", "smollm2_135m", "arith", "base", base)
    _write_shared(root / "smollm2_135m-arith", "smollm2_135m", "arith", "sft", sft, seed=1)
    results = collect_local([root])
    table = Table(results, resamples=500)
    assert table.rows == ["base", "sft_pos", "cdpo"]
    col = ("smollm2_135m", "arith")
    assert table.cell(col, "base")["accuracies"] == [25.0] and table.cell(col, "sft_pos")["accuracies"] == [50.0]
    md = table.markdown()
    assert "| Baseline (base model) | 25.0 |" in md and "| SFT (positive CE model) | 50.0 |" in md
    assert "| + cDPO | 81.2 ± 8.8" in md and "over 2 seed(s)" in md  # the seeds of the methods
    # tested against cDPO on the same questions, per question as the seeds of cDPO solved it
    t = table.tests[(col, "base")]
    cdpo = [mean(x) for x in zip([1, 1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 1])]
    assert t["questions"] == 8 and t["delta"] == pytest.approx(100 * (mean(cdpo) - mean(base)))
    assert {r["method.name"] for r in csv.DictReader(io.StringIO(table.csv()))} == {"base", "sft_pos", "cdpo"}

    # an ablation report: the same rows, first, whatever `rows` is
    ablation = Table(collect_local([root], rows="seed"), rows_key="seed", reference="0", resamples=200)
    assert ablation.rows == ["base", "sft_pos", "0", "1"]
    assert "| Baseline (base model) |" in ablation.markdown()

    # several run_dirs of one model x data set: the same evaluation counts once; different SFT models
    # (an ablation that changes them) leave the row out, saying so; method=baseline rows replace "base"
    other = root / "ablations" / "b2"
    _write_shared(other, "smollm2_135m", "arith", "base", base)
    _write_shared(other, "smollm2_135m", "arith", "sft", [0] * 8, adapter="a2")
    caplog.set_level(logging.INFO, logger="cdpo")
    rows = {r.row for r in collect_local([root])}
    assert rows == {"base", "cdpo"} and "'SFT (positive CE model)' left out for smollm2_135m / arith" in caplog.text
    _write_run(root, "smollm2_135m", "arith", "baseline", 0, base)
    assert sorted(r.row for r in collect_local([root])) == ["baseline", "cdpo", "cdpo"]
    other.joinpath("eval", "sft.json").unlink()  # one SFT model again: the baseline method still comes first
    assert Table(collect_local([root]), resamples=100).rows == ["baseline", "sft_pos", "cdpo"]


def test_sft_models_of_replicate_run_dirs_are_the_seeds_of_one_row(tmp_path, caplog):
    """The embedded grid's seeds are whole replicates (run_dir samples<seed>, sample.seed = ce.seed = seed):
    their SFT models differ and are that row's seeds; the same samples with other SFT models are an
    ablation, whose row is left out."""
    root = tmp_path / "grid"
    for seed in (0, 1):
        _write_run(root / f"samples{seed}", "smollm2_135m", "arith", "cdpo", seed, [1, 1, 1, seed],
                   sample={"seed": seed}, ce={"seed": seed})
        _write_shared(root / f"samples{seed}", "smollm2_135m", "arith", "sft", [1, 0, 0, seed], seed=seed,
                      adapter=f"a{seed}", samples=seed)
    sft = sorted((r.seed, r.accuracy) for r in collect_local([root]) if r.row == "sft_pos")
    assert sft == [(0, 0.25), (1, 0.5)]
    assert "| SFT (positive CE model) | 37.5 ± 17.7 |" in Table(collect_local([root]), resamples=100).markdown()
    # a third seed with its own samples but another CE learning rate: an ablation, not a replicate
    _write_shared(root / "samples2", "smollm2_135m", "arith", "sft", [0] * 4, seed=2, adapter="c", samples=2, ce_lr=1e-3)
    caplog.set_level(logging.INFO, logger="cdpo")
    assert "sft_pos" not in {r.row for r in collect_local([root])} and "left out" in caplog.text
    caplog.clear()
    # another seed on the same samples and CE seed, another SFT model: not a replicate either
    _write_shared(root / "samples2", "smollm2_135m", "arith", "sft", [0] * 4, seed=2, adapter="c", samples=1)
    assert "sft_pos" not in {r.row for r in collect_local([root])} and "left out" in caplog.text


def test_a_reference_that_is_not_a_row_is_named_with_the_rows_there(tmp_path, caplog):
    root = tmp_path / "runs"
    for b in (0.5, 1.0):
        _write_run(root / f"b{b}", "smollm2_135m", "arith", "cdpo", 0, [1, 0, 1, 1], ce={"b": b})
    caplog.set_level(logging.WARNING, logger="cdpo")
    table = Table(collect_local([root], rows="ce.b"), rows_key="ce.b", reference="1", resamples=100)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == "report: reference='1' is not a row of this report (its rows: 0.5, 1.0): nothing is tested against it"
    assert table.tests == {}
    caplog.clear()
    Table(collect_local([root], rows="ce.b"), rows_key="ce.b", reference="1.0", resamples=100)
    assert not caplog.records


def test_figure6_draws_the_raw_points_faint_and_their_ema(tmp_path):
    from cdpo.report.plots import draw_logps, mean_curves

    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(-10, 1, 30), rng.normal(-20, 3, 30)
    _write_run(tmp_path, "tiny", "arith", "cdpo", 0, [1], curve=list(zip(chosen, rejected)))
    [result] = collect_local([tmp_path])
    w = 0.8
    fig = draw_logps({"cDPO": mean_curves([result])}, "t", smoothing=w)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4  # chosen raw, chosen EMA, rejected raw, rejected EMA

    def closed_form(v):  # s_t = w^t v_0 + (1 - w) sum_{k=1..t} w^(t-k) v_k
        return [w ** t * v[0] + (1 - w) * sum(w ** (t - k) * v[k] for k in range(1, t + 1)) for t in range(len(v))]

    for (raw, smooth), values, style in ((lines[:2], chosen, "-"), (lines[2:], rejected, "--")):
        assert list(raw.get_xdata()) == list(range(30)) and np.allclose(raw.get_ydata(), values)
        assert raw.get_alpha() == 0.25 and raw.get_label().startswith("_")  # faint, not in the legend
        assert np.allclose(smooth.get_ydata(), closed_form(values)) and smooth.get_alpha() is None
        assert raw.get_linestyle() == smooth.get_linestyle() == style and raw.get_color() == smooth.get_color()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["cDPO chosen", "cDPO rejected"]
    # smoothing=0: the points as logged, one line per curve
    raw_only = draw_logps({"cDPO": mean_curves([result])}, "t", smoothing=0).axes[0].get_lines()
    assert len(raw_only) == 2 and np.allclose(raw_only[1].get_ydata(), rejected)
    with pytest.raises(ValueError, match=r"smoothing=1: .* \[0, 1\)"):
        build_report([tmp_path], tmp_path / "r", smoothing=1, wandb=False)


def test_an_archived_run_gives_the_same_report_without_the_run(tmp_path):
    """cdpo.report.archive keeps what the report reads (summaries, gzipped predictions and curves, markers);
    the report rebuilt from the copy alone equals the one from the run directories."""
    from cdpo.report.archive import archive

    root = _grid(tmp_path)
    run = root / "llama3_8b-gsm8k"
    _write_shared(run, "llama3_8b", "gsm8k", "sft", [1, 0] * 30)
    (run / "adapters" / "pos").mkdir(parents=True)
    (run / "adapters" / "pos" / "adapter_model.safetensors").write_bytes(b"weights: not archived")
    write_json(run / "score.done.json", {"seconds": 12.5})
    kept = tmp_path / "kept"
    written = archive(run, kept)
    assert (kept / "cdpo-seed0" / "eval.jsonl.gz").exists() and (kept / "dpo-seed1" / "metrics.jsonl.gz").exists()
    assert (kept / "score.done.json").exists() and (kept / "eval" / "sft.jsonl.gz").exists()
    assert not list(kept.rglob("*.safetensors")) and not list(kept.rglob("*.jsonl"))
    assert archive(run, kept) == []  # unchanged results: the same bytes, nothing rewritten
    from_run = build_report([run], tmp_path / "a" / "t", resamples=300)["markdown"]
    from_archive = build_report([kept], tmp_path / "b" / "t", resamples=300)["markdown"]
    assert from_archive == from_run and "SFT (positive CE model)" in from_archive and len(written) > 10


def _replicate(root, method, seed, correct, **extra):
    """A method's result in the embedded grid's layout: seed k is a replicate, its own samples and CE seed."""
    return _write_run(root / f"samples{seed}", "smollm2_135m", "arith", method, seed, correct,
                      sample={"seed": seed}, ce={"seed": seed}, **extra)


def test_a_partial_grid_compares_rows_on_the_sample_sets_both_have(tmp_path):
    """Seeds run fastest within a method, so mid-grid the reference may lack a replicate that other rows have.
    DPO equals cDPO in every replicate, and replicate 2 is a much worse sample set that cDPO has not run yet:
    no difference, and no star (compared across all seeds the worse sample set counted as +16 points)."""
    root = tmp_path / "grid"
    n = 60
    good, bad = [int(i % 10 != 0) for i in range(n)], [int(i % 2 == 0) for i in range(n)]
    for seed in (0, 1, 2):
        _replicate(root, "dpo", seed, bad if seed == 2 else good)
    for seed in (0, 1):
        _replicate(root, "cdpo", seed, good)
    _replicate(root, "ipo", 2, bad)            # a row of replicate 2 only: no sample set in common with cDPO
    for seed in (0, 1):                        # the SFT model of two of the three sample sets
        _write_shared(root / f"samples{seed}", "smollm2_135m", "arith", "sft", good, seed=seed,
                      adapter=f"a{seed}", samples=seed)
    table = Table(collect_local([root]), resamples=500)
    col = ("smollm2_135m", "arith")
    dpo = table.tests[(col, "dpo")]
    assert dpo["delta"] == 0.0 and dpo["p_bootstrap"] == 1.0 and dpo["seeds"] == "0, 1" and dpo["matched"]
    assert table.verdict(col, "dpo") == "pending"  # cDPO's replicate 2 is still to come
    ipo = table.tests[(col, "ipo")]
    assert not ipo["matched"] and ipo["seeds"] == "0, 1 vs 2 (no sample set in common)"
    assert ipo["delta"] > 30 and ipo["p_bootstrap"] < 0.005  # a large difference, yet across sample sets
    md = table.markdown()
    assert "| + cDPO | 90.0 ± 0.0 (n=2) |" in md  # no star: DPO is no worse, IPO only across sample sets
    assert "| SFT (positive CE model) | 90.0 ± 0.0 (n=2) |" in md  # 2 SFT models for 3 sample sets
    assert "| 0, 1 vs 2 (no sample set in common) |" in table.significance_markdown()
    rows = {r["method.name"]: r for r in csv.DictReader(io.StringIO(table.csv()))}
    assert rows["dpo"]["tested_on_seeds"] == "0;1" and rows["cdpo"]["tested_on_seeds"] == ""
    assert rows["dpo"]["delta_per_seed"] == "0.00;0.00" and rows["ipo"]["delta_per_seed"] == ""  # none across sets
    # the report says the grid is partial, naming what it lacks (the seeds: those some method row has)
    assert table.missing() == ["SFT (positive CE model): seed 2 missing", "IPO: seeds 0, 1 missing",
                               "cDPO: seed 2 missing"]
    assert "**Partial grid**, not yet its answer: SFT (positive CE model): seed 2 missing; IPO" in md
    expected = Table(collect_local([root]), resamples=10, expect_rows=["dpo", "rpo", "cdpo"], expect_seeds=[0, 1, 2, 3])
    assert expected.missing()[0] == "no results: RPO" and "DPO: seed 3 missing" in expected.missing()
    # the base and SFT rows are the pipeline's own: never missing by name (the base row is absent beside baselines)
    assert Table(collect_local([root]), resamples=10, expect_rows=["base", "sft_pos"]).missing() == table.missing()
    # once cDPO has replicate 2 and IPO the others, all three count
    _replicate(root, "cdpo", 2, bad)
    for seed in (0, 1):
        _replicate(root, "ipo", seed, good)
    for seed in (2,):
        _write_shared(root / f"samples{seed}", "smollm2_135m", "arith", "sft", bad, seed=seed, adapter="a2", samples=2)
    table = Table(collect_local([root]), resamples=500)
    assert table.tests[(col, "dpo")]["seeds"] == "0, 1, 2" and table.tests[(col, "ipo")]["delta"] == 0.0
    assert table.verdict(col, "ipo") == table.verdict(col, "dpo") == "unresolved"  # complete, and no difference
    assert table.missing() == [] and "Partial grid" not in table.markdown()  # complete: nothing named


def test_the_verdict_applies_the_rule_fixed_before_the_grid(tmp_path):
    """Holds: positive in every replicate with McNemar p < 0.005 each and the interval above 0; reversed: the same
    the other way; unresolved: one replicate short of it; pending while a replicate is missing."""
    root, n = tmp_path / "grid", 200
    first = lambda k: [int(i < k) for i in range(n)]  # noqa: E731
    rows = {"cdpo": [150, 150, 150], "dpo": [50, 50, 50], "rpo": [200, 200, 200], "ipo": [50, 50, 145],
            "simpo": [150, 150]}
    for method, solved in rows.items():
        for seed, k in enumerate(solved):
            _replicate(root, method, seed, first(k))
    # the close replicate on its own: 5 questions only cDPO solves, none the other way; p = 0.0625 > 0.005
    assert sps.binomtest(5, 5).pvalue == pytest.approx(0.0625)
    table = Table(collect_local([root]), resamples=2000)
    col = ("smollm2_135m", "arith")
    verdicts = {row: table.verdict(col, row) for row in ("dpo", "rpo", "ipo", "simpo")}
    assert verdicts == {"dpo": "holds", "rpo": "reversed", "ipo": "unresolved", "simpo": "pending"}
    assert table.tests[(col, "ipo")]["ci_low"] > 0  # the pooled interval alone would have called it
    assert "| 0, 1, 2 | holds |" in table.significance_markdown()
    csv_rows = {r["method.name"]: r["verdict"] for r in csv.DictReader(io.StringIO(table.csv()))}
    assert csv_rows == {"cdpo": "", **verdicts}
    # with its third replicate SimPO is judged; the missing reference replicate makes every row pending
    _replicate(root, "simpo", 2, first(150))
    assert Table(collect_local([root]), resamples=500).verdict(col, "simpo") == "unresolved"  # equal: Δ 0
    assert Table(collect_local([root]), resamples=10, expect_seeds=[0, 1, 2, 3]).verdict(col, "dpo") == "pending"


def test_a_partial_ablation_or_column_is_named():
    """An ablation's rows are numbers (`expect.rows=[0.5,1,2]` from Hydra: `1` is the row "1.0"), and a
    column whose seeds lag another's is partial too (the seeds: those some method row has in any column)."""
    def result(data, row, seed):
        return Result("tiny", data, row, seed, 0.5, 2, {"q0": 1, "q1": 0})

    ablation = Table([result("arith", "1.0", 0), result("arith", "0.5", 0)], rows_key="ce.b", reference="1.0",
                     resamples=10, expect_rows=[0.5, 1, 2])
    assert ablation.missing() == ["no results: ce.b=2"]
    columns = Table([result("gsm8k", "cdpo", s) for s in (0, 1, 2)] + [result("math500", "cdpo", 0)], resamples=10)
    assert columns.missing() == ["cDPO (MATH500 tiny): seeds 1, 2 missing"]


def test_results_of_one_column_must_come_from_the_same_test(tmp_path):
    """An archive keeps every result it was given: a row evaluated on an earlier test split, beside rows of
    the current one, is refused, naming both."""
    root = tmp_path / "grid"

    def with_test(method, seed, correct, limit):
        run = _replicate(root, method, seed, correct)
        summary = json.loads((run / "eval.json").read_text())
        summary["signature"] = {"questions": f"digest-{limit}", "model_identity": "m", "data": {"grading": "strict"},
                                "eval": {"limit": limit, "n": 1, "batch_size": 128 if method == "cdpo" else 32},
                                "adapter": method}
        write_json(run / "eval.json", summary)

    with_test("cdpo", 0, [1, 1, 0, 1], 4)
    with_test("dpo", 0, [1, 0, 0, 1], 4)       # another batch size and adapter: the same test
    assert {r.row for r in collect_local([root])} == {"cdpo", "dpo"}
    with_test("ipo", 0, [1] * 8, 8)
    with pytest.raises(DataError, match=r"smollm2_135m / arith: .*(cdpo|dpo)-seed0 and .*ipo-seed0 were evaluated "
                                        r"on different tests \(they differ in eval, questions\)"):
        collect_local([root])


def test_predictions_that_do_not_add_up_to_their_summary_are_refused(tmp_path):
    """An archive pass cut short between a result's predictions and its summary (here: the summary's copy
    fails after the new predictions were written) leaves the old summary beside the new predictions: the
    report refuses them, naming both files, and the next pass mends the archive."""
    from cdpo.report import archive as archive_module

    root, kept = tmp_path / "grid", tmp_path / "kept"
    _replicate(root, "cdpo", 0, [1, 1, 0, 0])
    archive_module.archive(root, kept)
    _replicate(root, "cdpo", 0, [1, 1, 1, 1, 1, 0])  # evaluated again, on more questions
    real_copy = archive_module._copy

    def cut(src, dst):
        if src.name == "eval.json":
            raise KeyboardInterrupt  # the pass is killed here
        return real_copy(src, dst)

    archive_module._copy = cut
    try:
        with pytest.raises(KeyboardInterrupt):
            archive_module.archive(root, kept)
    finally:
        archive_module._copy = real_copy
    with pytest.raises(DataError, match=r"eval.jsonl.gz: 5 of 6 questions right, but its summary .*eval.json says "
                                        r"2 of 4: the two files come from different evaluations"):
        collect_local([kept])
    archive_module.archive(root, kept)
    [result] = collect_local([kept])
    assert (result.accuracy, len(result.correct)) == (5 / 6, 6)


def test_the_archive_leaves_a_run_dir_with_a_job_in_it_for_the_next_pass(tmp_path):
    """A replicate's method re-aligned while the keeper archives: its new curve is half written beside its old
    evaluation. The run_dir's job holds its lock, so the pass copies only the other run_dirs and says which it
    left; a job that stopped after aligning (`stage=align`) leaves an evaluation of the earlier adapter, which
    waits too; the pass after the new evaluation copies the new result whole."""
    from cdpo.lock import run_lock
    from cdpo.report.archive import archive

    root, kept = tmp_path / "grid", tmp_path / "kept"
    curve = [(-10.0, -12.0), (-9.5, -15.0)]

    def aligned_and_evaluated(seed, correct, aligned, evaluated):
        run = _replicate(root, "cdpo", seed, correct, curve=curve)
        summary = json.loads((run / "eval.json").read_text())
        write_json(run / "eval.json", {**summary, "signature": {"adapter": evaluated}})
        write_json(run / "align.done.json", {"steps": 2, "artifacts": {"adapter": {"sha256": aligned}}})
        return run

    runs = [aligned_and_evaluated(seed, [1, 1, 0, 0], "a", "a") for seed in (0, 1)]
    for run in runs:
        (run.parent.parent / ".lock").touch()  # a job ran in each replicate's run_dir
    holder = '{"pid": 1, "host": "h", "since": "then", "command": "train.py"}'
    (root / "samples0" / ".lock").write_text(holder)  # who last held it: the archive only reads it
    lone = _write_run(root / "by-hand", "smollm2_135m", "arith", "ipo", 0, [1, 0])  # never locked
    archive(root, kept)
    assert (kept / lone.relative_to(root) / "eval.json").exists()
    assert (root / "samples0" / ".lock").read_text() == holder
    kept1 = kept / runs[1].relative_to(root)
    old_curve = (kept1 / "metrics.jsonl.gz").read_bytes()
    dpo = _replicate(root, "dpo", 0, [1, 0, 0, 0])  # a new result of replicate 0, finished
    skipped = []
    with run_lock(root / "samples1" / ".lock", timeout_s=0):  # the job re-aligning replicate 1's cDPO
        write_jsonl(runs[1] / "metrics.jsonl", [{"step": 0, "loss": 0.7}])  # half a curve
        written = archive(root, kept, skipped)
    assert kept / dpo.relative_to(root) / "eval.json" in written
    assert written and all("samples1" not in str(f) for f in written)
    assert (kept1 / "metrics.jsonl.gz").read_bytes() == old_curve
    [line] = skipped
    assert line.startswith(f"{root / 'samples1'}: left for the next pass, a job is writing there (pid {os.getpid()}")
    write_json(runs[1] / "align.done.json", {"steps": 2, "artifacts": {"adapter": {"sha256": "b"}}})  # stopped here
    skipped = []
    assert archive(root, kept, skipped) == [] and (kept1 / "metrics.jsonl.gz").read_bytes() == old_curve
    assert skipped == [f"{runs[1]}: left until it is evaluated again, its evaluation is of an earlier alignment"]
    aligned_and_evaluated(1, [1, 1, 1, 0], "b", "b")  # evaluated again
    assert kept1 / "eval.json" in archive(root, kept)
    assert {r.key: r.accuracy for r in collect_local([kept])}[("smollm2_135m", "arith", "cdpo", 1)] == 0.75
