"""Model checks of the meta-analysis engine (hierpipe.models.engines.meta_checks).

References are independent of the code under test: dense matrix algebra for
metafor's ``rstandard`` (Viechtbauer & Cheung 2010, eq. 5), a separate REML
maximiser for the leave-one-out ``rstudent``, a hand computation of the
Efron–Morris estimate on the eight schools, the Paule–Mandel estimator (which
solves Morris's estimating equation), and closed-form predictive distributions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from hierpipe.cv.kfold import model_and_design, run_kfold
from hierpipe.diagnostics.checks import predictive_checks, residual_check, shrinkage_table
from hierpipe.errors import MethodError
from hierpipe.models.engines import meta_checks
from hierpipe.models.meta import log_risk_ratio
from hierpipe.seeds import derive_rng

DATA = Path(__file__).parent / "data"
ES = "y | se(sigma) ~ 1 + (1 | school)"
BCG = "yi | var(vi) ~ 1 + (1 | study)"
BCG_LAT = "yi | var(vi) ~ 1 + ablat + (1 | study)"


@pytest.fixture(scope="module")
def schools() -> pd.DataFrame:
    return pd.read_csv(DATA / "eight_schools.csv")


@pytest.fixture(scope="module")
def bcg() -> pd.DataFrame:
    d = pd.read_csv(DATA / "bcg.csv")
    yi, vi = log_risk_ratio(d["tpos"], d["tneg"], d["cpos"], d["cneg"])
    # labels that sort in file order, so arrays line up with the tables' rows
    return d.assign(yi=yi, vi=vi, study=[f"T{t:02d}" for t in d["trial"]])


def load(df: pd.DataFrame, formula: str):
    return model_and_design(df, formula, "t.csv")


def fit(model, method: str, settings: dict | None = None, seed: int = 1):
    return model.engine.fit(
        model.prepared, model.structure, method, settings or {}, derive_rng(seed, method)
    )


def reml_tau2(y: np.ndarray, v: np.ndarray, X: np.ndarray) -> float:
    """REML estimate of tau^2 by bounded scalar maximisation (not the engine's Fisher scoring)."""

    def neg(t2: float) -> float:
        w = 1.0 / (v + t2)
        xtwx = X.T @ (w[:, None] * X)
        b = np.linalg.solve(xtwx, X.T @ (w * y))
        r = y - X @ b
        return 0.5 * (np.sum(np.log(v + t2)) + np.linalg.slogdet(xtwx)[1] + np.sum(w * r**2))

    res = optimize.minimize_scalar(neg, bounds=(0.0, 20.0 * np.var(y)), method="bounded",
                                   options={"xatol": 1e-12})  # fmt: skip
    return float(res.x)


# --------------------------------------------------------------------------- residuals


@pytest.mark.parametrize("formula", [BCG, BCG_LAT])
def test_rstandard_matches_dense_hat_matrix(bcg, formula):
    model, design = load(bcg, formula)
    data = model.prepared
    r = fit(model, "meta_reml")
    table = residual_check(model, design, r.summary, [])
    tau2 = r.info["meta"]["tau2"]
    # dense: e = (I - H) y, Cov(e) = (I - H) M (I - H)', H = X (X'WX)^-1 X'W, M = W^-1
    m = np.diag(data.v + tau2)
    w = np.linalg.inv(m)
    h = data.X @ np.linalg.inv(data.X.T @ w @ data.X) @ data.X.T @ w
    e = (np.eye(data.k) - h) @ data.y
    cov = (np.eye(data.k) - h) @ m @ (np.eye(data.k) - h).T
    # 1e-10: the same quantities by two routes in double precision
    np.testing.assert_allclose(table["residual"], e, rtol=0, atol=1e-10)
    np.testing.assert_allclose(table["se"], np.sqrt(np.diag(cov)), rtol=1e-10)
    np.testing.assert_allclose(table["standardised"], e / np.sqrt(np.diag(cov)), rtol=1e-9)
    # the fitted values are the fit's own regression at its tau (REML: GLS at tau-hat)
    b = r.summary.set_index("parameter")["mean"][[f"b_{n}" for n in data.names]]
    np.testing.assert_allclose(table["fitted"], data.X @ b.to_numpy(), rtol=1e-8)
    assert list(table.columns[:5]) == ["group", "observed", "fitted", "residual", "standardised"]


def test_rstudent_is_the_leave_one_out_std_residual(bcg):
    """metafor's rstudent: (y_j - x_j'b_(-j)) / sqrt(v_j + tau2_(-j) + x_j'V_(-j)x_j)."""
    model, _ = load(bcg, BCG_LAT)
    data = model.prepared
    for j in (0, 3, 12):
        row = model.engine.score_held_out(data, j, "meta_reml", {}, derive_rng(1, j))
        keep = np.arange(data.k) != j
        y, v, X = data.y[keep], data.v[keep], data.X[keep]
        t2 = reml_tau2(y, v, X)
        w = 1.0 / (v + t2)
        vb = np.linalg.inv(X.T @ (w[:, None] * X))
        b = vb @ X.T @ (w * y)
        xj = data.X[j]
        ref = (data.y[j] - xj @ b) / np.sqrt(data.v[j] + t2 + xj @ vb @ xj)
        # 1e-6: the reference tau^2 comes from a bounded optimiser (xatol 1e-12 on a
        # flat-topped likelihood), so it agrees with Fisher scoring to about 1e-7
        assert row["std_residual"] == pytest.approx(ref, abs=1e-6)


def test_no_pooling_has_no_standardised_residuals(schools):
    model, design = load(schools, ES)
    table = residual_check(model, design, fit(model, "no_pooling").summary, [])
    assert np.all(table["residual"] == 0) and table["standardised"].isna().all()


# --------------------------------------------------------------------------- James-Stein


def test_efron_morris_on_eight_schools_by_hand(schools):
    model, _ = load(schools, ES)
    y, s = schools["y"].to_numpy(float), schools["sigma"].to_numpy(float)
    w = 1 / s**2
    ybar = np.sum(w * y) / np.sum(w)
    # Q(0) = sum w (y - ybar)^2 = 4.6 < k - 1 = 7, so A-hat = 0 and B_j = (k-3)/(k-1) = 5/7
    assert np.sum(w * (y - ybar) ** 2) < 7
    table, facts = model.engine.james_stein_table(model.prepared, model.structure)
    np.testing.assert_allclose(table["js_shrinkage"], 5 / 7, rtol=1e-12)
    np.testing.assert_allclose(table["james_stein"], ybar + (2 / 7) * (y - ybar), rtol=1e-12)
    assert facts["a_hat"] == 0.0 and facts["centre"] == pytest.approx(ybar, rel=1e-12)
    assert facts["effective_parameters"] == pytest.approx(8 * 2 / 7, rel=1e-12)
    assert facts["known_variances"] is True


def test_morris_a_hat_is_paule_mandel_and_regression_form_reduces(bcg):
    model, _ = load(bcg, BCG)
    _, facts = model.engine.james_stein_table(model.prepared, model.structure)
    pm = fit(model, "meta_pm").info["meta"]["tau2"]
    # both solve sum (y - mu_A)^2 / (A + v) = k - 1; 1e-7: the two root finders' tolerances
    assert facts["a_hat"] == pytest.approx(pm, rel=1e-7)
    d = model.prepared
    m = meta_checks.morris_estimate(d.y, d.v, d.X)
    table, _ = model.engine.james_stein_table(d, model.structure)
    np.testing.assert_allclose(m["estimate"], table["james_stein"], rtol=1e-10)
    lat, _ = load(bcg, BCG_LAT)
    lat_table, lat_facts = lat.engine.james_stein_table(lat.prepared, lat.structure)
    assert lat_facts["form"] == "morris_regression"
    # with a moderator: B_j = (k-4)/(k-2) v_j/(v_j + A), A solving Q(A) = k - 2
    a = lat_facts["a_hat"]
    w = 1 / (a + lat.prepared.v)
    X, y = lat.prepared.X, lat.prepared.y
    b = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * y))
    assert np.sum(w * (y - X @ b) ** 2) == pytest.approx(13 - 2, rel=1e-9)
    np.testing.assert_allclose(
        lat_table["js_shrinkage"], 9 / 11 * lat.prepared.v / (lat.prepared.v + a), rtol=1e-12
    )


# --------------------------------------------------------------------------- PPC


def _replicated(model, r, replicates, info=None, seed=3):
    rng = np.random.default_rng(seed)
    reps = model.engine.ppc_replicates(
        model.prepared, model.structure, r.summary, r.draws, rng, replicates, info=info
    )
    ((_, _, block),) = list(reps.blocks)
    return reps, block["mean"]


def test_point_fit_replicates_are_the_marginal_model(bcg):
    model, _ = load(bcg, BCG)
    r = fit(model, "meta_reml")
    reps, y_rep = _replicated(model, r, 20000)
    assert reps.group_statistics == ("mean",)
    mu, tau2 = r.info["meta"]["coefficients"][0]["estimate"], r.info["meta"]["tau2"]
    sd = np.sqrt(tau2 + model.prepared.v)
    # 5 Monte Carlo SEs (sd / sqrt(20000) for the mean, about sd / sqrt(10000) for the SD)
    np.testing.assert_allclose(y_rep.mean(axis=0), mu, atol=5 * sd.max() / np.sqrt(20000))
    np.testing.assert_allclose(y_rep.std(axis=0), sd, rtol=5 / np.sqrt(10000))


def test_meta_bayes_replicates_have_the_posterior_predictive_spread(schools):
    model, _ = load(schools, ES)
    settings = {"prior": {"family": "uniform"}}
    r = fit(model, "meta_bayes", settings)
    _, y_rep = _replicated(model, r, 20000, info=r.info)
    theta = r.summary.set_index("parameter").loc[
        [f"coef_school[{s},Intercept]" for s in model.prepared.labels]
    ]
    # E[y_rep] = E[theta | y]; Var[y_rep] = Var[theta | y] + v_j (exact draws, 20000 of them)
    sd = np.sqrt(theta["sd"].to_numpy() ** 2 + model.prepared.v)
    # 5 Monte Carlo SEs of a mean of 20000 independent draws
    np.testing.assert_allclose(
        y_rep.mean(axis=0), theta["mean"], atol=5 * sd.max() / np.sqrt(20000)
    )
    # the SD's Monte Carlo SE is about 0.5% for normal draws; y_rep is a heavier-tailed
    # normal mixture over tau, so 2% (still several SEs, and far below a missed v_j: >15%)
    np.testing.assert_allclose(y_rep.std(axis=0), sd, rtol=0.02)


def test_ppc_tables_flag_heterogeneity_only_under_complete_pooling(bcg):
    model, design = load(bcg, BCG)
    p_sd = {}
    for method in ("complete_pooling", "meta_reml"):
        r = fit(model, method)
        table, overall, facts = predictive_checks(
            model, design, r.summary, None, 42, ("bcg", method), [], r.info
        )
        groups = table[table["scope"] == "group"]
        assert len(groups) == model.prepared.k and set(groups["statistic"]) == {"mean"}
        assert len(table[table["scope"] == "overall"]) == 4 and len(overall) == 400
        p_sd[method] = facts["overall_p"]["sd"]
    # Q = 152 on 12 df: estimates spread far more than their v_j allow when tau = 0
    assert p_sd["complete_pooling"] < 0.025
    assert 0.025 < p_sd["meta_reml"] < 0.975


def test_gibbs_replicates_use_the_stored_study_effects(schools):
    model, _ = load(schools, ES)
    r = fit(
        model, "gibbs", {"chains": 2, "warmup": 100, "draws": 200, "prior": {"family": "uniform"}}
    )
    reps, _ = _replicated(model, r, 100)
    assert reps.count == 100 and "the draw's study effects" in reps.note
    no_theta = r.draws[[c for c in r.draws.columns if not c.startswith("coef_")]]
    reps2 = model.engine.ppc_replicates(model.prepared, model.structure, r.summary, no_theta,
                                        np.random.default_rng(1), 100)  # fmt: skip
    assert "full conditional" in reps2.note


def test_replicates_without_stored_effects_follow_the_full_conditional(schools):
    """Draws at fixed (mu, tau) lacking coef_: y_rep_j ~ N((1-B)y + B mu, (1-B)v + v)."""
    model, _ = load(schools, ES)
    d, n, mu, tau = model.prepared, 20000, 8.0, 6.0
    draws = pd.DataFrame({"chain": 0, "draw": np.arange(n), "b_Intercept": mu,
                          "sd_school__Intercept": tau})  # fmt: skip
    reps = model.engine.ppc_replicates(d, model.structure, None, draws, np.random.default_rng(1), n)
    ((_, _, block),) = list(reps.blocks)
    b = d.v / (d.v + tau**2)
    sd = np.sqrt((1.0 - b) * d.v + d.v)
    # 5 Monte Carlo SEs of a mean of 20000 independent normals; the SD's SE is 0.5%, so 2.5%
    np.testing.assert_allclose(
        block["mean"].mean(axis=0), (1.0 - b) * d.y + b * mu, atol=5 * sd.max() / np.sqrt(n)
    )
    np.testing.assert_allclose(block["mean"].std(axis=0), sd, rtol=0.025)


# --------------------------------------------------------------------------- prior predictive


def test_prior_predictive_proper_and_improper(schools):
    model, _ = load(schools, ES)
    improper = {"priors": {"b_Intercept": {"family": "flat"}, "sd": {"family": "uniform"}}}
    assert model.engine.prior_predictive(model.prepared, model.structure, improper,
                                         np.random.default_rng(1)) is None  # fmt: skip
    info = {"priors": {"b_Intercept": {"family": "flat"},
                       "sd": {"family": "half_cauchy", "scale": 5.0}}}  # fmt: skip
    d = model.engine.prior_predictive(model.prepared, model.structure, info,
                                      np.random.default_rng(1), 40000)  # fmt: skip
    tau = d["sd_school__Intercept"].to_numpy()
    # half-Cauchy(5): median 5, 90% quantile 5 tan(0.45 pi); 40000 draws: 2% on quantiles
    assert np.median(tau) == pytest.approx(5.0, rel=0.03)
    assert np.quantile(tau, 0.9) == pytest.approx(5 * np.tan(0.45 * np.pi), rel=0.05)
    v_typ = np.median(model.prepared.v)
    np.testing.assert_allclose(d["outcome_sd"], np.sqrt(tau**2 + v_typ), rtol=1e-12)
    assert d["new_observation"].isna().all()  # flat prior on mu: no level
    # a new estimate's deviation given tau is N(0, tau^2 + v): standardised, it is N(0, 1)
    z = d["new_observation_deviation"] / d["outcome_sd"]
    assert stats.kstest(z, "norm").pvalue > 1e-3


# --------------------------------------------------------------------------- K-fold


def test_kfold_says_why_it_is_unavailable(schools):
    with pytest.raises(MethodError, match="one estimate per study, no within-study replication"):
        run_kfold(schools, ES, "meta_reml", folds=2, settings={}, seed=1, keys=("s",),
                  source="t.csv")  # fmt: skip


def test_shrinkage_table_carries_james_stein(schools):
    model, _ = load(schools, ES)
    r = fit(model, "meta_reml")
    skipped: list[str] = []
    table, facts = shrinkage_table(model, r.summary, r.info, skipped)
    assert not skipped and facts["form"] == "efron_morris"
    assert table["james_stein"].notna().all()


def test_diagnose_fit_writes_meta_checks(schools, tmp_path):
    """The diagnose stage on a meta_bayes fit: every check present, K-fold's reason recorded."""
    from hierpipe.diagnostics.checks import diagnose_fit
    from hierpipe.io import read_json, write_json, write_parquet

    csv = tmp_path / "es.csv"
    schools.to_csv(csv, index=False)
    model, _ = load(schools, ES)
    r = fit(model, "meta_bayes", {"prior": {"family": "half_normal", "scale": 10.0}})
    fdir, out = tmp_path / "fit", tmp_path / "diag"
    write_parquet(r.summary, fdir / "summary.parquet")
    write_json(r.info, fdir / "fit.json")
    diagnose_fit(csv, ES, fdir, out, seed=1, keys=("es", "meta_bayes"))
    checks = read_json(out / "checks.json")
    assert checks["skipped"] == ["kfold: one estimate per study, no within-study replication"]
    assert checks["ppc"]["p_values"] == 8 and checks["james_stein"]["form"] == "efron_morris"
    prior = pd.read_parquet(out / "prior_predictive.parquet")
    # half-normal(10) on tau: median 10 * 0.6745; 4000 draws, 5% is about 3 Monte Carlo SEs
    assert prior["sd_school__Intercept"].median() == pytest.approx(6.745, rel=0.05)
    assert pd.read_parquet(out / "residuals.parquet")["standardised"].notna().all()


def test_overview_describes_studies_not_group_sizes(schools):
    from hierpipe.formula import parse_formula
    from hierpipe.models.structure import classify
    from hierpipe.report.context import StudyContext
    from hierpipe.report.sections import overview

    formula = parse_formula(ES)
    ctx = StudyContext("es", Path("."), {}, 1, formula, classify(formula), schools, {}, None)
    s = overview.build(ctx)
    assert s["groups"] == 8
    assert (s["meta"]["se_min"], s["meta"]["se_median"], s["meta"]["se_max"]) == (9, 11, 18)
