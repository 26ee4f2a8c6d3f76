"""The marginal move of the correlated-slopes sampler stays where its target is computed reliably.

Regression: in a 4000-replication SBC run of ``slopes_huang_wand`` a chain's
marginal move accepted :math:`\\sigma^2 = 3\\cdot10^{-35}`,
:math:`\\Sigma_{11} = 3\\cdot10^{38}`, whose log target came out as
:math:`8\\cdot10^{42}` (the cancellations of ``_log_marginal`` with
:math:`\\mathrm{cond}(K_g) \\approx 10^{73}`), and the next coefficient draw failed
with a non-positive-definite precision. Points where
:math:`\\max_g \\mathrm{tr}(\\Sigma Z_g^\\top Z_g)/\\sigma^2` exceeds
``_K_COND_MAX`` now have weight 0, and a chain standing at such a point is
left there (which keeps the move exact for the whole posterior).
"""

from __future__ import annotations

import numpy as np

from hierpipe.models import gibbs_lmm as gl
from hierpipe.sbc import slopes

PRIORS = gl.LmmPriors(
    slopes.BETA_PRIOR, (gl.HuangWand(scale=(1.0, 1.0), nu=2.0),), gl.HalfCauchySigma(1.0)
)
SIGMA_TRUE = np.array([[4.0, 1.0], [1.0, 1.0]])


def _setup():
    """The SBC slopes design with one data set from moderate values; the move's pieces."""
    codes, X = slopes.design()
    G = slopes.SIZES.size
    rng = np.random.default_rng(3)
    b = rng.standard_normal((G, 2)) @ np.linalg.cholesky(SIGMA_TRUE).T
    y = X @ np.array([1.0, -0.5]) + np.einsum("nk,nk->n", X, b[codes])
    y = y + rng.standard_normal(codes.size)
    ztz = np.zeros((G, 2, 2))
    np.add.at(ztz, codes, X[:, :, None] * X[:, None, :])
    zty = np.zeros((G, 2))
    np.add.at(zty, codes, X * y[:, None])
    d = gl._Data(codes.size, ztz, ztz, zty, X.T @ X, y @ X, np.array(y @ y))
    slices = gl.block_slices(gl._sizes(PRIORS))
    beta_prec = np.diag(1.0 / np.asarray(slopes.BETA_PRIOR.sd) ** 2)
    return d, slices, gl._marginal_coords(slices, 2), gl._layout(d, 1), beta_prec


def test_degenerate_points_never_outweigh_the_posterior_bulk():
    d, slices, mc, lay, beta_prec = _setup()
    legit = gl._to_x(mc, np.array(1.0), SIGMA_TRUE)
    # Points with sigma^2 in e^(-80..-30) and Sigma_11 in e^(40..90): the posterior
    # density there is below e^-1000 of the bulk's. Before the fix 49 of these 2000
    # came out above the bulk's log density (and 407 finite), so the test can fail.
    r = np.random.default_rng(0)
    n = 2000
    bad = np.column_stack(
        [r.uniform(-80, -30, n), r.uniform(20, 45, n), r.uniform(-200, 200, n), r.uniform(-5, 6, n)]
    )
    x = np.vstack([legit, bad])[:, None, :]
    t = gl._log_target_x(mc, PRIORS, slices, lay, d.n_obs, x, beta_prec, np.zeros(2))[:, 0]
    assert np.isfinite(t[0])
    assert np.all(t[1:] == -np.inf)


def test_a_chain_outside_the_region_is_left_where_it_is():
    d, slices, mc, _, beta_prec = _setup()
    chains = 64
    sigma2 = np.full(chains, np.exp(-60.0))
    Sigma = np.broadcast_to(np.diag([np.exp(80.0), 1.0]), (chains, 2, 2)).copy()
    # a proposal around the posterior bulk, as fitted in warm-up
    loc = np.broadcast_to(gl._to_x(mc, np.array(1.0), SIGMA_TRUE), (chains, mc.dim)).copy()
    chol = np.broadcast_to(0.3 * np.eye(mc.dim), (chains, mc.dim, mc.dim)).copy()
    s2, S = gl._marginal_move(
        np.random.default_rng(1),
        mc,
        PRIORS,
        slices,
        gl._layout(d, chains),
        d.n_obs,
        sigma2,
        Sigma,
        loc,
        chol,
        beta_prec,
        np.zeros(2),
    )
    # _from_x(_to_x(.)) round trip: exp(log) agrees to a few ulps
    np.testing.assert_allclose(s2, sigma2, rtol=1e-12)
    np.testing.assert_allclose(S, Sigma, rtol=1e-12, atol=1e-12)
