"""Sweeps: every Hydra sweep preset and wandb grid spec composes into distinct jobs, the two formats
hold the same grids, and the embedded Table-1 grid runs end to end (multirun + report) on a tiny model."""
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_pipeline import TINY, _cfg, _inject_correct_samples

from cdpo.errors import ConfigError
from cdpo.io import read_jsonl
from cdpo.objectives import build, grid
from cdpo.models import load_tokenizer
from cdpo.pipeline import run_pipeline
from cdpo.pipeline.artifacts import RunPaths
from cdpo.report import build_report

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))
ABLATIONS = {"ablation_b": "ce.b", "ablation_chosen_weights": "method.chosen_weighting",
             "ablation_selection": "select.negative_rule", "ablation_n": "sample.n", "ablation_ce_rank": "ce_lora.r"}


def _hydra_grid(name: str) -> dict[str, list[str]]:
    """The sweep's parameters as Hydra's sweeper sees them (the registry's rows through the cdpo_grid resolver,
    which every entry point registers)."""
    import cdpo.cli  # noqa: F401  registers cdpo_grid

    params = yaml.safe_load((REPO / "conf" / "sweep" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    params = OmegaConf.to_container(OmegaConf.create(params), resolve=True)
    return {k: str(v).split(",") for k, v in params.items()}


def _compose_all(override_lists):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfgs = [compose(config_name="train", overrides=o) for o in override_lists]
    for c in cfgs:
        OmegaConf.resolve(c)
    return cfgs


def test_sweep_presets_cover_table1_and_the_ablations():
    assert {"table1", "embedded", *ABLATIONS} <= set(SWEEPS)
    from cdpo.objectives import grid

    # a grid's rows are the methods whose registry entry lists it (cdpo.objectives.METHODS), in its order
    assert _hydra_grid("embedded") == {"method": grid("embedded"), "seed": ["0", "1", "2"]}
    table1 = _hydra_grid("table1")
    assert table1["method"] == grid("table1")
    # the paper's grids keep their rows when an objective is added (its entry lists no grid unless it says so)
    assert grid("embedded") == [*grid("table1"), "cdpo_per_position"]
    assert len(table1["+experiment"]) * len(table1["method"]) * len(table1["seed"]) == 6 * 8 * 3
    with pytest.raises(ConfigError, match="grid 'embeded': no method lists it; the grids are embedded, table1"):
        grid("embeded")  # a misspelt grid would sweep, or expect in a report, nothing


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_a_sweep_composes_and_writes_its_own_directory(name):
    grid = _hydra_grid(name)
    seeds = grid.pop("seed")
    assert seeds == ["0", "1", "2"]
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    cfgs = _compose_all([[f"+sweep={name}", "seed=1", *(f"{k}={v}" for k, v in p.items())] for p in points])
    method_dirs = [c.method_dir for c in cfgs]
    assert len(set(method_dirs)) == len(points) and all(d.endswith("-seed1") for d in method_dirs)
    if name in ABLATIONS:  # one run_dir per value, shared stages reused from the main run_dir
        key = ABLATIONS[name]
        values = [OmegaConf.select(c, key) for c in cfgs]
        assert len(set(values)) == len(points) > 1
        assert len({c.run_dir for c in cfgs}) == len(points)
        assert all(c.reuse_from == f"runs/{c.model.name}-{c.data.name}" != c.run_dir for c in cfgs)
        assert all(c.method.name == "cdpo" for c in cfgs)


@pytest.mark.parametrize("name", SWEEPS)
def test_wandb_grid_spec_matches_the_hydra_sweep(name):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())
    assert spec["method"] == "grid" and (REPO / spec["program"]).exists()
    assert spec["command"] == ["${env}", "${interpreter}", "${program}", f"+sweep={name}", "${args_no_hyphens}"]
    grid = {k: [str(v) for v in p["values"]] for k, p in spec["parameters"].items()}
    assert grid == _hydra_grid(name)
    # the arguments the wandb agent builds for one grid point compose
    point = {k: {"value": p["values"][-1]} for k, p in spec["parameters"].items()}
    args = create_sweep_command_args({"args": point})["args_no_hyphens"]
    cfg = _compose_all([[f"+sweep={name}", *args]])[0]
    for key, p in spec["parameters"].items():
        group = key.lstrip("+").split("@")[-1]
        if (REPO / "conf" / key.lstrip("+").split("@")[0]).is_dir():  # a config group: its option was chosen
            assert group in ("experiment", "ce_lora") or OmegaConf.select(cfg, f"{group}.name") == p["values"][-1]
        else:
            assert OmegaConf.select(cfg, key) == p["values"][-1]


def test_embedded_grid_script_end_to_end(tmp_path):
    """scripts/embedded_grid.sh on the tiny model: a Hydra multirun of every method x 2 seeds in a
    subprocess, then the report. Each seed is a replicate with its own samples and CE models (run/samples<seed>),
    made once and shared by its rows; each method and seed trains its own adapter."""
    run, out = tmp_path / "run", tmp_path / "reports" / "embedded"
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    trajectories = {}
    for seed in (0, 1):  # the grid's settings (its grading, sample.seed = seed)
        cfg = _cfg(run / f"samples{seed}", "+sweep=embedded", f"seed={seed}")
        assert cfg.sample.seed == cfg.ce.seed == seed
        run_pipeline(_cfg(run / f"samples{seed}", "+sweep=embedded", f"seed={seed}", "stage=sample"))
        _inject_correct_samples(RunPaths(cfg), tok)  # a random tiny model never answers right
        trajectories[seed] = read_jsonl(run / f"samples{seed}" / "trajectories.jsonl")
    assert trajectories[0] != trajectories[1]  # two sample sets

    kept = tmp_path / "kept"  # ARCHIVE: the results copied while the grid runs (every 2 s here) and at its end
    env = {**os.environ, "RUN_DIR": str(run), "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "ARCHIVE": str(kept), "ARCHIVE_EVERY": "2",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "embedded_grid.sh"), *TINY, "seed=0,1",
                           f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    methods = grid("embedded")
    trained = [m for m in methods if build(m).trains]  # the baseline trains nothing
    ran = {stage: log.count(f"[{stage}] running") for stage in ("sample", "select", "sft_pos", "sft_neg", "score",
                                                                 "align", "eval")}
    assert ran == {"sample": 0, "select": 2, "sft_pos": 2, "sft_neg": 2, "score": 2, "align": 2 * len(trained),
                   "eval": 2 * len(methods)}
    for seed in (0, 1):
        assert read_jsonl(run / f"samples{seed}" / "trajectories.jsonl") == trajectories[seed]  # no job resampled
        for method in methods:
            assert (run / f"samples{seed}" / f"{method}-seed{seed}" / "eval.jsonl").exists(), (method, seed)
    # the SFT baseline is trained per seed (its own adapter, not the shared positive CE model)
    sft = [(run / f"samples{s}" / f"sft-seed{s}" / "adapter" / "adapter_model.safetensors").read_bytes() for s in (0, 1)]
    pos = [(run / f"samples{s}" / "adapters" / "pos" / "adapter_model.safetensors").read_bytes() for s in (0, 1)]
    assert sft[0] != sft[1] and sft[0] != pos[0] and pos[0] != pos[1]
    assert read_jsonl(run / "samples1" / "cdpo-seed1" / "metrics.jsonl")[0].keys() >= {"step", "logps/chosen",
                                                                                         "logps/rejected"}

    md = (out.parent / "embedded.md").read_text()
    assert md in log  # the report printed what it wrote
    for method in methods:
        assert f"| {build(method).row_label} | 0.0 ± 0.0 |" in md  # a random model: 0 of 3 questions, 2 seeds each
    # each run_dir's shared SFT evaluation (the positive CE model) is a row too; its base evaluation is the baseline's
    assert "| SFT (positive CE model) | 0.0 ± 0.0 |" in md and "Baseline (base model)" not in md
    # cDPO against each other row: the other methods and the shared SFT (positive CE model) row
    assert sum(line.startswith("| arith tiny |") for line in md.splitlines()) == len(methods) - 1 + 1
    csv_rows = (out.parent / "embedded.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(methods) + 1 and ",baseline,2," in csv_rows[1] and ",sft_pos,2," in csv_rows[2]
    passes = [line for line in log.splitlines() if "file(s) written under" in line]
    assert any(not line.startswith("0 ") for line in passes[:-1]), passes  # copied during the grid, not only at its end
    for method in methods:
        for seed in (0, 1):
            assert (kept / f"samples{seed}" / f"{method}-seed{seed}" / "eval.jsonl.gz").exists(), (method, seed)
        assert (kept / f"samples{seed}" / "eval" / "sft.jsonl.gz").exists()  # each replicate's shared evaluations
    kept_md = build_report([kept], tmp_path / "from-archive" / "t", wandb=False)["markdown"]
    assert kept_md.split("![")[0] == md.split("![")[0]  # the same tables from the archive alone
    assert "Partial grid" not in md  # the script's report expects the grid's rows: all are there
    # the script on a grid lacking one row's seed and one row (a copy of the archive; one job, the baseline of
    # seed 0, evaluated again there): its report names both
    for gone in ("samples1/ipo-seed1", "samples0/rpo-seed0", "samples1/rpo-seed1"):
        shutil.rmtree(kept / gone)
    partial = subprocess.run(["bash", str(REPO / "scripts" / "embedded_grid.sh"), *TINY, "method=baseline", "seed=0",
                              f"hydra.sweep.dir={tmp_path / 'multirun2'}"], capture_output=True, text=True, timeout=600,
                             cwd=tmp_path, env={**env, "RUN_DIR": str(kept), "OUT": str(tmp_path / "p" / "t"), "ARCHIVE": ""})
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "**Partial grid**, not yet its answer: no results: RPO; IPO: seed 1 missing." in partial.stdout
    # the eval stage ran with the grid's speed settings: the adapters merged, 128 questions a batch
    assert json.loads((run / "samples0" / "cdpo-seed0" / "eval.json").read_text())["signature"]["eval"]["merge_adapter"] is True
    assert sum(",2,0;1," in r for r in csv_rows[1:]) == len(methods) + 1  # the SFT (positive CE model) row too
    # the second significance table: every row against the authors' per-position form
    md_pp = (out.parent / "embedded-per_position.md").read_text()
    assert "| arith tiny | + cDPO |" in md_pp and "| arith tiny | + cDPO (per position) |" not in md_pp
    assert "| arith tiny | + cDPO (per position) |" in md
    # the two cDPO forms trained differently (same data, seed and initialisation)
    seq, pp = ((run / "samples0" / f"{m}-seed0" / "adapter" / "adapter_model.safetensors").read_bytes()
               for m in ("cdpo", "cdpo_per_position"))
    assert seq != pp
    assert "grid wall time:" in log
    png = out.parent / "embedded-tiny-arith-logps.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.name})" in md
