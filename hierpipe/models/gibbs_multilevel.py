r"""Gibbs samplers for nested and crossed variance-components models, from cell statistics.

Model
-----
.. math::
    y = X\beta + \sum_k Z_k b_k + e,\quad b_k \sim N(0, \sigma_k^2 I),\quad
    e \sim N(0, \sigma^2 I),\quad \sigma_k \sim p_{sd},\ \sigma \sim p_\sigma,

with :math:`\beta` flat (brms's default) or, for ``b_Intercept``, normal; the SD
priors are half-Cauchy :math:`C^+(0, A)` (default) or inverse-gamma on the
variance. Names: ``b_*``, ``sd_<factor>__Intercept``, ``sigma``,
``r_<factor>[label,Intercept]``.

Schemes (all chains advance together; chains are the leading array axis)
-----------------------------------------------------------------------
``"collapsed"`` (default). With :math:`u = (\log\sigma_1, \dots, \log\sigma_K,
\log\sigma)`, the marginal posterior with :math:`\beta` and every :math:`b_k`
integrated out is exact and cheap:

.. math::
    \log p(u \mid y) = -\tfrac12\big[n\log\sigma^2 + \log|V_\theta| + \log|P|
      + y^\top V_\theta^{-1}y/\sigma^2 + m^\top D m - h^\top P^{-1} h\big]
      + \textstyle\sum \log p(u_j) + \text{const},

:math:`P = X^\top V_\theta^{-1} X/\sigma^2 + D`, :math:`h = X^\top V_\theta^{-1}y/\sigma^2 + Dm`
(:math:`D`, :math:`m` the prior precision and mean of :math:`\beta`, zero where
flat), from the evaluators of :mod:`hierpipe.models.nested_reml` (nested,
:math:`O(\text{cells})`) and :mod:`hierpipe.models.crossed_reml` (crossed,
:math:`O(\text{cells} + \text{pairs} + q_R^3)`). Each iteration takes
``steps`` (default 5) random-walk Metropolis steps on :math:`u` with a
proposal covariance adapted per chain in warm-up only (then fixed), and then
draws :math:`\beta \mid u, y \sim N(P^{-1}h, P^{-1})` and all effects jointly
from :math:`b \mid \beta, u, y` (exactly: top-down for nested factors, by the
block Cholesky factor for crossed ones). This is a partially collapsed Gibbs
sampler (van Dyk & Park 2008): the variance parameters never condition on the
effects, so the funnel between an SD and its effects, which makes the plain
sampler crawl when groups are small or factors are crossed, does not arise.

``"slice"``. The same, with each :math:`u_j` updated in turn by slice sampling
(Neal 2003; stepping out and shrinkage, widths adapted in warm-up): higher
ESS per iteration, about four times the density evaluations (measured in the
benchmark, where Metropolis gives more ESS per second).

``"plain"``. The textbook centred Gibbs sampler, for comparison (benchmarks):
:math:`\beta \mid b`, each factor's :math:`b_k \mid` the rest, each
:math:`\sigma_k^2 \mid b_k` and :math:`\sigma^2 \mid` the rest, all conjugate
(half-Cauchy through the auxiliary-variable representation of Makalic &
Schmidt 2016). Each iteration is :math:`O(\text{cells})`.

Back ends (``MultilevelSettings.backend``, collapsed scheme only)
-----------------------------------------------------------------
``"numpy"`` (default) is the code here. ``"numba"`` (the ``fast`` extra;
:mod:`hierpipe.models.gibbs_multilevel_numba`) runs an iteration's Metropolis
steps for every chain in one compiled call, and the draw of :math:`\beta` and
the effects in another, on random numbers drawn by numpy beforehand in exactly
this loop's order (:func:`_step_variates`, :func:`_draw_variates`), so the two
back ends' draws agree to rounding (about 1e-14; the adaptation stays in
numpy). On small data the numpy iteration is almost all per-call overhead;
see ``benchmarks/README.md`` for the speed-ups. ``"auto"`` takes numba when it
is installed. The slice and plain schemes run on numpy whatever the setting.

References
----------
Neal, R. M. (2003). Slice sampling. *Ann. Statist.* 31(3), 705-767.

van Dyk, D. A. & Park, T. (2008). Partially collapsed Gibbs samplers. *J. Amer.
Statist. Assoc.* 103(482), 790-796.

Makalic, E. & Schmidt, D. F. (2016). A simple sampler for the horseshoe
estimator. *IEEE Signal Process. Lett.* 23(1), 179-182.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from hierpipe.errors import ConfigError
from hierpipe.models.gibbs_twolevel import (
    Flat,
    HalfCauchy,
    InvGamma,
    Normal,
    numba_available,
)
from hierpipe.models.variance_components import CellStats, Evaluator

Scheme = Literal["collapsed", "slice", "plain"]
#: Stepping-out limit of the slice sampler, in widths (Neal 2003, fig. 3).
SLICE_M = 50
#: More shrinkage rounds than this in one update can only mean a non-finite density.
SLICE_MAX_ROUNDS = 200
#: Warm-up iterations at which the slice widths are re-set (then doubling).
ADAPT_FIRST = 50
#: New width = this times the SD of the chain's values in the window just ended.
WIDTH_FACTOR = 2.5


@dataclass(frozen=True)
class MultilevelPriors:
    """Priors: one SD prior for every factor, one for sigma, and ``b_Intercept``'s."""

    sd: HalfCauchy | InvGamma
    sigma: HalfCauchy | InvGamma
    b_Intercept: Flat | Normal = field(default_factory=Flat)

    def to_dict(self) -> dict[str, Any]:
        return {
            "b_Intercept": self.b_Intercept.to_dict(),
            "sd": self.sd.to_dict(),
            "sigma": self.sigma.to_dict(),
        }


@dataclass(frozen=True)
class MultilevelSettings:
    """Sampler settings, recorded in ``fit.json``."""

    chains: int = 4
    warmup: int = 1000
    draws: int = 1000
    thin: int = 1
    scheme: Scheme = "collapsed"
    steps: int = 5
    #: ``"numpy"`` (default), ``"numba"`` (the ``fast`` extra; the collapsed
    #: scheme's iteration in compiled code, same random numbers and draws equal
    #: to rounding) or ``"auto"`` (numba when installed). The slice and plain
    #: schemes always run on numpy (and record ``"numpy"``).
    backend: str = "numpy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MultilevelDraws:
    """Posterior draws; leading axes (chain, draw).

    ``beta`` (C, D, p) with the intercept on the data's scale; ``sd`` (C, D, K);
    ``sigma`` (C, D); ``r`` one (C, D, G_k) array a factor.
    """

    beta: np.ndarray
    sd: np.ndarray
    sigma: np.ndarray
    r: list[np.ndarray]
    settings: MultilevelSettings
    priors: MultilevelPriors
    stats: dict[str, Any]

    def info(self) -> dict[str, Any]:
        return {
            "sampler": f"gibbs_multilevel ({self.settings.scheme})",
            "settings": self.settings.to_dict(),
            "priors": self.priors.to_dict(),
            "stats": self.stats,
        }


# --------------------------------------------------------------------------- densities


def log_prior_logsd(prior: HalfCauchy | InvGamma, u: np.ndarray) -> np.ndarray:
    """Log density of :math:`u = \\log\\sigma` (Jacobian included), up to a constant."""
    if isinstance(prior, HalfCauchy):
        return u - np.log1p(np.exp(2.0 * u) / prior.scale**2)
    # inverse gamma on v = sigma^2: log p(u) = -2 a u - b exp(-2u) + const.
    return -2.0 * prior.shape * u - prior.scale * np.exp(-2.0 * u)


class _Marginal:
    """Log marginal posterior of the log-SDs and the conditional of beta."""

    def __init__(self, ev: Evaluator, priors: MultilevelPriors) -> None:
        st = ev.stats
        self.ev = ev
        self.priors = priors
        self.n, self.p, self.K = st.n_obs, st.p, st.K
        self.prec = np.zeros(self.p)
        self.mean = np.zeros((st.batch, self.p))
        if isinstance(priors.b_Intercept, Normal):
            if st.intercept is None:
                raise ConfigError("prior 'b_Intercept' is set but the formula has no intercept")
            self.prec[st.intercept] = 1.0 / priors.b_Intercept.sd**2
            # the statistics hold y - shift, so the intercept's prior mean moves too
            self.mean[:, st.intercept] = priors.b_Intercept.mean - st.shift

    def parts(self, u: np.ndarray):
        s2 = np.exp(2.0 * u[:, -1])
        theta2 = np.exp(2.0 * (u[:, :-1] - u[:, -1:]))
        logdet, Q = self.ev.terms(theta2)
        p = self.p
        P = Q[:, :p, :p] / s2[:, None, None] + np.diag(self.prec)
        h = Q[:, :p, p] / s2[:, None] + self.prec * self.mean
        return s2, theta2, logdet, Q, P, h

    def logp(self, u: np.ndarray) -> np.ndarray:
        s2, _, logdet, Q, P, h = self.parts(u)
        p = self.p
        if p:
            chol = np.linalg.cholesky(P)
            logdet_p = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
            sol = np.linalg.solve(P, h[..., None])[..., 0]
            fit = np.einsum("ci,ci->c", h, sol)
            mdm = np.einsum("bi,i,bi->b", self.mean, self.prec, self.mean)
        else:
            logdet_p = fit = mdm = 0.0
        quad = Q[:, p, p] / s2 + mdm - fit
        lp = -0.5 * (self.n * np.log(s2) + logdet + logdet_p + quad)
        lp = lp + log_prior_logsd(self.priors.sigma, u[:, -1])
        return lp + log_prior_logsd(self.priors.sd, u[:, :-1]).sum(axis=1)

    def draw_beta(self, u: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """beta | u, y and the relative variances at u."""
        _, theta2, _, _, P, h = self.parts(u)
        if not self.p:
            return np.zeros((u.shape[0], 0)), theta2
        chol = np.linalg.cholesky(P)
        mean = np.linalg.solve(P, h[..., None])[..., 0]
        z = rng.standard_normal(mean.shape)[..., None]
        # x = mean + L^{-T} z has covariance (L L^T)^{-1} = P^{-1}
        return mean + np.linalg.solve(np.swapaxes(chol, 1, 2), z)[..., 0], theta2


# --------------------------------------------------------------------------- slice


def _slice_coordinate(
    lp_fn: Any, u: np.ndarray, lp: np.ndarray, j: int, width: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """One slice-sampling update of coordinate ``j`` of every chain (stepping out, shrinkage)."""
    C = u.shape[0]
    level = lp - rng.exponential(size=C)
    x0 = u[:, j].copy()
    left = x0 - width * rng.uniform(size=C)
    right = left + width
    steps_left = np.floor(SLICE_M * rng.uniform(size=C))
    steps_right = SLICE_M - 1 - steps_left
    evals = 0

    def at(x: np.ndarray) -> np.ndarray:
        v = u.copy()
        v[:, j] = x
        return lp_fn(v)

    for side, steps in ((-1, steps_left), (1, steps_right)):
        edge = left if side < 0 else right
        active = steps > 0
        while active.any():
            evals += 1
            out = at(edge)
            active &= out > level
            edge[active] += side * width[active]
            steps = steps - active
            active &= steps > 0
    new = x0.copy()
    new_lp = lp.copy()
    todo = np.ones(C, dtype=bool)
    for _ in range(SLICE_MAX_ROUNDS):
        x1 = left + rng.uniform(size=C) * (right - left)
        evals += 1
        l1 = at(np.where(todo, x1, new))
        ok = todo & (l1 > level)
        new[ok] = x1[ok]
        new_lp[ok] = l1[ok]
        todo &= ~ok
        if not todo.any():
            break
        below = todo & (x1 < x0)
        left[below] = x1[below]
        right[todo & ~below] = x1[todo & ~below]
    else:
        raise FloatingPointError("slice sampler: no acceptable point (non-finite density?)")
    u = u.copy()
    u[:, j] = new
    return u, new_lp, evals


# --------------------------------------------------------------------------- samplers


def residual_sums(sums: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(C, cells) cell sums of y - X beta from cell sums (B, cells, p+1) and beta (C, p)."""
    p = beta.shape[1]
    if sums.shape[0] == 1:
        return sums[0, :, p][None, :] - beta @ sums[0, :, :p].T
    return sums[..., p] - np.einsum("kci,ki->kc", sums[..., :p], beta)


def _initial(stats: CellStats, chains: int, rng: np.random.Generator) -> np.ndarray:
    """Log-SDs near a share of the outcome's spread, jittered per chain."""
    p = stats.p
    ybar = stats.zbar[..., p]
    total = stats.within[..., p, p].sum(axis=1) + np.einsum("c,bc->b", stats.n, ybar**2)
    sd = np.sqrt(np.maximum(total / stats.n_obs, 1e-12))
    base = np.log(np.broadcast_to(sd, (chains,)) / np.sqrt(stats.K + 1))
    return base[:, None] + rng.normal(0.0, 0.5, size=(chains, stats.K + 1))


def _step_variates(
    rng: np.random.Generator, steps: int, C: int, d: int
) -> tuple[np.ndarray, np.ndarray]:
    """An iteration's Metropolis variates for the numba kernel, in the numpy loop's order."""
    z = np.empty((steps, C, d))
    logu = np.empty((steps, C))
    for s in range(steps):
        z[s] = rng.standard_normal((C, d, 1))[..., 0]
        logu[s] = np.log(rng.uniform(size=C))
    return z, logu


def _draw_variates(
    rng: np.random.Generator, C: int, p: int, shapes: list[tuple[int, ...]]
) -> tuple[np.ndarray, np.ndarray]:
    """The normals of ``draw_beta`` then of the evaluator's ``draw``, in their order.

    ``shapes`` are the evaluator's draw calls without the chain axis (nested:
    one a level from the top; crossed: the Schur block's, then the eliminated
    factor's); they are laid end to end a chain.
    """
    zb = rng.standard_normal((C, p)) if p else np.zeros((C, 0))
    noise = [rng.standard_normal((C, *shape)).reshape(C, -1) for shape in shapes]
    return zb, np.ascontiguousarray(np.concatenate(noise, axis=1))


def _resolve_backend(backend: str, scheme: str) -> str:
    """``"numpy"`` or ``"numba"`` for a setting (``"auto"``: numba when installed)."""
    if backend not in ("numpy", "numba", "auto"):
        raise ConfigError(
            f"gibbs_multilevel: backend must be 'numpy', 'numba' or 'auto', got {backend!r}"
        )
    if scheme != "collapsed" or backend == "numpy":
        return "numpy"
    if not numba_available():
        if backend == "auto":
            return "numpy"
        raise ConfigError(
            "gibbs_multilevel: backend 'numba' needs the numba package (the 'fast' extra); "
            "install it or use backend 'numpy'"
        )
    return "numba"


def _rwm(
    ev: Evaluator,
    priors: MultilevelPriors,
    settings: MultilevelSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], dict[str, Any]]:
    r"""Collapsed scheme with a multivariate random-walk Metropolis update of the log-SDs.

    Proposal :math:`N(u, \lambda^2 \Sigma)` per chain; during warm-up only,
    :math:`\Sigma` is re-estimated from the chain's draws at iterations 50, 100,
    200, ... and :math:`\log\lambda` follows a Robbins-Monro recursion towards
    an acceptance rate of 0.3 (Roberts & Rosenthal 2009); afterwards the kernel
    is fixed. ``settings.steps`` Metropolis steps are taken an iteration.
    """
    st = ev.stats
    C, K, d = settings.chains, st.K, st.K + 1
    marg = _Marginal(ev, priors)
    u = _initial(st, C, rng)
    lp = marg.logp(u)
    chol = np.broadcast_to(np.eye(d) * 0.3, (C, d, d)).copy()
    log_lam = np.zeros(C)
    total = settings.warmup + settings.draws * settings.thin
    keep_u = np.empty((C, settings.draws, d))
    keep_b = np.empty((C, settings.draws, st.p))
    keep_r = [np.empty((C, settings.draws, g)) for g in st.group_counts]
    history = np.empty((C, max(settings.warmup, 1), d))
    adapt_at, window_start = ADAPT_FIRST, 0
    accepted = 0.0
    steps = settings.steps
    sums = st.sums
    fast = None
    if settings.backend == "numba":
        from hierpipe.models.gibbs_multilevel_numba import Collapsed

        fast = Collapsed(ev, marg.prec, marg.mean, marg.n, priors)
        u, lp, acc_box = np.ascontiguousarray(u), np.ascontiguousarray(lp), np.zeros(1)
    for it in range(total):
        if fast is not None:
            z, logu = _step_variates(rng, steps, C, d)
            fast.metropolis(u, lp, chol, log_lam, z, logu, it < settings.warmup, it, acc_box)
        else:
            for _ in range(steps):
                z = rng.standard_normal((C, d, 1))
                prop = u + np.exp(log_lam)[:, None] * (chol @ z)[..., 0]
                lp_prop = marg.logp(prop)
                acc = np.log(rng.uniform(size=C)) < lp_prop - lp
                u = np.where(acc[:, None], prop, u)
                lp = np.where(acc, lp_prop, lp)
                if it < settings.warmup:
                    log_lam += (acc - 0.3) / (it + 1.0) ** 0.6
                else:
                    accepted += acc.mean()
        if it < settings.warmup:
            history[:, it] = u
            if it + 1 == adapt_at:
                window = history[:, window_start : it + 1]
                cov = np.einsum(
                    "cti,ctj->cij",
                    window - window.mean(1, keepdims=True),
                    window - window.mean(1, keepdims=True),
                ) / max(window.shape[1] - 1, 1)
                cov = cov * 2.38**2 / d + 1e-6 * np.eye(d)
                chol = np.linalg.cholesky(cov)
                log_lam[:] = 0.0
                window_start, adapt_at = it + 1, 2 * adapt_at
            continue
        k = it - settings.warmup
        if k % settings.thin:
            continue
        j = k // settings.thin
        if fast is not None:
            beta, effects = fast.draw(u, *_draw_variates(rng, C, st.p, fast.noise_shapes))
        else:
            beta, theta2 = marg.draw_beta(u, rng)
            effects = ev.draw(theta2, np.exp(u[:, -1]), residual_sums(sums, beta), rng)
        keep_u[:, j] = u
        keep_b[:, j] = beta
        for f in range(K):
            keep_r[f][:, j] = effects[f]
    if fast is not None:
        accepted = float(acc_box[0])
    n_kept = max(total - settings.warmup, 1) * steps
    stats = {"acceptance_rate": float(accepted / n_kept), "metropolis_steps_per_iteration": steps}
    return keep_u, keep_b, keep_r, stats


def _slice(
    ev: Evaluator,
    priors: MultilevelPriors,
    settings: MultilevelSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], dict[str, Any]]:
    """The collapsed scheme with coordinate-wise slice sampling of the log-SDs."""
    st = ev.stats
    C, K = settings.chains, st.K
    marg = _Marginal(ev, priors)
    u = _initial(st, C, rng)
    lp = marg.logp(u)
    width = np.ones((C, K + 1))
    total = settings.warmup + settings.draws * settings.thin
    keep_u = np.empty((C, settings.draws, K + 1))
    keep_b = np.empty((C, settings.draws, st.p))
    keep_r = [np.empty((C, settings.draws, g)) for g in st.group_counts]
    history = np.empty((C, max(settings.warmup, 1), K + 1))
    adapt_at = ADAPT_FIRST
    window_start = 0
    evals = 0
    sums = st.sums
    for it in range(total):
        for j in range(K + 1):
            u, lp, e = _slice_coordinate(marg.logp, u, lp, j, width[:, j], rng)
            evals += e
        if it < settings.warmup:
            history[:, it] = u
            if it + 1 == adapt_at:
                sd = history[:, window_start : it + 1].std(axis=1)
                width = np.clip(WIDTH_FACTOR * sd, 1e-3, 10.0)
                window_start, adapt_at = it + 1, 2 * adapt_at
            continue
        k = it - settings.warmup
        if k % settings.thin:
            continue
        d = k // settings.thin
        beta, theta2 = marg.draw_beta(u, rng)
        resid = residual_sums(sums, beta)
        effects = ev.draw(theta2, np.exp(u[:, -1]), resid, rng)
        keep_u[:, d] = u
        keep_b[:, d] = beta
        for f in range(K):
            keep_r[f][:, d] = effects[f]
    stats = {
        "density_evaluations_per_iteration": evals / total,
        "slice_widths": width.tolist(),
    }
    return keep_u, keep_b, keep_r, stats


def _ig(rng: np.random.Generator, shape: Any, scale: Any) -> np.ndarray:
    return scale / rng.gamma(shape)


def _draw_variance(
    prior: HalfCauchy | InvGamma,
    aux: np.ndarray,
    ss: np.ndarray,
    count: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """sigma^2 | effects (and the half-Cauchy auxiliary): conjugate inverse gamma."""
    if isinstance(prior, HalfCauchy):
        return _ig(rng, (count + 1.0) / 2.0, ss / 2.0 + 1.0 / aux)
    return _ig(rng, prior.shape + count / 2.0, prior.scale + ss / 2.0)


def _plain(
    ev: Evaluator,
    priors: MultilevelPriors,
    settings: MultilevelSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], dict[str, Any]]:
    """The centred Gibbs sampler (see module docstring); O(cells) an iteration."""
    st = ev.stats
    if not isinstance(priors.b_Intercept, Flat) or st.batch != 1:
        raise ConfigError("the plain scheme supports a flat b_Intercept prior and one data set")
    C, K, p = settings.chains, st.K, st.p
    sums = st.sums[0]
    n = st.n
    base = st.pooled_within[0] + np.einsum("c,ci,cj->ij", n, st.zbar[0], st.zbar[0])
    xtx_inv = np.linalg.inv(base[:p, :p]) if p else np.zeros((0, 0))
    xtx_chol = np.linalg.cholesky(xtx_inv) if p else xtx_inv
    G = st.group_counts
    sizes = [st.group_sizes(k) for k in range(K)]
    u0 = _initial(st, C, rng)
    var = np.exp(2.0 * u0[:, :-1])
    s2 = np.exp(2.0 * u0[:, -1])
    b = [np.zeros((C, g)) for g in G]
    beta = np.zeros((C, p))
    aux = np.ones((C, K))
    aux_s = np.ones(C)
    total = settings.warmup + settings.draws * settings.thin
    keep_u = np.empty((C, settings.draws, K + 1))
    keep_b = np.empty((C, settings.draws, p))
    keep_r = [np.empty((C, settings.draws, g)) for g in G]
    codes = st.codes
    for it in range(total):
        cell_b = sum(b[k][:, codes[:, k]] for k in range(K))  # (C, cells)
        if p:
            xty = base[:p, p][None, :] - np.einsum("ci,kc->ki", sums[:, :p], cell_b)
            mean = xty @ xtx_inv
            beta = mean + np.sqrt(s2)[:, None] * (rng.standard_normal((C, p)) @ xtx_chol.T)
        fixed = beta @ sums[:, :p].T if p else 0.0  # (C, cells) sums of x beta
        for k in range(K):
            other = cell_b - b[k][:, codes[:, k]]
            r = sums[:, p][None, :] - fixed - n * other
            rs = np.stack(
                [np.bincount(codes[:, k], weights=r[c], minlength=G[k]) for c in range(C)]
            )
            prec = sizes[k][None, :] / s2[:, None] + 1.0 / var[:, k, None]
            b[k] = rs / s2[:, None] / prec + rng.standard_normal((C, G[k])) / np.sqrt(prec)
            cell_b = other + b[k][:, codes[:, k]]
            if isinstance(priors.sd, HalfCauchy):
                aux[:, k] = _ig(rng, 1.0, 1.0 / priors.sd.scale**2 + 1.0 / var[:, k])
            var[:, k] = _draw_variance(priors.sd, aux[:, k], (b[k] ** 2).sum(axis=1), G[k], rng)
        e = np.concatenate([-beta, np.ones((C, 1))], axis=1)
        within = np.einsum("ci,ij,cj->c", e, st.pooled_within[0], e)
        mres = st.zbar[0][:, p][None, :] - (beta @ st.zbar[0][:, :p].T if p else 0.0) - cell_b
        ssr = within + (n * mres**2).sum(axis=1)
        if isinstance(priors.sigma, HalfCauchy):
            aux_s = _ig(rng, 1.0, 1.0 / priors.sigma.scale**2 + 1.0 / s2)
        s2 = _draw_variance(priors.sigma, aux_s, ssr, st.n_obs, rng)
        if it < settings.warmup:
            continue
        k2 = it - settings.warmup
        if k2 % settings.thin:
            continue
        d = k2 // settings.thin
        keep_u[:, d, :-1] = 0.5 * np.log(var)
        keep_u[:, d, -1] = 0.5 * np.log(s2)
        keep_b[:, d] = beta
        for k in range(K):
            keep_r[k][:, d] = b[k]
    return keep_u, keep_b, keep_r, {}


def gibbs_multilevel(
    ev: Evaluator,
    priors: MultilevelPriors,
    settings: MultilevelSettings,
    rng: np.random.Generator,
) -> MultilevelDraws:
    """Run the sampler; ``ev``'s statistics may carry one data set a chain (B = C)."""
    st = ev.stats
    if st.batch not in (1, settings.chains):
        raise ValueError("statistics batch must be 1 or the number of chains")
    if settings.chains < 1 or settings.warmup < 0 or settings.draws < 1 or settings.thin < 1:
        raise ConfigError("gibbs needs chains >= 1, warmup >= 0, draws >= 1 and thin >= 1")
    run = {"collapsed": _rwm, "slice": _slice, "plain": _plain}.get(settings.scheme)
    if run is None:
        raise ConfigError(f"unknown gibbs scheme '{settings.scheme}' (collapsed or plain)")
    settings = replace(settings, backend=_resolve_backend(settings.backend, settings.scheme))
    u, beta, r, stats = run(ev, priors, settings, rng)
    if st.intercept is not None:
        beta[..., st.intercept] += st.shift[:, None] if st.batch > 1 else st.shift[0]
    return MultilevelDraws(
        beta=beta,
        sd=np.exp(u[..., :-1]),
        sigma=np.exp(u[..., -1]),
        r=r,
        settings=settings,
        priors=priors,
        stats=stats,
    )
