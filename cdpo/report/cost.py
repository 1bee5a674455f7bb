"""What the report's results cost and where they were made: every stage marker (`*.done.json`) under
the runs gives its wall time and, from this version on, its machine, dtype and commit
(`cdpo.provenance`, written by the pipeline runner)."""
from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

from cdpo.progress import duration
from cdpo.stages import NAMES as STAGES

log = logging.getLogger(__name__)


def stage_markers(runs: list[str | Path]) -> list[tuple[str, dict]]:
    """(stage, marker) for every readable stage marker under `runs` that computed its stage: a marker
    carried over from another run_dir (`reused_from`) and the same marker seen twice (a run dir and its
    archive) count once."""
    found, seen = [], set()
    for path in sorted({p.resolve() for run in runs for p in Path(run).glob("**/*.done.json")}):
        stage = path.name.removesuffix(".done.json")
        if stage not in STAGES:
            continue
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning(f"{path}: unreadable stage marker ({str(e)[:80]}): left out of the cost table")
            continue
        key = (stage, json.dumps(marker.get("identity"), sort_keys=True), marker.get("seconds"))
        if "reused_from" in marker or (marker.get("identity") and key in seen):
            continue
        seen.add(key)
        found.append((stage, marker))
    return found


def _machine(made_on: dict) -> str:
    where = made_on.get("gpu") or f"{made_on.get('cpu', '?')} ({made_on.get('cores', '?')} cores)"
    return f"{where}, {made_on.get('dtype') or '?'}"


def cost_markdown(markers: list[tuple[str, dict]]) -> str:
    """A table per stage, in pipeline order: runs, median and total wall time, the machines, dtypes and
    commits that made them (`—` for markers written before the runner recorded them)."""
    by_stage = defaultdict(list)
    for stage, marker in markers:
        if isinstance(marker.get("seconds"), (int, float)):
            by_stage[stage].append(marker)
    if not by_stage:
        return ""
    lines = ["| stage | runs | median | total | CPU time, total | machine, dtype | code |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    for stage in (s for s in STAGES if s in by_stage):
        ms = by_stage[stage]
        seconds = [m["seconds"] for m in ms]
        total += sum(seconds)
        made = [m["made_on"] for m in ms if isinstance(m.get("made_on"), dict)]
        machines = sorted({_machine(m) for m in made}) or ["—"]
        code = sorted({str(m.get("code", "?")) for m in made}) or ["—"]
        lines.append(f"| {stage} | {len(ms)} | {duration(statistics.median(seconds))} | {duration(sum(seconds))} "
                     f"| {_cpu_time(ms)} | {'; '.join(machines)} | {', '.join(code)} |")
    return "\n".join([f"Wall time per stage ({duration(total)} in all, read from the stage markers; wall time "
                      "includes any pause or wait for a shared machine, the CPU time of the stage's process "
                      "does not):", "", *lines, ""])


def _cpu_time(markers: list[dict]) -> str:
    """The CPU seconds of the markers that recorded them (markers of older versions did not)."""
    cpu = [m["cpu_seconds"] for m in markers if isinstance(m.get("cpu_seconds"), (int, float))]
    if not cpu:
        return "—"
    return duration(sum(cpu)) + ("" if len(cpu) == len(markers) else f" ({len(cpu)} of {len(markers)} runs)")
