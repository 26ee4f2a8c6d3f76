r"""Leave-one-group-out scoring of a new group's observations.

For the varying-intercept model the held-out group's observations
:math:`y_j = (y_{1j}, \dots, y_{n_j j})` have, given the hyperparameters, the
marginal distribution

.. math::
    y_j \sim N\big(\beta_0 \mathbf 1,\; \sigma^2 I + a \mathbf 1 \mathbf 1^\top\big),

where :math:`a = \tau^2` (plus the variance of :math:`\hat\beta_0` for plug-in
fits). Its log density needs only :math:`n_j`, :math:`\bar y_j` and
:math:`S_j`:

.. math::
    \log p = -\tfrac{n}{2}\log 2\pi - \tfrac{n-1}{2}\log\sigma^2
             - \tfrac12 \log(\sigma^2 + n a) - \frac{S_j}{2\sigma^2}
             - \frac{n(\bar y_j - \beta_0)^2}{2(\sigma^2 + n a)}.

For samplers the predictive density is the mean of this over posterior draws
(computed as a log-sum-exp), which integrates over the hyperparameters'
uncertainty as well as over the group's effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from hierpipe.cv.psis import weighted_quantile

Z90 = 1.6448536269514722


@dataclass(frozen=True)
class Predictive:
    """Hyperparameters of the new-group predictive, scalars or arrays over draws.

    ``a`` is the variance of the new group's mean about ``mu`` (tau^2, plus the
    squared SE of mu for plug-in fits); ``sigma2`` the residual variance.
    """

    mu: np.ndarray
    a: np.ndarray
    sigma2: np.ndarray


def group_log_density(
    n: float, ybar: float, ss: float, mu: np.ndarray, a: np.ndarray, sigma2: np.ndarray
) -> np.ndarray:
    """Joint log density of one group's observations (see module docstring)."""
    total = sigma2 + n * a
    return (
        -0.5 * n * np.log(2 * np.pi)
        - 0.5 * (n - 1) * np.log(sigma2)
        - 0.5 * np.log(total)
        - 0.5 * ss / sigma2
        - 0.5 * n * (ybar - mu) ** 2 / total
    )


@dataclass(frozen=True)
class GroupScore:
    """Scores of one held-out group."""

    elpd: float
    pred_mean: float
    pred_q5: float
    pred_q95: float
    error: float
    covered: bool


def score_group(
    pred: Predictive,
    n: float,
    ybar: float,
    ss: float,
    rng: np.random.Generator,
    log_weights: np.ndarray | None = None,
) -> GroupScore:
    """Log predictive density of the group and a 90% interval for its mean.

    With one set of hyperparameters the interval for :math:`\\bar y_j` is the
    normal :math:`\\mu \\pm 1.645\\sqrt{a + \\sigma^2/n}`; with draws it is
    the 5% and 95% quantiles of one simulated :math:`\\bar y_j` per draw.

    ``log_weights`` (normalised, one a draw) turn the draws into a weighted
    sample of another posterior, e.g. Pareto-smoothed importance weights for
    leaving the group out (:mod:`hierpipe.cv.psis`): the density is then
    :math:`\\log \\sum_s w_s p(y_j \\mid \\phi^{(s)})` and the mean and quantiles
    are weighted.
    """
    mu, a, s2 = (
        np.atleast_1d(np.asarray(x, dtype=np.float64)) for x in (pred.mu, pred.a, pred.sigma2)
    )
    logp = group_log_density(n, ybar, ss, mu, a, s2)
    sd = np.sqrt(a + s2 / n)
    if log_weights is not None:
        lw = np.asarray(log_weights, dtype=np.float64)
        elpd = float(logsumexp(logp + lw))
        w = np.exp(lw)
        sims = mu + sd * rng.standard_normal(mu.size)
        centre = float(np.dot(w, mu) / w.sum())
        lo, hi = (float(q) for q in weighted_quantile(sims, w, np.array([0.05, 0.95])))
    elif mu.size == 1:
        elpd = float(logp[0])
        centre = float(mu[0])
        lo, hi = centre - Z90 * float(sd[0]), centre + Z90 * float(sd[0])
    else:
        elpd = float(logsumexp(logp) - np.log(logp.size))
        sims = mu + sd * rng.standard_normal(mu.size)
        centre = float(np.mean(mu))
        lo, hi = (float(q) for q in np.quantile(sims, [0.05, 0.95]))
    return GroupScore(
        elpd=elpd,
        pred_mean=centre,
        pred_q5=lo,
        pred_q95=hi,
        error=float(ybar - centre),
        covered=bool(lo <= ybar <= hi),
    )
