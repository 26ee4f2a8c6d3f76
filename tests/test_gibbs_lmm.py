"""The varying-slopes Gibbs sampler (hierpipe.models.gibbs_lmm) against independent references.

References: dense Henderson mixed-model equations for the (beta, b) conditional;
two-dimensional quadrature of the exact marginal posterior of the
intercept-only model; simulation-based calibration (Talts et al. 2018) of the
correlated-slopes model; recovery of a simulated truth; the inverse-Wishart's
closed-form mean.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from hierpipe.data.simulate import simulate
from hierpipe.errors import ConfigError
from hierpipe.models import gibbs_lmm as gl
from hierpipe.models.fitting import fit_table
from hierpipe.models.suffstats_lmm import lmm_suffstats


def slopes_data(seed: int, groups: int, size: int, beta, Sigma, sigma, x_sd=1.0):
    """y = X beta + Z b + e with X = Z = [1, x]; returns X, codes, y."""
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(groups), size)
    x = x_sd * rng.standard_normal(codes.size)
    X = np.column_stack([np.ones_like(x), x])
    b = rng.multivariate_normal(np.zeros(2), Sigma, size=groups)
    y = X @ beta + np.einsum("nk,nk->n", X, b[codes]) + sigma * rng.standard_normal(x.size)
    return X, codes, y


class _ZeroNormals:
    """A generator stand-in whose standard normals are 0: draws become conditional means."""

    def standard_normal(self, size):
        return np.zeros(size)


# --------------------------------------------------------------------------- (1) conditionals


def _henderson(X, Z, codes, y, G, Sigma, sigma2):
    """Dense posterior of (beta, b) with flat beta prior: Henderson's equations (n x n free)."""
    n, q = Z.shape
    zfull = np.zeros((n, G * q))
    for k in range(q):
        zfull[np.arange(n), codes * q + k] = Z[:, k]
    w = np.hstack([X, zfull])
    prec = w.T @ w / sigma2
    prec[X.shape[1] :, X.shape[1] :] += np.kron(np.eye(G), np.linalg.inv(Sigma))
    cov = np.linalg.inv(prec)
    return cov @ (w.T @ y) / sigma2, cov


def test_coefficient_conditional_is_the_dense_gls_blup_posterior():
    G = 6
    rng = np.random.default_rng(3)
    sizes = np.array([1, 2, 3, 5, 8, 4])  # unbalanced; a singleton group
    codes = np.repeat(np.arange(G), sizes)
    x, u = rng.standard_normal(codes.size), rng.uniform(size=codes.size)
    X = np.column_stack([np.ones_like(x), x, u]) + np.array([0.0, 5.0, 0.0])  # off-centre x
    Z = X[:, :2]
    y = 3.0 + X[:, 1] - 2 * u + rng.standard_normal(codes.size)
    Sigma = np.array([[0.8, 0.3], [0.3, 0.5]])
    sigma2 = 0.7
    stats = lmm_suffstats(X, Z, y, codes, G)
    d = gl._data(stats)
    mean, cov = _henderson(X, Z, codes, y, G, Sigma, sigma2)
    zero = np.zeros((3, 3)), np.zeros(3)
    R = stats.transform_matrix()

    def to_raw(beta_c):  # the sampler works in centred coordinates (exact reparametrisation)
        out = beta_c @ R.T
        out[..., stats.intercept] += stats.y_center
        return out

    # the conditional mean, exactly (no Monte Carlo): rounding-level agreement
    beta0, b0 = gl.draw_coefficients(_ZeroNormals(), d, np.array([sigma2]), Sigma[None], *zero)
    got = np.concatenate([to_raw(beta0)[0], b0[0].ravel()])
    np.testing.assert_allclose(got, mean, rtol=1e-9, atol=1e-9)
    # the covariance: 40,000 chains = 40,000 independent joint draws in one call
    C = 40_000
    beta, b = gl.draw_coefficients(
        np.random.default_rng(0), d, np.full(C, sigma2), np.broadcast_to(Sigma, (C, 2, 2)), *zero
    )
    draws = np.hstack([to_raw(beta), b.reshape(C, -1)])
    emp = np.cov(draws, rowvar=False)
    # SE of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / C); 5 SE over 120 distinct
    # entries gives a false-alarm chance below 1e-4
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / C)
    assert np.all(np.abs(emp - cov) < 5 * se)
    assert np.all(np.abs(draws.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / C))


def test_marginal_likelihood_of_the_variances_is_the_dense_gaussian_one():
    """The marginal move's log p(y | sigma^2, Sigma) (beta, b integrated) against the dense
    N x N restricted likelihood, at well-conditioned and near-singular Sigma."""
    G = 7
    X, codes, y = slopes_data(3, G, 4, [1.0, 0.5], np.array([[0.8, 0.3], [0.3, 0.5]]), 1.0)
    d = gl._data(lmm_suffstats(X, X, y, codes, G))
    n = y.size
    zfull = np.zeros((n, 2 * G))
    for k in range(2):
        zfull[np.arange(n), codes * 2 + k] = X[:, k]

    def dense(s2, S):  # flat beta: -1/2 (log|V| + log|X'V^-1X| + y'Py)
        V = s2 * np.eye(n) + zfull @ np.kron(np.eye(G), S) @ zfull.T
        Vi = np.linalg.inv(V)
        A = X.T @ Vi @ X
        P = Vi - Vi @ X @ np.linalg.solve(A, X.T @ Vi)
        return -0.5 * (np.linalg.slogdet(V)[1] + np.linalg.slogdet(A)[1] + y @ P @ y)

    pts = [
        (0.7, np.array([[0.8, 0.3], [0.3, 0.5]])),
        (1.3, np.array([[0.2, -0.1], [-0.1, 0.9]])),
        (0.2, np.array([[3.0, 0.0], [0.0, 0.05]])),
        (0.9, np.array([[1.0, 0.9999], [0.9999, 1.0]])),  # correlation near 1
    ]
    chol = np.stack([np.linalg.cholesky(S) for _, S in pts], axis=-1)[:, :, :, None]
    got = gl._log_marginal(
        gl._layout(d, 1),
        d.n_obs,
        np.array([[s2] for s2, _ in pts]),
        chol,
        np.zeros((2, 2)),
        np.zeros(2),
    )[:, 0]
    ref = np.array([dense(s2, S) for s2, S in pts])
    # the function drops the constant -(N - p)/2 log(2 pi) (and centring is exact), so
    # differences between points must agree to rounding of sums of ~30 terms of size ~30
    np.testing.assert_allclose(np.diff(got), np.diff(ref), atol=1e-7)


def test_inverse_wishart_draws_have_the_closed_form_mean():
    psi = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
    df, C = 12.0, 100_000
    draws = gl.inv_wishart(np.random.default_rng(1), df, np.broadcast_to(psi, (C, 3, 3)))
    expected = psi / (df - 3 - 1)  # E[IW(df, Psi)] = Psi / (df - k - 1)
    se = draws.std(axis=0) / np.sqrt(C)
    assert np.all(np.abs(draws.mean(axis=0) - expected) < 5 * se)


# --------------------------------------------------------------------------- (2) q = 1 exact


def _quadrature_posterior(codes, y, G, A_tau, A_sigma):
    """Posterior means of tau, sigma, mu for y_gi = mu + b_g + e, flat mu, half-Cauchy SDs.

    Exact marginal likelihood of (tau, sigma) with mu integrated out, on a
    600 x 600 grid in (log tau, log sigma).
    """
    n = np.bincount(codes, minlength=G).astype(float)
    ybar = np.bincount(codes, y, minlength=G) / n
    ssw = float(np.sum((y - ybar[codes]) ** 2))
    lt = np.linspace(-9.0, 3.0, 600)[:, None, None]
    ls = np.linspace(-3.0, 2.0, 600)[None, :, None]
    t2, s2 = np.exp(2 * lt), np.exp(2 * ls)
    v = s2 + n * t2  # (.,.,G)
    w = n / v
    sw = w.sum(-1, keepdims=True)
    mu_hat = (w * ybar).sum(-1, keepdims=True) / sw
    loglik = (
        -0.5 * ((n - 1) * np.log(s2)).sum(-1)
        - 0.5 * np.log(v).sum(-1)
        - ssw / (2 * s2[..., 0])
        - 0.5 * (w * (ybar - mu_hat) ** 2).sum(-1)
        - 0.5 * np.log(sw[..., 0])
    )
    tau, sig = np.exp(lt[..., 0]), np.exp(ls[..., 0])
    logp = (
        loglik
        + sps.halfcauchy.logpdf(tau, scale=A_tau)
        + sps.halfcauchy.logpdf(sig, scale=A_sigma)
        + np.log(tau)
        + np.log(sig)  # Jacobian of the log grid
    )
    p = np.exp(logp - logp.max())
    p /= p.sum()
    return {
        "tau": float((p * tau).sum()),
        "sigma": float((p * sig).sum()),
        "mu": float((p * mu_hat[..., 0]).sum()),
    }


@pytest.mark.parametrize("interweave", [True, False])
def test_intercept_only_matches_the_exact_marginal_posterior(interweave):
    G = 8
    rng = np.random.default_rng(11)
    sizes = np.array([2, 3, 3, 4, 5, 6, 2, 7])
    codes = np.repeat(np.arange(G), sizes)
    y = 1.0 + rng.normal(0, 0.7, G)[codes] + rng.standard_normal(codes.size)
    X = np.ones((codes.size, 1))
    stats = lmm_suffstats(X, X, y, codes, G)
    priors = gl.LmmPriors(gl.FlatBeta(), (gl.HuangWand((1.0,), nu=1.0),), gl.HalfCauchySigma(2.0))
    settings = gl.LmmGibbsSettings(chains=4, warmup=500, draws=3000, interweave=interweave)
    draws = gl.gibbs_lmm_stats(stats, priors, settings, np.random.default_rng(5))
    arrays = gl.parameter_arrays(draws, "g", ("Intercept",), ("Intercept",), (1,))
    summ = gl.summarise_draws(arrays).set_index("parameter")
    exact = _quadrature_posterior(codes, y, G, 1.0, 2.0)
    for name, key in (("sd_g__Intercept", "tau"), ("sigma", "sigma"), ("b_Intercept", "mu")):
        got, mcse = summ.loc[name, "mean"], summ.loc[name, "mcse_mean"]
        # 4.5 MCSE: six comparisons over both parametrisations, false alarm < 1e-4;
        # the grid's own error is below 1e-3 of the posterior SD (600 points)
        assert abs(got - exact[key]) < 4.5 * mcse, (name, got, exact[key], mcse)
        assert summ.loc[name, "rhat"] < 1.01


# --------------------------------------------------------------------------- (3) SBC


def _sbc_ranks(priors: gl.LmmPriors, sampler_priors: gl.LmmPriors, reps: int, seed: int):
    """Ranks of the truth among thinned posterior draws, one data set a chain.

    Design: 8 groups x 5 observations, X = Z = [1, x] (x fixed across data
    sets). Truth from ``priors``; posterior by ``sampler_priors``.
    """
    rng = np.random.default_rng(seed)
    G, size = 8, 5
    codes = np.repeat(np.arange(G), size)
    x = rng.standard_normal(codes.size)
    X = np.column_stack([np.ones_like(x), x])
    hw = priors.blocks[0]
    # truth from the prior
    beta = rng.normal(np.asarray(priors.beta.mean), np.asarray(priors.beta.sd), size=(reps, 2))
    if isinstance(hw, gl.HuangWand):
        a = gl.inv_gamma(rng, 0.5, np.broadcast_to(1.0 / np.asarray(hw.scale) ** 2, (reps, 2)))
        psi = np.zeros((reps, 2, 2))
        psi[:, [0, 1], [0, 1]] = 2 * hw.nu / a
        Sigma = gl.inv_wishart(rng, hw.nu + 1, psi)
    else:
        Sigma = gl.inv_wishart(rng, hw.df, np.broadcast_to(np.asarray(hw.psi), (reps, 2, 2)))
    if isinstance(priors.sigma, gl.HalfCauchySigma):
        sigma = np.abs(priors.sigma.scale * rng.standard_cauchy(reps))
    else:
        sigma = np.sqrt(gl.inv_gamma(rng, priors.sigma.shape, np.full(reps, priors.sigma.scale)))
    b = np.einsum("rkl,rgl->rgk", np.linalg.cholesky(Sigma), rng.standard_normal((reps, G, 2)))
    y = (
        beta @ X.T
        + np.einsum("nk,rnk->rn", X, b[:, codes])
        + sigma[:, None] * (rng.standard_normal((reps, codes.size)))
    )
    # cross-products, no centring (exact; y differs by chain)
    ztz = np.einsum("gnk,gnl->gkl", X.reshape(G, size, 2), X.reshape(G, size, 2))
    d = gl._Data(
        n_obs=codes.size,
        ztz=ztz,
        ztx=ztz.copy(),
        zty=np.einsum("gnk,rgn->rgk", X.reshape(G, size, 2), y.reshape(reps, G, size)),
        xtx=X.T @ X,
        xty=y @ X,
        yty=np.einsum("rn,rn->r", y, y),
    )
    settings = gl.LmmGibbsSettings(chains=reps, warmup=200, draws=99, thin=5)
    pb, _, ps, pS = gl.sample_lmm(d, sampler_priors, settings, np.random.default_rng(seed + 1))
    sd = np.sqrt(np.diagonal(pS, axis1=2, axis2=3))
    post = {
        "b_Intercept": pb[..., 0],
        "b_x": pb[..., 1],
        "sd_g__Intercept": sd[..., 0],
        "sd_g__x": sd[..., 1],
        "cor_g__Intercept__x": pS[..., 0, 1] / (sd[..., 0] * sd[..., 1]),
        "sigma": ps,
    }
    tsd = np.sqrt(np.diagonal(Sigma, axis1=1, axis2=2))
    truth = {
        "b_Intercept": beta[:, 0],
        "b_x": beta[:, 1],
        "sd_g__Intercept": tsd[:, 0],
        "sd_g__x": tsd[:, 1],
        "cor_g__Intercept__x": Sigma[:, 0, 1] / (tsd[:, 0] * tsd[:, 1]),
        "sigma": sigma,
    }
    return {k: (post[k] < truth[k][:, None]).sum(axis=1) for k in post}  # ranks 0..99


def _uniformity_pvalues(ranks: dict[str, np.ndarray]) -> dict[str, float]:
    """Chi-square p-value of each rank histogram (100 ranks in 10 bins of 10)."""
    return {
        k: float(sps.chisquare(np.bincount(r // 10, minlength=10)).pvalue) for k, r in ranks.items()
    }


HW_PRIORS = gl.LmmPriors(
    gl.NormalBeta((0.0, 0.0), (1.0, 1.0)),
    (gl.HuangWand((1.0, 1.0), nu=2.0),),
    gl.HalfCauchySigma(1.0),
)
IW_PRIORS = gl.LmmPriors(
    gl.NormalBeta((0.5, -0.5), (1.0, 2.0)),
    (gl.InvWishart(5.0, ((1.0, 0.3), (0.3, 2.0))),),
    gl.InvGamma(3.0, 2.0),
)


@pytest.mark.parametrize("priors", [HW_PRIORS, IW_PRIORS], ids=["huang_wand", "inv_wishart"])
def test_simulation_based_calibration_correlated_slopes(priors):
    """Talts et al. (2018): 400 data sets from the prior, ranks of 6 parameters among 99 draws.

    Each histogram is tested at level 0.001 (chi-square, 9 df), so the
    family-wise false-alarm rate of the 6 tests is at most 0.6% if the sampler
    is exact and thinning (5) makes the kept draws close to independent; the
    seed is fixed, so the outcome is reproducible.
    """
    pvals = _uniformity_pvalues(_sbc_ranks(priors, priors, reps=400, seed=2024))
    assert min(pvals.values()) > 0.001, pvals


def test_calibration_check_detects_a_wrong_prior():
    """Power check of the SBC test above: a sampler whose SD prior is 5x too narrow fails it."""
    wrong = gl.LmmPriors(HW_PRIORS.beta, (gl.HuangWand((0.2, 0.2), nu=2.0),), HW_PRIORS.sigma)
    pvals = _uniformity_pvalues(_sbc_ranks(HW_PRIORS, wrong, reps=400, seed=2024))
    assert pvals["sd_g__Intercept"] < 0.001 or pvals["sd_g__x"] < 0.001, pvals


# --------------------------------------------------------------------------- (4) recovery


def test_recovers_a_simulated_slopes_truth_end_to_end():
    sim = simulate(
        "slopes",
        np.random.default_rng(7),
        groups=120,
        size=[6, 14],
    )
    truth = sim.truth.set_index("parameter")["value"]
    result = fit_table(
        sim.data,
        "score ~ 1 + ses + (1 + ses | school)",
        "gibbs",
        settings={"chains": 2, "warmup": 300, "draws": 600, "store_group_draws": 3},
        rng=np.random.default_rng(1),
        source="t",
    )
    s = result.summary.set_index("parameter")
    names = [
        "b_Intercept",
        "b_ses",
        "sd_school__Intercept",
        "sd_school__ses",
        "cor_school__Intercept__ses",
        "sigma",
    ]
    assert set(names) <= set(s.index)
    assert (s.loc[names, "rhat"] < 1.02).all()
    for name in names:
        # 4 posterior SDs: 6 parameters, a false alarm below 1e-3 under a normal posterior
        assert abs(s.loc[name, "mean"] - truth[name]) < 4 * s.loc[name, "sd"], (name, truth[name])
    # every group summarised; draws kept for 3 groups, as asked
    assert s.index.str.startswith("coef_school[").sum() == 2 * 120
    assert result.draws.columns.str.startswith("r_school[").sum() == 2 * 3
    assert result.info["group_draws"]["groups"] == 3
    # new-group predictive at the mean row: variance = E[z'Sigma z] + E[sigma^2] + Var(x'beta)
    # (total variance, b_new has mean 0); the reference uses the stored population draws
    pred = {(r["target"], r["at"]): r for r in result.info["predictions"]}
    at = next(a for t, a in pred if t == "new_group_mean")
    row = pred[("new_observation_new_group", at)]
    xbar = sim.data["ses"].mean()
    sd0, sd1 = result.draws["sd_school__Intercept"], result.draws["sd_school__ses"]
    cov01 = result.draws["cor_school__Intercept__ses"] * sd0 * sd1
    zsz = sd0**2 + 2 * xbar * cov01 + xbar**2 * sd1**2
    mean = result.draws["b_Intercept"] + xbar * result.draws["b_ses"]
    var = zsz.mean() + (result.draws["sigma"] ** 2).mean() + mean.var()
    # 1,200 draws: the SD of a predictive SD estimate is about 2% of it; 8% is 4 of those
    assert abs(row["sd"] / np.sqrt(var) - 1) < 0.08
    assert abs(row["mean"] - mean.mean()) < 4 * np.sqrt(var / 1200)
    # coef = b + r, draw by draw
    lab = result.info["group_draws"]["labels"][0]
    dr = result.draws
    np.testing.assert_allclose(
        dr[f"coef_school[{lab},ses]"], dr["b_ses"] + dr[f"r_school[{lab},ses]"], rtol=1e-12
    )


# --------------------------------------------------------------------------- (5) determinism


def test_same_seed_same_draws_other_seed_other_draws():
    X, codes, y = slopes_data(1, 10, 4, [1.0, 0.5], np.diag([1.0, 0.3]), 1.0)
    stats = lmm_suffstats(X, X, y, codes, 10)
    priors = gl.LmmPriors(gl.FlatBeta(), (gl.HuangWand((1.0, 1.0)),), gl.HalfCauchySigma(1.0))
    st = gl.LmmGibbsSettings(chains=2, warmup=20, draws=30)
    one = gl.gibbs_lmm_stats(stats, priors, st, np.random.default_rng(4))
    two = gl.gibbs_lmm_stats(stats, priors, st, np.random.default_rng(4))
    three = gl.gibbs_lmm_stats(stats, priors, st, np.random.default_rng(5))
    for f in ("beta", "b", "sigma", "Sigma"):
        np.testing.assert_array_equal(getattr(one, f), getattr(two, f))
        assert not np.array_equal(getattr(one, f), getattr(three, f))


# --------------------------------------------------------------------------- numba back end

BACKEND_CASES = {
    "huang_wand": gl.LmmPriors(gl.FlatBeta(), (gl.HuangWand((1.0, 2.0)),), gl.HalfCauchySigma(1.0)),
    "inv_wishart": gl.LmmPriors(
        gl.NormalBeta((0.0, 0.0), (10.0, 10.0)),
        (gl.InvWishart(3.0, ((2.0, 0.1), (0.1, 1.0))),),
        gl.InvGamma(2.0, 1.0),
    ),
    "two_blocks": gl.LmmPriors(
        gl.FlatBeta(),
        (gl.HuangWand((1.0,), nu=1.0), gl.InvGamma(1.0, 0.5)),
        gl.HalfCauchySigma(2.0),
    ),
}


def _run_backends(run):
    """The same sampler call on both back ends, same seed."""
    return run("numpy"), run("numba")


def _assert_same_draws(one, two):
    # The back ends consume the same variates and differ only in the rounding of the
    # small dense inverses and solves numpy leaves to LAPACK (about 1e-16 relative an
    # operation); a Gibbs step is a smooth map of its variates, so over these ~200
    # iterations the draws measured 1e-13 apart. 1e-10 leaves room for other BLAS and
    # CPUs, while a wrong formula or a variate read out of order differs by O(1).
    for f in ("beta", "b", "sigma", "Sigma"):
        np.testing.assert_allclose(getattr(one, f), getattr(two, f), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_numba_backend_gives_the_numpy_draws(case):
    """Marginal move (after warm-up iteration 50), scale and shear moves, every prior family."""
    pytest.importorskip("numba")
    X, codes, y = slopes_data(1, 12, 4, [1.0, 0.5], np.array([[1.0, 0.3], [0.3, 0.5]]), 1.0)
    stats = lmm_suffstats(X, X, y, codes, 12)

    def run(backend):
        st = gl.LmmGibbsSettings(chains=3, warmup=120, draws=40, thin=2, backend=backend)
        return gl.gibbs_lmm_stats(stats, BACKEND_CASES[case], st, np.random.default_rng(4))

    one, two = _run_backends(run)
    assert (one.settings.backend, two.settings.backend) == ("numpy", "numba")
    _assert_same_draws(one, two)


def test_numba_backend_gives_the_numpy_draws_batch_three_coefficients():
    """gibbs_lmm_batch (one data set a chain) with a 3 x 3 block: 6 shear pairs."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(8)
    G, n, C = 9, 5, 3
    x = rng.standard_normal((G, n, 2))
    Z = np.concatenate([np.ones((G, n, 1)), x], axis=2)  # (G, n, 3), X = Z
    y = rng.standard_normal((C, G, n)) + Z[..., 1] + 0.5 * rng.standard_normal((C, G, 1))
    ztz = np.einsum("gnk,gnl->gkl", Z, Z)
    args = (
        G * n,
        ztz.sum(axis=0),
        ztz,
        ztz.copy(),
        np.einsum("gnk,cgn->ck", Z, y),
        np.einsum("gnk,cgn->cgk", Z, y),
        np.einsum("cgn,cgn->c", y, y),
    )
    priors = gl.LmmPriors(gl.FlatBeta(), (gl.HuangWand((1.0, 1.0, 2.0)),), gl.HalfCauchySigma(1.0))

    def run(backend):
        st = gl.LmmGibbsSettings(chains=C, warmup=100, draws=30, backend=backend)
        return gl.gibbs_lmm_batch(*args, priors, st, np.random.default_rng(2))

    _assert_same_draws(*_run_backends(run))


def test_numba_log_target_is_the_numpy_one_and_has_its_region():
    """The marginal move's log target at 600 points, with and beyond its region of validity."""
    pytest.importorskip("numba")
    from hierpipe.models import gibbs_lmm_numba as nb

    X, codes, y = slopes_data(2, 8, 5, [1.0, 0.5], np.array([[4.0, 1.0], [1.0, 1.0]]), 1.0)
    stats = lmm_suffstats(X, X, y, codes, 8)
    d = gl._data(stats)
    priors = BACKEND_CASES["huang_wand"]
    slices = gl.block_slices(gl._sizes(priors))
    mc = gl._marginal_coords(slices, 2)
    r = np.random.default_rng(0)
    # log sigma^2, log L_00, L_10, log L_11: the bulk, then points so far out that the
    # ratio max_g tr(Sigma Z'Z) / sigma^2 exceeds _K_COND_MAX, or a coordinate exceeds _X_MAX
    x = np.vstack(
        [
            r.normal([0.0, 0.5, 0.5, 0.0], 1.0, (300, 4)),
            np.column_stack([r.uniform(-80, 0, 300), r.uniform(-5, 45, 300), r.normal(0, 5, 300),
                             r.uniform(-250, 6, 300)]),
        ]
    )  # fmt: skip
    zero = np.zeros(2)
    lay = gl._layout(d, 1)
    want = gl._log_target_x(mc, priors, slices, lay, d.n_obs, x[:, None], np.zeros((2, 2)), zero)
    want = want[:, 0]
    plan = gl._plan(priors, slices, 2)
    g, q, p = d.shape
    cm = [
        np.ascontiguousarray(v)
        for v in (d.ztz.transpose(1, 2, 0), d.ztx.transpose(1, 2, 0), d.zty.T)
    ]
    work = (np.empty((3, q, q, g)), np.empty((2, q, p, g)), np.empty((3, q, g)))
    got = np.array([
        nb._log_target(
            xi, *cm, *work, d.xtx, d.xty, float(d.yty), float(d.n_obs), np.zeros((2, 2)), zero,
            mc.rows.astype(np.int64), mc.cols.astype(np.int64), mc.diag, mc.jac, plan.sig_hc,
            plan.sig_par, plan.blk_start, plan.blk_size, plan.blk_type, plan.blk_par,
            plan.blk_scale, plan.inv_a2, plan.psi_iw, gl._X_MAX, gl._K_COND_MAX,
        )
        for xi in x
    ])  # fmt: skip
    # both sides of the region are represented, and the two agree on which side each point is
    assert 100 < np.isfinite(want).sum() < 550
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    # Within the region the two evaluate the same formula, with the same operation order
    # per group except in numpy's sums over groups and its LAPACK solves: measured at most
    # 3e-15 relative, even at ratios near the region's edge where the cancellations are
    # largest; 1e-10 leaves room for other CPUs while a wrong term is off by O(1).
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-10)


def test_numba_backend_from_the_config_reaches_the_sampler():
    """``gibbs.backend: numba`` in a study runs the kernel and fit.json records it."""
    pytest.importorskip("numba")
    sim = simulate("slopes", np.random.default_rng(3), groups=8, size=5)
    res = fit_table(
        sim.data,
        "score ~ 1 + ses + (1 + ses | school)",
        "gibbs",
        settings={"backend": "numba", "chains": 2, "warmup": 10, "draws": 10},
        rng=np.random.default_rng(0),
        source="t",
    )
    assert res.info["settings"]["backend"] == "numba"


def test_backend_setting_without_numba(monkeypatch):
    """numba asked for but absent: a config error; "auto" falls back to numpy and says so."""
    X, codes, y = slopes_data(1, 6, 3, [1.0, 0.5], np.diag([1.0, 0.3]), 1.0)
    stats = lmm_suffstats(X, X, y, codes, 6)
    priors = BACKEND_CASES["huang_wand"]
    monkeypatch.setitem(__import__("sys").modules, "numba", None)
    assert not gl.numba_available()
    st = gl.LmmGibbsSettings(chains=1, warmup=5, draws=10, backend="numba")
    with pytest.raises(ConfigError, match="numba"):
        gl.gibbs_lmm_stats(stats, priors, st, np.random.default_rng(0))
    auto = gl.gibbs_lmm_stats(
        stats, priors, gl.LmmGibbsSettings(1, 5, 10, backend="auto"), np.random.default_rng(0)
    )
    assert auto.info()["settings"]["backend"] == "numpy"
    with pytest.raises(ConfigError, match="backend"):
        gl.settings_from_config({"backend": "jax"})
    assert gl.settings_from_config({}).backend == "numpy"
    assert gl.settings_from_config({"backend": "numba"}).backend == "numba"


# --------------------------------------------------------------------------- config errors


def test_config_errors_name_the_prior_and_the_allowed_families():
    sim = simulate("slopes", np.random.default_rng(3), groups=10, size=5)
    formula = "score ~ 1 + ses + (1 + ses | school)"

    def run(settings):
        return fit_table(
            sim.data, formula, "gibbs", settings=settings, rng=np.random.default_rng(0), source="t"
        )

    with pytest.raises(ConfigError, match=r"sd\[0\] \(block of 2\).*huang_wand or inv_wishart"):
        run({"priors": {"sd": {"family": "half_cauchy"}}, "draws": 10, "warmup": 0})
    with pytest.raises(ConfigError, match=r"'sigma'.*half_cauchy or inv_gamma"):
        run({"priors": {"sigma": {"family": "uniform"}}, "draws": 10, "warmup": 0})
    with pytest.raises(ConfigError, match="interweave"):
        run({"interweave": "yes"})
    # the inverse-Wishart alternative and a normal prior on b run and are recorded
    res = run(
        {
            "priors": {
                "sd": {"family": "inv_wishart", "df": 3, "scale": 10.0},
                "b": {"family": "normal", "scale": 100.0},
            },
            "chains": 1,
            "warmup": 10,
            "draws": 10,
        }
    )
    assert res.info["priors"]["blocks"][0]["family"] == "inv_wishart"
    assert res.info["priors"]["beta"] == {
        "family": "normal",
        "mean": [0.0, 0.0],
        "sd": [100.0, 100.0],
    }
