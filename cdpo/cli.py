"""The one wrapper every entry point (train, score, eval, report, rollout) runs its work in.

- a user error (`cdpo.errors.UserError`, or a missing file) is one line on stderr and exit code 2;
  under a Hydra multirun it is re-raised instead, so Hydra records the failed job and runs the others;
  so is a full or read-only disk or a missing permission met where no writer named its file
  (`cdpo.io.disk_problem`);
- a signal that stops the run (SIGTERM from `timeout` or SLURM preemption, SIGINT, SIGHUP) exits with
  128 + its number in every stage, never 0: what was finished is kept and a rerun resumes from it.
Imports nothing heavy: the work function imports what it needs.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from omegaconf import OmegaConf

from cdpo import signals
from cdpo.errors import Stopped, UserError


def _grid_rows(name: str) -> str:
    from cdpo.objectives import grid  # the registry (and torch) only when a sweep preset asks for its rows

    return ",".join(grid(name))


# conf/sweep/table1.yaml and embedded.yaml: `method: ${cdpo_grid:table1}`, the rows the registry gives that grid
if not OmegaConf.has_resolver("cdpo_grid"):
    OmegaConf.register_new_resolver("cdpo_grid", _grid_rows)


def _exit_now(signum, frame):
    # the work is over (its files are complete): a late signal still ends the process as stopped
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _stopped(name: str, signum: int):
    print(f"{name}: stopped by {signal.Signals(signum).name}; finished stages and shards are kept: rerun the same "
          "command to resume", file=sys.stderr)
    sys.exit(128 + signum)


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not under Hydra
        return False


# Hydra launchers of conf/hydra/launcher/ (and the plugin's own names) -> (plugin module, what installs it)
LAUNCHER_PLUGINS = {name: ("hydra_plugins.hydra_submitit_launcher", 'pip install -e ".[slurm]" (hydra-submitit-launcher)')
                    for name in ("slurm", "submitit_slurm", "submitit_local")}


def check_launcher(name: str, argv: list[str] | None = None) -> None:
    """Before Hydra starts: a multirun launcher whose plugin is not installed is one line and exit 2, instead
    of Hydra's traceback ("Unknown plugin class") once the sweep is set up."""
    import importlib
    import re

    argv = sys.argv[1:] if argv is None else argv
    if not {"-m", "--multirun"} & set(argv):
        return  # a single run never starts the launcher
    for arg in argv:
        launcher = re.fullmatch(r"\+{0,2}hydra/launcher=(\w+)", arg)
        if launcher and launcher[1] in LAUNCHER_PLUGINS:
            module, install = LAUNCHER_PLUGINS[launcher[1]]
            try:
                importlib.import_module(module)
            except ImportError as e:
                print(f"{name}: error: {arg} needs the Hydra launcher plugin {module}, which is not installed "
                      f"({e}): {install}", file=sys.stderr)
                sys.exit(2)


def run_entry(name: str, work: Callable[[], object], *, also: tuple[type[BaseException], ...] = ()):
    """Run `work()` as entry point `name` (e.g. "train.py"); `also`: extra exception types that count
    as user errors there (report.py: ValueError from its arguments)."""
    signals.install()
    try:
        result = work()
        signals.check()  # a stop whose exception was swallowed (raised in a finaliser) still stops
        return result
    except Stopped as stop:
        _stopped(name, stop.signum)
    except (UserError, FileNotFoundError, *also) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        if _multirun():
            raise  # Hydra records the failed job, runs the others and raises at the end of the sweep
        sys.exit(2)
    except BaseException as e:
        if signals.received:  # e.g. Lightning's SIGTERMException, a SystemExit(None) = exit 0, after our
            _stopped(name, signals.received[0])  # Stopped was swallowed by a finaliser
        from cdpo.io import disk_problem

        why = disk_problem(e) if isinstance(e, Exception) else None
        if why is None:
            raise
        # a full or read-only disk, a missing permission, met where no writer named its file
        print(f"{name}: error: {getattr(e, 'filename', None) or 'writing a file'}: {why}", file=sys.stderr)
        if _multirun():
            raise
        sys.exit(2)
    finally:
        for s in signals.SIGNALS:  # until the process ends, or a multirun's next job installs its own
            signal.signal(s, _exit_now)
