"""Two-level Gibbs sampler (hierpipe.models.gibbs_twolevel) against exact answers.

What is checked, and how tight:

* each full conditional against its closed form (exact, to rounding);
* the half-Cauchy auxiliary-variable updates against the exact conditional
  density (Kolmogorov-Smirnov);
* the collapsed log posterior against a direct multivariate-normal computation;
* posterior means and quantiles of every scheme against numerical integration
  on a grid (1-D with sigma known, 2-D with sigma unknown), within 4.5 Monte
  Carlo standard errors;
* simulation-based calibration (Talts et al. 2018) with 1000 replications
  carried on the chain axis;
* recovery of a schools-like truth, mixing in the weak-data regime,
  determinism, block-size invariance and numpy/numba agreement.

Every random input has a fixed seed, so each test is deterministic; the stated
false-alarm rates say how often a correct sampler would fail such a test over
random seeds, i.e. how likely a failure is to be a fluke rather than a bug.
"""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pytest
from scipy import integrate, stats

import hierpipe.models.gibbs_twolevel as g
from hierpipe.errors import ConfigError, InputError
from hierpipe.models.gibbs_twolevel import (
    Flat,
    GibbsSettings,
    HalfCauchy,
    InvGamma,
    Normal,
    Priors,
    gibbs_two_level,
)

# Tolerance, in Monte Carlo standard errors (ArviZ, ESS-based), for sampler
# estimates against exact values. Over 40 seeds of the 2-D grid test the
# z-scores had mean 0.0 +- 0.2 and SD 1.03-1.16 (ArviZ's MCSE is ~10% optimistic
# at 4 x 4000 draws), so at 4.5 MCSE a correct sampler fails one comparison
# with probability ~5e-5, ~0.3% over the ~60 comparisons in this file. A bias of
# 5 MCSE (~0.02 on tau here) is still caught.
Z_MCSE = 4.5

# Eight groups of unequal size; the means were simulated once (mu = 1, tau =
# 1.5, sigma = 2) and are fixed here so the exact answers are fixed too.
N8 = np.array([3, 5, 8, 2, 10, 4, 6, 7])
YBAR8 = np.array([2.372, 3.135, 0.907, -1.079, 0.111, 2.441, 2.657, 2.882])
SSW8 = 89.719


# --------------------------------------------------------------------------- helpers


def make_groups(seed, J, lo, hi, mu, tau, sigma):
    """Sufficient statistics of simulated data (observations materialised)."""
    rng = np.random.default_rng(seed)
    n = rng.integers(lo, hi + 1, J)
    theta = mu + tau * rng.standard_normal(J)
    ys = [theta[j] + sigma * rng.standard_normal(n[j]) for j in range(J)]
    ybar = np.array([y.mean() for y in ys])
    ssw = float(sum(((y - y.mean()) ** 2).sum() for y in ys))
    return n, ybar, ssw, theta


def data(n, ybar, ssw, chains=4):
    return g._Data(np.atleast_2d(n).astype(float), np.atleast_2d(ybar), np.atleast_1d(ssw), chains)


def consts(priors, **settings):
    return g._consts(priors, GibbsSettings(**settings))


def log_prior_sd(prior, x):
    """Log prior density of an SD (w.r.t. d SD) from scipy, independent of the module."""
    if isinstance(prior, HalfCauchy):
        return stats.halfcauchy.logpdf(x, scale=prior.scale)
    return stats.invgamma.logpdf(x**2, a=prior.shape, scale=prior.scale) + np.log(2 * x)


def grid_reference(n, ybar, ssw, pri, taus, sigmas=None, sigma_fixed=None):
    """Exact posterior summaries of (tau, sigma, mu) by integration on a grid.

    Given (tau, sigma), ybar_j ~ N(mu, V_j) independently with V_j = tau^2 +
    sigma^2/n_j; a normal prior on mu is one more "observation" m0 with
    variance s0^2, a flat prior none. Integrating mu out gives
    -1/2 [sum log V_j + log W + sum w_j (ybar_j - muhat)^2] (w = 1/V, W = sum w),
    and E[mu | tau, sigma, y] = muhat. With sigma unknown, SSW / sigma^2 ~
    chi^2_{N-J} adds -(N-J) log sigma - SSW / (2 sigma^2). Marginal densities
    are integrated by the trapezoid rule (error O(h^2)); quantiles invert the
    cumulative trapezoid of the marginal by linear interpolation.
    """
    fixed = sigmas is None
    svals = np.array([sigma_fixed]) if fixed else sigmas
    nn = n.astype(float)
    logp = np.empty((taus.size, svals.size))
    muhat = np.empty_like(logp)
    for i, s in enumerate(svals):
        V = taus[:, None] ** 2 + s**2 / nn
        obs = np.broadcast_to(ybar, V.shape)
        if isinstance(pri.b_Intercept, Normal):
            V = np.column_stack([V, np.full(taus.size, pri.b_Intercept.sd**2)])
            obs = np.column_stack([obs, np.full(taus.size, pri.b_Intercept.mean)])
        w = 1.0 / V
        W = w.sum(1)
        muhat[:, i] = (w * obs).sum(1) / W
        lp = -0.5 * (np.log(V).sum(1) + np.log(W) + (w * (obs - muhat[:, i, None]) ** 2).sum(1))
        lp += log_prior_sd(pri.sd, taus)
        if not fixed:
            dof = nn.sum() - nn.size
            lp += -dof * np.log(s) - ssw / (2 * s**2) + log_prior_sd(pri.sigma, s)
        logp[:, i] = lp
    p = np.exp(logp - logp.max())
    if fixed:
        marg_tau, marg_sigma = p[:, 0], None
        mu_tau = (p * muhat)[:, 0]
    else:
        marg_tau = integrate.trapezoid(p, svals, axis=1)
        marg_sigma = integrate.trapezoid(p, taus, axis=0)
        mu_tau = integrate.trapezoid(p * muhat, svals, axis=1)
    Z = integrate.trapezoid(marg_tau, taus)

    def summary(x, dens):
        cdf = integrate.cumulative_trapezoid(dens, x, initial=0.0) / Z
        quantiles = {q: float(np.interp(q, cdf, x)) for q in (0.05, 0.5, 0.95)}
        edges = (float(dens[0] / dens.max()), float(dens[-1] / dens.max()))
        return float(integrate.trapezoid(x * dens, x) / Z), quantiles, edges

    out = {"sd": summary(taus, marg_tau), "mu": float(integrate.trapezoid(mu_tau, taus) / Z)}
    if not fixed:
        out["sigma"] = summary(svals, marg_sigma)
    out["muhat"], out["weights"] = muhat[:, 0], marg_tau / Z
    return out


def assert_within_mcse(draws, exact_mean, exact_quantiles, what):
    """Sampler mean and quantiles within Z_MCSE Monte Carlo SEs of the exact values."""
    mean_se = float(np.ravel(az.mcse(draws, method="mean"))[0])
    assert abs(draws.mean() - exact_mean) < Z_MCSE * mean_se, (what, draws.mean(), exact_mean)
    for q, exact in exact_quantiles.items():
        se = float(az.mcse(draws, method="quantile", prob=q))
        got = np.quantile(draws, q)
        assert abs(got - exact) < Z_MCSE * se, (what, q, got, exact, se)


# --------------------------------------------------------------------------- conditionals


def test_theta_conditional_is_the_normal_normal_posterior():
    # Closed form for one group: theta_j | mu, tau, sigma, y is normal with
    # mean (n tau^2 ybar + sigma^2 mu) / (n tau^2 + sigma^2) and variance
    # tau^2 sigma^2 / (n tau^2 + sigma^2). draw_theta is affine in z, so z = 0
    # and z = 1 pin down its mean and SD exactly (to rounding, 1e-12).
    d = data(N8, YBAR8, SSW8, chains=3)
    mu, t2, s2 = np.array([0.5, 1.0, -2.0]), np.array([0.3, 2.0, 9.0]), np.array([4.0, 1.0, 0.5])
    mean = draw_theta0 = g.draw_theta(d, mu, t2, s2, np.zeros((3, 8)))
    sd = g.draw_theta(d, mu, t2, s2, np.ones((3, 8))) - draw_theta0
    n = N8[None, :]
    want_mean = (n * t2[:, None] * YBAR8 + s2[:, None] * mu[:, None]) / (
        n * t2[:, None] + s2[:, None]
    )
    want_var = t2[:, None] * s2[:, None] / (n * t2[:, None] + s2[:, None])
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(sd**2, want_var, rtol=1e-12)


@pytest.mark.parametrize("prior", [Flat(), Normal(3.0, 0.7)])
def test_mu_conditionals_match_closed_forms(prior):
    pri = Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=prior)
    k = consts(pri)
    theta = np.array([[1.0, 2.0, 0.5, 3.0], [-1.0, 0.0, 4.0, 2.0]])
    t2 = np.array([0.8, 3.0])
    # Centred: mu | theta, tau is N(theta-bar, tau^2/J) (flat), or the product of
    # that likelihood with N(m0, s0^2).
    m = g.draw_mu_centred(theta.sum(1), 4, t2, np.zeros(2), k)
    s = g.draw_mu_centred(theta.sum(1), 4, t2, np.ones(2), k) - m
    prec = 4 / t2 + (1 / prior.sd**2 if isinstance(prior, Normal) else 0)
    num = theta.sum(1) / t2 + (prior.mean / prior.sd**2 if isinstance(prior, Normal) else 0)
    np.testing.assert_allclose(m, num / prec, rtol=1e-12)
    np.testing.assert_allclose(s**2, 1 / prec, rtol=1e-12)
    # Collapsed: mu | tau, sigma, y = y0 + m/P + z/sqrt(P) must be the GLS
    # posterior of mu with ybar_j ~ N(mu, tau^2 + sigma^2/n_j) (and the prior as
    # one more observation).
    d = data(N8, YBAR8, SSW8, chains=2)
    if isinstance(prior, Normal):
        d.c0 = prior.mean - d.y0
    tau, sigma = np.array([0.7, 2.0]), np.array([1.5, 3.0])
    _, P, mm = g.collapsed_log_posterior(d, tau, sigma, k)
    V = tau[:, None] ** 2 + sigma[:, None] ** 2 / N8
    w = 1 / V
    prec = w.sum(1) + (1 / prior.sd**2 if isinstance(prior, Normal) else 0)
    num = (w * YBAR8).sum(1) + (prior.mean / prior.sd**2 if isinstance(prior, Normal) else 0)
    np.testing.assert_allclose(d.y0 + mm / P, num / prec, rtol=1e-12)
    np.testing.assert_allclose(P, prec, rtol=1e-12)


def test_inverse_gamma_updates_are_the_conjugate_draws():
    # tau^2 | theta, mu ~ IG(a + J/2, b + S/2) and sigma^2 | theta ~ IG(a + N/2,
    # b + S_w/2); the functions map the gamma variate g to scale / g exactly.
    pri = Priors(sd=InvGamma(2.0, 1.5), sigma=InvGamma(3.0, 0.5))
    k = consts(pri)
    s_theta, gam = np.array([4.0, 0.1]), np.array([0.7, 3.0])
    np.testing.assert_allclose(
        g.draw_tau2_centred(s_theta, np.ones(2), gam, np.ones(2), k), (1.5 + s_theta / 2) / gam
    )
    d = data(N8, YBAR8, SSW8, chains=2)
    theta = np.tile(YBAR8 + 0.3, (2, 1))
    sw = SSW8 + (N8 * 0.09).sum()
    np.testing.assert_allclose(
        g.draw_sigma2(d, theta, np.ones(2), gam, np.ones(2), k), (0.5 + sw / 2) / gam, rtol=1e-12
    )


def _ks_against_density(samples, logdens, lo, hi):
    grid = np.linspace(lo, hi, 200_001)
    dens = np.exp(logdens(grid) - logdens(grid).max())
    cdf = integrate.cumulative_trapezoid(dens, grid, initial=0.0)
    cdf /= cdf[-1]
    return stats.kstest(samples, lambda x: np.interp(x, grid, cdf)).pvalue


@pytest.mark.parametrize("which", ["tau", "sigma"])
def test_half_cauchy_auxiliary_updates_leave_the_exact_conditional_invariant(which):
    # The Makalic-Schmidt pair (a | tau; tau^2 | a, rest) is a Markov kernel on
    # tau whose stationary law must be p(tau | S) ∝ tau^-m exp(-S / 2 tau^2) /
    # (1 + tau^2/A^2). Run 20000 independent chains 300 steps from a dispersed
    # start (the kernel mixes in a few steps) and KS-test against that density
    # computed on a fine grid. False alarm: 1e-3.
    rng = np.random.default_rng(7)
    A, S, m, C = 1.3, 6.0, 8, 20_000
    pri = Priors(sd=HalfCauchy(A), sigma=HalfCauchy(A))
    k = consts(pri)
    x2 = rng.uniform(0.01, 20.0, C)
    for _ in range(300):
        gam = rng.standard_gamma((m + 1) / 2, C)
        e = rng.standard_exponential(C)
        if which == "tau":
            x2 = g.draw_tau2_centred(np.full(C, S), x2, gam, e, k)
        else:
            # sigma^2 | theta with S_w = SSW + sum n (ybar - theta)^2 = S when
            # theta = ybar and SSW = S; N = m observations.
            d = data(np.ones(m), np.zeros(m), S, chains=C)
            x2 = g.draw_sigma2(d, np.zeros((C, m)), x2, gam, e, k)
    p = _ks_against_density(
        np.sqrt(x2),
        lambda t: -m * np.log(t) - S / (2 * t**2) - np.log1p(t**2 / A**2),
        1e-3,
        60.0,
    )
    assert p > 1e-3


def test_ancillary_proposal_is_the_regression_posterior():
    # With dev fixed, (mu', lambda) | y, sigma is the weighted least-squares
    # posterior N(M^-1 r, sigma^2 M^-1) of ybar_j = mu' + lambda dev_j + e_j,
    # e_j ~ N(0, sigma^2/n_j), plus the N(m0, s0^2) prior on mu'. The proposal is
    # affine in (z_lam, z_mu): check its mean and covariance against numpy.linalg.
    pri = Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=Normal(1.0, 2.0))
    k = consts(pri)
    d = data(N8, YBAR8, SSW8, chains=1)
    dev = np.linspace(-1.0, 1.3, 8)[None, :] ** 3 + 0.2
    s2 = np.array([2.5])
    m12, r2 = d.ndot_and_nybardot(dev)
    _, m22 = d.sum_and_ndot(dev * dev)
    pts = [
        g.ancillary_proposal(d, m12, m22, r2, s2, np.array([a]), np.array([b]), k)
        for a, b in ((0, 0), (1, 0), (0, 1))
    ]
    mean = np.array([pts[0][0][0], pts[0][1][0]])
    L = np.array([[pts[i][0][0] - mean[0], pts[i][1][0] - mean[1]] for i in (1, 2)]).T
    X = np.column_stack([np.ones(8), dev[0]])
    Wt = np.diag(N8 / s2[0])
    prec = X.T @ Wt @ X + np.diag([1 / 4.0, 0.0])
    rhs = X.T @ Wt @ YBAR8 + np.array([1.0 / 4.0, 0.0])
    np.testing.assert_allclose(mean, np.linalg.solve(prec, rhs), rtol=1e-10)
    np.testing.assert_allclose(L @ L.T, np.linalg.inv(prec), rtol=1e-10)


def test_log_prior_ratio_matches_scipy_densities():
    lam, t2 = np.array([0.3, -1.7, 2.2]), np.array([0.5, 4.0, 0.01])
    for prior in (HalfCauchy(1.7), InvGamma(2.5, 0.8)):
        k = consts(Priors(sd=prior, sigma=HalfCauchy(1.0)))
        tau = np.sqrt(t2)
        want = log_prior_sd(prior, np.abs(lam) * tau) - log_prior_sd(prior, tau)
        np.testing.assert_allclose(g.log_prior_ratio_tau(lam, t2, k), want, rtol=1e-10)


@pytest.mark.parametrize(
    "priors",
    [
        Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(3.0), b_Intercept=Normal(0.5, 1.5)),
        Priors(sd=InvGamma(2.0, 1.0), sigma=InvGamma(3.0, 2.0), b_Intercept=Normal(-1.0, 3.0)),
    ],
)
def test_collapsed_log_posterior_matches_multivariate_normal(priors):
    # With a normal prior on mu, ybar ~ MVN(m0 1, diag(V) + s0^2 11') exactly and
    # SSW / sigma^2 ~ chi^2_{N-J} independently; the module's O(K) formula must
    # equal that log density plus the log priors, up to one additive constant.
    d = data(N8, YBAR8, SSW8, chains=1)
    d.c0 = priors.b_Intercept.mean - d.y0
    k = consts(priors)
    got, want = [], []
    for tau, sigma in ((0.3, 1.0), (1.5, 2.0), (4.0, 0.7), (0.05, 5.0)):
        f, _, _ = g.collapsed_log_posterior(d, np.array([tau]), np.array([sigma]), k)
        got.append(f[0])
        cov = np.diag(tau**2 + sigma**2 / N8) + priors.b_Intercept.sd**2
        lp = stats.multivariate_normal(np.full(8, priors.b_Intercept.mean), cov).logpdf(YBAR8)
        lp += stats.chi2.logpdf(SSW8 / sigma**2, N8.sum() - 8) - 2 * np.log(sigma)
        lp += log_prior_sd(priors.sd, tau) + log_prior_sd(priors.sigma, sigma)
        want.append(lp)
    diff = np.array(got) - np.array(want)
    np.testing.assert_allclose(diff - diff[0], 0.0, atol=1e-9)


def test_collapsed_log_posterior_with_flat_prior_integrates_mu():
    # Flat prior: compare with numerical integration over mu of prod_j N(ybar_j;
    # mu, V_j), again up to one additive constant.
    pri = Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(3.0))
    d = data(N8, YBAR8, SSW8, chains=1)
    k = consts(pri, sigma_fixed=1.0)
    diffs = []
    for tau in (0.2, 1.0, 3.0):
        f, _, _ = g.collapsed_log_posterior(d, np.array([tau]), np.array([1.3]), k)
        sd = np.sqrt(tau**2 + 1.3**2 / N8)
        val, _ = integrate.quad(
            lambda m, sd=sd: np.exp(stats.norm.logpdf(YBAR8, m, sd).sum() + 20), -10, 12
        )
        diffs.append(f[0] - (np.log(val) - 20 + log_prior_sd(pri.sd, tau)))
    np.testing.assert_allclose(np.array(diffs) - diffs[0], 0.0, atol=1e-8)


# --------------------------------------------------------------------------- exact posteriors


def _exact_posterior_draws(priors, size, rng):
    """Independent draws of (tau, sigma) from the exact posterior of the N8 data.

    Sampled from a grid of 0.005 x 0.005 cells (uniform within a cell), whose
    total-variation distance from the exact posterior is ~(h/sd)^2/8 < 1e-3,
    below the KS resolution (~1e-2) of the tests that use it. Also returns the
    marginal CDFs of that grid distribution.
    """
    h = 0.005
    taus = np.arange(h / 2, 12.0, h)
    sigmas = np.arange(0.8 + h / 2, 4.5, h)
    logp = np.empty((taus.size, sigmas.size))
    for j, s in enumerate(sigmas):
        V = taus[:, None] ** 2 + s**2 / N8
        w = 1.0 / V
        W = w.sum(1)
        muhat = (w * YBAR8).sum(1) / W
        logp[:, j] = -0.5 * (
            np.log(V).sum(1) + np.log(W) + (w * (YBAR8 - muhat[:, None]) ** 2).sum(1)
        )
        logp[:, j] += log_prior_sd(priors.sigma, s) - (N8.sum() - 8) * np.log(s) - SSW8 / (2 * s**2)
    logp += log_prior_sd(priors.sd, taus)[:, None]
    p = np.exp(logp - logp.max())
    p /= p.sum()
    idx = rng.choice(p.size, size=size, p=p.ravel())
    i, j = np.unravel_index(idx, p.shape)
    tau = taus[i] + rng.uniform(-h / 2, h / 2, size)
    sigma = sigmas[j] + rng.uniform(-h / 2, h / 2, size)
    cdf_tau = np.cumsum(p.sum(1))
    cdf_sigma = np.cumsum(p.sum(0))

    def cdf(grid, c):  # exact CDF of the jittered grid distribution
        return lambda x: np.interp(x, np.r_[grid[0] - h / 2, grid + h / 2], np.r_[0.0, c])

    return tau, sigma, cdf(taus, cdf_tau), cdf(sigmas, cdf_sigma)


@pytest.mark.parametrize("update", ["multi_proposal", "slice"])
def test_collapsed_updates_keep_the_exact_posterior(update):
    # Start 10000 chains from exact posterior draws of (tau, sigma), apply three
    # updates, and KS-test the result against the exact marginals: an invariant
    # kernel keeps them (false alarm 1e-3 a test, 4 tests). The proposal of the
    # multiple-proposal step is deliberately poor (shifted by about one SD and
    # half as wide): that costs efficiency, never correctness.
    rng = np.random.default_rng(31)
    priors = Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(3.0))
    C = 10_000
    tau, sigma, cdf_tau, cdf_sigma = _exact_posterior_draws(priors, C, rng)
    assert stats.kstest(tau, cdf_tau).pvalue > 1e-3  # the reference itself
    d = data(N8, YBAR8, SSW8, chains=C)
    k = consts(priors)
    if update == "multi_proposal":
        # One proposal for all chains, fitted to the exact draws, then spoiled.
        trace = np.stack([tau**2, sigma**2])[:, :, None].transpose(1, 0, 2)
        loc, chol = g._fit_proposal(trace, True, d.log_nh[:1])
        loc = np.tile(loc + np.array([0.3, -0.6]), (C, 1))
        chol = np.tile(chol * 0.5, (C, 1, 1))
    else:
        shrink = g._UniformBuffer(rng, C)
    moved = np.zeros(C, bool)
    for _ in range(3):
        old = tau
        if update == "multi_proposal":
            zp = rng.standard_normal((g._MP_M, C, 2))
            gp = 2.0 * rng.standard_exponential((g._MP_M, C))
            tau, sigma, *_ = g.multi_proposal_update(
                d, k, tau, sigma, loc, chol, zp, gp, rng.random(C)
            )
        else:
            shrink.refill()
            n_eval = np.zeros(C)
            e, u = rng.standard_exponential((2, C)), rng.random((4, C))
            tau, *_ = g.slice_update(
                lambda x, s=sigma: g.collapsed_log_posterior(d, x, s, k, "tau"),
                tau, np.full(C, 1.0), e[0], u[0], u[1], shrink, n_eval,
            )  # fmt: skip
            sigma, *_ = g.slice_update(
                lambda x, t=tau: g.collapsed_log_posterior(d, t, x, k, "sigma"),
                sigma, np.full(C, 0.3), e[1], u[2], u[3], shrink, n_eval,
            )  # fmt: skip
        moved |= tau != old
    assert moved.mean() > 0.5  # the chains did move
    assert stats.kstest(tau, cdf_tau).pvalue > 1e-3
    assert stats.kstest(sigma, cdf_sigma).pvalue > 1e-3


@pytest.mark.parametrize("scheme", ["collapsed", "asis", "centred"])
def test_known_sigma_posterior_matches_grid_integration(scheme):
    # sigma known: the exact posterior of tau is 1-D (mu, theta integrated in
    # closed form). Compare posterior mean and 5/50/95% quantiles of tau, and the
    # means of b_Intercept and theta_1, within Z_MCSE MCSE. The grid (40000
    # points on (0, 40]) has discretisation error far below the MCSE (~1e-2).
    priors = Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(1.0))
    fit = gibbs_two_level(
        N8, YBAR8, SSW8, priors=priors, rng=np.random.default_rng(11), scheme=scheme,
        sigma_fixed=2.0, warmup=500, draws=4000,
    )  # fmt: skip
    taus = np.linspace(1e-4, 40.0, 40_000)
    ref = grid_reference(N8, YBAR8, SSW8, priors, taus, sigma_fixed=2.0)
    mean, qs, (_, upper) = ref["sd"]
    assert upper < 1e-6  # the grid holds the posterior
    assert_within_mcse(fit.sd, mean, qs, "sd")
    assert_within_mcse(fit.b_Intercept, ref["mu"], {}, "b_Intercept")
    # E[theta_1 | tau, y] is the precision-weighted mean of ybar_1 and muhat(tau).
    th1 = (N8[0] * YBAR8[0] / 4.0 + ref["muhat"] / taus**2) / (N8[0] / 4.0 + 1 / taus**2)
    exact_th1 = integrate.trapezoid(th1 * ref["weights"], taus)
    assert_within_mcse(fit.theta[:, :, 0], exact_th1, {}, "theta_1")
    np.testing.assert_allclose(fit.sigma, 2.0)


@pytest.mark.parametrize(
    ("scheme", "priors"),
    [
        ("collapsed", Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(3.0))),
        (
            "collapsed",
            Priors(sd=InvGamma(2.0, 1.0), sigma=InvGamma(3.0, 2.0), b_Intercept=Normal(0.0, 2.0)),
        ),
        ("asis", Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(3.0), b_Intercept=Normal(0.0, 2.0))),
        ("asis", Priors(sd=InvGamma(2.0, 1.0), sigma=InvGamma(3.0, 2.0))),
    ],
)
def test_full_posterior_matches_2d_grid_integration(scheme, priors):
    # sigma unknown: exact posterior of (tau, sigma) on a 2500 x 700 grid; compare
    # means and 5/50/95% quantiles of tau and sigma and the mean of b_Intercept
    # within Z_MCSE MCSE (grid error ~1e-4, checked against a 6000 x 2000 grid,
    # against MCSEs of ~4e-3).
    fit = gibbs_two_level(
        N8, YBAR8, SSW8, priors=priors, rng=np.random.default_rng(5), scheme=scheme,
        warmup=500, draws=4000,
    )  # fmt: skip
    ref = grid_reference(
        N8, YBAR8, SSW8, priors, np.linspace(1e-4, 25.0, 2500), np.linspace(0.8, 4.5, 700)
    )
    for draws, name in ((fit.sd, "sd"), (fit.sigma, "sigma")):
        mean, qs, (lower, upper) = ref[name]
        # The grid holds the posterior: negligible density at its far ends (tau's
        # grid starts at 1e-4, cutting off mass < 1e-4 of the total).
        assert upper < 1e-6 and (name == "sd" or lower < 1e-6)
        assert_within_mcse(draws, mean, qs, name)
    assert_within_mcse(fit.b_Intercept, ref["mu"], {}, "b_Intercept")


# --------------------------------------------------------------------------- calibration


def _sbc_pvalues(scheme, prior_family, R=1000, J=8, L=99, thin=3, seed=2018):
    """Simulation-based calibration (Talts et al. 2018) with replications as chains.

    R data sets are simulated from the prior (mu ~ N(0, 2^2); tau, sigma from
    the prior family), each with J groups of 1-6 observations; chain r samples
    data set r. The rank of each true value among L = 99 thinned draws is
    uniform on 0..99 if the sampler is right. Two tests a quantity: chi-square
    on 10 bins of 100 expected counts (9 df; any shape), and the mean rank
    against 49.5 with SD sqrt(833.25 / R) (a z-test, more powerful for a
    shift). Returns the smallest p-value of each quantity.
    """
    rng = np.random.default_rng(seed)
    if prior_family == "half_cauchy":
        priors = Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=Normal(0.0, 2.0))
        tau = np.abs(stats.cauchy.rvs(size=R, random_state=rng))
        sigma = np.abs(stats.cauchy.rvs(size=R, random_state=rng))
    else:
        priors = Priors(
            sd=InvGamma(2.0, 1.0), sigma=InvGamma(3.0, 2.0), b_Intercept=Normal(0.0, 2.0)
        )
        tau = np.sqrt(1.0 / rng.gamma(2.0, 1.0, R))
        sigma = np.sqrt(2.0 / rng.gamma(3.0, 1.0, R))
    mu = 2.0 * rng.standard_normal(R)
    n = rng.integers(1, 7, (R, J)).astype(float)
    theta = mu[:, None] + tau[:, None] * rng.standard_normal((R, J))
    ybar = theta + sigma[:, None] / np.sqrt(n) * rng.standard_normal((R, J))
    dof = n.sum(1) - J
    ssw = np.where(dof > 0, sigma**2 * rng.chisquare(np.maximum(dof, 1)), 0.0)
    settings = GibbsSettings(chains=R, warmup=200, draws=L, thin=thin, scheme=scheme)
    fit = g._gibbs_core(n, ybar, ssw, priors, settings, np.random.default_rng(seed + 1))
    out = {}
    for name, draws, truth in (
        ("b_Intercept", fit.b_Intercept, mu),
        ("sd", fit.sd, tau),
        ("sigma", fit.sigma, sigma),
        ("theta_1", fit.theta[:, :, 0], theta[:, 0]),
    ):
        ranks = (draws < truth[:, None]).sum(axis=1)
        p_shape = stats.chisquare(np.bincount(ranks // 10, minlength=10)).pvalue
        z = (ranks.mean() - 49.5) / np.sqrt((100**2 - 1) / 12 / R)
        out[name] = min(p_shape, 2 * stats.norm.sf(abs(z)))
    return out


@pytest.mark.parametrize("scheme", ["collapsed", "asis", "centred"])
@pytest.mark.parametrize("prior_family", ["half_cauchy", "inv_gamma"])
def test_simulation_based_calibration(scheme, prior_family):
    # 48 tests (3 schemes x 2 prior families x 4 quantities x 2 tests) at
    # alpha = 2e-4 each: family-wise false-alarm rate <= 1% (Bonferroni). Power
    # (measured by planting bugs): doubling the log P term of the collapsed
    # density gives p = 1e-8, accepting every ASIS proposal 1e-16, scaling the
    # sigma^2 draws by 1.05 4e-15; a missing Jacobian factor sigma in the
    # multiple-proposal weights gives only p = 2.2e-4, but the 2-D grid test
    # flags it at 14 MCSE.
    pvalues = _sbc_pvalues(scheme, prior_family)
    assert min(pvalues.values()) > 2e-4, pvalues


# --------------------------------------------------------------------------- recovery, mixing


def test_schools_recovery_and_mixing():
    # 30 schools x 50 students, mu 70, tau 5, sigma 10 (observations simulated).
    # 99% intervals of b_Intercept, sd and sigma cover the truth (each misses
    # with probability 1% under calibration: 3% family-wise) and at least 28 of
    # the 30 school means lie in their 99% intervals (P(<= 27 of 30) = 0.3%).
    # Mixing (default scheme, 4 x 1000 draws): R-hat < 1.01 and bulk ESS > 2000
    # for all three; measured ESS is 3400-3900, so this guards a regression.
    n, ybar, ssw, theta = make_groups(2024, 30, 50, 50, 70.0, 5.0, 10.0)
    sdy = 10.0 * 1.2  # a data-scaled half-Cauchy scale, as the caller would set
    fit = gibbs_two_level(
        n, ybar, ssw, priors=Priors(sd=HalfCauchy(sdy), sigma=HalfCauchy(sdy)),
        rng=np.random.default_rng(3),
    )  # fmt: skip
    for draws, truth in ((fit.b_Intercept, 70.0), (fit.sd, 5.0), (fit.sigma, 10.0)):
        lo, hi = np.quantile(draws, [0.005, 0.995])
        assert lo < truth < hi
        assert az.rhat(draws) < 1.01
        assert az.ess(draws) > 2000
    lo, hi = np.quantile(fit.theta, [0.005, 0.995], axis=(0, 1))
    assert ((lo < theta) & (theta < hi)).sum() >= 28
    np.testing.assert_allclose(fit.r, fit.theta - fit.b_Intercept[:, :, None])


def test_weak_groups_mix_where_interweaving_does_not():
    # 2000 groups of 1-40 observations with tau = 0.1, sigma = 10: every group
    # is nearly uninformative (n tau^2 / sigma^2 <= 0.004). Centring and
    # non-centring both lose almost all information about tau here, so ASIS
    # mixes slowly (measured ESS/draw of sd 0.12 in this run); the collapsed
    # default integrates theta out and measures 0.68. The thresholds sit
    # between the two with room for the ~15% noise of ESS estimates at this
    # length.
    n, ybar, ssw, _ = make_groups(9, 2000, 1, 40, 0.0, 0.1, 10.0)
    priors = Priors(sd=HalfCauchy(10.0), sigma=HalfCauchy(10.0))
    kw = {"priors": priors, "warmup": 300, "draws": 500, "rng": np.random.default_rng(1)}
    default = gibbs_two_level(n, ybar, ssw, **kw)
    asis = gibbs_two_level(n, ybar, ssw, scheme="asis", **kw)
    ess_default = az.ess(default.sd) / default.sd.size
    ess_asis = az.ess(asis.sd) / asis.sd.size
    assert ess_default > 0.4
    assert ess_asis < 0.2


def test_all_groups_of_size_one_without_within_information():
    # N = J, SSW = 0: sigma is identified only through the between-group spread
    # and its prior. The sampler must run and give finite, positive draws.
    rng = np.random.default_rng(4)
    fit = gibbs_two_level(
        np.ones(40, int), rng.normal(0, 2, 40), 0.0,
        priors=Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(2.0)), rng=rng,
        warmup=200, draws=200,
    )  # fmt: skip
    for x in (fit.sd, fit.sigma):
        assert np.isfinite(x).all() and (x > 0).all()


# --------------------------------------------------------------------------- reproducibility


def _small_fit(seed, **kw):
    n, ybar, ssw, _ = make_groups(1, 12, 2, 9, 0.0, 1.0, 2.0)
    kw = {"warmup": 150, "draws": 120, **kw}
    return gibbs_two_level(
        n, ybar, ssw, priors=Priors(sd=HalfCauchy(2.0), sigma=HalfCauchy(2.0)),
        rng=np.random.default_rng(seed), **kw,
    )  # fmt: skip


@pytest.mark.parametrize("scheme", ["collapsed", "asis", "centred"])
def test_same_seed_same_draws_and_block_size_does_not_matter(scheme, monkeypatch):
    a = _small_fit(8, scheme=scheme)
    b = _small_fit(8, scheme=scheme)
    c = _small_fit(9, scheme=scheme)
    # Blocks of 1 or 3 iterations instead of 150+ must give the same draws:
    # every variate stream is consumed in order whatever the block size.
    monkeypatch.setattr(g, "_BLOCK_ELEMENTS", 3 * 4 * 12)
    d = _small_fit(8, scheme=scheme)
    monkeypatch.setattr(g, "_BLOCK_ELEMENTS", 1)
    e = _small_fit(8, scheme=scheme)
    for name in ("b_Intercept", "sd", "sigma", "theta"):
        x = getattr(a, name)
        assert np.array_equal(x, getattr(b, name))
        assert np.array_equal(x, getattr(d, name))
        assert np.array_equal(x, getattr(e, name))
        assert not np.array_equal(x, getattr(c, name))
    assert a.stats == b.stats


@pytest.mark.parametrize("scheme", ["collapsed", "asis"])
def test_thinning_keeps_every_thin_th_iteration(scheme):
    a = _small_fit(3, draws=120, scheme=scheme)
    b = _small_fit(3, draws=40, thin=3, scheme=scheme)
    for name in ("b_Intercept", "sd", "sigma"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name)[:, ::3])
    if scheme == "asis":
        np.testing.assert_array_equal(b.theta, a.theta[:, ::3])
    else:
        # The collapsed scheme draws theta only at kept iterations, from its own
        # stream: a different, equally valid draw given the same (mu, tau, sigma).
        np.testing.assert_array_equal(b.theta[:, 0], a.theta[:, 0])
        assert not np.array_equal(b.theta[:, 1:], a.theta[:, 3::3])


@pytest.mark.parametrize("scheme", ["collapsed", "asis", "centred"])
def test_numba_backend_matches_numpy(scheme):
    # Same variates, same arithmetic: draws agree to rounding (1e-9 relative,
    # measured ~1e-13), including the slice sampler's evaluation counts.
    pytest.importorskip("numba")
    kw = {"scheme": scheme}
    a = _small_fit(5, **kw)
    b = _small_fit(5, backend="numba", **kw)
    for name in ("b_Intercept", "sd", "sigma", "theta"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-12)
    assert b.stats == a.stats


def test_numba_backend_without_numba_is_a_config_error(monkeypatch):
    monkeypatch.setattr(g, "_NUMBA_KERNEL", None)
    monkeypatch.setitem(__import__("sys").modules, "numba", None)
    assert not g.numba_available()
    with pytest.raises(ConfigError, match="numba"):
        _small_fit(1, backend="numba")


# --------------------------------------------------------------------------- interface


def test_info_is_json_and_records_settings_and_priors():
    fit = _small_fit(2, sigma_fixed=1.5)
    info = json.loads(json.dumps(fit.info()))
    assert info["settings"]["sigma_fixed"] == 1.5
    assert info["settings"]["scheme"] == "collapsed"
    assert info["priors"]["sd"] == {"family": "half_cauchy", "on": "sd", "scale": 2.0}
    assert info["stats"]["log_density_evaluations_per_iteration"] > 3
    assert fit.theta.shape == (4, 120, 12)
    assert fit.b_Intercept.shape == fit.sd.shape == fit.sigma.shape == (4, 120)


def test_chains_start_dispersed():
    # R-hat is only meaningful if chains start apart: with 8 chains and no
    # warm-up the first draws of tau must span more than a factor of 3.
    fit = _small_fit(4, chains=8, warmup=0, draws=1, scheme="centred")
    assert fit.sd[:, 0].max() / fit.sd[:, 0].min() > 3


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 2], [0.1], 1.0), "2 groups but ybar has 1"),
        (([3], [0.1], 1.0), "at least two groups"),
        (([1, 0], [0.1, 0.2], 1.0), "group index 1"),
        (([1, 2.5], [0.1, 0.2], 1.0), "group index 1"),
        (([1, 2], [0.1, np.nan], 1.0), "not finite at group index 1"),
        (([1, 2], [0.1, 0.2], -1.0), "ssw"),
        (([[1, 2]], [[0.1, 0.2]], 1.0), "one-dimensional"),
    ],
)
def test_bad_input_is_an_input_error(args, match):
    with pytest.raises(InputError, match=match):
        gibbs_two_level(
            *args,
            priors=Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0)),
            rng=np.random.default_rng(0),
        )


@pytest.mark.parametrize(
    ("priors", "kw", "match"),
    [
        (Priors(sd=HalfCauchy(0.0), sigma=HalfCauchy(1.0)), {}, "half-Cauchy scale"),
        (Priors(sd=HalfCauchy(1.0), sigma=InvGamma(-1.0, 1.0)), {}, "inverse-gamma shape"),
        (Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=Normal(0, 0)), {}, "sd"),
        (Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0)), {"chains": 0}, "chains"),
        (Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0)), {"warmup": -1}, "warmup"),
        (Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0)), {"scheme": "ncp"}, "scheme"),
        (Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0)), {"backend": "jax"}, "backend"),
        (Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0)), {"sigma_fixed": 0.0}, "sigma_fixed"),
    ],
)
def test_bad_settings_are_config_errors(priors, kw, match):
    with pytest.raises(ConfigError, match=match):
        gibbs_two_level([2, 3], [0.1, 0.5], 1.0, priors=priors, rng=np.random.default_rng(0), **kw)


def test_config_settings_scheme_and_backend_reach_the_sampler():
    """The README's ``gibbs.scheme`` and ``gibbs.backend`` keys must be accepted by the fit.

    The draws under ``asis`` differ from the default collapsed scheme's, so the
    setting is used, not merely tolerated; the numba back end gives the numpy draws.
    """
    from hierpipe.data.simulate import simulate
    from hierpipe.models.fitting import fit_table

    pytest.importorskip("numba")
    df = simulate("two_level", np.random.default_rng(3), groups=6, size=5).data
    base = {"chains": 2, "warmup": 50, "draws": 50}

    def b0(**extra):
        settings = {**base, **extra}
        rng = np.random.default_rng(9)
        formula = "score ~ 1 + (1 | school)"
        res = fit_table(df, formula, "gibbs", settings=settings, rng=rng, source="t")
        return res.draws["b_Intercept"].to_numpy()

    default = b0()
    assert not np.array_equal(b0(scheme="asis"), default)
    np.testing.assert_array_equal(b0(backend="numba"), default)
