"""Model checks: James–Stein, predictive checks, residuals, prior draws, convergence table.

References: the published James–Stein batting-average example (Efron & Morris
1977), the defining equation of the Efron–Morris (Morris 1983) estimate and a
risk simulation, brute-force simulation of whole data sets (replicated
statistics), uniformity of p-values at the true parameters, pandas (observed
statistics), statsmodels MixedLM (residuals), scipy's distributions (prior
draws) and ArviZ (MCSE of quantiles).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import arviz as az
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from hierpipe.cv.kfold import model_and_design
from hierpipe.data.simulate import simulate
from hierpipe.diagnostics import checks
from hierpipe.diagnostics.ppc import (
    Replicates,
    normal_group_statistics,
    observed_statistics,
    p_values,
    ppc_tables,
)
from hierpipe.diagnostics.shrinkage import _q_statistic, james_stein
from hierpipe.io import write_json, write_parquet
from hierpipe.models.engines.one_way_checks import prior_predictive
from hierpipe.models.fitting import fit_table
from hierpipe.models.structure import Structure
from hierpipe.seeds import derive_rng

FORMULA = "score ~ 1 + (1 | school)"
STRUCTURE = Structure("one_way", "score", "school")


def _data(seed: int = 1, groups: int = 12, size=(4, 25), tau: float = 4.0) -> pd.DataFrame:
    rng = derive_rng(seed, "checks-test")
    return simulate(
        "two_level", rng, groups=groups, size=list(size), mu=60.0, tau=tau, sigma=8.0
    ).data


# --------------------------------------------------------------------------- James–Stein


def test_james_stein_reproduces_the_published_batting_averages() -> None:
    # Efron & Morris (1977, Sci. Am. 236(5)): 18 players' averages after 45 at-bats,
    # known variance p(1-p)/45 at the grand mean p = .265; shrinking factor c = .212,
    # Clemente .400 -> .294, Alvis .156 -> .242 (published to three decimals).
    hits = np.array([18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7])
    y = hits / 45
    p = y.mean()
    js = james_stein(y, np.full(y.size, p * (1 - p) / 45))
    assert js.form == "james_stein"
    assert 1 - js.shrinkage[0] == pytest.approx(0.212, abs=5e-4)
    published = [0.294, 0.289, 0.285, 0.280, 0.275, 0.275, 0.270, 0.266, 0.261, 0.261,
                 0.256, 0.256, 0.256, 0.256, 0.256, 0.252, 0.247, 0.242]  # fmt: skip
    np.testing.assert_allclose(js.estimate, published, atol=5e-4)  # rounding of the table
    assert js.centre == pytest.approx(p)


def test_efron_morris_solves_its_equation_and_reduces_to_james_stein() -> None:
    rng = np.random.default_rng(4)
    d = rng.uniform(0.5, 3.0, 15)
    y = rng.normal(0, 2.0, 15)
    em = james_stein(y, d)
    assert em.form == "efron_morris"
    assert em.a_hat > 0
    # Defining equation (Morris 1983): sum (y - mu_A)^2 / (A + D) = J - 1.
    assert _q_statistic(em.a_hat, y, d) == pytest.approx(14.0, rel=1e-10)
    np.testing.assert_allclose(em.shrinkage, (12 / 14) * d / (d + em.a_hat), rtol=1e-12)
    # Nearly equal variances take the Efron–Morris path; with A > 0 it is James–Stein.
    d_eq = np.full(15, 1.0) * (1 + 1e-9 * np.arange(15))
    em_eq = james_stein(y, d_eq)
    js = james_stein(y, np.ones(15))
    assert em_eq.form == "efron_morris" and js.form == "james_stein"
    np.testing.assert_allclose(em_eq.estimate, js.estimate, atol=1e-7)


def test_efron_morris_beats_the_group_means_in_risk() -> None:
    # Simulation: theta ~ N(0, 1), ybar ~ N(theta, D_j) with unequal D_j. The Bayes
    # risk of the group means is sum D_j = 21; of the Bayes rule sum D_j / (1 + D_j)
    # = 8.3 here, and the empirical-Bayes estimate should sit well below the former.
    rng = np.random.default_rng(8)
    d = np.linspace(0.5, 3.0, 12)
    loss_mean, loss_em = [], []
    for _ in range(1000):
        theta = rng.normal(0, 1.0, d.size)
        y = theta + np.sqrt(d) * rng.standard_normal(d.size)
        loss_mean.append(np.sum((y - theta) ** 2))
        loss_em.append(np.sum((james_stein(y, d).estimate - theta) ** 2))
    assert np.mean(loss_em) < 0.6 * np.mean(loss_mean)


# --------------------------------------------------------------------------- predictive checks


def _one_block(stats: dict[str, np.ndarray], note: str = "test") -> Replicates:
    count, width = stats["mean"].shape
    return Replicates(count=count, blocks=[(0, width, stats)], note=note)


def test_replicated_statistics_match_brute_force_simulation() -> None:
    rng = np.random.default_rng(21)
    n = np.array([1.0, 3.0, 12.0])
    theta, sigma, reps = np.array([[0.0, 5.0, -2.0]]), 2.0, 4000
    fast = normal_group_statistics(np.repeat(theta, reps, axis=0), np.full(reps, sigma), n, rng)
    # Brute force: whole data sets, statistics computed the ordinary way.
    codes = np.repeat(np.arange(3), n.astype(int))
    slow = {s: np.empty((reps, 3)) for s in ("mean", "sd", "min", "max")}
    slow_overall = {s: np.empty(reps) for s in ("mean", "sd", "min", "max")}
    for r in range(reps):
        y = theta[0][codes] + sigma * rng.standard_normal(codes.size)
        obs = observed_statistics(y, codes, 3)
        for s in slow:
            slow[s][r] = obs.group[s]
            slow_overall[s][r] = obs.overall[s]
    observed = observed_statistics(theta[0][codes], codes, 3)
    _, fast_overall = ppc_tables(observed, _one_block(fast), ("a", "b", "c"))
    # Two-sample KS tests, fixed seeds: a wrong distribution (say max of n uniforms
    # taken as U^n, or the SD's degrees of freedom off by one) gives p < 1e-10 at this size.
    for s in slow:
        for j in range(3):
            if s == "sd" and n[j] == 1:
                assert np.isnan(fast[s][:, j]).all()
                continue
            p = stats.ks_2samp(fast[s][:, j], slow[s][:, j]).pvalue
            assert p > 1e-3, (s, j, p)
        assert stats.ks_2samp(fast_overall[s], slow_overall[s]).pvalue > 1e-3, s


def test_blocks_give_the_same_tables_as_one_block() -> None:
    rng = np.random.default_rng(2)
    j, reps = 7, 50
    n = rng.integers(1, 9, j).astype(float)
    codes = np.repeat(np.arange(j), n.astype(int))
    observed = observed_statistics(rng.normal(size=codes.size), codes, j)
    stats_ = normal_group_statistics(np.zeros((reps, j)), np.ones(reps), n, rng)
    labels = tuple("abcdefg")
    whole = ppc_tables(observed, _one_block(stats_), labels)
    cuts = [(0, 3), (3, 4), (4, 7)]
    blocks = [(a, b, {k: v[:, a:b] for k, v in stats_.items()}) for a, b in cuts]
    split = ppc_tables(observed, Replicates(count=reps, blocks=blocks, note=""), labels)
    # The overall SD is accumulated from shifted sums: equal to rounding.
    pd.testing.assert_frame_equal(whole[0], split[0], rtol=1e-12)
    pd.testing.assert_frame_equal(whole[1], split[1], rtol=1e-12)
    with pytest.raises(ValueError, match="consecutive"):
        ppc_tables(observed, Replicates(reps, [blocks[0], blocks[2]], ""), labels)


def test_p_values_are_uniform_at_the_true_parameters() -> None:
    rng = np.random.default_rng(33)
    j, reps = 300, 400
    n = rng.integers(2, 30, j).astype(float)
    theta = rng.normal(0, 3, j)
    codes = np.repeat(np.arange(j), n.astype(int))
    y = theta[codes] + 1.5 * rng.standard_normal(codes.size)
    observed = observed_statistics(y, codes, j)
    reps_ = normal_group_statistics(np.broadcast_to(theta, (reps, j)), np.full(reps, 1.5), n, rng)
    for s in ("mean", "sd", "min", "max"):
        p = p_values(observed.group[s], reps_[s])
        # Uniform up to the 1/400 grid: KS against U(0, 1) over 300 groups.
        assert stats.kstest(p, "uniform").pvalue > 1e-3, s
    table, overall = ppc_tables(observed, _one_block(reps_), tuple(str(i) for i in range(j)))
    assert len(table) == 4 + 4 * j and len(overall) == reps
    assert table["extreme"].mean() < 0.1  # 5% expected


def test_observed_statistics_match_pandas() -> None:
    df = _data(3)
    _, design = model_and_design(df, FORMULA, "t")
    term = design.random[0]
    obs = observed_statistics(design.y, term.codes, len(term.labels))
    g = df.groupby("school")["score"]
    np.testing.assert_allclose(obs.group["mean"], g.mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(obs.group["sd"], g.std().to_numpy(), rtol=1e-10)
    np.testing.assert_array_equal(obs.group["min"], g.min().to_numpy())
    np.testing.assert_array_equal(obs.group["max"], g.max().to_numpy())
    assert obs.overall["sd"] == pytest.approx(df["score"].std(), rel=1e-12)


# --------------------------------------------------------------------------- residuals


def test_pearson_residuals_match_statsmodels_mixedlm() -> None:
    df = _data(5)
    res = fit_table(df, FORMULA, "eb_reml", settings={}, rng=derive_rng(0, "x"), source="t")
    model, design = model_and_design(df, FORMULA, "t")
    ours = model.engine.residuals(design, model.prepared, model.structure, res.summary)
    sm_model = smf.mixedlm("score ~ 1", df.astype({"school": str}), groups="school")
    # statsmodels' default tolerance leaves tau off by 3e-5 relative; BFGS at gtol 1e-10
    # matches our REML optimum to ~1e-7 relative.
    sm = sm_model.fit(reml=True, method="bfgs", gtol=1e-10)
    resid = df["score"].to_numpy() - sm.fittedvalues.to_numpy()
    # Residuals on a scale of 10 then agree to ~1e-6; 1e-5 leaves room for the optimisers.
    np.testing.assert_allclose(ours["residual"], resid, atol=1e-5)
    np.testing.assert_allclose(ours["standardised"], resid / np.sqrt(sm.scale), atol=1e-5)
    assert list(ours["group"]) == list(df["school"].astype(str))


# --------------------------------------------------------------------------- prior draws


def test_prior_draws_follow_the_recorded_priors() -> None:
    info = {
        "priors": {
            "b_Intercept": {"family": "normal", "mean": 10.0, "sd": 2.0},
            "sd": {"family": "half_cauchy", "on": "sd", "scale": 3.0},
            "sigma": {"family": "inv_gamma", "on": "variance", "shape": 3.0, "scale": 8.0},
        }
    }
    draws = prior_predictive(None, STRUCTURE, info, np.random.default_rng(2), size=4000)
    # KS against scipy's distributions at the stated parameters.
    tau = draws["sd_school__Intercept"]
    assert stats.kstest(tau, stats.halfcauchy(scale=3.0).cdf).pvalue > 1e-3
    var = draws["sigma"] ** 2
    assert stats.kstest(var, stats.invgamma(a=3.0, scale=8.0).cdf).pvalue > 1e-3
    assert stats.kstest(draws["b_Intercept"], stats.norm(10, 2).cdf).pvalue > 1e-3
    np.testing.assert_allclose(draws["outcome_sd"], np.hypot(tau, draws["sigma"]))
    flat = dict(info["priors"], b_Intercept={"family": "flat"})
    draws_flat = prior_predictive(None, STRUCTURE, {"priors": flat}, np.random.default_rng(2))
    assert draws_flat["new_observation"].isna().all()
    assert prior_predictive(None, STRUCTURE, {}, np.random.default_rng(2)) is None


# --------------------------------------------------------------------------- convergence table


def test_convergence_table_mcse_quantiles_match_arviz(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="arviz")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 400, 2)).cumsum(axis=1) * 0.05 + rng.standard_normal((3, 400, 2))
    draws = pd.DataFrame(
        {
            "chain": np.repeat(np.arange(3), 400),
            "draw": np.tile(np.arange(400), 3),
            "b_Intercept": x[:, :, 0].ravel(),
            "r_g[a,Intercept]": x[:, :, 1].ravel(),
        }
    )
    table = checks.convergence_table(draws).set_index("parameter")
    for k, name in enumerate(["b_Intercept", "r_g[a,Intercept]"]):
        for prob, col in ((0.05, "mcse_q5"), (0.95, "mcse_q95")):
            want = float(az.mcse(x[:, :, k], method="quantile", prob=prob))
            assert table.loc[name, col] == pytest.approx(want, rel=1e-6)
    assert table.loc["b_Intercept", "hyperparameter"]
    assert not table.loc["r_g[a,Intercept]", "hyperparameter"]


# --------------------------------------------------------------------------- the diagnose job


def _fit_dir(tmp, df, method, settings=None):
    res = fit_table(df, FORMULA, method, settings=settings or {}, rng=derive_rng(4, method),
                    source="t")  # fmt: skip
    d = tmp / "fits" / method
    write_parquet(res.summary, d / "summary.parquet")
    if res.draws is not None:
        write_parquet(res.draws, d / "draws.parquet")
    write_json({"method": method, **res.info}, d / "fit.json")
    return d


def test_diagnose_writes_every_table_deterministically(tmp_path) -> None:
    df = _data(6, groups=6, size=(3, 9))
    write_parquet(df, tmp_path / "data.parquet")
    gibbs = _fit_dir(tmp_path, df, "gibbs", {"chains": 2, "warmup": 100, "draws": 200})
    eb = _fit_dir(tmp_path, df, "eb_reml")
    files = {}
    for run in ("a", "b"):
        for fit_dir in (gibbs, eb):
            out = tmp_path / run / fit_dir.name
            checks.diagnose_fit(tmp_path / "data.parquet", FORMULA, fit_dir, out, seed=1,
                                keys=["s", fit_dir.name])  # fmt: skip
            files[run, fit_dir.name] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files["a", "gibbs"] == files["b", "gibbs"]
    assert set(files["a", "gibbs"]) == {
        "checks.json", "convergence.parquet", "ppc.parquet", "ppc_overall.parquet",
        "prior_predictive.parquet", "residuals.parquet", "shrinkage.parquet",
    }  # fmt: skip
    assert "convergence.parquet" not in files["a", "eb_reml"]
    ppc = pd.read_parquet(tmp_path / "a" / "gibbs" / "ppc.parquet")
    assert len(ppc) == 4 + 4 * 6
    assert len(pd.read_parquet(tmp_path / "a" / "gibbs" / "ppc_overall.parquet")) == 400
    shrink = pd.read_parquet(tmp_path / "a" / "eb_reml" / "shrinkage.parquet")
    assert {"james_stein", "js_shrinkage"} <= set(shrink.columns)
    resid = pd.read_parquet(tmp_path / "a" / "eb_reml" / "residuals.parquet")
    assert len(resid) == len(df)


def test_checks_an_engine_lacks_are_skipped_with_empty_tables() -> None:
    bare = SimpleNamespace(engine=SimpleNamespace(), structure=STRUCTURE, prepared=None)
    skipped: list[str] = []
    ppc, overall, facts = checks.predictive_checks(bare, None, None, None, 1, [], skipped)
    resid = checks.residual_check(bare, None, None, skipped)
    assert len(ppc) == len(overall) == len(resid) == 0 and facts is None
    assert "p_value" in ppc.columns and "standardised" in resid.columns
    assert [s.split(":")[0] for s in skipped] == ["ppc", "residuals"]
