"""Runs the stages in order, skipping those finished with this run's identity, and prints what was achieved."""
from __future__ import annotations

import importlib
import logging
import time
import warnings

import lightning as L
from omegaconf import DictConfig, OmegaConf

from cdpo import distributed, provenance, signals
from cdpo.data.preferences import is_preference_data
from cdpo.io import recover_dir
from cdpo.objectives import Objective, from_config as objective_of
from cdpo.pipeline import artifacts, estimate
from cdpo.pipeline.artifacts import RunPaths
from cdpo.pipeline.context import device_for
from cdpo.lock import run_lock
from cdpo.stages import BY_NAME, NAMES as STAGES
from cdpo.validation import validate

log = logging.getLogger(__name__)


def _stages_for(cfg: DictConfig, objective: Objective) -> list[str]:
    if cfg.stage == "all":
        preference = is_preference_data(cfg.data)
        evaluate = not preference or bool(cfg.data.get("eval_source"))
        if preference and not evaluate:
            log.info("[eval] preference data has no gold answers: the run ends after align (data.eval_source="
                     "<arith|gsm8k|jsonl:path|...> evaluates on its test questions)")
        if not objective.trains:  # the baseline: the base model, evaluated as it is
            return ["eval"]
        stages = [s for s in STAGES if not (preference and s == "sample") and (evaluate or s != "eval")]
        if not objective.needs_scores:  # the CE scores (and the negative model) serve only such objectives
            stages = [s for s in stages if s not in ("score", "sft_neg")]
            # the positive model is then only the "sft" row of the evaluation, unless the method's own row
            # takes that name (the SFT row is the aligned model itself)
            if not evaluate or "sft" not in set(cfg.compare) - {objective.name}:
                stages.remove("sft_pos")
        return stages
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {', '.join(STAGES)} or all")
    return [cfg.stage]


def run_stage(cfg: DictConfig, paths: RunPaths, stage: str, objective: Objective) -> dict:
    """Run `stage` as the table of stages declares it (cdpo.stages)."""
    declared = BY_NAME[stage]
    run = getattr(importlib.import_module(f"cdpo.pipeline.{declared.module}"), declared.function)
    return run(cfg, paths, objective)


def stage_seed(cfg: DictConfig, stage: str) -> int:
    """Shared stages are seeded by their own settings, so that every method and seed of a run_dir
    reuses the same samples and CE models whichever job made them; align and eval by `seed`."""
    return OmegaConf.select(cfg, BY_NAME[stage].seed)


def _quiet_lightning() -> None:
    # Lightning's per-fit INFO lines (GPU available, tips) drown the stage summaries
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning 2.6's batch-size probe builds torch's LeafSpec, which torch 2.10+ deprecates: Lightning's to fix
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def run_pipeline(cfg: DictConfig) -> dict:
    validate(cfg)  # every setting, before any work (train.py has checked them already: cheap)
    _quiet_lightning()
    paths = RunPaths(cfg)
    objective = objective_of(cfg.method)  # built once: every stage asks this object
    stages = _stages_for(cfg, objective)
    distributed.check_stages(cfg.trainer, stages)
    if not distributed.is_main_process():  # the processes of one fit run under rank 0's lock
        return _run_stages(cfg, paths, stages, objective)
    with run_lock(paths.lock, cfg.get("lock_timeout_s")):
        for adapter in (paths.pos_adapter, paths.neg_adapter, paths.aligned_adapter):
            recover_dir(adapter)  # a save a kill interrupted: the old adapter back, no staging leftovers
        return _run_stages(cfg, paths, stages, objective)


def _run_stages(cfg: DictConfig, paths: RunPaths, stages: list[str], objective: Objective) -> dict:
    reuse_from = cfg.get("reuse_from")
    source = None
    if reuse_from:
        source = RunPaths(OmegaConf.create({"run_dir": reuse_from, "method_dir": reuse_from, "data": cfg.data}))
    timings, summaries, identities = {}, {}, {}
    forecast_done = False
    for stage in stages:
        signals.check()  # a signal whose exception was swallowed stops at the next stage at the latest
        artifacts.check_inputs(cfg, paths, stage, objective, known=identities)
        identity = identities[stage] = artifacts.stage_identity(cfg, paths, stage, objective)
        if stage != "eval" and artifacts.finished(paths, stage, identity, cfg):
            log.info(f"[{stage}] done already ({paths.marker(stage)}): skipped")
            summaries[stage] = artifacts.read_marker(paths, stage)
            continue
        if source is not None and artifacts.reuse_stage(source, paths, stage, identity):
            log.info(f"[{stage}] reused from {source.run} (same settings and inputs)")
            summaries[stage] = artifacts.read_marker(paths, stage)
            continue
        if stage in estimate.STAGES and not forecast_done and is_preference_data(cfg.data) and _on_cpu(cfg):
            forecast_done = True  # once, before the first training stage: the pairs are known by then
            log.info(estimate.forecast(cfg, paths, stages[stages.index(stage):]) or "[estimate] no pairs yet")
        log.info(f"[{stage}] running")
        L.seed_everything(stage_seed(cfg, stage), verbose=False)
        t0, cpu0 = time.perf_counter(), time.process_time()
        summary = run_stage(cfg, paths, stage, objective)
        timings[stage] = round(time.perf_counter() - t0, 1)
        # CPU time of this process's threads: unlike wall time it does not grow while the process is paused
        # or waits for a shared machine, so the cost table can tell a slow stage from a crowded machine
        summary = {**summary, "seconds": timings[stage], "cpu_seconds": round(time.process_time() - cpu0, 1),
                   "made_on": provenance.where(device_for(cfg), cfg.model.get("dtype"))}
        earlier = artifacts.read_marker(paths, stage) if summary.get("evaluated") == 0 else None
        if earlier and "seconds" in earlier:  # every result cached: the marker keeps what computing them cost
            summary.update({k: earlier.get(k) for k in ("seconds", "cpu_seconds", "made_on")})
        summaries[stage] = summary
        if not distributed.is_main_process():
            continue  # several training processes: global rank 0 writes the marker
        artifacts.mark_done(paths, stage, cfg, summary, identity)
        log.info(f"[{stage}] finished in {timings[stage]:.0f} s: {_short(summary)}")
    if "eval" in summaries:
        log.info(results_table(summaries["eval"]["results"]))
    log.info(f"artifacts: {paths.run}  (method: {paths.method})")
    if timings:
        log.info("wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return {"stages": summaries, "seconds": timings}


def _on_cpu(cfg: DictConfig) -> bool:
    return device_for(cfg) == "cpu"


def _short(summary: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)) and k not in ("seconds", "cpu_seconds"))


def results_table(results: dict) -> str:
    lines = ["", "| model | accuracy | correct / questions | no answer |", "|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {100 * r['accuracy']:.1f} % | {r['correct']} / {r['questions']} | {r['no_answer']} |")
    return "\n".join(lines) + "\n"
