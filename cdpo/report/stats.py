"""Significance of a difference in accuracy between two methods on the same questions.

Both tests pair the methods question by question, which is what makes a few points on a few
hundred questions detectable: most questions are solved by both or by neither.
- paired bootstrap (the report's default): resample questions with replacement and look at the
  distribution of the mean difference; works on per-question scores in [0, 1], so several seeds of
  a method enter as the fraction of seeds that solved the question.
- McNemar's exact test: only the discordant questions count; under the null hypothesis each is
  equally likely to favour either method, so their split is Binomial(n01 + n10, 1/2). It needs one
  right/wrong outcome per question, so the report applies it seed by seed.
"""
from __future__ import annotations

from math import comb
from statistics import mean, stdev
from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no deviation from one value."""
    return mean(values), (stdev(values) if len(values) > 1 else None)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test of paired binary outcomes a[i], b[i] (one per question).
    n10: questions only `a` solved; n01: only `b`; p = 2 P(X <= min(n01, n10)), X ~ Bin(n01 + n10, 1/2)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths: {len(a)} and {len(b)}")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n01 + n10
    tail = sum(comb(n, i) for i in range(min(n01, n10) + 1))  # exact integers, one division at the end
    return {"n10": n10, "n01": n01, "p": min(1.0, 2 * tail / 2 ** n)}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95, chunk: int = 1000) -> dict:
    """Paired bootstrap over questions of mean(a) - mean(b). Returns the observed difference, a
    percentile confidence interval and the two-sided p-value 2 min(P*(d <= 0), P*(d >= 0)) of the
    bootstrap distribution (with +1 smoothing, so never below 2 / (resamples + 1))."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(a) != len(b) or len(d) == 0:
        raise ValueError(f"need two equally long, non-empty score lists; got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, len(d), size=(min(chunk, resamples - start), len(d)))].mean(axis=1)
                            for start in range(0, resamples, chunk)])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    tail = min(int((means <= 0).sum()), int((means >= 0).sum()))
    return {"delta": float(d.mean()), "ci_low": float(low), "ci_high": float(high),
            "p": min(1.0, 2 * (tail + 1) / (resamples + 1))}


def paired_sample_size(discordant: float, delta: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Questions a paired comparison of two methods needs to detect an accuracy difference `delta` with a
    two-sided test at level `alpha` and the given power, when a share `discordant` of the questions is
    solved by exactly one of the two (Connor 1987, the normal approximation to McNemar's test):
    n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2, psi the discordant share."""
    if not 0 < abs(delta) <= discordant <= 1:
        raise ValueError(f"need 0 < |delta| <= discordant <= 1, got delta={delta}, discordant={discordant}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf
    root = z(1 - alpha / 2) * discordant ** 0.5 + z(power) * (discordant - delta ** 2) ** 0.5
    return int(np.ceil(root ** 2 / delta ** 2))
