"""Where a result was made: the machine, the libraries and the code's commit. Written into every stage
marker, read back by the report's cost table, so that a result archived on one machine still says
which CPU or GPU, which dtype and which commit made it and how long each stage took."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def cpu_info() -> str:
    """The text of /proc/cpuinfo (model name, flags); empty off Linux."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_model() -> str:
    for line in cpu_info().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def code_version() -> str:
    """The checkout's commit, with `+changes` when tracked files differ from it; the package version
    outside a git checkout."""
    from cdpo import __version__

    try:
        run = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
        top = run(["git", "rev-parse", "--show-toplevel"]).stdout.strip()
        if Path(top).resolve() != REPO:  # installed inside another checkout: not this code's commit
            return f"cdpo {__version__}"
        commit = run(["git", "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"cdpo {__version__}"
    return commit + ("+changes" if dirty else "")


def where(device: str = "cpu", dtype: str | None = None) -> dict:
    """The machine and code of this process (`device`: the stage's, "cpu" or "cuda:N"; `dtype`: model.dtype,
    resolved for that device)."""
    from cdpo.models.loading import torch_dtype

    gpu = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None
    resolved = None if dtype is None else str(torch_dtype(dtype, device)).removeprefix("torch.")
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "dtype": resolved, "torch": torch.__version__, "code": code_version()}
