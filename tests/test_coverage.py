"""Empirical-Bayes intervals undercover with few groups, as theory says (issue 7).

Morris (1983, sec. 4) and Carlin & Louis (2000, sec. 3.5): plug-in EB intervals
ignore the uncertainty of the estimated variances, so with few groups the 90%
intervals of the group means cover less than 90% of the true means (averaged
over the means and the data), and the shortfall shrinks as groups are added.
The full table is in docs/coverage.md (benchmarks/coverage_eb.py).
"""

from __future__ import annotations

import numpy as np

from hierpipe.sbc.coverage import CoverageDesign, eb_coverage, simulate_stats
from hierpipe.seeds import derive_rng


def test_eb_group_mean_intervals_undercover_with_few_groups():
    few = eb_coverage(
        "eb_reml", CoverageDesign(groups=3, size=10, tau=0.5), 100, derive_rng(1, "few")
    )
    many = eb_coverage(
        "eb_reml", CoverageDesign(groups=30, size=10, tau=0.5), 40, derive_rng(1, "many")
    )
    # Measured (docs/coverage.md): about 0.80 with 3 groups, 0.88 with 30. The
    # margins are 3 Monte Carlo SEs, so a correct implementation fails by chance
    # with probability about 0.1% each; the fixed seeds make the outcome stable.
    assert few.group_means + 3 * few.group_means_se < 0.90
    assert many.group_means - few.group_means > 3 * np.hypot(
        few.group_means_se, many.group_means_se
    )
    # The mechanism: with 3 groups tau-hat is often exactly 0 (every interval then
    # collapses to b_Intercept's), with 30 almost never.
    assert few.boundary > 0.1 and many.boundary < 0.02


def test_simulated_statistics_have_their_stated_distribution():
    """ybar ~ N(theta, sigma^2/n) and ss ~ sigma^2 chi^2_{n-1}: moments against closed forms."""
    d = CoverageDesign(groups=50, size=10, tau=0.5, sigma=2.0, mu=3.0)
    theta, ybar, ss = simulate_stats(d, 400, np.random.default_rng(0))
    m = theta.size  # 20000 draws of each: 5 SEs of a mean is about 0.035 of its SD
    assert abs(theta.mean() - d.mu) < 5 * d.tau / np.sqrt(m)
    resid = (ybar - theta) / (d.sigma / np.sqrt(d.size))
    assert abs(resid.mean()) < 5 / np.sqrt(m) and abs(resid.var() - 1) < 5 * np.sqrt(2 / m)
    scaled = ss / d.sigma**2  # chi^2_9: mean 9, variance 18
    assert abs(scaled.mean() - 9) < 5 * np.sqrt(18 / m)
