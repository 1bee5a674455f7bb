"""The one progress bar of a long stage (sample, score, eval): all of the stage's work (every shard,
every evaluated model) with its ETA and tokens/s, on stderr through tqdm."""
from __future__ import annotations

import time

from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    """A wall time as a reader takes it in: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


class Progress:
    """`total` units of work (sequences, pairs). `resume(n)`: units an earlier run finished (resumed shards);
    reported before the bar starts they become tqdm's `initial`, counted as done but not in the rate, so the
    ETA is this run's. `start()` when the work begins, `advance(n, tokens)` as it goes: the postfix is the
    tokens (generated, or scored) per second of wall time since the start."""

    def __init__(self, desc: str, total: int, unit: str, *, disable: bool = False, file=None):
        self.desc, self.total, self.unit, self.disable, self.file = desc, total, unit, disable, file
        self.resumed, self.tokens = 0, 0
        self.bar: tqdm | None = None
        self._t0 = 0.0

    def resume(self, n: int) -> None:
        if self.bar is None:
            self.resumed += n
        else:  # a finished shard met after the work began: done all the same
            self.bar.update(n)

    def start(self) -> Progress:
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=self.resumed, desc=self.desc, unit=self.unit,
                            disable=self.disable, dynamic_ncols=True, file=self.file)
            self._t0 = time.perf_counter()
        return self

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self._t0, 1e-9) if self.bar is not None else 0.0

    def advance(self, n: int, tokens: int = 0) -> None:
        self.start()
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens_per_s:,.0f} tokens/s", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
