"""Stopping on a signal (SIGTERM from `timeout` or SLURM preemption, SIGINT, SIGHUP) as an exception.

The handler raises `Stopped` where the program is, so `finally` blocks run and no file is left half
written (every artifact is written to a temporary file and renamed). Python ignores an exception
raised while a finaliser (`__del__`) runs, so the signal is also recorded, and the pipeline calls
`check()` between stages and shards: a stop is never lost, at worst it waits for the current step.
"""
from __future__ import annotations

import contextlib
import signal

from cdpo.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
received: list[int] = []
_held = 0


def raise_stopped(signum, frame):
    received.append(signum)
    if not _held:
        raise Stopped(signum)


@contextlib.contextmanager
def held():
    """A few steps that must not be split by a stop (e.g. the two renames that put a directory in place):
    a signal arriving meanwhile is recorded and raised once they are done."""
    global _held
    before = len(received)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held and len(received) > before:
        raise Stopped(received[before])


def install() -> None:
    received.clear()
    for s in SIGNALS:
        signal.signal(s, raise_stopped)


def check() -> None:
    """Raise `Stopped` if a signal arrived (and its exception was swallowed somewhere)."""
    if received:
        raise Stopped(received[0])
