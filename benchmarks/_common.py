"""Shared bits of the benchmark scripts: arith prompts for the embedded model, peak-memory probes."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


def default_cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, *args) -> dict:
    """Run one measurement in a fresh process (so its peak RSS is its own) and return its JSON line."""
    out = subprocess.run([sys.executable, script, "--worker", *map(str, args)], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
