"""The meta-analysis engine: summaries, fit.json facts, leave-one-study-out, errors.

References: metafor's published output for the BCG data and BDA3 for the eight
schools (both as in tests/test_meta.py), the library functions tested there
(meta_fit, posterior_tau_grid) where the engine only re-labels their results,
and independent dense or brute-force computations written here (Henderson's
mixed-model equations, a 2-D grid over (mu, tau), statsmodels' least squares).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hierpipe.errors import ConfigError, InputError, MethodError
from hierpipe.models.fitting import fit_table, load_model
from hierpipe.models.meta import egger_test, log_risk_ratio, meta_fit, q_profile_ci
from hierpipe.models.meta_bayes import mixture_quantiles, posterior_tau_grid
from hierpipe.seeds import derive_rng
from hierpipe.studies import fit_settings

DATA = Path(__file__).parent / "data"
Z90 = stats.norm.ppf(0.95)
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
    # labels that sort in file order, so arrays line up with the summary's rows
    return d.assign(yi=yi, vi=vi, study=[f"T{t:02d}" for t in d["trial"]])


def fit(df, formula, method, settings=None, seed=1):
    return fit_table(df, formula, method, settings=settings or {}, rng=derive_rng(seed, method),
                     source="t.csv")  # fmt: skip


def est(result) -> pd.DataFrame:
    return result.summary.set_index("parameter")


# ----------------------------------------------------------------------------
# frequentist fits
# ----------------------------------------------------------------------------


def test_bcg_reml_summary_is_metafors_fit_under_brms_names(bcg):
    r = fit(bcg, BCG, "meta_reml")
    s = est(r)
    labels = [f"T{t:02d}" for t in range(1, 14)]
    expected = ["b_Intercept", "sd_study__Intercept"]
    expected += [f"r_study[{lab},Intercept]" for lab in labels]
    expected += [f"coef_study[{lab},Intercept]" for lab in labels]
    assert list(s.index) == expected  # no sigma: the within-study variances are known
    # published metafor REML values (RoBMA vignette): tau2 0.3132, mu -0.7145 (SE 0.1798),
    # I2 92.22%; 6e-5 = half the 4th decimal plus metafor's 1e-5 convergence threshold
    m = r.info["meta"]
    assert m["tau2"] == pytest.approx(0.3132, abs=6e-5)
    assert s.loc["b_Intercept", "mean"] == pytest.approx(-0.7145, abs=6e-5)
    assert s.loc["b_Intercept", "sd"] == pytest.approx(0.1798, abs=6e-5)
    assert m["I2"] == pytest.approx(92.22, abs=0.005)
    assert m["Q"] == pytest.approx(152.2330, abs=5e-5) and m["Q_df"] == 12
    # the summary's interval is the 90% Wald interval; tau's is the 90% Q-profile one
    b = s.loc["b_Intercept"]
    assert (b["q5"], b["q95"]) == pytest.approx(
        (b["mean"] - Z90 * b["sd"], b["mean"] + Z90 * b["sd"])
    )
    lo, hi = q_profile_ci(bcg["yi"], bcg["vi"], level=0.90)
    t = s.loc["sd_study__Intercept"]
    assert t["mean"] == pytest.approx(np.sqrt(m["tau2"]), rel=1e-12)
    assert (t["q5"], t["q95"]) == pytest.approx((np.sqrt(lo), np.sqrt(hi)), rel=1e-12)
    # coef_ = BLUP (metafor blup, tested as the exact conditional posterior in test_meta)
    ref = meta_fit(bcg["yi"], bcg["vi"], method="REML")
    coef = s.loc[[f"coef_study[{lab},Intercept]" for lab in labels]]
    np.testing.assert_allclose(coef["mean"], ref.blup, rtol=1e-12)
    np.testing.assert_allclose(coef["sd"], ref.blup_se, rtol=1e-12)
    r_ = s.loc[[f"r_study[{lab},Intercept]" for lab in labels], "mean"].to_numpy()
    np.testing.assert_allclose(r_, ref.blup - ref.beta[0], atol=1e-12)
    # the prediction interval is Higgins-Thompson-Spiegelhalter's, and says so
    assert m["pi"]["lb"] == pytest.approx(ref.pi_hts_lb, rel=1e-12)
    assert "Higgins" in m["pi"]["variant"] and "k-2" in m["pi"]["variant"]
    assert not m["boundary"] and r.info["warnings"] == []


def test_bcg_dl_and_knha_settings(bcg):
    dl = fit(bcg, BCG, "meta_dl")
    # metafor / Stata metan: DL tau2 0.3088, mu -0.7141 (closed form: 4-decimal rounding)
    assert dl.info["meta"]["tau2"] == pytest.approx(0.3088, abs=5e-5)
    assert est(dl).loc["b_Intercept", "mean"] == pytest.approx(-0.7141, abs=5e-5)
    kh = fit(bcg, BCG, "meta_reml", {"knha": True, "level": 0.9})
    ref = meta_fit(bcg["yi"], bcg["vi"], method="REML", knha=True, level=0.9)
    m = kh.info["meta"]
    assert m["knha"] and m["test"] == "t" and m["df"] == 12 and m["level"] == 0.9
    c = m["coefficients"][0]
    assert (c["ci_lb"], c["ci_ub"]) == pytest.approx((ref.ci_lb[0], ref.ci_ub[0]), rel=1e-12)
    # the summary's 90% interval uses the same t(k - p) reference distribution
    b = est(kh).loc["b_Intercept"]
    assert b["q95"] - b["mean"] == pytest.approx(stats.t.ppf(0.95, 12) * ref.se[0], rel=1e-12)
    with pytest.raises(ConfigError, match="knha"):
        fit(bcg, BCG, "meta_reml", {"knha": "yes"})
    with pytest.raises(ConfigError, match="level"):
        fit(bcg, BCG, "meta_reml", {"level": 95})


def test_meta_regression_coefficients_and_coef_prediction_error(bcg):
    r = fit(bcg, BCG_LAT, "meta_reml")
    s = est(r)
    # Viechtbauer (2010, section 3.3): intrcpt 0.2515 (SE 0.2491), ablat -0.0291
    # (SE 0.0072), tau2 0.0764
    assert s.loc["b_Intercept", "mean"] == pytest.approx(0.2515, abs=6e-5)
    assert s.loc["b_ablat", "mean"] == pytest.approx(-0.0291, abs=6e-5)
    assert s.loc["b_ablat", "sd"] == pytest.approx(0.0072, abs=6e-5)
    assert r.info["meta"]["tau2"] == pytest.approx(0.0764, abs=6e-5)
    assert "pi" not in r.info["meta"]  # no single prediction interval with moderators
    # coef_ = b_Intercept + u_j, as lme4's coef(); its SD is the prediction error SD
    # from Henderson's mixed-model equations, solved densely here
    y, v = bcg["yi"].to_numpy(), bcg["vi"].to_numpy()
    X = np.column_stack([np.ones(13), bcg["ablat"]])
    tau2 = r.info["meta"]["tau2"]
    R_inv = np.diag(1 / v)
    mme = np.block([[X.T @ R_inv @ X, X.T @ R_inv], [R_inv @ X, R_inv + np.eye(13) / tau2]])
    C = np.linalg.inv(mme)
    sol = C @ np.concatenate([X.T @ R_inv @ y, R_inv @ y])
    for j in (0, 7, 12):
        k = np.zeros(15)
        k[0], k[2 + j] = 1.0, 1.0
        row = s.loc[f"coef_study[T{j + 1:02d},Intercept]"]
        assert row["mean"] == pytest.approx(k @ sol, rel=1e-9)
        assert row["sd"] == pytest.approx(np.sqrt(k @ C @ k), rel=1e-8)
    # the study effects x_j'beta + u_j in fit.json are metafor's blup
    ref = meta_fit(y, v, X, method="REML")
    np.testing.assert_allclose(r.info["meta"]["study_effects"]["estimate"], ref.blup, rtol=1e-12)


def test_complete_and_no_pooling(schools, bcg):
    cp = fit(schools, ES, "complete_pooling")
    s = est(cp)
    w = 1 / schools["sigma"] ** 2
    mu = float(np.sum(w * schools["y"]) / w.sum())
    # BDA3 5.5: the complete-pooling estimate is 7.7 with SE 4.1 (1 decimal)
    assert s.loc["b_Intercept", "mean"] == pytest.approx(mu, rel=1e-12)
    assert round(s.loc["b_Intercept", "mean"], 1) == 7.7
    assert round(s.loc["b_Intercept", "sd"], 1) == 4.1
    assert "sd_school__Intercept" not in s.index
    assert s.loc["coef_school[C,Intercept]", "mean"] == s.loc["b_Intercept", "mean"]
    assert cp.info["meta"]["estimator"] == "FE" and not cp.info["meta"]["boundary"]
    # metafor's FE I2 = (Q - df)/Q is DerSimonian-Laird's I2 (both are that formula)
    fe = fit(bcg, BCG, "complete_pooling").info["meta"]
    # metafor rma(method = "FE") on dat.bcg, as Stata's metan (metafor's
    # test_misc_metan_vs_rma.uni_with_dat.bcg.r): -0.4303 (SE 0.0405), z -10.6247,
    # CI -0.5097 .. -0.3509; closed form, so only the 4-decimal rounding applies
    c = fe["coefficients"][0]
    assert (c["estimate"], c["se"]) == pytest.approx((-0.4303, 0.0405), abs=5e-5)
    assert c["statistic"] == pytest.approx(-10.6247, abs=5e-5)
    assert (c["ci_lb"], c["ci_ub"]) == pytest.approx((-0.5097, -0.3509), abs=5e-5)
    assert fe["I2"] == pytest.approx(fit(bcg, BCG, "meta_dl").info["meta"]["I2"], rel=1e-12)
    assert fe["H2"] == pytest.approx(fe["Q"] / 12, rel=1e-12)
    npool = est(fit(schools, ES, "no_pooling"))
    assert npool.loc["coef_school[A,Intercept]", "mean"] == 28.0
    assert npool.loc["coef_school[A,Intercept]", "sd"] == 15.0
    assert not any(p.startswith(("b_", "sd_")) for p in npool.index)


def test_eight_schools_every_estimator_at_the_boundary(schools):
    """Q = 4.7 < 7 = k - 1: tau2 = 0 by DL, PM, ML, REML, HS, and then every mean is FE's."""
    fe = est(fit(schools, ES, "complete_pooling")).loc["b_Intercept"]
    for method in ("meta_dl", "meta_pm", "meta_ml", "meta_reml", "meta_hs"):
        r = fit(schools, ES, method)
        m = r.info["meta"]
        assert m["tau2"] == 0.0 and m["boundary"], method
        assert (round(m["Q"], 1), m["Q_df"]) == (4.7, 7)
        assert est(r).loc["b_Intercept", "mean"] == pytest.approx(fe["mean"], rel=1e-12)
        assert any("boundary fit" in w for w in r.info["warnings"])
    assert fit(schools, ES, "meta_sj").info["meta"]["tau2"] > 0  # SJ is never 0


def test_two_studies_dl_pm_reml_agree_and_few_studies_warn():
    df = pd.DataFrame({"study": ["a", "b"], "y": [0.3, -0.9], "s": [0.05**0.5, 0.2**0.5]})
    f = "y | se(s) ~ 1 + (1 | study)"
    closed = ((0.3 + 0.9) ** 2 - 0.25) / 2  # (d^2 - v1 - v2) / 2
    for method in ("meta_dl", "meta_pm", "meta_reml"):
        r = fit(df, f, method)
        assert r.info["meta"]["tau2"] == pytest.approx(closed, rel=1e-9)
        assert r.info["meta"]["pi"]["lb"] is None  # t on k - 2 = 0 df does not exist
        assert any("only 2 studies" in w and "knha" in w for w in r.info["warnings"])
    kh = fit(df, f, "meta_reml", {"knha": True})
    assert not any("consider meta.knha" in w for w in kh.info["warnings"])


# ----------------------------------------------------------------------------
# Bayesian fits
# ----------------------------------------------------------------------------


def test_meta_bayes_summary_is_the_exact_posterior(schools):
    r = fit(schools, ES, "meta_bayes", {"prior": {"family": "uniform"}})
    s = est(r)
    y, v = schools["y"].to_numpy(float), schools["sigma"].to_numpy(float) ** 2
    post = posterior_tau_grid(y, v, "uniform")
    assert s.loc["b_Intercept", "mean"] == post.mu_mean
    assert s.loc["sd_school__Intercept", "sd"] == post.sd
    # quantiles of mu: our mixture solver against the grid's own CDF (Brent)
    assert s.loc["b_Intercept", "q5"] == pytest.approx(post.mu_quantile(0.05), abs=1e-7)
    # BDA3 Table 5.3 (200 draws, integers): school A's median about 10 (MC SE of a
    # 200-draw median ~0.7, rounding 0.5) and mu's mean about 8, sd about 5
    assert s.loc["coef_school[A,Intercept]", "q50"] == pytest.approx(10.0, abs=2.0)
    assert s.loc["b_Intercept", "mean"] == pytest.approx(8.0, abs=0.5)
    assert r.info["meta"]["tau"]["median"] == pytest.approx(5.0, abs=1.0)
    # theta_A quantiles against 200,000 exact independent draws: the quantile's MC SE
    # is sqrt(q(1-q)/n)/f(x_q) ~ 0.03 here; 0.15 is 5 of them
    from hierpipe.models.meta_bayes import draw_meta_posterior

    d = draw_meta_posterior(post, 200_000, derive_rng(3, "theta_draws"))
    for col, j in (("q5", 0), ("q50", 0), ("q95", 0), ("q5", 2), ("q95", 6)):
        lab = "ABCDEFGH"[j]
        ref = np.quantile(d["theta"][:, j], {"q5": 0.05, "q50": 0.5, "q95": 0.95}[col])
        assert s.loc[f"coef_school[{lab},Intercept]", col] == pytest.approx(ref, abs=0.15)
    dens = r.info["meta"]["tau_posterior"]
    assert len(dens["tau"]) == len(dens["density"]) and dens["tau"][0] == 0.0
    assert r.draws is None  # exact: no Markov chain, nothing to diagnose


def test_mixture_quantiles_invert_the_mixture_cdf():
    rng = derive_rng(5, "mixture")
    w = rng.dirichlet(np.ones(40))
    means, sds = rng.normal(0, 3, (40, 3)), rng.uniform(0.5, 4, (40, 3))
    sds[0, 1] = 0.0  # a point mass (r_j at tau = 0)
    q = mixture_quantiles(w, means, sds, [0.05, 0.5, 0.95])
    for c in range(3):
        for i, p in enumerate((0.05, 0.5, 0.95)):
            z = (q[c, i] - means[:, c]) / np.where(sds[:, c] > 0, sds[:, c], 1.0)
            cdf = np.where(sds[:, c] > 0, stats.norm.cdf(z), means[:, c] <= q[c, i])
            assert np.dot(w, cdf) == pytest.approx(p, abs=1e-9)


def test_gibbs_summary_and_settings(schools):
    with pytest.raises(ConfigError, match=r"meta\.prior"):
        fit(schools, ES, "gibbs", {"priors": {"sd": {"family": "half_cauchy", "scale": 5}}})
    r = fit(schools, ES, "gibbs", {"chains": 2, "warmup": 100, "draws": 200,
                                    "prior": {"family": "half_normal", "scale": 10}})  # fmt: skip
    s = r.summary
    assert {"rhat", "ess_bulk", "ess_tail", "mcse_mean"} <= set(s.columns)
    assert "sigma" not in set(s["parameter"])
    assert len(r.draws) == 400 and {"chain", "draw", "b_Intercept"} <= set(r.draws.columns)
    assert r.info["priors"]["sd"] == {"family": "half_normal", "scale": 10.0}


def test_bayesian_fits_need_the_intercept_only_model(bcg):
    for method in ("meta_bayes", "gibbs"):
        with pytest.raises(MethodError, match="intercept-only"):
            fit(bcg, BCG_LAT, method)


# ----------------------------------------------------------------------------
# leave one study out
# ----------------------------------------------------------------------------


def test_held_out_plugin_score_is_the_refit_without_the_study(bcg):
    model = load_model(bcg, BCG, "t.csv")
    j = 3
    row = model.engine.score_held_out(model.prepared, j, "meta_reml", {}, derive_rng(1))
    keep = np.arange(13) != j
    ref = meta_fit(bcg["yi"][keep], bcg["vi"][keep], method="REML")
    sd = np.sqrt(ref.tau2 + bcg["vi"][j] + ref.se[0] ** 2)
    assert row["group"] == "T04" and row["mu"] == pytest.approx(ref.beta[0], rel=1e-12)
    assert row["tau"] == pytest.approx(ref.tau, rel=1e-12)
    assert row["elpd"] == pytest.approx(stats.norm.logpdf(bcg["yi"][j], ref.beta[0], sd), rel=1e-12)
    assert row["std_residual"] == pytest.approx((bcg["yi"][j] - ref.beta[0]) / sd, rel=1e-12)
    assert (row["pi_lb"], row["pi_ub"]) == pytest.approx((ref.pi_hts_lb, ref.pi_hts_ub), rel=1e-12)
    with pytest.raises(ConfigError, match="no_pooling"):
        model.engine.score_held_out(model.prepared, j, "no_pooling", {}, derive_rng(1))


def test_held_out_exact_bayes_density_is_a_ratio_of_marginal_likelihoods(schools):
    """p(y_A | y_-A) = p(y) / p(y_-A), each a brute-force 2-D integral over (mu, tau)."""
    model = load_model(schools, ES, "t.csv")
    row = model.engine.score_held_out(model.prepared, 0, "meta_bayes", {}, derive_rng(1))
    y, v = schools["y"].to_numpy(float), schools["sigma"].to_numpy(float) ** 2
    tau = np.linspace(0.0, 400.0, 801)  # flat prior; mass beyond 400 is < 1e-7
    mu = np.linspace(-300.0, 320.0, 621)

    def log_marginal(idx: np.ndarray) -> float:
        tot = v[idx][None, None, :] + tau[:, None, None] ** 2
        r2 = (y[idx][None, None, :] - mu[None, :, None]) ** 2
        ll = -0.5 * (np.log(2 * np.pi * tot) + r2 / tot).sum(axis=-1)
        lik = np.exp(ll - ll.max())
        return float(np.log(np.trapezoid(np.trapezoid(lik, mu, axis=1), tau)) + ll.max())

    ref = log_marginal(np.arange(8)) - log_marginal(np.arange(1, 8))
    # The integrands are smooth, decay fast in mu and are even in tau, so the
    # trapezoid rule converges geometrically: this grid (steps 0.5 and 1) and one
    # five times finer agree to 2e-13. The cut at tau = 400 drops < 1e-7 of each
    # marginal, nearly the same share of both. The engine's grid is good to ~1e-8.
    assert row["elpd"] == pytest.approx(ref, abs=1e-6)


def test_psis_row_agrees_with_the_exact_held_out_density(schools):
    from hierpipe.cv.psis import psis

    model = load_model(schools, ES, "t.csv")
    g = fit(schools, ES, "gibbs", {"chains": 4, "warmup": 200, "draws": 1500})
    loglik = model.engine.logo_log_lik(model.prepared, model.structure, g.draws)
    assert loglik.shape == (6000, 8)
    exact = model.engine.score_held_out(model.prepared, 0, "meta_bayes", {}, derive_rng(1))
    sm = psis(-loglik[:, 0], 1.0)
    row = model.engine.score_held_out_weighted(
        model.prepared, 0, model.structure, g.draws, sm.log_weights, derive_rng(2)
    )
    # a Monte Carlo estimate of the same log density from 6000 dependent draws;
    # the densities vary by a factor < 3 over the posterior, so its error is ~0.01
    assert row["elpd"] == pytest.approx(exact["elpd"], abs=0.05)
    assert row["mu"] == pytest.approx(exact["mu"], abs=0.5)  # mu_se ~5, ESS ~ thousands


# ----------------------------------------------------------------------------
# input and method errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sigma": [15, 10, 16, 0, 9, 11, 10, 18]}, r"column 'sigma' row 4: standard error must"),
        ({"sigma": [15, 10, 16, -1, 9, 11, 10, 18]}, r"column 'sigma' row 4: standard error"),
        ({"sigma": [15, 10, 16, np.nan, 9, 11, 10, 18]}, r"column 'sigma' row 4: missing value"),
        ({"sigma": [15, 10, 16, np.inf, 9, 11, 10, 18]}, r"column 'sigma' row 4: inf is not"),
        ({"school": list("ABCDEFGA")}, r"column 'school': study 'A' is on rows 1 and 8"),
    ],
)
def test_bad_input_is_one_line(schools, change, match):
    with pytest.raises(InputError, match=match) as exc:
        fit(schools.assign(**change), ES, "meta_reml")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("t.csv: ")


def test_methods_and_formulas_that_do_not_apply(schools):
    with pytest.raises(MethodError, match="does not apply"):
        fit(schools, ES, "eb_reml")
    df = schools.assign(x=np.arange(8.0))
    with pytest.raises(MethodError, match="one varying intercept"):
        fit(df, "y | se(sigma) ~ 1 + (1 + x | school)", "meta_reml")


# ----------------------------------------------------------------------------
# settings routing and Egger's test
# ----------------------------------------------------------------------------


def test_fit_settings_give_each_fit_only_what_it_reads():
    cfg = {"studies": {"m": {"meta": {"knha": True, "level": 0.9,
                                      "prior": {"family": "uniform"}},
                             "gibbs": {"draws": 50}}}}  # fmt: skip
    assert fit_settings(cfg, "m", "meta_reml") == {"knha": True, "level": 0.9}
    assert fit_settings(cfg, "m", "meta_bayes") == {"level": 0.9, "prior": {"family": "uniform"}}
    assert fit_settings(cfg, "m", "no_pooling") == {}
    g = fit_settings(cfg, "m", "gibbs")
    assert g["draws"] == 50 and g["prior"] == {"family": "uniform"} and "knha" not in g


def test_egger_test_is_the_weighted_regression_on_the_standard_error(bcg):
    import statsmodels.api as sm

    y, v = bcg["yi"].to_numpy(), bcg["vi"].to_numpy()
    se = np.sqrt(v)
    e = egger_test(y, v)
    # direct form: OLS of y/se on 1/se (Egger et al. 1997)
    ols = sm.OLS(y / se, sm.add_constant(1 / se)).fit()
    assert e.intercept == pytest.approx(ols.params[0], rel=1e-10)
    assert e.se == pytest.approx(ols.bse[0], rel=1e-10)
    assert e.pval == pytest.approx(ols.pvalues[0], rel=1e-8)
    assert e.slope == pytest.approx(ols.params[1], rel=1e-10)
    # equivalent form: WLS of y on se with weights 1/v; the slope on se is Egger's intercept
    wls = sm.WLS(y, sm.add_constant(se), weights=1 / v).fit()
    assert e.intercept == pytest.approx(wls.params[1], rel=1e-10)
    assert e.t == pytest.approx(wls.tvalues[1], rel=1e-10)
    assert e.df == 11
    with pytest.raises(InputError, match="at least 3"):
        egger_test(y[:2], v[:2])
