"""One job at a time per run_dir: an OS file lock on `<run_dir>/.lock`.

flock is released by the kernel when the process exits, however it exits (kill -9 included), so a
lock is never stale; the file itself only says who holds it. A second job waits for the first (up to
`lock_timeout_s`, null = for ever) and then finds the shared stages finished or redoes them for its own
settings, so two jobs never write one artifact at once. Jobs of a Hydra multirun run one after the
other in one process, each taking and releasing the lock.
"""
from __future__ import annotations

import logging
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from cdpo.errors import LockError

log = logging.getLogger(__name__)


def _holder(f) -> str:
    f.seek(0)
    try:
        info = json.loads(f.read() or "{}")
    except json.JSONDecodeError:
        return "another job"
    command = info.get("command", "")
    command = command if len(command) <= 120 else command[:119] + "…"  # cut, and said so
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({command})"


@contextlib.contextmanager
def run_lock(path: Path, timeout_s: float | None = None, *, poll_s: float = 1.0):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        t0, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if timeout_s is not None and time.monotonic() - t0 >= timeout_s:
                    error = LockError(f"{path.parent} is in use by {_holder(f)}; wait for it to finish (lock_timeout_s="
                                      f"{timeout_s}: null waits for ever), or use another run_dir")
                    error.holder = _holder(f)
                    raise error from None
                if not told:
                    log.warning(f"[lock] {path.parent} is in use by {_holder(f)}: waiting for it")
                    told = True
                time.sleep(poll_s)
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def read_lock(path: Path):
    """Held while a reader copies a run_dir (the archive): shared with other readers, never with a job, and
    refused at once (LockError, `holder` naming the job) while a job holds the run_dir. The lock file is
    opened read-only, so a reader needs no write access and leaves the holder's line as it was."""
    with Path(path).open("r") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            error = LockError(f"{Path(path).parent} is in use by {_holder(f)}")
            error.holder = _holder(f)
            raise error from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
