"""The sample size of a paired comparison (issue: enough questions to tell Table 1's rows apart),
checked against a simulation of McNemar's exact test rather than against its own formula."""
import numpy as np
import pytest
from scipy import stats as sps

from cdpo.report.stats import paired_sample_size


def _simulated_power(n: int, discordant: float, delta: float, trials: int = 4000, seed: int = 0) -> float:
    """Share of simulated evaluations on n questions in which McNemar's exact test (alpha 0.05) rejects:
    each question is solved by only A with probability (psi + delta) / 2, only B with (psi - delta) / 2."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [(discordant + delta) / 2, (discordant - delta) / 2, 1 - discordant], size=trials)
    only_a, only_b = counts[:, 0], counts[:, 1]
    p = np.minimum(1.0, 2 * sps.binom.cdf(np.minimum(only_a, only_b), only_a + only_b, 0.5))
    return float(np.mean(p < 0.05))


def test_the_first_grids_discordance_needs_about_2300_questions_for_3_points():
    # cDPO vs RPO in the first embedded grid: 13 + 13 of 100 questions discordant
    n = paired_sample_size(0.26, 0.03)
    assert 2200 < n < 2350
    assert _simulated_power(n, 0.26, 0.03) == pytest.approx(0.80, abs=0.03)
    assert _simulated_power(n // 2, 0.26, 0.03) < 0.6  # half as many questions: clearly underpowered


@pytest.mark.parametrize("discordant,delta", [(0.1, 0.05), (0.4, 0.1), (0.2, 0.02)])
def test_the_formula_gives_the_requested_power_across_settings(discordant, delta):
    n = paired_sample_size(discordant, delta)
    assert _simulated_power(n, discordant, delta, seed=1) == pytest.approx(0.80, abs=0.04)
    assert paired_sample_size(discordant, delta, power=0.9) > n


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="discordant"):
        paired_sample_size(0.02, 0.03)  # fewer discordant questions than the difference itself
