"""Numerical reference tests of the one-factor LMM engine (hierpipe.models.lmm).

References used: closed forms of the balanced one-way layout (Searle, Casella &
McCulloch 1992, ch. 3), a brute-force dense evaluation of the (restricted)
likelihood with V = Z Sigma Z' + sigma^2 I, and statsmodels MixedLM.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from hierpipe.errors import ConfigError, InputError, MethodError
from hierpipe.models import lmm
from hierpipe.models.lmm import (
    _newton_polish,
    _Objective,
    _one_way_criterion,
    _one_way_derivative,
    _OneWay,
    canonical_theta,
    criterion,
    criterion_gradient,
    fit_lmm,
    fit_lmm_from_stats,
    one_way_reml,
)
from hierpipe.models.suffstats_lmm import lmm_suffstats, one_way_stats

# --------------------------------------------------------------------------------------
# data and independent references


def slope_data(seed: int, n_groups: int = 40, cor: float = 0.4, sd_slope: float = 0.5):
    """Unbalanced groups (2..14 rows), a correlated varying intercept and slope."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 15, n_groups)
    codes = np.repeat(np.arange(n_groups), sizes)
    n = codes.size
    x = rng.normal(size=n)
    cov = np.array([[1.0, cor * sd_slope], [cor * sd_slope, sd_slope**2]])
    b = rng.multivariate_normal([0.0, 0.0], cov, n_groups)
    y = 1.0 + 0.5 * x + b[codes, 0] + b[codes, 1] * x + rng.normal(scale=0.8, size=n)
    X = np.column_stack([np.ones(n), x])
    return X, X.copy(), y, codes, n_groups


def factor_from_theta(theta: np.ndarray, q: int) -> np.ndarray:
    """lme4's theta order written out by hand: lower triangle, column by column."""
    lam = np.zeros((q, q))
    it = iter(theta)
    for col in range(q):
        for row in range(col, q):
            lam[row, col] = next(it)
    return lam


def dense_parts(X, Z, y, codes, n_groups, theta):
    """Full n x n relative covariance V = I + Z_full (I_G kron Lambda Lambda') Z_full'."""
    n, q = Z.shape
    z_full = np.zeros((n, n_groups * q))
    for k in range(q):
        z_full[np.arange(n), codes * q + k] = Z[:, k]
    lam = factor_from_theta(theta, q)
    g_rel = np.kron(np.eye(n_groups), lam @ lam.T)
    v_rel = np.eye(n) + z_full @ g_rel @ z_full.T
    return z_full, g_rel, v_rel


def dense_criterion(X, Z, y, codes, n_groups, theta, method):
    """-2 log-likelihood (ML) or restricted log-likelihood (REML), beta and sigma profiled.

    ML: the multivariate normal density at the GLS beta and sigma^2 = r'V^-1 r / n.
    REML (Harville 1977): l_R = l(beta_hat) + p/2 log 2pi - 1/2 log|X' V^-1 X|,
    with V = sigma^2 V_rel and sigma^2 = r'V_rel^-1 r / (n - p).
    """
    n, p = X.shape
    _, _, v_rel = dense_parts(X, Z, y, codes, n_groups, theta)
    vi = np.linalg.inv(v_rel)
    xtvx = X.T @ vi @ X
    beta = np.linalg.solve(xtvx, X.T @ vi @ y)
    r = y - X @ beta
    sigma2 = (r @ vi @ r) / (n - p if method == "REML" else n)
    ll = sps.multivariate_normal(X @ beta, sigma2 * v_rel).logpdf(y)
    if method == "REML":
        ll += 0.5 * p * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(xtvx / sigma2)[1]
    return -2.0 * ll


# --------------------------------------------------------------------------------------
# (3) brute-force dense checks


def small_data(q: int, with_intercept: bool):
    """Twelve groups of 1..6 rows; Z has q columns (1, x, x^2), X may lack an intercept."""
    rng = np.random.default_rng(7 + q)
    sizes = rng.integers(1, 7, 12)
    codes = np.repeat(np.arange(12), sizes)
    n = codes.size
    x = rng.normal(size=n)
    Z = np.column_stack([np.ones(n), x, x**2])[:, :q]
    X = np.column_stack([np.ones(n), x]) if with_intercept else np.column_stack([x, x**2])
    y = 3.0 + x + rng.normal(size=12)[codes] + 0.5 * rng.normal(size=12)[codes] * x
    y += rng.normal(scale=0.5, size=n)
    return X, Z, y, codes, 12


THETAS = {
    1: [np.array([1.0]), np.array([0.3]), np.array([0.0])],
    2: [np.array([1.0, 0.0, 1.0]), np.array([0.5, -0.3, 0.2]), np.array([2.0, 1.0, 0.0])],
    3: [np.array([1.0, 0.2, -0.1, 0.7, 0.3, 0.4]), np.array([0.5, 0.0, 0.0, 0.0, 0.0, 0.0])],
}


@pytest.mark.parametrize("method", ["ML", "REML"])
@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("with_intercept", [True, False])
def test_criterion_equals_dense_likelihood(method, q, with_intercept):
    X, Z, y, codes, g = small_data(q, with_intercept)
    stats = lmm_suffstats(X, Z, y, codes, g)
    for theta in THETAS[q]:
        # Both sides are exact formulas for the same number (|value| ~ 100); what
        # separates them is rounding in O(n)-term log-determinants, ~1e-12.
        assert criterion(stats, theta, method) == pytest.approx(
            dense_criterion(X, Z, y, codes, g, theta, method), abs=1e-8
        )


@pytest.mark.parametrize("method", ["ML", "REML"])
@pytest.mark.parametrize("q", [1, 2, 3])
def test_gradient_matches_finite_differences(method, q):
    X, Z, y, codes, g = small_data(q, True)
    stats = lmm_suffstats(X, Z, y, codes, g)
    h = 1e-5
    for theta in THETAS[q]:
        exact = criterion_gradient(stats, theta, method)
        fd = np.array(
            [
                (criterion(stats, theta + e, method) - criterion(stats, theta - e, method))
                / (2 * h)
                for e in h * np.eye(theta.size)
            ]
        )
        # Central differences: truncation ~h^2 |f'''| ~ 1e-9, rounding ~1e-16 |f| / h ~ 1e-9.
        np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_fit_quantities_equal_dense_formulas(method):
    """beta, vcov, sigma, conditional modes and SDs against dense GLS/BLUP algebra."""
    X, Z, y, codes, g = small_data(2, True)
    fit = fit_lmm(X, Z, y, codes, g, method=method)
    n, p = X.shape
    z_full, g_rel, v_rel = dense_parts(X, Z, y, codes, g, fit.theta)
    vi = np.linalg.inv(v_rel)
    xtvx = X.T @ vi @ X
    beta = np.linalg.solve(xtvx, X.T @ vi @ y)
    r = y - X @ beta
    sigma2 = (r @ vi @ r) / (n - p if method == "REML" else n)
    # Henderson: b_hat = G Z' V^-1 (y - X beta); Var(b | y, beta) = G - G Z' V^-1 Z G;
    # with beta estimated, P = V^-1 - V^-1 X (X'V^-1X)^-1 X' V^-1 replaces V^-1.
    g_cov = sigma2 * g_rel
    v_inv = vi / sigma2
    proj = v_inv - v_inv @ X @ np.linalg.solve(X.T @ v_inv @ X, X.T @ v_inv)
    b_hat = g_cov @ z_full.T @ v_inv @ r
    cond = g_cov - g_cov @ z_full.T @ v_inv @ z_full @ g_cov
    pev = g_cov - g_cov @ z_full.T @ proj @ z_full @ g_cov
    # Same quantities, block-diagonal algebra vs dense inverses of a ~40x40 V: agree to
    # rounding, ~1e-12 relative; 1e-9 leaves room for the conditioning of V.
    tol = {"rtol": 1e-9, "atol": 1e-11}
    np.testing.assert_allclose(fit.beta, beta, **tol)
    np.testing.assert_allclose(fit.sigma**2, sigma2, **tol)
    np.testing.assert_allclose(fit.beta_cov, sigma2 * np.linalg.inv(xtvx), **tol)
    np.testing.assert_allclose(fit.b_hat, b_hat.reshape(g, 2), **tol)
    np.testing.assert_allclose(fit.b_sd, np.sqrt(np.diag(cond)).reshape(g, 2), **tol)
    np.testing.assert_allclose(fit.b_sd_total, np.sqrt(np.diag(pev)).reshape(g, 2), **tol)
    assert fit.objective == pytest.approx(dense_criterion(X, Z, y, codes, g, fit.theta, method))
    # The dense log-likelihood at (theta, beta, sigma) is loglik, for REML fits too.
    ll = sps.multivariate_normal(X @ beta, sigma2 * v_rel).logpdf(y)
    assert fit.loglik == pytest.approx(ll, rel=1e-12)
    assert fit.deviance == pytest.approx(-2 * ll, rel=1e-12)
    assert fit.converged


# --------------------------------------------------------------------------------------
# (1) balanced one-way closed forms and (4) its boundary


def balanced(k: int, n: int, between_sd: float, seed: int):
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(k), n)
    y = 5.0 + between_sd * rng.normal(size=k)[codes] + rng.normal(size=k * n)
    return y, codes


def anova(y, codes, k, n):
    ybar = np.bincount(codes, y) / n
    msw = np.sum((y - ybar[codes]) ** 2) / (k * (n - 1))
    msb = n * np.sum((ybar - ybar.mean()) ** 2) / (k - 1)
    return ybar, msw, msb


def one_way_fits(y, codes, k, method):
    """The general engine on (X = Z = 1) and the shortcut on group summaries."""
    ones = np.ones((y.size, 1))
    general = fit_lmm(
        ones, ones, y, codes, k, method=method, coef_names=["Intercept"], group_name="g"
    )
    n = np.bincount(codes)
    ybar = np.bincount(codes, y) / n
    ss = np.bincount(codes, (y - ybar[codes]) ** 2)
    return general, one_way_reml(n, ybar, ss, method, group_name="g")


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_balanced_one_way_closed_form(method):
    k, n = 10, 6
    y, codes = balanced(k, n, between_sd=1.0, seed=3)
    ybar, msw, msb = anova(y, codes, k, n)
    # Searle, Casella & McCulloch (1992) sec. 3.7 (ML) and 3.8 (REML), balanced case.
    tau2 = ((msb - msw) / n) if method == "REML" else (((k - 1) / k * msb - msw) / n)
    assert tau2 > 0.1  # interior, so the closed forms apply
    shrink = n * tau2 / (msw + n * tau2)
    for fit in one_way_fits(y, codes, k, method):
        # The optimum is found to a Newton step < 1e-4 (theta units) and then
        # polished to ~1e-9; 1e-7 is well above that and well below any real error.
        assert fit.sigma**2 == pytest.approx(msw, rel=1e-7)
        assert fit.sds[0] ** 2 == pytest.approx(tau2, rel=1e-7)
        assert fit.beta[0] == pytest.approx(y.mean(), rel=1e-12)
        # Var(grand mean) = (sigma^2 + n tau^2) / (k n), which is MSB/(kn) under REML.
        assert fit.beta_se[0] ** 2 == pytest.approx((msw + n * tau2) / (k * n), rel=1e-7)
        np.testing.assert_allclose(fit.b_hat[:, 0], shrink * (ybar - y.mean()), rtol=1e-7)
        np.testing.assert_allclose(fit.b_sd[:, 0] ** 2, tau2 * msw / (msw + n * tau2), rtol=1e-7)
        assert fit.boundary == ()
        assert not fit.singular
        assert fit.converged


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_one_way_negative_moments_estimate_is_flagged_at_zero(method):
    k, n = 8, 5
    y, codes = balanced(k, n, between_sd=0.0, seed=5)
    # Pull the group means towards the grand mean so that MSB < MSW for sure.
    ybar = np.bincount(codes, y) / n
    y = y - 0.9 * (ybar - ybar.mean())[codes]
    _, msw, msb = anova(y, codes, k, n)
    assert msb < msw
    sigma2 = np.sum((y - y.mean()) ** 2) / (k * n - (1 if method == "REML" else 0))
    for fit in one_way_fits(y, codes, k, method):
        assert fit.sds[0] == 0.0
        assert fit.boundary == ("sd_g__Intercept estimated at 0",)
        assert fit.singular
        assert fit.converged
        # At tau = 0 the model is iid normal: sigma^2 is the total SS over n (ML) or n - 1.
        assert fit.sigma**2 == pytest.approx(sigma2, rel=1e-12)


def test_slope_sd_zero_is_flagged():
    """Group-centred x and every group's least-squares slope equal: sd_g__x = 0.

    With x centred in each group, Z_g'Z_g is diagonal and the slopes carry no
    information about the intercepts; identical observed slopes vary less than
    noise alone would make them, so the slope SD is estimated at its boundary.
    (Without centring the optimum may instead be cor = +1 with a small slope SD.)
    """
    X, Z, y, codes, g = slope_data(21, n_groups=30)
    xbar = np.bincount(codes, X[:, 1]) / np.bincount(codes)
    xc = X[:, 1] - xbar[codes]
    X = np.column_stack([np.ones(y.size), xc])
    Z = X.copy()
    slope_g = np.bincount(codes, xc * y) / np.bincount(codes, xc**2)
    y = y + (0.5 - slope_g[codes]) * xc
    for method in ("ML", "REML"):
        fit = fit_lmm(X, Z, y, codes, g, method=method, coef_names=["Intercept", "x"])
        assert fit.sds[1] == 0.0
        assert "sd_g__x estimated at 0" in fit.boundary
        assert fit.singular and fit.converged
        # A boundary optimum: moving off it anywhere does not lower the criterion.
        stats = lmm_suffstats(X, Z, y, codes, g)
        rng = np.random.default_rng(0)
        for d in rng.normal(size=(20, 3)) * 1e-3:
            assert criterion(stats, fit.theta + d, method) >= fit.objective - 1e-10


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_correlation_at_one_is_flagged(sign):
    """This simulated set's REML and ML optima have cor = +1 (Sigma of rank one);
    with x replaced by -x the slope, and so the correlation, changes sign."""
    rng = np.random.default_rng(1)
    sizes = rng.integers(2, 12, 30)
    codes = np.repeat(np.arange(30), sizes)
    x = rng.normal(size=codes.size) + 3
    b = rng.multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 0.25]], 30)
    y = 10 + 2 * x + b[codes, 0] + b[codes, 1] * x + rng.normal(scale=0.7, size=codes.size)
    X = np.column_stack([np.ones(codes.size), sign * x])
    stats = lmm_suffstats(X, X, y, codes, 30)
    expected = "cor_g__Intercept__x estimated at " + ("+1" if sign > 0 else "-1")
    for method in ("ML", "REML"):
        fit = fit_lmm_from_stats(stats, method=method, coef_names=["Intercept", "x"])
        assert fit.boundary == (expected,)
        assert fit.cor[0, 1] == pytest.approx(sign, abs=1e-12)
        assert fit.theta[2] == 0.0 and fit.singular and fit.converged
        # Off the boundary (theta[2] != 0 makes |cor| < 1) the criterion is not lower.
        for t in (1e-6, 1e-4, 1e-2, -1e-3):
            assert (
                criterion(stats, fit.theta + np.array([0, 0, t]), method) >= fit.objective - 1e-10
            )


# --------------------------------------------------------------------------------------
# (2) statsmodels MixedLM


def statsmodels_best(y, x, codes, reml):
    """statsmodels' fit with the highest likelihood over several optimisers."""
    import statsmodels.formula.api as smf

    df = pd.DataFrame({"y": y, "x": x, "g": codes})
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for opt in ("lbfgs", "powell"):
            res = smf.mixedlm("y ~ x", df, groups="g", re_formula="~x").fit(reml=reml, method=opt)
            if best is None or res.llf > best.llf:
                best = res
    return best


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_against_statsmodels_mixedlm(method):
    X, Z, y, codes, g = slope_data(11, n_groups=80)
    fit = fit_lmm(X, Z, y, codes, g, method=method, coef_names=["Intercept", "x"])
    sm = statsmodels_best(y, X[:, 1], codes, method == "REML")
    stats = lmm_suffstats(X, Z, y, codes, g)
    rel = sm.cov_re.to_numpy() / sm.scale
    chol = np.linalg.cholesky(rel)
    theta_sm = np.array([chol[0, 0], chol[1, 0], chol[1, 1]])
    # Same criterion: ours at statsmodels' estimates is statsmodels' own -2 llf
    # (same constants; statsmodels also profiles beta and the scale). Rounding only.
    assert criterion(stats, theta_sm, method) == pytest.approx(-2 * sm.llf, abs=1e-8)
    # Ours is at least as good (rounding allowance 1e-9 on a value ~1500).
    gap = -2 * sm.llf - fit.objective
    assert gap >= -1e-9
    # statsmodels stops within 1e-6 of the optimum here (measured ~1e-9) ...
    assert gap < 1e-6
    # ... so its theta lies within sqrt(2 gap / lambda_min(H)) of ours (quadratic
    # model of the criterion; factor 2 for its error), H our Hessian at the optimum.
    hess = np.array(
        fit.convergence["attempts"][fit.convergence["chosen_attempt"]]["checks"]["hessian"]
    )
    radius = 2 * np.sqrt(2 * max(gap, 0.0) / np.linalg.eigvalsh(hess)[0]) + 1e-8
    assert np.linalg.norm(theta_sm - fit.theta) <= radius
    # Parameters follow theta smoothly; with |d theta| < 2e-5 (measured) they agree to
    # ~1e-5 relative, so 1e-4 is the optimiser tolerance, not slack for a bias.
    sds = np.sqrt(np.diag(sm.cov_re.to_numpy()))
    np.testing.assert_allclose(fit.beta, sm.fe_params.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(fit.sds, sds, rtol=1e-4)
    assert fit.cor[0, 1] == pytest.approx(sm.cov_re.to_numpy()[0, 1] / sds.prod(), abs=1e-4)
    assert fit.sigma == pytest.approx(np.sqrt(sm.scale), rel=1e-4)
    # beta_se is not compared: statsmodels takes it from the observed information of
    # all parameters, lme4 and we from sigma^2 (X'V^-1X)^-1 (checked against dense
    # algebra in test_fit_quantities_equal_dense_formulas); they differ by ~0.1% here.
    assert fit.converged and fit.boundary == ()


# --------------------------------------------------------------------------------------
# (5) the one-way shortcut


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_one_way_shortcut_agrees_with_general_engine(method):
    rng = np.random.default_rng(17)
    sizes = rng.integers(1, 25, 40)
    codes = np.repeat(np.arange(40), sizes)
    y = 100.0 + 0.7 * rng.normal(size=40)[codes] + rng.normal(size=codes.size)
    general, short = one_way_fits(y, codes, 40, method)
    # Both optimise the same criterion to ~1e-9 in theta; the brief asks for 1e-6.
    for name in ("beta", "beta_se", "sds", "theta", "b_hat", "b_sd", "b_sd_total"):
        np.testing.assert_allclose(getattr(short, name), getattr(general, name), rtol=1e-6)
    for name in ("sigma", "objective", "loglik", "reml_criterion"):
        assert getattr(short, name) == pytest.approx(getattr(general, name), rel=1e-6)
    assert short.converged and general.converged
    assert short.convergence["attempts"][0]["polish"] == "root of the exact derivative"


@pytest.mark.parametrize("reml", [False, True])
def test_one_way_derivative_matches_finite_differences(reml):
    """The exact derivative that pins the shortcut's optimum (after Brent)."""
    rng = np.random.default_rng(4)
    n = rng.integers(1, 12, 20).astype(float)
    ow = _OneWay(n=n, dev=rng.normal(size=20), ssw=float(np.sum(n - 1)), reml=reml)
    for ratio in (0.0, 0.05, 0.8, 7.0):
        h = 1e-6 * max(ratio, 1.0)
        lo = max(ratio - h, 0.0)
        fd = (_one_way_criterion(ow, ratio + h) - _one_way_criterion(ow, lo)) / (ratio + h - lo)
        # Central (forward at 0) differences on values ~100: error ~h f'' ~1e-6 at 0,
        # ~h^2 f3 (third derivative) elsewhere, plus rounding ~1e-14 / h ~1e-8.
        assert _one_way_derivative(ow, ratio) == pytest.approx(fd, rel=1e-5, abs=1e-5)


def test_one_way_criterion_equals_general_criterion():
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 9, 15)
    codes = np.repeat(np.arange(15), sizes)
    y = rng.normal(size=15)[codes] + rng.normal(size=codes.size)
    n = np.bincount(codes)
    ybar = np.bincount(codes, y) / n
    ss = np.bincount(codes, (y - ybar[codes]) ** 2)
    from_rows = lmm_suffstats(np.ones((y.size, 1)), np.ones((y.size, 1)), y, codes, 15)
    from_groups = one_way_stats(n, ybar, ss)
    for theta in (0.0, 0.2, 1.0, 5.0):
        for method in ("ML", "REML"):
            # Same exact formula from two routes to the statistics: rounding only.
            assert criterion(from_groups, np.array([theta]), method) == pytest.approx(
                criterion(from_rows, np.array([theta]), method), rel=1e-12
            )


# --------------------------------------------------------------------------------------
# centring, records and input checks


def test_far_from_zero_data_fit_like_centred_data():
    """y near 1e6 and x near 1e3: the internal centring keeps every digit that matters."""
    X, Z, y, codes, g = slope_data(12, n_groups=30)
    base = fit_lmm(X, Z, y, codes, g)
    X2 = np.column_stack([np.ones(y.size), X[:, 1] + 1000.0])
    # Same model (Z unchanged) written as y + 1e6 on x + 1000:
    # b_Intercept' = b_Intercept + 1e6 - 1000 b_x, b_x' = b_x.
    shifted = fit_lmm(X2, Z, y + 1e6, codes, g)
    # Data near 1e6 carry rounding ~1e-10 each; 1e-9 relative is 1e-3 absolute on 1e6.
    assert shifted.beta[0] == pytest.approx(base.beta[0] + 1e6 - 1000 * base.beta[1], rel=1e-9)
    # The rest is computed from centred statistics, so only the optimiser's ~1e-9 remains.
    assert shifted.beta[1] == pytest.approx(base.beta[1], rel=1e-7)
    np.testing.assert_allclose(shifted.sds, base.sds, rtol=1e-7)
    np.testing.assert_allclose(shifted.b_hat, base.b_hat, rtol=1e-6, atol=1e-9)
    assert shifted.sigma == pytest.approx(base.sigma, rel=1e-7)
    assert shifted.objective == pytest.approx(base.objective, rel=1e-9)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_newton_polish_converges_from_nearby(method):
    """The polish (a safeguard for an early L-BFGS-B stop) reaches the optimum quadratically."""
    X, Z, y, codes, g = slope_data(15, n_groups=60)
    fit = fit_lmm(X, Z, y, codes, g, method=method)
    obj = _Objective(lmm_suffstats(X, Z, y, codes, g), method == "REML")
    start = fit.theta + np.array([2e-2, -2e-2, 2e-2])
    theta, f, record = _newton_polish(obj, start, obj.value(start))
    assert record["steps"] >= 2
    # From 3e-2 away, Newton steps square the error down to the noise floor of the
    # finite-difference Hessian (~1e-8 in theta), well inside 1e-6.
    np.testing.assert_allclose(theta, fit.theta, atol=1e-6)
    assert f == pytest.approx(fit.objective, abs=1e-9)


def test_early_optimiser_stop_is_recorded_and_rescued_by_the_polish(monkeypatch):
    X, Z, y, codes, g = slope_data(11, n_groups=80)
    reference = fit_lmm(X, Z, y, codes, g)
    monkeypatch.setitem(lmm.LBFGS_OPTIONS, "maxiter", 1)
    fit = fit_lmm(X, Z, y, codes, g)
    (attempt,) = fit.convergence["attempts"]
    assert not attempt["success"] and "ITERATIONS" in attempt["message"]
    assert attempt["polish"]["steps"] >= 3 and fit.converged
    # Both end at the optimum to the finite-difference noise floor (~1e-8 in theta).
    np.testing.assert_allclose(fit.theta, reference.theta, atol=1e-6)


def test_failed_checks_trigger_one_recorded_nelder_mead_attempt(monkeypatch):
    X, Z, y, codes, g = slope_data(11, n_groups=80)
    reference = fit_lmm(X, Z, y, codes, g)
    # Stop L-BFGS-B after one iteration and switch the polish off: the checks fail.
    monkeypatch.setitem(lmm.LBFGS_OPTIONS, "maxiter", 1)
    monkeypatch.setattr(lmm, "_newton_polish", lambda obj, theta, f: (theta, f, {}))
    fit = fit_lmm(X, Z, y, codes, g)
    first, second = fit.convergence["attempts"]
    assert not first["checks"]["passed"]
    assert second["optimizer"] == "Nelder-Mead" and fit.convergence["chosen_attempt"] == 1
    assert second["objective"] < first["objective"]
    assert fit.converged == second["checks"]["passed"]
    # Nelder-Mead (xatol 1e-10, no polish) ends 2e-8 from the optimum here (measured);
    # 1e-6 is the same allowance as for the polished path.
    np.testing.assert_allclose(fit.theta, reference.theta, atol=1e-6)


def test_canonical_form_flips_columns_and_snaps_to_the_boundary():
    X, Z, y, codes, g = slope_data(16)
    obj = _Objective(lmm_suffstats(X, Z, y, codes, g), True)
    # Negative diagonal: same Lambda Lambda', so the criterion is unchanged, diagonal >= 0.
    theta = np.array([-0.8, 0.3, -0.5])
    canon, f, record = canonical_theta(obj, theta, obj.value(theta))
    np.testing.assert_allclose(canon, [0.8, -0.3, 0.5], rtol=1e-15)
    assert not record["snapped"] and f == obj.value(canon)
    # A diagonal element below 1e-4 goes to 0 when the criterion rises < 1e-8 ...
    near = np.array([0.8, 0.3, 1e-7])
    canon, f, record = canonical_theta(obj, near, obj.value(near))
    assert record["snapped"] and canon[2] == 0.0 and canon[:2] == pytest.approx(near[:2])
    # ... and stays put when moving to the boundary would cost more.
    far = np.array([0.8, 0.3, 5e-5])
    rise = obj.value(np.array([0.8, 0.3, 0.0])) - obj.value(far)
    assert rise > 1e-8
    canon, _, record = canonical_theta(obj, far, obj.value(far))
    assert not record["snapped"] and record["criterion_change"] == pytest.approx(rise)
    np.testing.assert_array_equal(canon, far)


def test_convergence_record_is_json_and_honest():
    X, Z, y, codes, g = slope_data(13)
    fit = fit_lmm(X, Z, y, codes, g, method="ML")
    record = json.loads(json.dumps(fit.convergence))
    attempt = record["attempts"][record["chosen_attempt"]]
    assert attempt["optimizer"] == "L-BFGS-B"
    assert attempt["checks"]["passed"] is fit.converged is True
    assert attempt["checks"]["newton_step_max"] < 1e-4
    assert min(attempt["checks"]["hessian_eigenvalues"]) > 0
    assert fit.n_evaluations >= attempt["optimizer_evaluations"]


def test_bad_inputs_raise_user_errors():
    X, Z, y, codes, g = slope_data(14, n_groups=5)
    with pytest.raises(ConfigError, match="ML' or 'REML"):
        fit_lmm(X, Z, y, codes, g, method="reml")
    with pytest.raises(InputError, match="no observations"):
        fit_lmm(X, Z, y, codes, g + 1)
    with pytest.raises(InputError, match="outside"):
        fit_lmm(X, Z, y, np.where(codes == 0, -1, codes), g)
    with pytest.raises(InputError, match="rank deficient"):
        fit_lmm(np.column_stack([X, 2 * X[:, 1]]), Z, y, codes, g)
    with pytest.raises(InputError, match="non-finite value at row 3"):
        fit_lmm(X, Z, np.where(np.arange(y.size) == 3, np.nan, y), codes, g)
    with pytest.raises(InputError, match="too few"):
        fit_lmm(X, Z, y, np.arange(y.size), y.size)
    with pytest.raises(InputError, match="at least two groups"):
        fit_lmm(X, Z, y, np.zeros_like(codes), 1)
    stats = lmm_suffstats(X, Z, y, codes, g)
    two = type(stats)(**{**stats.__dict__, "terms": stats.terms * 2})
    with pytest.raises(MethodError, match="one grouping factor"):
        fit_lmm_from_stats(two)
