"""A run's results kept with the repository: what report.py reads, without the models.

    python -m cdpo.report.archive runs/smollm2_135m-arith-table1 docs/results/embedded-grid

Copies, under the same relative paths, every evaluation summary (`<method_dir>/eval.json`, each
run_dir's `eval/base.json` and `eval/sft.json`, at any depth: a grid of replicate run_dirs), its graded predictions and training curves gzipped (`.jsonl.gz`,
no timestamp in the gzip header, so an unchanged file gives the same bytes and git sees no change), and
the stage markers (their identities and wall times). `report.py runs=[<dest>]` rebuilds every table
from the copy on a fresh clone. Rerun it as results arrive: finished results are added, none removed.
"""
from __future__ import annotations

import gzip
import os
import tempfile
import sys
from pathlib import Path

SUMMARIES = ("eval.json", "eval/base.json", "eval/sft.json")


def archive(run_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy `run_dir`'s results into `dest`; returns the files written or replaced."""
    run_dir, dest = Path(run_dir), Path(dest)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    summaries = sorted({p for pattern in ("**/eval.json", "**/eval/*.json") for p in run_dir.glob(pattern)})
    written = []
    # a result's predictions and curves first, its summary next, the stage markers last: a pass cut short
    # leaves an older summary beside newer predictions at worst, which report.py refuses (collect._correct),
    # never a summary that claims predictions it does not have
    for summary in summaries:
        for jsonl in (summary.with_suffix(".jsonl"), summary.parent / "metrics.jsonl"):
            if jsonl.exists() and (jsonl.name != "metrics.jsonl" or summary.name == "eval.json"):
                written += _copy_gz(jsonl, dest / jsonl.relative_to(run_dir).with_suffix(".jsonl.gz"))
        written += _copy(summary, dest / summary.relative_to(run_dir))
    for marker in sorted(run_dir.glob("**/*.done.json")):
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
    files = archive(sys.argv[1], sys.argv[2])
    print(f"{len(files)} file(s) written under {sys.argv[2]}")
