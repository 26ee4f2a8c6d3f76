r"""Frequentist coverage of the two-level fits' 90% intervals, by repeated simulation.

For a design :math:`(J, n, \mu, \tau, \sigma)` each replication draws group means
:math:`\theta_j \sim \mathcal N(\mu, \tau^2)` and the sufficient statistics
:math:`\bar y_j \sim \mathcal N(\theta_j, \sigma^2/n)`,
:math:`S_j \sim \sigma^2\chi^2_{n-1}` (exactly the distribution of per-group
means and within sums of squares of normal data), fits the model and records
whether the 90% interval of ``b_Intercept`` covers :math:`\mu` and what share
of the ``coef_`` intervals cover their :math:`\theta_j`. Averaging over
:math:`\theta` as well as over the data is the empirical-Bayes notion of
coverage (Morris 1983): the one a nominal 90% EB interval is meant to have.

The empirical-Bayes intervals plug in :math:`\hat\tau^2, \hat\sigma^2` and
ignore their uncertainty, and use a normal quantile for
:math:`\hat\beta_0`, so with few groups they *undercover*: :math:`\hat\tau^2`
is noisy and often 0 (then every interval for :math:`\theta_j` shrinks to the
interval of :math:`\hat\beta_0`). Morris (1983, sec. 4) and Carlin & Louis
(2000, sec. 3.5) describe the effect and corrections; it vanishes as
:math:`J` grows. Gibbs intervals integrate over :math:`\tau` and are not
subject to it (their frequentist coverage depends on the prior instead).

References
----------
Morris, C. N. (1983). Parametric empirical Bayes inference: theory and
applications. *J. Amer. Statist. Assoc.* 78, 47-55.

Carlin, B. P. & Louis, T. A. (2000). *Bayes and Empirical Bayes Methods for Data
Analysis*, 2nd ed. Chapman & Hall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hierpipe.data.groups import GroupStats
from hierpipe.models.engines import one_way
from hierpipe.models.structure import Structure

__all__ = ["Coverage", "CoverageDesign", "eb_coverage", "gibbs_coverage", "simulate_stats"]

_STRUCTURE = Structure("one_way", "y", "g")


@dataclass(frozen=True)
class CoverageDesign:
    """A balanced two-level design: ``groups`` groups of ``size``, true ``mu, tau, sigma``."""

    groups: int
    size: int
    tau: float
    sigma: float = 1.0
    mu: float = 0.0

    @property
    def shrinkage(self) -> float:
        """Weight :math:`B = \\tau^2/(\\tau^2 + \\sigma^2/n)` a group's own mean gets."""
        return self.tau**2 / (self.tau**2 + self.sigma**2 / self.size)


@dataclass(frozen=True)
class Coverage:
    """Measured coverage of 90% intervals, with Monte Carlo standard errors.

    ``group_means`` is the share of ``coef_`` intervals covering their
    :math:`\\theta_j`; its SE is from the per-replication shares (the groups of
    one replication share :math:`\\hat\\tau`, so they are not independent).
    ``boundary`` is the share of replications with :math:`\\hat\\tau = 0`.
    """

    method: str
    design: CoverageDesign
    replications: int
    intercept: float
    intercept_se: float
    group_means: float
    group_means_se: float
    boundary: float


def simulate_stats(
    design: CoverageDesign, replications: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True means ``theta`` and the statistics ``ybar``, ``ss``, each ``(R, J)``."""
    shape = (replications, design.groups)
    theta = design.mu + design.tau * rng.standard_normal(shape)
    ybar = theta + design.sigma / np.sqrt(design.size) * rng.standard_normal(shape)
    ss = design.sigma**2 * rng.chisquare(design.size - 1, shape)
    return theta, ybar, ss


def _summarise(
    method: str, design: CoverageDesign, hit_mu: np.ndarray, hit_theta: np.ndarray, zero: np.ndarray
) -> Coverage:
    r = hit_mu.size
    per_rep = hit_theta.mean(axis=1)
    return Coverage(
        method=method,
        design=design,
        replications=r,
        intercept=float(hit_mu.mean()),
        intercept_se=float(np.sqrt(hit_mu.mean() * (1 - hit_mu.mean()) / r)),
        group_means=float(per_rep.mean()),
        group_means_se=float(per_rep.std(ddof=1) / np.sqrt(r)),
        boundary=float(zero.mean()),
    )


def eb_coverage(
    method: str, design: CoverageDesign, replications: int, rng: np.random.Generator
) -> Coverage:
    """Coverage of the 90% intervals of ``method`` (``eb_moments``, ``eb_ml``, ``eb_reml``).

    Each replication is fitted by the one-way engine exactly as ``hierpipe fit``
    fits it, from its group statistics.
    """
    theta, ybar, ss = simulate_stats(design, replications, rng)
    labels = tuple(f"G{j:03d}" for j in range(design.groups))
    n = np.full(design.groups, float(design.size))
    coef = [f"coef_g[{lab},Intercept]" for lab in labels]
    hit_mu = np.empty(replications, dtype=bool)
    hit_theta = np.empty((replications, design.groups), dtype=bool)
    zero = np.empty(replications, dtype=bool)
    for r in range(replications):
        stats = GroupStats(labels, n, ybar[r], ss[r])
        s = one_way.fit(stats, _STRUCTURE, method, {}, rng).summary.set_index("parameter")
        lo, hi = s.loc["b_Intercept", "q5"], s.loc["b_Intercept", "q95"]
        hit_mu[r] = lo <= design.mu <= hi
        lo, hi = s.loc[coef, "q5"].to_numpy(), s.loc[coef, "q95"].to_numpy()
        hit_theta[r] = (lo <= theta[r]) & (theta[r] <= hi)
        zero[r] = s.loc["sd_g__Intercept", "mean"] == 0.0
    return _summarise(method, design, hit_mu, hit_theta, zero)


def gibbs_coverage(
    design: CoverageDesign,
    replications: int,
    rng: np.random.Generator,
    *,
    warmup: int = 500,
    draws: int = 1000,
) -> Coverage:
    """Coverage of the Gibbs sampler's 90% posterior intervals (5% and 95% quantiles).

    Priors as hierpipe's defaults: flat on ``b_Intercept``, half-Cauchy on both
    SDs with the outcome's SD as scale; here the true one,
    :math:`\\sqrt{\\tau^2 + \\sigma^2}`, for every replication (the default
    estimates it from each data set), so all replications run as the chains of
    one vectorised sampler call, one chain a replication.
    """
    from hierpipe.models.gibbs_twolevel import Flat, GibbsSettings, HalfCauchy, Priors, _gibbs_core

    theta, ybar, ss = simulate_stats(design, replications, rng)
    scale = float(np.hypot(design.tau, design.sigma))
    priors = Priors(sd=HalfCauchy(scale), sigma=HalfCauchy(scale), b_Intercept=Flat())
    n = np.full((replications, design.groups), float(design.size))
    settings = GibbsSettings(chains=replications, warmup=warmup, draws=draws)
    sample = _gibbs_core(n, ybar, ss.sum(axis=1), priors, settings, rng)
    lo, hi = np.quantile(sample.b_Intercept, [0.05, 0.95], axis=1)
    hit_mu = (lo <= design.mu) & (design.mu <= hi)
    lo, hi = np.quantile(sample.theta, [0.05, 0.95], axis=1)
    hit_theta = (lo <= theta) & (theta <= hi)
    return _summarise("gibbs", design, hit_mu, hit_theta, np.zeros(replications, dtype=bool))
