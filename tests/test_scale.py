"""Group-level draws at scale: summaries of every group, draws of a stated sample (issue 7).

The full-size run (10^7 observations in 10^5 groups) is ``benchmarks/bench_scale.py``;
here the same code paths run small, against the direct computations they replace.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from hierpipe.data.groups import GroupStats
from hierpipe.diagnostics.convergence import summarise_draws
from hierpipe.errors import ConfigError
from hierpipe.models import gibbs_fit
from hierpipe.models.gibbs_fit import gibbs_result, stored_groups


class _Sample:
    """Stands in for the sampler's result: arrays of the shapes it returns."""

    def __init__(self, chains: int, draws: int, groups: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.b_Intercept = 50 + rng.standard_normal((chains, draws))
        self.sd = np.exp(rng.normal(1.0, 0.1, (chains, draws)))
        self.sigma = np.exp(rng.normal(2.0, 0.05, (chains, draws)))
        self.theta = self.b_Intercept[:, :, None] + 3 * rng.standard_normal((chains, draws, groups))

    def info(self) -> dict:
        return {"sampler": "test"}


def _stats(groups: int) -> GroupStats:
    n = np.arange(groups) % 7 + 1.0
    labels = tuple(f"G{j:05d}" for j in range(groups))
    return GroupStats(labels, n, np.zeros(groups), np.zeros(groups))


def test_stored_groups_rule():
    assert stored_groups(5).tolist() == [0, 1, 2, 3, 4]  # default 1000: every group up to 1000
    assert len(stored_groups(5000)) == gibbs_fit.GROUP_DRAWS_DEFAULT
    assert stored_groups(10, 4).tolist() == [0, 3, 6, 9]  # evenly spaced, first and last
    assert stored_groups(10, "all").tolist() == list(range(10))
    assert stored_groups(10, 0).tolist() == []
    for bad in ("some", -1, 2.5, True):
        with pytest.raises(ConfigError, match="store_group_draws"):
            stored_groups(10, bad)


def test_blockwise_summary_equals_the_direct_one(monkeypatch):
    """Blocks of groups give the same bytes as one pass over every parameter."""
    stats, sample = _stats(37), _Sample(2, 60, 37)
    monkeypatch.setattr(gibbs_fit, "_BLOCK_VALUES", 5 * 120)  # 5 groups a block
    res = gibbs_result(stats, "g", sample, {}, np.random.default_rng(1), store_group_draws=4)
    mu, tau, sigma = sample.b_Intercept, sample.sd, sample.sigma
    direct = {"b_Intercept": mu, "sd_g__Intercept": tau, "sigma": sigma,
              "icc_g": tau**2 / (tau**2 + sigma**2)}  # fmt: skip
    for j, lab in enumerate(stats.labels):
        direct[f"r_g[{lab},Intercept]"] = sample.theta[:, :, j] - mu
    for j, lab in enumerate(stats.labels):
        direct[f"coef_g[{lab},Intercept]"] = sample.theta[:, :, j]
    pd.testing.assert_frame_equal(res.summary, summarise_draws(direct))
    weight = (tau[..., None] ** 2 / (tau[..., None] ** 2 + sigma[..., None] ** 2 / stats.n)).mean(
        axis=(0, 1)
    )
    np.testing.assert_allclose(list(res.info["shrinkage"].values()), weight, rtol=1e-14)
    kept = [stats.labels[j] for j in (0, 12, 24, 36)]
    assert res.info["group_draws"] == {
        "stored": "sample", "groups": 4, "of": 37,
        "rule": "evenly spaced in sorted label order", "labels": kept,
    }  # fmt: skip
    cols = [c for c in res.draws.columns if c.startswith(("r_", "coef_"))]
    assert cols == [f"r_g[{lab},Intercept]" for lab in kept] + [
        f"coef_g[{lab},Intercept]" for lab in kept
    ]
    np.testing.assert_array_equal(
        res.draws[f"coef_g[{kept[1]},Intercept]"], sample.theta[:, :, 12].reshape(-1)
    )


def test_group_parameters_take_memory_of_a_block_not_of_all_draws(monkeypatch):
    """Beyond the sampler's own ``theta``, memory stays well below another copy of it.

    The direct computation held ``r`` (a copy of ``theta``), a stacked batch of
    every ``r_``/``coef_`` column (two copies), the (chains, draws, groups) weights
    (one copy) and a draws table of every column (two copies): measured, 23 times
    ``theta``'s size for the batch alone. Blockwise it is about 0.4 (mostly the
    summary table, which is output).
    """
    stats, sample = _stats(2000), _Sample(2, 200, 2000)
    monkeypatch.setattr(gibbs_fit, "_BLOCK_VALUES", 1 << 14)  # 40 groups a block
    tracemalloc.start()
    try:
        gibbs_result(stats, "g", sample, {}, np.random.default_rng(1), store_group_draws=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * sample.theta.nbytes, (peak, sample.theta.nbytes)
