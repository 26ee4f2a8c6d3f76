"""Random-effects meta-analysis: estimators against published values and independent references.

References used below
---------------------
* metafor output for the BCG data (Colditz et al. 1994, metafor's ``dat.bcg``):
  - REML fit, printed in the RoBMA vignette "Bayesian Meta-Analysis" (Bartoš,
    CRAN RoBMA 4.0.0), which shows ``metafor::rma(yi, vi, data = dat,
    method = "REML")``;
  - metafor's own test suite (wviechtb/metafor, tests/testthat):
    test_misc_metan_vs_rma.uni_with_dat.bcg.r (DL and FE fits, also checked
    against Stata's metan), test_misc_confint.r (Q-profile CI of the DL fit),
    test_misc_fitstats.r (ML log-likelihoods), test_misc_rma_uni.r (iterated DL
    and SJ estimators, which converge to Paule-Mandel: 0.3181);
  - the mixed-effects model on absolute latitude (Viechtbauer 2010, J. Stat.
    Softw. 36(3), section 3.3 / metafor's rma.uni help).
* BDA3 (Gelman et al. 2013) sections 5.4-5.5 for the eight schools.
* Independent dense re-derivations written here (k x k matrices, multivariate
  normal densities, error contrasts, brute-force optimisers and 2-D grids) that
  share no code with the O(k) implementation.

metafor prints 4 decimals and stops Fisher scoring at a change of 1e-5 in tau2,
so comparisons with printed metafor values use 6e-5 on estimates (half a unit
in the 4th decimal plus the convergence threshold) unless said otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import linalg, optimize, stats

from hierpipe.errors import ConfigError, InputError
from hierpipe.models.meta import (
    METHODS,
    log_risk_ratio,
    meta_fit,
    meta_predict,
    q_profile_ci,
    tau2_dl,
    tau2_hs,
    tau2_ml,
    tau2_pm,
    tau2_reml,
    tau2_sj,
)
from hierpipe.models.meta_bayes import (
    draw_meta_posterior,
    posterior_tau_grid,
    sample_meta_posterior,
)
from hierpipe.seeds import derive_rng

DATA = Path(__file__).parent / "data"
# half a unit in metafor's 4th printed decimal + its 1e-5 convergence threshold
METAFOR_4DP = 6e-5


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bcg() -> dict[str, np.ndarray]:
    d = pd.read_csv(DATA / "bcg.csv")
    y, v = log_risk_ratio(d["tpos"], d["tneg"], d["cpos"], d["cneg"])
    X = np.column_stack([np.ones(len(d)), d["ablat"].to_numpy(float)])
    return {"y": y, "v": v, "X": X}


@pytest.fixture(scope="module")
def schools() -> dict[str, np.ndarray]:
    d = pd.read_csv(DATA / "eight_schools.csv")
    return {"y": d["y"].to_numpy(float), "v": d["sigma"].to_numpy(float) ** 2}


# ----------------------------------------------------------------------------
# independent dense references (k x k algebra, no shared code)
# ----------------------------------------------------------------------------


def dense_p(v: np.ndarray, X: np.ndarray, tau2: float) -> np.ndarray:
    W = np.diag(1.0 / (v + tau2))
    return W - W @ X @ np.linalg.solve(X.T @ W @ X, X.T @ W)


def dense_gls(y: np.ndarray, v: np.ndarray, X: np.ndarray, tau2: float):
    S_inv = np.linalg.inv(np.diag(v + tau2))
    vb = np.linalg.inv(X.T @ S_inv @ X)
    return vb @ X.T @ S_inv @ y, vb


def dense_q(y: np.ndarray, v: np.ndarray, X: np.ndarray, tau2: float) -> float:
    return float(y @ dense_p(v, X, tau2) @ y)


def dense_loglik_ml(y, v, X, beta, tau2) -> float:
    return float(stats.multivariate_normal(X @ beta, np.diag(v + tau2)).logpdf(y))


def dense_loglik_reml(y, v, X, tau2) -> float:
    """Log-density of the error contrasts K'y, K an orthonormal basis of X's null space."""
    K = linalg.null_space(X.T)
    S = K.T @ np.diag(v + tau2) @ K
    return float(stats.multivariate_normal(np.zeros(K.shape[1]), S).logpdf(K.T @ y))


def dense_score(y, v, X, tau2, reml: bool) -> float:
    P = dense_p(v, X, tau2)
    ypp_y = float(y @ P @ P @ y)
    return 0.5 * (ypp_y - (np.trace(P) if reml else np.sum(1.0 / (v + tau2))))


def brute_reml(y, v, X, upper: float = 5.0) -> float:
    res = optimize.minimize_scalar(
        lambda t: -dense_loglik_reml(y, v, X, t),
        bounds=(0.0, upper),
        method="bounded",
        options={"xatol": 1e-12},
    )
    return float(res.x)


def brute_ml(y, v, X) -> tuple[float, np.ndarray]:
    """Joint Nelder-Mead over (beta, tau2): no profiling, no scoring."""
    p = X.shape[1]

    def nll(theta: np.ndarray) -> float:
        beta, tau2 = theta[:p], theta[p]
        if tau2 < 0:
            return np.inf
        return -dense_loglik_ml(y, v, X, beta, tau2)

    beta0, _ = dense_gls(y, v, X, 0.1)
    x0 = np.append(beta0, 0.1)
    # simplex edges sized to each parameter: slopes on latitude (tens of degrees)
    # are ~0.03, the intercept and tau2 are ~0.1-1
    steps = np.full(p + 1, 0.05)
    steps[1:p] = 0.002
    simplex = np.vstack([x0, x0 + np.diag(steps)])
    res = optimize.minimize(
        nll,
        x0,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 1e-11, "fatol": 1e-14, "maxiter": 40000},
    )
    return float(res.x[p]), res.x[:p]


# ----------------------------------------------------------------------------
# effect sizes
# ----------------------------------------------------------------------------


def test_log_risk_ratio_matches_escalc(bcg):
    # metafor escalc(measure = "RR", ai = tpos, bi = tneg, ci = cpos, di = cneg,
    # data = dat.bcg), printed to 4 decimals (Viechtbauer 2010, section 3.1)
    yi = [-0.8893, -1.5854, -1.3481, -1.4416, -0.2175, -0.7861, -1.6209,
          0.0120, -0.4694, -1.3713, -0.3394, 0.4459, -0.0173]  # fmt: skip
    vi = [0.3256, 0.1946, 0.4154, 0.0200, 0.0512, 0.0069, 0.2230,
          0.0040, 0.0564, 0.0730, 0.0124, 0.5325, 0.0714]  # fmt: skip
    # half a unit in the 4th printed decimal
    np.testing.assert_allclose(bcg["y"], yi, atol=5e-5)
    np.testing.assert_allclose(bcg["v"], vi, atol=5e-5)


def test_log_risk_ratio_rejects_zero_events():
    with pytest.raises(InputError, match="zero events"):
        log_risk_ratio([1, 2], [10, 10], [0, 3], [10, 10])
    with pytest.raises(InputError, match="tneg"):
        log_risk_ratio([1, 2], [10, -1], [1, 3], [10, 10])


# ----------------------------------------------------------------------------
# BCG, intercept only: published metafor values
# ----------------------------------------------------------------------------


def test_bcg_reml_matches_metafor(bcg):
    r = meta_fit(bcg["y"], bcg["v"], method="REML")
    # metafor: tau^2 0.3132 (SE 0.1664), tau 0.5597, I^2 92.22%, H^2 12.86,
    # Q(df = 12) = 152.2330, estimate -0.7145, se 0.1798, z -3.9744,
    # ci -1.0669 .. -0.3622 (RoBMA vignette's metafor output)
    assert r.tau2 == pytest.approx(0.3132, abs=METAFOR_4DP)
    assert r.se_tau2 == pytest.approx(0.1664, abs=METAFOR_4DP)
    assert r.tau == pytest.approx(0.5597, abs=METAFOR_4DP)
    assert r.I2 == pytest.approx(92.22, abs=0.005)  # printed to 2 decimals
    assert r.H2 == pytest.approx(12.86, abs=0.005)
    assert r.Q == pytest.approx(152.2330, abs=5e-5)  # Q does not depend on tau2
    assert r.Q_df == 12
    assert r.beta[0] == pytest.approx(-0.7145, abs=METAFOR_4DP)
    assert r.se[0] == pytest.approx(0.1798, abs=METAFOR_4DP)
    # z and the CI carry the tau2 convergence slack through dz/dtau2 ~ 4
    assert r.zval[0] == pytest.approx(-3.9744, abs=2e-4)
    assert r.ci_lb[0] == pytest.approx(-1.0669, abs=METAFOR_4DP)
    assert r.ci_ub[0] == pytest.approx(-0.3622, abs=METAFOR_4DP)
    assert r.test == "z" and not r.boundary and r.k == 13 and r.p == 1


def test_bcg_dl_matches_metafor_and_stata(bcg):
    r = meta_fit(bcg["y"], bcg["v"], method="DL")
    # metafor test_misc_metan_vs_rma.uni_with_dat.bcg.r (agrees with Stata metan):
    # beta -0.7141, ci -1.0644 .. -0.3638, z -3.9952, tau2 0.3088, I2 92.1173
    # DL is closed form, so only the 4-decimal rounding applies
    assert r.tau2 == pytest.approx(0.3088, abs=5e-5)
    assert r.beta[0] == pytest.approx(-0.7141, abs=5e-5)
    assert r.se[0] == pytest.approx(0.1787, abs=5e-5)
    assert r.ci_lb[0] == pytest.approx(-1.0644, abs=5e-5)
    assert r.ci_ub[0] == pytest.approx(-0.3638, abs=5e-5)
    assert r.zval[0] == pytest.approx(-3.9952, abs=5e-5)
    assert r.I2 == pytest.approx(92.1173, abs=5e-5)
    assert r.H2 == pytest.approx(12.6861, abs=5e-5)  # test_misc_confint.r
    # and DL's defining moment equation, with a dense P
    P0 = dense_p(bcg["v"], np.ones((13, 1)), 0.0)
    assert r.tau2 == pytest.approx(
        (dense_q(bcg["y"], bcg["v"], np.ones((13, 1)), 0.0) - 12) / np.trace(P0), rel=1e-12
    )


def test_bcg_q_profile_ci(bcg):
    y, v = bcg["y"], bcg["v"]
    lb, ub = q_profile_ci(y, v)
    r = meta_fit(y, v, method="DL")
    assert (r.tau2_ci_lb, r.tau2_ci_ub) == (lb, ub)
    # metafor confint(res) for the DL fit: tau2 0.1197 .. 1.1115,
    # I2 81.9177 .. 97.6781, H2 5.5303 .. 43.0680 (test_misc_confint.r).
    # metafor finds the bounds by uniroot with tol = eps^0.25 = 1.2e-4 in tau2,
    # so its bounds carry up to that error: 2e-4 on tau2, times dI2/dtau2
    # (<= 124 here) and dH2/dtau2 (= 1/vt = 38) for I2 and H2.
    assert lb == pytest.approx(0.1197, abs=2e-4)
    assert ub == pytest.approx(1.1115, abs=2e-4)
    assert r.I2_ci_lb == pytest.approx(81.9177, abs=124 * 2e-4)
    assert r.I2_ci_ub == pytest.approx(97.6781, abs=124 * 2e-4)
    assert r.H2_ci_lb == pytest.approx(5.5303, abs=38 * 2e-4)
    assert r.H2_ci_ub == pytest.approx(43.0680, abs=38 * 2e-4)
    # our bounds solve the defining equations (Viechtbauer 2007) to rounding
    X = np.ones((13, 1))
    assert dense_q(y, v, X, lb) == pytest.approx(stats.chi2.ppf(0.975, 12), rel=1e-10)
    assert dense_q(y, v, X, ub) == pytest.approx(stats.chi2.ppf(0.025, 12), rel=1e-10)


def test_bcg_pm_solves_generalised_q_equation(bcg):
    y, v = bcg["y"], bcg["v"]
    t = tau2_pm(y, v)
    # metafor's iterated DL and SJ estimators converge to PM: 0.3181 (test_misc_rma_uni.r)
    assert t == pytest.approx(0.3181, abs=METAFOR_4DP)
    assert dense_q(y, v, np.ones((13, 1)), t) == pytest.approx(12.0, rel=1e-10)
    # with a moderator the target is k - p
    tx = tau2_pm(y, v, bcg["X"])
    assert dense_q(y, v, bcg["X"], tx) == pytest.approx(11.0, rel=1e-10)


@pytest.mark.parametrize("with_mod", [False, True], ids=["intercept", "ablat"])
def test_reml_is_the_brute_force_maximiser_and_zeroes_the_score(bcg, with_mod):
    y, v = bcg["y"], bcg["v"]
    X = bcg["X"] if with_mod else np.ones((13, 1))
    t = tau2_reml(y, v, X)
    # bounded Brent on the contrast likelihood, xatol 1e-12: agreement to 1e-8
    # is far inside both methods' tolerances and far outside rounding
    assert t == pytest.approx(brute_reml(y, v, X), abs=1e-8)
    # score 1/2 (y'PPy - tr P) with dense P; scoring stops at a step of
    # 1e-10 * (tau2 + median v), i.e. a score below ~1e-9 times the information
    assert abs(dense_score(y, v, X, t, reml=True)) < 1e-7
    r = meta_fit(y, v, X, method="REML")
    assert r.loglik_reml == pytest.approx(dense_loglik_reml(y, v, X, t), rel=1e-12)
    assert r.se_tau2 == pytest.approx(np.sqrt(2.0 / np.sum(dense_p(v, X, t) ** 2)), rel=1e-10)


@pytest.mark.parametrize("with_mod", [False, True], ids=["intercept", "ablat"])
def test_ml_is_the_brute_force_maximiser_and_zeroes_the_score(bcg, with_mod):
    y, v = bcg["y"], bcg["v"]
    X = bcg["X"] if with_mod else np.ones((13, 1))
    t = tau2_ml(y, v, X)
    t_bf, beta_bf = brute_ml(y, v, X)
    # Nelder-Mead on the joint (beta, tau2) likelihood reaches ~1e-7 in tau2
    assert t == pytest.approx(t_bf, abs=1e-6)
    assert abs(dense_score(y, v, X, t, reml=False)) < 1e-7
    r = meta_fit(y, v, X, method="ML")
    np.testing.assert_allclose(r.beta, beta_bf, atol=1e-6)
    assert r.loglik == pytest.approx(dense_loglik_ml(y, v, X, r.beta, t), rel=1e-12)
    # metafor logLik: -12.6651 (RE) and -7.6857 (ablat), test_misc_fitstats.r;
    # the log-likelihood is flat at the optimum, so only the rounding applies
    assert r.loglik == pytest.approx(-7.6857 if with_mod else -12.6651, abs=5e-5)
    assert r.se_tau2 == pytest.approx(np.sqrt(2.0 / np.sum(1.0 / (v + t) ** 2)), rel=1e-12)


@pytest.mark.parametrize("with_mod", [False, True], ids=["intercept", "ablat"])
def test_moment_estimators_match_their_definitions(bcg, with_mod):
    y, v = bcg["y"], bcg["v"]
    X = bcg["X"] if with_mod else np.ones((13, 1))
    k, p = X.shape
    q0 = dense_q(y, v, X, 0.0)
    # DL, general form (Raudenbush 2009): (QE - (k - p)) / tr P0
    assert tau2_dl(y, v, X) == pytest.approx(
        max(0.0, (q0 - (k - p)) / np.trace(dense_p(v, X, 0.0))), rel=1e-12
    )
    # HS as metafor: (QE - k) / sum(1 / v)
    assert tau2_hs(y, v, X) == pytest.approx(max(0.0, (q0 - k) / np.sum(1.0 / v)), rel=1e-12)
    # SJ: tau0 * QE(tau0) / (k - p) with tau0 = var(y) (k - 1) / k
    tau0 = np.var(y)
    assert tau2_sj(y, v, X) == pytest.approx(tau0 * dense_q(y, v, X, tau0) / (k - p), rel=1e-12)


def test_se_tau2_of_moment_estimators_is_the_quadratic_form_variance(bcg):
    """DL, HS and SJ are c * y'Ay; Var = 2 c^2 tr(A S A S), S = V + tau2 I (plug-in)."""
    y, v = bcg["y"], bcg["v"]
    for X in (np.ones((13, 1)), bcg["X"]):
        k, p = X.shape
        tau0 = np.var(y)
        forms = {
            "DL": (dense_p(v, X, 0.0), 1.0 / np.trace(dense_p(v, X, 0.0))),
            "HS": (dense_p(v, X, 0.0), 1.0 / np.sum(1.0 / v)),
            "SJ": (dense_p(v, X, tau0), tau0 / (k - p)),
        }
        for method, (A, c) in forms.items():
            r = meta_fit(y, v, X, method=method)
            S = np.diag(v + r.tau2)
            assert r.se_tau2 == pytest.approx(c * np.sqrt(2 * np.trace(A @ S @ A @ S)), rel=1e-10)
    assert np.isnan(meta_fit(y, v, method="PM").se_tau2)


def test_bcg_meta_regression_on_latitude(bcg):
    y, v, X = bcg["y"], bcg["v"], bcg["X"]
    r = meta_fit(y, v, X, method="REML")
    # metafor rma(yi, vi, mods = ~ ablat): tau2 0.0764 (SE 0.0591), intrcpt 0.2515
    # (se 0.2491), ablat -0.0291 (se 0.0072, z -4.0444), QE(df = 11) = 30.7331,
    # I2 68.39%, H2 3.16 (Viechtbauer 2010, section 3.3)
    assert r.tau2 == pytest.approx(0.0764, abs=METAFOR_4DP)
    assert r.se_tau2 == pytest.approx(0.0591, abs=2e-4)  # its slope in tau2 is ~0.8, plus rounding
    np.testing.assert_allclose(r.beta, [0.2515, -0.0291], atol=METAFOR_4DP)
    np.testing.assert_allclose(r.se, [0.2491, 0.0072], atol=METAFOR_4DP)
    assert r.zval[1] == pytest.approx(-4.0444, abs=2e-3)  # dz/dtau2 ~ 25 times 6e-5
    assert (r.Q, r.Q_df) == (pytest.approx(30.7331, abs=5e-5), 11)
    assert r.I2 == pytest.approx(68.39, abs=0.005)
    assert r.H2 == pytest.approx(3.16, abs=0.005)
    # independent: dense GLS at the brute-force REML tau2
    beta, vb = dense_gls(y, v, X, brute_reml(y, v, X))
    np.testing.assert_allclose(r.beta, beta, rtol=1e-7)
    np.testing.assert_allclose(r.se, np.sqrt(np.diag(vb)), rtol=1e-7)
    # The task brief quoted SE(ablat) = 0.0067: that is the DL fit's SE, not REML's
    assert meta_fit(y, v, X, method="DL").se[1] == pytest.approx(0.0067, abs=5e-5)


def test_blup_is_the_exact_conditional_posterior(bcg):
    """With beta flat and tau2 fixed, theta | y is normal with precision V^-1 + M / tau2,
    M = I - X (X'X)^-1 X' (beta integrated out); its mean and sd are metafor's blup."""
    y, v = bcg["y"], bcg["v"]
    for X in (np.ones((13, 1)), bcg["X"]):
        r = meta_fit(y, v, X, method="REML")
        M = np.eye(13) - X @ np.linalg.solve(X.T @ X, X.T)
        prec = np.diag(1.0 / v) + M / r.tau2
        cov = np.linalg.inv(prec)
        np.testing.assert_allclose(r.blup, cov @ (y / v), rtol=1e-9)
        np.testing.assert_allclose(r.blup_se, np.sqrt(np.diag(cov)), rtol=1e-9)


def test_knapp_hartung(bcg):
    y, v = bcg["y"], bcg["v"]
    for X in (np.ones((13, 1)), bcg["X"]):
        k, p = X.shape
        z = meta_fit(y, v, X, method="REML")
        t = meta_fit(y, v, X, method="REML", knha=True)
        s2w = dense_q(y, v, X, z.tau2) / (k - p)
        assert t.s2w == pytest.approx(s2w, rel=1e-12)
        assert t.test == "t" and t.df == k - p
        np.testing.assert_allclose(t.se, z.se * np.sqrt(s2w), rtol=1e-12)
        crit = stats.t.ppf(0.975, k - p)
        np.testing.assert_allclose(t.ci_ub - t.ci_lb, 2 * crit * t.se, rtol=1e-12)
        np.testing.assert_allclose(t.pval, 2 * stats.t.sf(np.abs(t.beta / t.se), k - p), rtol=1e-12)


def test_prediction_intervals(bcg):
    y, v = bcg["y"], bcg["v"]
    r = meta_fit(y, v, method="REML")
    half = np.sqrt(r.se[0] ** 2 + r.tau2)
    # metafor default: normal quantile, sqrt(se^2 + tau2)
    assert r.pi_lb == pytest.approx(r.beta[0] - stats.norm.ppf(0.975) * half, rel=1e-12)
    assert r.pi_ub == pytest.approx(r.beta[0] + stats.norm.ppf(0.975) * half, rel=1e-12)
    # metafor predict(res, transf = exp, digits = 2): pi 0.15 .. 1.55 (rounding: 0.005)
    assert np.exp(r.pi_lb) == pytest.approx(0.15, abs=0.005)
    assert np.exp(r.pi_ub) == pytest.approx(1.55, abs=0.005)
    # Higgins, Thompson & Spiegelhalter (2009): t with k - 2 df
    assert r.pi_hts_lb == pytest.approx(r.beta[0] - stats.t.ppf(0.975, 11) * half, rel=1e-12)
    assert r.pi_hts_ub == pytest.approx(r.beta[0] + stats.t.ppf(0.975, 11) * half, rel=1e-12)
    # under Knapp-Hartung the default interval uses t with k - p df
    rk = meta_fit(y, v, method="REML", knha=True)
    half_k = np.sqrt(rk.se[0] ** 2 + rk.tau2)
    assert rk.pi_ub == pytest.approx(rk.beta[0] + stats.t.ppf(0.975, 12) * half_k, rel=1e-12)
    # with moderators the fit has none; meta_predict gives them at chosen rows
    rm = meta_fit(y, v, bcg["X"], method="REML")
    assert np.isnan(rm.pi_lb)
    pr = meta_predict(rm, [[1.0, 10.0], [1.0, 50.0]])
    x0 = np.array([[1.0, 10.0], [1.0, 50.0]])
    se0 = np.sqrt(np.einsum("ij,jk,ik->i", x0, rm.vcov, x0))
    np.testing.assert_allclose(pr.pred, x0 @ rm.beta, rtol=1e-12)
    np.testing.assert_allclose(
        pr.pi_hts_ub, x0 @ rm.beta + stats.t.ppf(0.975, 10) * np.sqrt(se0**2 + rm.tau2), rtol=1e-12
    )
    with pytest.raises(InputError, match="columns"):
        meta_predict(rm, [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------
# eight schools
# ----------------------------------------------------------------------------


def test_eight_schools_complete_pooling_and_zero_tau2(schools):
    y, v = schools["y"], schools["v"]
    fits = {m: meta_fit(y, v, method=m) for m in METHODS}
    # BDA3 section 5.5: complete pooling 7.7 (SE 4.1), printed to 1 decimal
    w = 1.0 / v
    mu_fe = np.sum(w * y) / np.sum(w)
    assert mu_fe == pytest.approx(7.7, abs=0.05)
    assert 1.0 / np.sqrt(np.sum(w)) == pytest.approx(4.1, abs=0.05)
    r = fits["REML"]
    assert r.Q == pytest.approx(np.sum(w * (y - mu_fe) ** 2), rel=1e-12)
    assert (round(r.Q, 1), r.Q_df) == (4.7, 7)
    # Q < k - 1 (and < k), so DL, PM, HS are 0 by their formulas; ML and REML are
    # 0 because the likelihoods decrease from tau2 = 0 (next test)
    for m in ("DL", "PM", "ML", "REML", "HS"):
        f = fits[m]
        assert f.tau2 == 0.0 and f.boundary, m
        # tau2 = 0: every estimator gives the inverse-variance (complete-pooling) mean
        assert f.beta[0] == pytest.approx(mu_fe, rel=1e-12), m
        assert f.se[0] == pytest.approx(1.0 / np.sqrt(np.sum(w)), rel=1e-12), m
        assert f.I2 == 0.0 and f.H2 == 1.0
        np.testing.assert_allclose(f.blup, mu_fe, rtol=1e-12)  # full shrinkage
    # SJ is tau0 * QE(tau0) / (k - 1) > 0 whenever the y differ: it never gives 0
    sj = fits["SJ"]
    tau0 = np.var(y)
    assert sj.tau2 == pytest.approx(tau0 * dense_q(y, v, np.ones((8, 1)), tau0) / 7, rel=1e-12)
    assert sj.tau2 > 0 and not sj.boundary
    # Q-profile: Q(0) = 4.7 < chi2_7(0.975) = 16.0, so the lower bound is 0
    assert r.tau2_ci_lb == 0.0
    assert dense_q(y, v, np.ones((8, 1)), r.tau2_ci_ub) == pytest.approx(
        stats.chi2.ppf(0.025, 7), rel=1e-10
    )


def test_eight_schools_likelihoods_peak_at_zero(schools):
    y, v = schools["y"], schools["v"]
    X = np.ones((8, 1))
    # both scores are negative at 0, and the brute-force maximiser sits on the bound
    assert dense_score(y, v, X, 0.0, reml=True) < 0
    assert dense_score(y, v, X, 0.0, reml=False) < 0
    assert brute_reml(y, v, X, upper=500.0) < 1e-6  # bounded Brent stops within xatol of 0


# ----------------------------------------------------------------------------
# agreement where theory says so
# ----------------------------------------------------------------------------


def test_balanced_variances_closed_forms():
    """Equal v: DL = PM = REML = max(0, s^2 - v); ML = HS = max(0, (k-1) s^2 / k - v)."""
    rng = derive_rng(20240601, "test_meta", "balanced")
    k, vv = 9, 0.5
    y = rng.normal(1.0, np.sqrt(vv + 0.8), size=k)
    v = np.full(k, vv)
    s2 = np.var(y, ddof=1)
    assert s2 > vv  # the closed forms are then positive and informative
    for f in (tau2_dl, tau2_pm, tau2_reml):
        assert f(y, v) == pytest.approx(s2 - vv, rel=1e-9)
    for f in (tau2_ml, tau2_hs):
        assert f(y, v) == pytest.approx((k - 1) / k * s2 - vv, rel=1e-9)
    # all equal to zero when s^2 < v
    y0 = 1.0 + 0.1 * (y - y.mean())
    for f in (tau2_dl, tau2_pm, tau2_reml, tau2_ml, tau2_hs):
        assert f(y0, v) == 0.0


def test_two_studies_closed_forms():
    """k = 2: DL, PM and REML all equal max(0, (d^2 - v1 - v2) / 2), d = y1 - y2, and
    the Q-profile bounds solve d^2 / (v1 + v2 + 2 tau2) = chi2_1 quantile."""
    y, v = np.array([0.3, -0.9]), np.array([0.05, 0.2])
    d2 = (y[0] - y[1]) ** 2
    closed = (d2 - v.sum()) / 2
    assert closed > 0
    for f in (tau2_dl, tau2_pm, tau2_reml):
        assert f(y, v) == pytest.approx(closed, rel=1e-9)
    lb, ub = q_profile_ci(y, v)
    assert lb == pytest.approx(max(0.0, (d2 / stats.chi2.ppf(0.975, 1) - v.sum()) / 2), abs=1e-12)
    assert ub == pytest.approx((d2 / stats.chi2.ppf(0.025, 1) - v.sum()) / 2, rel=1e-9)
    r = meta_fit(y, v, method="DL")
    assert np.isnan(r.pi_hts_lb)  # t with k - 2 = 0 df does not exist


def test_large_k_is_linear_and_consistent():
    """k = 40000 would need a 12 GB k x k matrix; the O(k) fit recovers the truth."""
    rng = derive_rng(20240601, "test_meta", "large_k")
    k, tau2, mu = 40_000, 0.04, 0.3
    v = rng.uniform(0.01, 0.1, size=k)
    y = rng.normal(mu, np.sqrt(v + tau2))
    r = meta_fit(y, v, method="REML")
    # within 4 standard errors of the truth (fixed seed; 4 SE fails 6e-5 of seeds)
    assert abs(r.tau2 - tau2) < 4 * r.se_tau2
    assert abs(r.beta[0] - mu) < 4 * r.se[0]


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "v", "X", "match"),
    [
        ([1.0, 2.0, 3.0], [0.1, 0.0, 0.2], None, "study 1"),
        ([1.0, 2.0, 3.0], [0.1, -0.2, 0.2], None, "must be finite and > 0"),
        ([1.0, 2.0, 3.0], [0.1, np.nan, 0.2], None, "sampling variance"),
        ([1.0, np.inf, 3.0], [0.1, 0.1, 0.2], None, "not finite"),
        ([1.0], [0.1], None, "at least 2 studies"),
        ([1.0, 2.0], [0.1, 0.2, 0.3], None, "y has 2 studies but v has 3"),
        ([1.0, 2.0, 3.0], [0.1, 0.1, 0.2], np.ones((2, 1)), "X has 2 rows"),
        ([1.0, 2.0], [0.1, 0.1], np.array([[1.0, 0.0], [1.0, 1.0]]), "need k > p"),
        ([1.0, 2.0, 3.0], [0.1, 0.1, 0.2], np.array([[1.0, 2.0]] * 3), "rank deficient"),
    ],
)
def test_input_errors_are_one_clear_line(y, v, X, match):
    with pytest.raises(InputError, match=match) as exc:
        meta_fit(y, v, X)
    assert "\n" not in str(exc.value)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown tau2 method"):
        meta_fit([1.0, 2.0, 3.0], [0.1, 0.1, 0.1], method="EB")
    with pytest.raises(ConfigError, match="level"):
        meta_fit([1.0, 2.0, 3.0], [0.1, 0.1, 0.1], level=95)


# ----------------------------------------------------------------------------
# exact Bayes (BDA3 5.4-5.5)
# ----------------------------------------------------------------------------

# brute-force grid over the full joint (mu, tau) for the eight schools. Its own
# error: tau is cut at 300 (posterior mass beyond is 1e-8 under the flat prior,
# adding < 2e-5 relative to E[tau^2]); the trapezoid steps are 0.1 in tau and
# 0.25 in mu, against posterior SDs >= 4: both well below 1e-4 relative.
BF_TAU = np.linspace(0.0, 300.0, 3001)
BF_MU = np.linspace(-250.0, 265.0, 2061)


@pytest.fixture(scope="module")
def joint_likelihood(schools) -> np.ndarray:
    """prod_j N(y_j | mu, v_j + tau^2) on BF_TAU x BF_MU, written from the definition."""
    y, v = schools["y"], schools["v"]
    out = np.empty((BF_TAU.size, BF_MU.size))
    for i in range(0, BF_TAU.size, 250):
        t = BF_TAU[i : i + 250]
        tot = v[None, None, :] + t[:, None, None] ** 2
        r2 = (y[None, None, :] - BF_MU[None, :, None]) ** 2
        out[i : i + 250] = np.exp(-0.5 * (np.log(2 * np.pi * tot) + r2 / tot).sum(axis=-1))
    return out


def brute_summaries(lik: np.ndarray, prior: np.ndarray, upper: float = np.inf) -> dict[str, object]:
    # a bounded prior ends the tau integrals at its bound (a node of BF_TAU): an
    # indicator inside the trapezoid rule would add half a cell beyond it
    keep = BF_TAU <= upper
    tau = BF_TAU[keep]
    joint = lik[keep] * prior[keep, None]
    p_tau = np.trapezoid(joint, BF_MU, axis=1)
    z = np.trapezoid(p_tau, tau)
    dens = p_tau / z
    p_mu = np.trapezoid(joint, tau, axis=0) / z
    e_tau = np.trapezoid(tau * dens, tau)
    e_mu = np.trapezoid(BF_MU * p_mu, BF_MU)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(tau))])
    return {
        "tau": tau,
        "density": dens,
        "tau_mean": e_tau,
        "tau_sd": np.sqrt(np.trapezoid(tau**2 * dens, tau) - e_tau**2),
        "tau_median": np.interp(0.5, cdf, tau),
        "mu_mean": e_mu,
        "mu_sd": np.sqrt(np.trapezoid(BF_MU**2 * p_mu, BF_MU) - e_mu**2),
    }


@pytest.mark.parametrize(
    ("prior", "scale"),
    [("uniform", None), ("uniform", 20.0), ("half_cauchy", 25.0), ("half_normal", 10.0)],
)
def test_tau_posterior_matches_brute_force_joint(schools, joint_likelihood, prior, scale):
    y, v = schools["y"], schools["v"]
    if prior == "uniform":
        prior_on_grid = np.ones_like(BF_TAU)
    elif prior == "half_cauchy":
        prior_on_grid = 1.0 / (1.0 + (BF_TAU / scale) ** 2)
    else:
        prior_on_grid = np.exp(-0.5 * (BF_TAU / scale) ** 2)
    upper = scale if prior == "uniform" and scale is not None else np.inf
    assert upper == np.inf or np.any(BF_TAU == upper)  # the bound is a brute-force node
    ref = brute_summaries(joint_likelihood, prior_on_grid, upper)
    post = posterior_tau_grid(y, v, prior, scale)
    # brute force is good to ~2e-5 relative (see BF_TAU); 1e-4 leaves margin
    for name, ours in (
        ("tau_mean", post.mean),
        ("tau_sd", post.sd),
        ("tau_median", float(post.quantile(0.5))),
        ("mu_mean", post.mu_mean),
        ("mu_sd", post.mu_sd),
    ):
        assert ours == pytest.approx(ref[name], rel=1e-4), name
    # the marginal density itself, on our grid's span and where it is not negligible
    tau = ref["tau"]
    inside = (tau <= min(60.0, post.upper)) & (ref["density"] > 1e-9 * ref["density"].max())
    np.testing.assert_allclose(
        np.interp(tau[inside], post.grid, post.density), ref["density"][inside], rtol=1e-4
    )
    assert post.cdf[0] == 0.0 and post.cdf[-1] == 1.0 and np.all(np.diff(post.cdf) >= 0)


def test_bda3_eight_schools_uniform_prior(schools):
    y, v = schools["y"], schools["v"]
    post = posterior_tau_grid(y, v, "uniform")
    # BDA3 5.5 (Fig. 5.5, Table 5.3; summaries of 200 draws, rounded): p(tau | y)
    # is largest at tau = 0, its median is about 5 (MC SE of a 200-draw median
    # ~0.5, so allow 1), mu has mean about 8 and sd about 5 (rounded to integers)
    assert post.grid[np.argmax(post.density)] == 0.0
    assert float(post.quantile(0.5)) == pytest.approx(5.0, abs=1.0)
    assert post.mu_mean == pytest.approx(8.0, abs=0.5)
    assert post.mu_sd == pytest.approx(5.0, abs=0.5)
    # mu's quantiles invert its mixture CDF
    q = post.mu_quantile(0.975)
    assert post.mu_cdf(q) == pytest.approx(0.975, abs=1e-12)
    # school A is shrunk from 28 towards the pooled mean, but stays above it (BDA3 Table 5.3)
    assert post.mu_mean < post.theta_mean[0] < 28.0


def test_exact_draws_agree_with_the_grid(schools):
    y, v = schools["y"], schools["v"]
    n = 200_000
    post = posterior_tau_grid(y, v, "uniform")
    draws = draw_meta_posterior(post, n, derive_rng(20240601, "test_meta", "draws"))
    assert draws["tau"].shape == (n,) and draws["theta"].shape == (n, 8)
    # independent draws: the mean's MC SE is sd / sqrt(n); 4 SE (fixed seed, a
    # false alarm for 6e-5 of seeds per check)
    se = 1.0 / np.sqrt(n)
    assert abs(draws["tau"].mean() - post.mean) < 4 * post.sd * se
    assert abs(draws["mu"].mean() - post.mu_mean) < 4 * post.mu_sd * se
    assert np.all(np.abs(draws["theta"].mean(axis=0) - post.theta_mean) < 4 * post.theta_sd * se)
    # sample sds: SE ~ sd sqrt((kurtosis - 1) / 4n); tau's kurtosis is ~ 9 here, so 6 SE
    # of the normal-theory value sd / sqrt(2n) is about 4 SE of the true one
    assert abs(draws["tau"].std() - post.sd) < 6 * post.sd / np.sqrt(2 * n)
    assert abs(draws["mu"].std() - post.mu_sd) < 6 * post.mu_sd / np.sqrt(2 * n)
    np.testing.assert_array_less(
        np.abs(draws["theta"].std(axis=0) - post.theta_sd), 6 * post.theta_sd / np.sqrt(2 * n)
    )
    # whole distribution of tau: Kolmogorov-Smirnov against the grid CDF at the
    # 0.1% critical value 1.95 / sqrt(n)
    ts = np.sort(draws["tau"])
    cdf = np.interp(ts, post.grid, post.cdf)
    ecdf = np.arange(1, n + 1) / n
    assert np.max(np.maximum(ecdf - cdf, cdf - (ecdf - 1.0 / n))) < 1.95 / np.sqrt(n)
    # same generator state, same draws
    again = sample_meta_posterior(y, v, "uniform", None, 1000, derive_rng(1, "x"))
    once = sample_meta_posterior(y, v, "uniform", None, 1000, derive_rng(1, "x"))
    np.testing.assert_array_equal(again["theta"], once["theta"])


def test_bayes_configuration_errors(schools):
    y, v = schools["y"], schools["v"]
    with pytest.raises(ConfigError, match="improper"):
        posterior_tau_grid(y[:2], v[:2], "uniform")
    assert posterior_tau_grid(y[:2], v[:2], "uniform", 50.0).upper == pytest.approx(50.0)
    assert posterior_tau_grid(y[:2], v[:2], "half_cauchy", 5.0).mean > 0
    with pytest.raises(ConfigError, match="needs a scale"):
        posterior_tau_grid(y, v, "half_normal")
    with pytest.raises(ConfigError, match="unknown prior"):
        posterior_tau_grid(y, v, "inverse_gamma", 1.0)
    with pytest.raises(ConfigError, match="scale"):
        posterior_tau_grid(y, v, "half_cauchy", -1.0)
    with pytest.raises(InputError):
        posterior_tau_grid(y, np.zeros(8), "half_cauchy", 1.0)
