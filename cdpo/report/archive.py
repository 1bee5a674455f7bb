"""A run's results kept with the repository: what report.py reads, without the models.

    python -m cdpo.report.archive runs/smollm2_135m-arith-table1 docs/results/embedded-grid

Copies, under the same relative paths, every evaluation summary (`<method_dir>/eval.json`, each
run_dir's `eval/base.json` and `eval/sft.json`, at any depth: a grid of replicate run_dirs), its graded predictions and training curves gzipped (`.jsonl.gz`,
no timestamp in the gzip header, so an unchanged file gives the same bytes and git sees no change), and
the stage markers (their identities and wall times). `report.py runs=[<dest>]` rebuilds every table
from the copy on a fresh clone. Rerun it as results arrive: finished results are added, none removed.

A run_dir with a job in it (its `.lock` held: a stage rewriting predictions, curves or markers) is
skipped for that pass and said so; the others are copied under a shared lock (read-only: no write
access needed), so a job never writes into a run_dir while its files are copied. A method re-aligned
by a job that stopped before evaluating (its evaluation names another adapter than its align marker)
waits for its new evaluation: the copy never pairs an old result with new curves.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
import sys
from pathlib import Path

from cdpo.errors import LockError
from cdpo.lock import read_lock

def archive(run_dir: str | Path, dest: str | Path, skipped: list[str] | None = None) -> list[Path]:
    """Copy the results of `run_dir` (a run_dir, or a folder of them) into `dest`, one run_dir at a time
    under its lock; returns the files written or replaced. `skipped` gets a line per run_dir left for the
    next pass because a job holds it."""
    run_dir, dest = Path(run_dir), Path(dest)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    owners = sorted({p.parent for p in run_dir.glob("**/.lock")}, key=lambda p: -len(p.parts))  # deepest first
    files = sorted({p for pattern in ("**/eval.json", "**/eval/*.json", "**/*.done.json") for p in run_dir.glob(pattern)})
    groups: dict[Path | None, list[Path]] = {}
    for f in files:  # each file with the innermost run_dir holding it (None: no job ever locked one)
        groups.setdefault(next((o for o in owners if o in f.parents), None), []).append(f)
    written, skipped = [], skipped if skipped is not None else []
    for owner, group in groups.items():
        if owner is None:
            written += _copy_results(run_dir, dest, group, skipped)
            continue
        try:
            with read_lock(owner / ".lock"):
                written += _copy_results(run_dir, dest, group, skipped)
        except LockError as e:
            skipped.append(f"{owner}: left for the next pass, a job is writing there ({e.holder})")
    return written


def _evaluated_before_aligned(summary: Path) -> bool:
    """A method's evaluation of another adapter than the one its align marker records: re-aligned by a job
    that stopped before evaluating (`stage=align`), so its curves are newer than its result."""
    marker = summary.parent / "align.done.json"
    if summary.name != "eval.json" or not marker.exists():
        return False
    evaluated = (json.loads(summary.read_text()).get("signature") or {}).get("adapter")
    aligned = ((json.loads(marker.read_text()).get("artifacts") or {}).get("adapter") or {}).get("sha256")
    return None not in (evaluated, aligned) and evaluated != aligned


def _copy_results(run_dir: Path, dest: Path, files: list[Path], skipped: list[str]) -> list[Path]:
    stale = {f.parent for f in files if _evaluated_before_aligned(f)}
    skipped += [f"{d}: left until it is evaluated again, its evaluation is of an earlier alignment" for d in sorted(stale)]
    files = [f for f in files if f.parent not in stale]
    summaries = [f for f in files if not f.name.endswith(".done.json")]
    written = []
    # a result's predictions and curves first, its summary next, the stage markers last: a pass cut short
    # leaves an older summary beside newer predictions at worst, which report.py refuses (collect._correct),
    # never a summary that claims predictions it does not have
    for summary in summaries:
        for jsonl in (summary.with_suffix(".jsonl"), summary.parent / "metrics.jsonl"):
            if jsonl.exists() and (jsonl.name != "metrics.jsonl" or summary.name == "eval.json"):
                written += _copy_gz(jsonl, dest / jsonl.relative_to(run_dir).with_suffix(".jsonl.gz"))
        written += _copy(summary, dest / summary.relative_to(run_dir))
    for marker in (f for f in files if f.name.endswith(".done.json")):
        written += _copy(marker, dest / marker.relative_to(run_dir))
    return written


def _copy(src: Path, dst: Path) -> list[Path]:
    return _put(src.read_bytes(), dst)


def _copy_gz(src: Path, dst: Path) -> list[Path]:
    return _put(gzip.compress(src.read_bytes(), compresslevel=9, mtime=0), dst)


def _put(data: bytes, dst: Path) -> list[Path]:
    """Write `data` to `dst` unless it holds them already; a reader (git, report.py) never sees half a file."""
    if dst.exists() and dst.read_bytes() == data:
        return []
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")  # one per writer
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return [dst]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m cdpo.report.archive <run_dir> <dest>")
    skipped: list[str] = []
    files = archive(sys.argv[1], sys.argv[2], skipped)
    print("\n".join([*skipped, f"{len(files)} file(s) written under {sys.argv[2]}"]))
