"""Pareto smoothed importance sampling and PSIS leave-one-group-out.

References: ArviZ's ``psislw`` on the same log-ratios (k-hat and smoothed
weights), scipy's generalized Pareto distribution (the shape estimate), numpy's
``inverted_cdf`` quantiles (weighted quantiles), and exact refits of the Gibbs
sampler (PSIS-LOGO).
"""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hierpipe.cv.folds import run_chunk
from hierpipe.cv.psis import gpd_fit, khat_threshold, psis, tail_length, weighted_quantile
from hierpipe.data.simulate import simulate
from hierpipe.models.fitting import fit_table
from hierpipe.seeds import derive_rng

FORMULA = "score ~ 1 + (1 | school)"


def _log_ratio_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240701)
    return {
        "normal 4000": rng.normal(size=4000),
        "normal scaled 1000": 5 * rng.normal(size=1000),
        "student-t3 2000": rng.standard_t(3, size=2000),
        "exponential 3000": rng.exponential(2.0, size=3000),
        "lognormal tails 500": np.log(rng.lognormal(0, 2, size=500)) * 2,
        "short 30": rng.normal(size=30),
        "tiny 12 (tail <= 4)": rng.normal(size=12),
    }


@pytest.mark.parametrize("name", list(_log_ratio_cases()))
@pytest.mark.parametrize("r_eff", [1.0, 0.35])
def test_psis_matches_arviz(name: str, r_eff: float) -> None:
    lr = _log_ratio_cases()[name]
    ours = psis(lr, r_eff)
    lw, k = az.psislw(lr.copy(), reff=r_eff)
    # Same formulas in float64 on both sides; any logic slip (tail length, cutoff,
    # prior on k, truncation) moves the values by far more than 1e-10.
    if np.isinf(k):
        assert np.isinf(ours.khat)
    else:
        assert ours.khat == pytest.approx(float(k), rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(ours.log_weights, lw, rtol=0, atol=1e-10)
    assert np.log(np.exp(ours.log_weights).sum()) == pytest.approx(0.0, abs=1e-12)


def test_tail_length_and_threshold_follow_the_paper() -> None:
    # Vehtari et al. (2024): M = ceil(min(S/5, 3 sqrt(S / r_eff)));
    # threshold min(1 - 1/log10 S, 0.7).
    assert tail_length(4000) == 190  # ceil(3 * sqrt(4000)) = ceil(189.7)
    assert tail_length(100) == 20  # S/5 is the smaller
    assert tail_length(4000, 0.25) == 380
    assert khat_threshold(4000) == 0.7
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)


@pytest.mark.parametrize("k_true", [0.2, 0.6])
def test_gpd_fit_recovers_shape_of_scipy_draws(k_true: float) -> None:
    x = np.sort(stats.genpareto(c=k_true, scale=2.0).rvs(size=20000, random_state=3))
    k, sigma = gpd_fit(x)
    # SE of the shape estimate is about (1 + k) / sqrt(n) = 0.008-0.011; 0.04 is ~4 SE.
    assert k == pytest.approx(k_true, abs=0.04)
    assert sigma == pytest.approx(2.0, rel=0.05)


def test_weighted_quantile_matches_numpy_and_repetition() -> None:
    rng = np.random.default_rng(5)
    v = rng.normal(size=301)
    probs = np.array([0.05, 0.5, 0.95])
    got = weighted_quantile(v, np.ones_like(v), probs)
    np.testing.assert_array_equal(got, np.quantile(v, probs, method="inverted_cdf"))
    w = rng.integers(1, 5, size=v.size).astype(float)
    got_w = weighted_quantile(v, w, probs)
    want_w = np.quantile(np.repeat(v, w.astype(int)), probs, method="inverted_cdf")
    np.testing.assert_array_equal(got_w, want_w)


def _data(seed: int, groups: int = 10, size=(5, 20), tau: float = 3.0) -> pd.DataFrame:
    sim = simulate(
        "two_level",
        derive_rng(seed, "psis-test"),
        groups=groups,
        size=list(size),
        mu=50.0,
        tau=tau,
        sigma=5.0,
    )
    return sim.data


SETTINGS = {"chains": 2, "warmup": 300, "draws": 1000}


def _draws(df: pd.DataFrame) -> pd.DataFrame:
    res = fit_table(df, FORMULA, "gibbs", settings=SETTINGS, rng=derive_rng(1, "fit"), source="t")
    return res.draws


def test_psis_logo_agrees_with_exact_refits() -> None:
    df = _data(11)
    draws = _draws(df)
    kw = dict(chunk=0, chunks=1, settings=SETTINGS, seed=3, keys=["t"], source="t")
    exact = run_chunk(df, FORMULA, "gibbs", cv_method="exact", **kw).set_index("group")
    approx = run_chunk(df, FORMULA, "gibbs", cv_method="psis", draws=draws, **kw).set_index("group")
    # Most groups must be scored by PSIS for the comparison to test it (k-hat here is
    # 0.0-0.6); a group that falls back is compared too and then agrees exactly.
    assert (approx["cv_method"] == "psis").mean() >= 0.8
    diff = approx["elpd"] - exact["elpd"]
    # Both are Monte Carlo estimates from 2000 draws of independent runs; each group's
    # log-mean density has MC SE ~0.01-0.03 here (observed |diff| <= 0.04). 0.15 per
    # group and 0.4 in total are ~4 SE; a wrong weight sign or a missing
    # normalisation shifts a group's elpd by 0.5 or more.
    assert diff.abs().max() < 0.15, diff
    assert abs(diff.sum()) < 0.4
    # The predicted mean of a held-out group: MC SE ~0.1 at these scales.
    assert (approx["pred_mean"] - exact["pred_mean"]).abs().max() < 0.4


def test_high_khat_falls_back_to_the_exact_refit() -> None:
    df = _data(12, groups=8, size=(30, 30), tau=1.0)
    # One group far from the others dominates the hyperparameters' posterior:
    # leaving it out moves the posterior far, so importance sampling fails.
    outlier = df["school"] == df["school"].iloc[0]
    df.loc[outlier, "score"] += 40.0
    draws = _draws(df)
    # Chunk 0 of 8 holds out only the first group (the outlier).
    kw = dict(chunk=0, chunks=8, settings=SETTINGS, seed=3, keys=["t"], source="t")
    approx = run_chunk(df, FORMULA, "gibbs", cv_method="psis", draws=draws, **kw)
    assert list(approx["group"]) == [df["school"].iloc[0]]
    row = approx.set_index("group").loc[df["school"].iloc[0]]
    assert row["khat"] > 0.7
    assert row["cv_method"] == "exact_fallback"
    exact = run_chunk(df, FORMULA, "gibbs", cv_method="exact", **kw).set_index("group")
    # Same derived generator as the exact method: the same numbers, bit for bit.
    assert row["elpd"] == exact.loc[row.name, "elpd"]
    assert row["pred_q5"] == exact.loc[row.name, "pred_q5"]


def test_relative_efficiency_of_autocorrelated_likelihoods() -> None:
    from scipy import signal

    from hierpipe.cv.folds import relative_efficiency

    rng = np.random.default_rng(17)
    phi, chains, draws = 0.8, 4, 2000
    e = rng.standard_normal((chains, draws, 2))
    e[:, 0] /= np.sqrt(1 - phi**2)
    ar = signal.lfilter([1.0], [1.0, -phi], e, axis=1)
    # exp(0.01 x) is linear in x to 1e-4, so its ESS is the AR(1) one:
    # S (1 - phi) / (1 + phi), i.e. r_eff = 1/9.
    loglik = 0.01 * ar.reshape(chains * draws, 2)
    chain = np.repeat(np.arange(chains), draws)
    r = relative_efficiency(loglik, chain)
    # The ESS estimate of 8000 AR(1) draws has a relative SE of about 10%.
    np.testing.assert_allclose(r, (1 - phi) / (1 + phi), rtol=0.25)
    iid = relative_efficiency(0.01 * rng.standard_normal((chains * draws, 2)), chain)
    np.testing.assert_allclose(iid, 1.0, rtol=0.15)
    # Draws not in chain-major blocks: treated as independent.
    assert (relative_efficiency(loglik, chain[::-1]) == 1.0).all()
