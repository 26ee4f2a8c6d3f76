r"""Exact Bayesian inference for the normal-normal (random-effects) meta-analysis.

Model (Gelman et al. 2013, *BDA3* sections 5.4-5.5):

.. math::

    y_j \mid \theta_j \sim N(\theta_j, v_j), \qquad
    \theta_j \mid \mu, \tau \sim N(\mu, \tau^2), \qquad
    p(\mu, \tau) \propto p(\tau),

with :math:`v_j = \mathrm{se}_j^2` known and a flat prior on :math:`\mu`.
Integrating out :math:`\theta` and :math:`\mu` gives the marginal posterior of
:math:`\tau` (BDA3 eq. 5.21)

.. math::

    p(\tau \mid y) \propto p(\tau)\, V_\mu^{1/2} \prod_j (v_j + \tau^2)^{-1/2}
    \exp\!\Big(-\frac{(y_j - \hat\mu)^2}{2 (v_j + \tau^2)}\Big),
    \qquad
    \hat\mu = \frac{\sum_j w_j y_j}{\sum_j w_j}, \quad V_\mu = \frac{1}{\sum_j w_j},
    \quad w_j = \frac{1}{v_j + \tau^2},

and the conditionals :math:`\mu \mid \tau, y \sim N(\hat\mu, V_\mu)` (eq. 5.20)
and, with :math:`B_j = v_j / (v_j + \tau^2)`,
:math:`\theta_j \mid \mu, \tau, y \sim N((1 - B_j) y_j + B_j \mu, (1 - B_j) v_j)`
(eq. 5.17). The one-dimensional :math:`p(\tau \mid y)` is computed on a grid and
everything else is exact given :math:`\tau`, so posterior moments are
deterministic and draws are independent (no Markov chain).

**Grid.** Work in :math:`u = \operatorname{asinh}(\tau / c)` with :math:`c` a
data scale (:math:`\sqrt{\max(s_y^2, \operatorname{median} v)}`, or the prior
scale if smaller). The map is linear near 0 and logarithmic for large
:math:`\tau`, so one uniform grid in :math:`u` resolves both the bulk and a
polynomial tail (:math:`p(\tau \mid y) \sim \tau^{1-k}` under a flat prior
becomes :math:`e^{(2-k)u}`). Integrals are taken in :math:`u` of
:math:`g(u) = p(\tau(u) \mid y)\, c \cosh u`, which is smooth and even in
:math:`u` (it depends on :math:`\tau^2` only): composite Simpson for the
normaliser and the moments, the running trapezoid for the CDF (so the CDF is
piecewise linear in :math:`u`, exactly what inverse-CDF sampling and
:meth:`TauPosterior.quantile` invert). Range: coarse passes of 2049 points,
the first over :math:`u \in [0, 64]` (:math:`\tau` up to :math:`3 \times
10^{27} c`), each zooming onto the interval outside which each tail holds less
than ``TAIL_MASS`` (:math:`10^{-12}`) of the posterior, so even a very
concentrated posterior is bracketed tightly; the left end stays at
:math:`\tau = 0` unless the mass below is negligible too.
Refinement: the number of grid points is doubled (nesting the previous grid)
from 1025 until the first two moments of :math:`\tau` and :math:`\mu` change by
less than ``GRID_RTOL`` (:math:`10^{-8}`) relative and the 2.5/50/97.5%
quantiles of :math:`\tau` by less than ``QUANTILE_TOL`` (:math:`10^{-6}`)
posterior SDs (the CDF is only second-order accurate, and :math:`10^{-6}` SD is
far below the Monte Carlo error of any practical number of draws). Each grid
point costs :math:`O(k)` and is evaluated once (refinement adds midpoints).

**Priors on** :math:`\tau`. ``"uniform"``: flat on :math:`[0, U_\tau]`. With
``scale`` given, :math:`U_\tau` = ``scale`` (a real modelling choice). Without it,
:math:`U_\tau` is where the posterior under the improper flat prior has mass
below :math:`10^{-12}` left, so the truncation changes no reported digit of the
CDF or the quantiles. That posterior is proper only for :math:`k \ge 3` (its tail
is :math:`\tau^{1-k}`, and :math:`\mu`'s inherits it through
:math:`V_\mu \approx \tau^2/k`): with :math:`k = 3` neither :math:`\tau` nor
:math:`\mu` has a mean and with :math:`k \le 4` neither has a variance, so those
reported moments are then the truncated prior's and depend on :math:`U_\tau`;
quantiles do not (Gelman 2006 discusses this prior).
``"half_cauchy"``: :math:`p(\tau) \propto 1/(1 + (\tau/s)^2)` (Gelman 2006).
``"half_normal"``: :math:`p(\tau) \propto \exp(-\tau^2 / 2s^2)`.

References
----------
Gelman, A., Carlin, J. B., Stern, H. S., Dunson, D. B., Vehtari, A. & Rubin, D. B.
(2013). *Bayesian Data Analysis* (3rd ed.), sections 5.4-5.5. CRC Press.
Gelman, A. (2006). Prior distributions for variance parameters in hierarchical
models. *Bayesian Analysis* 1, 515-534.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special
from scipy.special import logsumexp

from hierpipe.errors import ConfigError
from hierpipe.models.meta import _check_inputs

__all__ = [
    "GRID_RTOL",
    "MIXTURE_POINTS",
    "PRIORS",
    "QUANTILE_TOL",
    "TAIL_MASS",
    "TauPosterior",
    "draw_meta_posterior",
    "mixture_quantiles",
    "mixture_weights",
    "new_study_mixture",
    "posterior_tau_grid",
    "predictive_log_density",
    "sample_meta_posterior",
    "study_effect_mixtures",
]

FloatArray = NDArray[np.float64]

PRIORS: tuple[str, ...] = ("uniform", "half_cauchy", "half_normal")
TAIL_MASS = 1e-12
GRID_RTOL = 1e-8
QUANTILE_TOL = 1e-6

_U_MAX = 64.0
_COARSE_POINTS = 2049
_ZOOM_PASSES = 6
_N_START = 1025
_N_MAX = 2**20 + 1
# rows of a (grid or draws) x k block evaluated at once: bounds memory at ~16 MB
_BLOCK_ELEMENTS = 2_000_000


@dataclass(frozen=True, eq=False)
class TauPosterior:
    r"""Marginal posterior of :math:`\tau` on a grid, with exact derived summaries.

    Attributes
    ----------
    grid : array (n,)
        :math:`\tau` values, increasing to ``upper``; the first is 0 unless the
        posterior mass below it is under ``TAIL_MASS``.
    density : array (n,)
        :math:`p(\tau \mid y)` at ``grid``, normalised to integrate to 1.
    cdf : array (n,)
        :math:`P(\tau' \le \tau \mid y)` at ``grid`` (0 at the first point, 1 at
        the last: the tails beyond the grid, each under ``TAIL_MASS``, are dropped).
    prior : str
        ``"uniform"``, ``"half_cauchy"`` or ``"half_normal"``.
    scale : float
        Prior scale (the upper bound for ``"uniform"``).
    upper : float
        End of the grid: where the posterior mass left above is below
        ``TAIL_MASS``, or the uniform prior's upper bound if that comes first.
    mean, sd : float
        Posterior mean and SD of :math:`\tau`.
    mu_mean, mu_sd : float
        Posterior mean and SD of :math:`\mu`.
    theta_mean, theta_sd : arrays (k,)
        Posterior means and SDs of the study effects :math:`\theta_j`.
    """

    grid: FloatArray
    density: FloatArray
    cdf: FloatArray
    prior: str
    scale: float
    upper: float
    mean: float
    sd: float
    mu_mean: float
    mu_sd: float
    theta_mean: FloatArray
    theta_sd: FloatArray
    # what sampling and the mu quantiles need
    _u: FloatArray
    _c: float
    _weights: FloatArray  # Simpson weights times g / Z on the u grid: sum to 1
    _mu_hat: FloatArray
    _v_mu: FloatArray
    _y: FloatArray
    _v: FloatArray

    def quantile(self, q: ArrayLike) -> FloatArray:
        """Posterior quantiles of :math:`\\tau` (inverse of the grid CDF, as sampling uses)."""
        q_arr = np.asarray(q, dtype=np.float64)
        return self._c * np.sinh(_inverse_cdf(self.cdf, self._u, q_arr))

    def mu_cdf(self, x: float) -> float:
        r"""Posterior CDF of :math:`\mu`, a normal mixture over the grid.

        :math:`P(\mu \le x \mid y) = \int \Phi\big((x - \hat\mu(\tau)) / V_\mu^{1/2}\big)
        \, p(\tau \mid y) \, d\tau`.
        """
        z = (x - self._mu_hat) / np.sqrt(self._v_mu)
        return float(np.sum(self._weights * special.ndtr(z)))

    def mu_quantile(self, q: float) -> float:
        """Posterior quantile of :math:`\\mu`, by Brent's method on :meth:`mu_cdf`."""
        if not 0.0 < q < 1.0:
            raise ConfigError(f"quantile must be in (0, 1), got {q!r}")
        # widen until the bracket holds q: the mixture can have heavy tails (k = 3)
        half = 10.0 * self.mu_sd
        while not self.mu_cdf(self.mu_mean - half) < q < self.mu_cdf(self.mu_mean + half):
            half *= 2.0
        return float(
            optimize.brentq(
                lambda x: self.mu_cdf(x) - q,
                self.mu_mean - half,
                self.mu_mean + half,
                xtol=1e-12 * self.mu_sd,
            )
        )


def _check_prior(prior: str, scale: float | None, k: int) -> tuple[str, float | None]:
    pr = str(prior).lower()
    if pr not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r} for tau; choose one of {', '.join(PRIORS)}")
    if scale is not None:
        s = float(scale)
        if not (np.isfinite(s) and s > 0):
            raise ConfigError(f"prior scale for tau must be finite and > 0, got {scale!r}")
        return pr, s
    if pr != "uniform":
        raise ConfigError(f"prior {pr!r} on tau needs a scale")
    if k < 3:
        raise ConfigError(
            "a flat prior on tau with k = 2 studies gives an improper posterior; "
            "give scale (the upper bound of tau)"
        )
    return pr, None


def _log_prior(tau: FloatArray, prior: str, scale: float | None) -> FloatArray:
    if prior == "half_cauchy":
        assert scale is not None
        return -np.log1p((tau / scale) ** 2)
    if prior == "half_normal":
        assert scale is not None
        return -0.5 * (tau / scale) ** 2
    return np.zeros_like(tau)


def _conditionals(
    tau: FloatArray, y: FloatArray, v: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    r"""For each :math:`\tau`: :math:`\hat\mu`, :math:`V_\mu` and the log marginal likelihood part.

    The last is :math:`\tfrac12\log V_\mu - \tfrac12\sum\log(v_j+\tau^2) -
    \tfrac12\sum (y_j-\hat\mu)^2/(v_j+\tau^2)`, computed in row blocks so memory
    stays bounded while each value costs O(k).
    """
    n, k = tau.size, y.size
    mu_hat = np.empty(n)
    v_mu = np.empty(n)
    loglik = np.empty(n)
    rows = max(1, _BLOCK_ELEMENTS // k)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        tot = v[None, :] + tau[sl, None] ** 2
        w = 1.0 / tot
        sw = w.sum(axis=1)
        m = np.einsum("ij,j->i", w, y) / sw
        mu_hat[sl] = m
        v_mu[sl] = 1.0 / sw
        resid2 = (y[None, :] - m[:, None]) ** 2
        loglik[sl] = -0.5 * (np.log(sw) + np.log(tot).sum(axis=1) + (w * resid2).sum(axis=1))
    return mu_hat, v_mu, loglik


def _log_g(
    u: FloatArray, c: float, y: FloatArray, v: FloatArray, prior: str, scale: float | None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Log of the integrand in u (posterior density of tau times d tau / d u), unnormalised."""
    tau = c * np.sinh(u)
    mu_hat, v_mu, loglik = _conditionals(tau, y, v)
    # log(c cosh u) written to stay finite for large u
    log_jac = np.log(c) + u + np.log1p(np.exp(-2.0 * u)) - np.log(2.0)
    return loglik + _log_prior(tau, prior, scale) + log_jac, mu_hat, v_mu


def _simpson_weights(n: int, h: float) -> FloatArray:
    """Composite Simpson weights for an odd number of equally spaced points."""
    wts = np.full(n, 2.0 * h / 3.0)
    wts[1::2] = 4.0 * h / 3.0
    wts[0] = wts[-1] = h / 3.0
    return wts


def _cumulative_cdf(g: FloatArray, h: float) -> FloatArray:
    """Trapezoid running integral of ``g``, scaled to end at exactly 1."""
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]))]) * h
    return cdf / cdf[-1]


def _grid_range(
    c: float, y: FloatArray, v: FloatArray, prior: str, scale: float | None
) -> tuple[float, float]:
    """Interval of u outside which each tail holds less than TAIL_MASS of the posterior.

    Coarse passes of _COARSE_POINTS points, each zooming onto the previous
    pass's interval (with two cells of margin), until the interval stops
    shrinking by more than half: this finds a bulk far narrower than the first
    pass's step. The left end stays at 0 unless the mass below it is negligible.
    """
    lo = 0.0
    hi = float(np.arcsinh(scale / c)) if prior == "uniform" and scale is not None else _U_MAX
    for _ in range(_ZOOM_PASSES):
        u = np.linspace(lo, hi, _COARSE_POINTS)
        lg, _, _ = _log_g(u, c, y, v, prior, scale)
        g = np.exp(lg - lg.max())
        left = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]))])
        total = left[-1]
        right = total - left
        i_lo = max(int(np.flatnonzero(left <= TAIL_MASS * total)[-1]) - 2, 0)
        i_hi = min(int(np.flatnonzero(right <= TAIL_MASS * total)[0]) + 2, u.size - 1)
        new_lo, new_hi = float(u[i_lo]), float(u[i_hi])
        shrink = (new_hi - new_lo) / (hi - lo)
        lo, hi = new_lo, new_hi
        if shrink > 0.5:
            break
    return lo, hi


def _data_scale(y: FloatArray, v: FloatArray, prior: str, scale: float | None) -> float:
    c = float(np.sqrt(max(np.var(y, ddof=1), np.median(v))))
    if prior != "uniform" and scale is not None:
        c = min(c, scale)
    return c


@dataclass(frozen=True)
class _GridPass:
    u: FloatArray
    log_g: FloatArray
    mu_hat: FloatArray
    v_mu: FloatArray
    weights: FloatArray  # Simpson weight * g / Z: sums to 1
    g_over_z: FloatArray
    cdf: FloatArray
    summary: FloatArray  # E tau, E tau^2, E mu, E mu^2, then tau quantiles at _CHECK_Q


# tau quantiles that must have settled too, since users read them off the CDF
_CHECK_Q = np.array([0.025, 0.5, 0.975])


def _finish_pass(
    u: FloatArray, lg: FloatArray, mu_hat: FloatArray, v_mu: FloatArray, c: float
) -> _GridPass:
    h = float(u[1] - u[0])
    g = np.exp(lg - lg.max())
    wts = _simpson_weights(u.size, h) * g
    z = wts.sum()
    tau = c * np.sinh(u)
    weights = wts / z
    cdf = _cumulative_cdf(g, h)
    summary = np.concatenate(
        [
            np.einsum("i,ji->j", weights, np.stack([tau, tau**2, mu_hat, v_mu + mu_hat**2])),
            c * np.sinh(_inverse_cdf(cdf, u, _CHECK_Q)),
        ]
    )
    return _GridPass(u, lg, mu_hat, v_mu, weights, g / z, cdf, summary)


def _first_pass(
    n: int,
    u_range: tuple[float, float],
    c: float,
    y: FloatArray,
    v: FloatArray,
    prior: str,
    scale: float | None,
) -> _GridPass:
    u = np.linspace(u_range[0], u_range[1], n)
    lg, mu_hat, v_mu = _log_g(u, c, y, v, prior, scale)
    return _finish_pass(u, lg, mu_hat, v_mu, c)


def _refine(
    prev: _GridPass, c: float, y: FloatArray, v: FloatArray, prior: str, scale: float | None
) -> _GridPass:
    """Halve the step: evaluate only the midpoints and interleave them with ``prev``."""
    mid = 0.5 * (prev.u[1:] + prev.u[:-1])
    lg_m, mu_m, vm_m = _log_g(mid, c, y, v, prior, scale)
    n = 2 * prev.u.size - 1

    def interleave(old: FloatArray, new: FloatArray) -> FloatArray:
        out = np.empty(n)
        out[0::2] = old
        out[1::2] = new
        return out

    return _finish_pass(
        interleave(prev.u, mid),
        interleave(prev.log_g, lg_m),
        interleave(prev.mu_hat, mu_m),
        interleave(prev.v_mu, vm_m),
        c,
    )


def _settled(cur: _GridPass, prev: _GridPass) -> bool:
    """Have the moments (to GRID_RTOL) and the tau quantiles (to QUANTILE_TOL sd) settled?"""
    e_tau, e_tau2, e_mu, e_mu2 = cur.summary[:4]
    sd_tau = np.sqrt(max(e_tau2 - e_tau**2, 0.0))
    # mu's moments are judged on its own scale so that a mean near 0 cannot stall it
    mu_scale = np.sqrt(max(e_mu2 - e_mu**2, 0.0)) + abs(e_mu)
    tol = np.concatenate(
        [
            GRID_RTOL * np.array([e_tau, e_tau2, mu_scale, mu_scale**2]),
            np.full(_CHECK_Q.size, QUANTILE_TOL * sd_tau),
        ]
    )
    return bool(np.all(np.abs(cur.summary - prev.summary) <= tol))


def posterior_tau_grid(
    y: ArrayLike, v: ArrayLike, prior: str = "uniform", scale: float | None = None
) -> TauPosterior:
    r"""Marginal posterior of :math:`\tau` on an adaptive grid, and exact summaries.

    See the module docstring for the model, the grid and the priors.

    Parameters
    ----------
    y : array (k,)
        Effect sizes.
    v : array (k,)
        Known sampling variances (:math:`\mathrm{se}^2`).
    prior : {"uniform", "half_cauchy", "half_normal"}
        Prior on :math:`\tau`.
    scale : float, optional
        Prior scale; for ``"uniform"`` the upper bound of :math:`\tau` (chosen
        from the data when omitted).

    Returns
    -------
    TauPosterior

    Raises
    ------
    InputError
        Bad ``y`` or ``v`` (as :func:`hierpipe.models.meta.meta_fit`).
    ConfigError
        Unknown prior, bad scale, or a flat prior without bound when k = 2.
    """
    y_, v_, _ = _check_inputs(y, v, None)
    pr, sc = _check_prior(prior, scale, y_.size)
    c = _data_scale(y_, v_, pr, sc)
    u_range = _grid_range(c, y_, v_, pr, sc)

    cur = _first_pass(_N_START, u_range, c, y_, v_, pr, sc)
    while cur.u.size < _N_MAX:
        prev, cur = cur, _refine(cur, c, y_, v_, pr, sc)
        if _settled(cur, prev):
            break

    tau = c * np.sinh(cur.u)
    cdf = cur.cdf
    density = cur.g_over_z / (c * np.cosh(cur.u))
    theta_mean, theta_sd = _theta_moments(cur, tau, y_, v_)
    e_tau, e_tau2, e_mu, e_mu2 = cur.summary[:4]
    return TauPosterior(
        grid=tau,
        density=density,
        cdf=cdf,
        prior=pr,
        scale=float(sc) if sc is not None else float(tau[-1]),
        upper=float(tau[-1]),
        mean=float(e_tau),
        sd=float(np.sqrt(max(e_tau2 - e_tau**2, 0.0))),
        mu_mean=float(e_mu),
        mu_sd=float(np.sqrt(max(e_mu2 - e_mu**2, 0.0))),
        theta_mean=theta_mean,
        theta_sd=theta_sd,
        _u=cur.u,
        _c=c,
        _weights=cur.weights,
        _mu_hat=cur.mu_hat,
        _v_mu=cur.v_mu,
        _y=y_,
        _v=v_,
    )


def _theta_moments(
    gp: _GridPass, tau: FloatArray, y: FloatArray, v: FloatArray
) -> tuple[FloatArray, FloatArray]:
    r"""Posterior mean and SD of each :math:`\theta_j`, integrating the exact conditionals.

    Given :math:`\tau`: :math:`E[\theta_j] = (1-B_j) y_j + B_j\hat\mu` and
    :math:`\operatorname{Var}[\theta_j] = (1-B_j) v_j + B_j^2 V_\mu`.
    """
    k = y.size
    m1 = np.zeros(k)
    m2 = np.zeros(k)
    rows = max(1, _BLOCK_ELEMENTS // k)
    for start in range(0, tau.size, rows):
        sl = slice(start, start + rows)
        b = v[None, :] / (v[None, :] + tau[sl, None] ** 2)
        mean = (1.0 - b) * y[None, :] + b * gp.mu_hat[sl, None]
        var = (1.0 - b) * v[None, :] + b**2 * gp.v_mu[sl, None]
        wt = gp.weights[sl]
        m1 += np.einsum("i,ij->j", wt, mean)
        m2 += np.einsum("i,ij->j", wt, var + mean**2)
    return m1, np.sqrt(np.maximum(m2 - m1**2, 0.0))


def _inverse_cdf(cdf: FloatArray, x: FloatArray, q: FloatArray) -> FloatArray:
    """Invert a piecewise-linear CDF given at points ``x``; flat stretches are skipped."""
    idx = np.clip(np.searchsorted(cdf, q, side="left"), 1, cdf.size - 1)
    lo, hi = cdf[idx - 1], cdf[idx]
    span = hi - lo
    frac = np.where(span > 0, (q - lo) / np.where(span > 0, span, 1.0), 0.0)
    return x[idx - 1] + np.clip(frac, 0.0, 1.0) * (x[idx] - x[idx - 1])


def draw_meta_posterior(
    posterior: TauPosterior, n_draws: int, rng: np.random.Generator
) -> dict[str, FloatArray]:
    r"""Independent draws of :math:`(\mu, \tau, \theta)` from a computed :class:`TauPosterior`.

    :math:`\tau` by inverse CDF (linear interpolation of the grid CDF in
    :math:`u`), then :math:`\mu \mid \tau, y` and :math:`\theta_j \mid \mu, \tau, y`
    from their normal conditionals (BDA3 eqs. 5.20, 5.17). Random numbers are
    consumed in a fixed order (all uniforms, then the :math:`\mu` normals, then the
    :math:`\theta` normals row by row), so a generator state gives one answer.

    Returns
    -------
    dict
        ``"mu"`` (n_draws,), ``"tau"`` (n_draws,), ``"theta"`` (n_draws, k).
    """
    n = int(n_draws)
    if n < 1:
        raise ConfigError(f"n_draws must be >= 1, got {n_draws!r}")
    y, v = posterior._y, posterior._v
    k = y.size
    tau = posterior._c * np.sinh(_inverse_cdf(posterior.cdf, posterior._u, rng.random(n)))
    mu_hat, v_mu, _ = _conditionals(tau, y, v)
    mu = mu_hat + np.sqrt(v_mu) * rng.standard_normal(n)
    theta = np.empty((n, k))
    rows = max(1, _BLOCK_ELEMENTS // k)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        b = v[None, :] / (v[None, :] + tau[sl, None] ** 2)
        mean = (1.0 - b) * y[None, :] + b * mu[sl, None]
        sd = np.sqrt((1.0 - b) * v[None, :])
        theta[sl] = mean + sd * rng.standard_normal((mean.shape[0], k))
    return {"mu": mu, "tau": tau, "theta": theta}


def sample_meta_posterior(
    y: ArrayLike,
    v: ArrayLike,
    prior: str,
    scale: float | None,
    n_draws: int,
    rng: np.random.Generator,
) -> dict[str, FloatArray]:
    r"""Exact independent posterior draws for the normal-normal meta-analysis model.

    Computes :func:`posterior_tau_grid` and then :func:`draw_meta_posterior`.

    Parameters
    ----------
    y, v : arrays (k,)
        Effect sizes and known sampling variances.
    prior : {"uniform", "half_cauchy", "half_normal"}
        Prior on :math:`\tau` (flat prior on :math:`\mu`).
    scale : float or None
        Prior scale (upper bound for ``"uniform"``; None chooses it from the data).
    n_draws : int
        Number of draws.
    rng : numpy.random.Generator
        Source of randomness (derive it with :func:`hierpipe.seeds.derive_rng`).

    Returns
    -------
    dict
        ``"mu"`` (n_draws,), ``"tau"`` (n_draws,), ``"theta"`` (n_draws, k).
    """
    return draw_meta_posterior(posterior_tau_grid(y, v, prior, scale), n_draws, rng)


# ----------------------------------------------------------------------------
# exact marginal summaries: normal mixtures over the grid
# ----------------------------------------------------------------------------

# Newton steps stop below this fraction of the mixture's SD: far below any
# printed digit and below the grid's own accuracy (QUANTILE_TOL)
_MIXTURE_XTOL = 1e-10


# Mixture summaries use a nested sub-grid of at most this many points: the
# components vary smoothly with tau, and Simpson's rule on 257 points already
# reproduces the full-grid quantiles of mu to 1e-10 posterior SDs (eight
# schools, BCG), so 1025 costs nothing in accuracy and 30x less time.
MIXTURE_POINTS = 1025


def mixture_weights(
    posterior: TauPosterior, max_points: int = MIXTURE_POINTS
) -> tuple[NDArray[np.intp], FloatArray]:
    """Indices of a nested sub-grid (every 2^j-th point) and its Simpson weights, summing to 1."""
    n = posterior._u.size
    step = 1
    while (n - 1) // step + 1 > max_points and (n - 1) % (2 * step) == 0:
        step *= 2
    idx = np.arange(0, n, step)
    h = float(posterior._u[idx[1]] - posterior._u[idx[0]])
    full = _simpson_weights(n, float(posterior._u[1] - posterior._u[0]))
    # posterior._weights = Simpson weight * g / Z; recover g / Z on the sub-grid
    wt = _simpson_weights(idx.size, h) * posterior._weights[idx] / full[idx]
    return idx, wt / wt.sum()


def study_effect_mixtures(
    posterior: TauPosterior, idx: NDArray[np.intp] | None = None
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    r"""Normal components of the marginal posteriors of :math:`\theta_j` and :math:`\theta_j - \mu`.

    Given :math:`\tau` (with :math:`\mu` integrated out), :math:`\theta_j \sim
    N((1-B_j) y_j + B_j\hat\mu, (1-B_j) v_j + B_j^2 V_\mu)` and
    :math:`\theta_j - \mu \sim N((1-B_j)(y_j - \hat\mu), (1-B_j) v_j + (1-B_j)^2 V_\mu)`,
    :math:`B_j = v_j/(v_j + \tau^2)`; the marginals are mixtures of these over
    the grid (``idx``: the sub-grid of :func:`mixture_weights`; all points by default).

    Returns
    -------
    theta_mean, theta_sd, r_mean, r_sd : arrays (n_points, k)
    """
    sel = slice(None) if idx is None else idx
    y, v = posterior._y, posterior._v
    b = v[None, :] / (v[None, :] + posterior.grid[sel, None] ** 2)
    mu, vmu = posterior._mu_hat[sel, None], posterior._v_mu[sel, None]
    theta_mean = (1.0 - b) * y[None, :] + b * mu
    theta_sd = np.sqrt((1.0 - b) * v[None, :] + b**2 * vmu)
    r_mean = (1.0 - b) * (y[None, :] - mu)
    r_sd = np.sqrt((1.0 - b) * v[None, :] + (1.0 - b) ** 2 * vmu)
    return theta_mean, theta_sd, r_mean, r_sd


def new_study_mixture(posterior: TauPosterior, v_new: float = 0.0) -> tuple[FloatArray, FloatArray]:
    r"""Components of the posterior predictive of a new study.

    The true effect of a new study, :math:`\theta_{new} \mid \tau, y \sim
    N(\hat\mu, V_\mu + \tau^2)`; with ``v_new`` > 0, its *observed* estimate
    :math:`y_{new} \sim N(\hat\mu, V_\mu + \tau^2 + v_{new})`.

    Returns
    -------
    means, sds : arrays (n_grid,)
    """
    return posterior._mu_hat, np.sqrt(posterior._v_mu + posterior.grid**2 + float(v_new))


def predictive_log_density(posterior: TauPosterior, y_new: float, v_new: float) -> float:
    r"""Log posterior predictive density of a new study's estimate ``y_new`` (variance ``v_new``).

    :math:`\log \int N(y_{new} \mid \hat\mu(\tau), V_\mu(\tau) + \tau^2 + v_{new})
    \, p(\tau \mid y)\, d\tau`, the integral by the grid's quadrature weights.
    """
    means, sds = new_study_mixture(posterior, v_new)
    w = posterior._weights
    keep = w > 0
    z = (float(y_new) - means[keep]) / sds[keep]
    logn = -0.5 * z**2 - np.log(sds[keep]) - 0.5 * np.log(2.0 * np.pi)
    return float(logsumexp(logn, b=w[keep]))


def mixture_quantiles(
    weights: ArrayLike, means: ArrayLike, sds: ArrayLike, probs: ArrayLike
) -> FloatArray:
    r"""Quantiles of normal mixtures :math:`\sum_i w_i N(m_{ic}, s_{ic}^2)`, one a column.

    Safeguarded Newton iteration on the mixture CDF (its density is the
    derivative), inside a bracket that is kept and bisected whenever a Newton
    step would leave it; stops when every step is below ``1e-10`` mixture SDs.

    Parameters
    ----------
    weights : array (n,)
        Mixture weights, non-negative, summing to 1.
    means, sds : arrays (n,) or (n, m)
        Component means and SDs (> 0), one column a mixture.
    probs : array (q,)
        Probabilities in (0, 1).

    Returns
    -------
    array (m, q), or (q,) when ``means`` is one-dimensional.
    """
    w = np.asarray(weights, dtype=np.float64)
    m_arr = np.asarray(means, dtype=np.float64)
    single = m_arr.ndim == 1
    m_arr = m_arr.reshape(m_arr.shape[0], -1)
    s_arr = np.broadcast_to(np.asarray(sds, dtype=np.float64).reshape(w.size, -1), m_arr.shape)
    p = np.asarray(probs, dtype=np.float64).ravel()
    if np.any((p <= 0) | (p >= 1)):
        raise ConfigError("quantile probabilities must lie in (0, 1)")
    keep = w > 0
    w, m_arr, s_arr = w[keep], m_arr[keep], s_arr[keep]
    cols = max(1, _BLOCK_ELEMENTS // max(1, w.size * p.size))
    out = np.empty((m_arr.shape[1], p.size))
    for start in range(0, m_arr.shape[1], cols):
        sl = slice(start, start + cols)
        out[sl] = _mixture_quantiles_block(w, m_arr[:, sl], s_arr[:, sl], p)
    return out[0] if single else out


def _mixture_quantiles_block(
    w: FloatArray, means: FloatArray, sds: FloatArray, p: FloatArray
) -> FloatArray:
    mean = w @ means
    sd = np.sqrt(np.maximum(w @ (sds**2 + means**2) - mean**2, 0.0)) + np.min(sds, axis=0)
    target = np.broadcast_to(p[None, :], (means.shape[1], p.size))

    # a component with SD 0 (r_j at tau = 0) is a point mass: a step in the CDF
    point = sds[:, :, None] == 0.0
    inv_sd = np.where(point, 0.0, 1.0 / np.where(point, 1.0, sds[:, :, None]))

    def cdf_pdf(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        diff = x[None, :, :] - means[:, :, None]
        z = diff * inv_sd
        cdf = np.einsum("n,nmq->mq", w, np.where(point, diff >= 0.0, special.ndtr(z)))
        pdf = np.einsum("n,nmq->mq", w, np.exp(-0.5 * z**2) * inv_sd)
        return cdf, pdf / np.sqrt(2.0 * np.pi)

    half = np.broadcast_to(8.0 * sd[:, None], target.shape).copy()
    lo = mean[:, None] - half
    hi = mean[:, None] + half
    # widen until every bracket holds its probability (heavy-tailed mixtures)
    for _ in range(200):
        f_lo, _ = cdf_pdf(lo)
        f_hi, _ = cdf_pdf(hi)
        bad_lo, bad_hi = f_lo > target, f_hi < target
        if not (bad_lo.any() or bad_hi.any()):
            break
        half = np.where(bad_lo | bad_hi, 2.0 * half, half)
        lo = np.where(bad_lo, mean[:, None] - half, lo)
        hi = np.where(bad_hi, mean[:, None] + half, hi)
    x = np.clip(mean[:, None] + sd[:, None] * special.ndtri(target), lo, hi)
    tol = _MIXTURE_XTOL * sd[:, None]
    for _ in range(200):
        f, dens = cdf_pdf(x)
        below = f < target
        lo = np.where(below, x, lo)
        hi = np.where(below, hi, x)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = x - (f - target) / dens
        ok = np.isfinite(newton) & (newton > lo) & (newton < hi)
        x_new = np.where(ok, newton, 0.5 * (lo + hi))
        done = np.abs(x_new - x) <= tol
        x = x_new
        if done.all():
            break
    return x
