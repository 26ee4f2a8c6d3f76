r"""The James–Stein estimate of group means, beside the fits' shrinkage.

Group means :math:`\bar y_j \sim N(\theta_j, D_j)` with :math:`D_j = \sigma^2/n_j`
and :math:`\sigma^2` treated as known (in hierpipe the pooled within-group
variance :math:`s^2 = \sum_j S_j / (N - J)`).

Equal :math:`D_j = D` (balanced groups): the positive-part James–Stein estimate
towards the grand mean (Efron & Morris 1973, 1975),

.. math::
    \hat\theta_j = \bar y + (1 - B)(\bar y_j - \bar y), \qquad
    B = \min\Big(1, \frac{(J - 3) D}{\sum_k (\bar y_k - \bar y)^2}\Big).

Unequal :math:`D_j`: the Efron–Morris form (Morris 1983, sec. 4 with one
regressor, the intercept). :math:`\hat A` solves

.. math::
    \sum_j \frac{(\bar y_j - \hat\mu_{\hat A})^2}{\hat A + D_j} = J - 1, \qquad
    \hat\mu_A = \frac{\sum_j \bar y_j / (A + D_j)}{\sum_j 1/(A + D_j)},

with :math:`\hat A = 0` when the left side is already at most :math:`J - 1` at
:math:`A = 0` (it decreases in :math:`A`, so the root is unique), and
:math:`B_j = \frac{J-3}{J-1} \frac{D_j}{D_j + \hat A}`,
:math:`\hat\theta_j = \hat\mu_{\hat A} + (1 - B_j)(\bar y_j - \hat\mu_{\hat A})`.
With equal :math:`D_j` and :math:`\hat A > 0` this is exactly the James–Stein
estimate above (then :math:`\hat A + D = \sum_k (\bar y_k - \bar y)^2/(J-1)`); the
two differ only in how they truncate (Morris: :math:`\hat A \ge 0`; James–Stein:
:math:`B \le 1`). With :math:`J \le 3` there is no shrinkage (:math:`B_j = 0`).

:math:`\sum_j (1 - B_j)` is the estimate's effective number of group parameters,
comparable with the fits' (Hodges & Sargent 2001).

References
----------
Efron, B. & Morris, C. (1975). Data analysis using Stein's estimator and its
generalizations. *J. Amer. Statist. Assoc.* 70(350), 311-319.

Morris, C. N. (1983). Parametric empirical Bayes inference: theory and
applications. *J. Amer. Statist. Assoc.* 78(381), 47-55.

Hodges, J. S. & Sargent, D. J. (2001). Counting degrees of freedom in
hierarchical and other richly-parameterised models. *Biometrika* 88(2), 367-379.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Relative spread of D_j below which groups count as balanced (floating noise of s^2/n_j).
_BALANCED_RTOL = 1e-12


@dataclass(frozen=True)
class JamesStein:
    """James–Stein estimates of group means.

    Attributes
    ----------
    estimate : ndarray (J,) of :math:`\\hat\\theta_j`.
    shrinkage : ndarray (J,) of :math:`B_j` (0: own mean, 1: the centre).
    centre : the mean the estimates shrink towards.
    a_hat : :math:`\\hat A`, the between-group variance estimate (James–Stein: the
        implied :math:`\\sum_k (\\bar y_k - \\bar y)^2/(J-1) - D`, which may be negative).
    form : ``"james_stein"`` (equal :math:`D_j`) or ``"efron_morris"``.
    """

    estimate: np.ndarray
    shrinkage: np.ndarray
    centre: float
    a_hat: float
    form: str

    @property
    def effective_parameters(self) -> float:
        return float(np.sum(1.0 - self.shrinkage))


def james_stein(ybar: np.ndarray, d: np.ndarray) -> JamesStein:
    """Positive-part James–Stein (equal ``d``) or Efron–Morris (unequal ``d``) estimates.

    Parameters
    ----------
    ybar : ndarray (J,)
        Group means.
    d : ndarray (J,)
        Their known sampling variances :math:`D_j > 0`.

    Returns
    -------
    JamesStein
    """
    y = np.asarray(ybar, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    j = y.size
    if j < 2 or d.shape != y.shape or not (np.all(np.isfinite(d)) and np.all(d > 0)):
        raise ValueError("james_stein needs at least 2 groups and finite positive variances")
    balanced = float(np.ptp(d)) <= _BALANCED_RTOL * float(np.max(d))
    form = "james_stein" if balanced else "efron_morris"
    factor = max(j - 3, 0) / (j - 1)
    if balanced:
        centre = float(y.mean())
        spread = float(np.sum((y - centre) ** 2))
        a_hat = spread / (j - 1) - float(d[0])
        b = np.full(j, 1.0 if spread == 0 else min(1.0, max(j - 3, 0) * float(d[0]) / spread))
    else:
        a_hat = _morris_a(y, d)
        w = 1.0 / (a_hat + d)
        centre = float(np.dot(w, y) / w.sum())
        b = factor * d / (d + a_hat)
    estimate = centre + (1.0 - b) * (y - centre)
    return JamesStein(estimate=estimate, shrinkage=b, centre=centre, a_hat=a_hat, form=form)


def _q_statistic(a: float, y: np.ndarray, d: np.ndarray) -> float:
    w = 1.0 / (a + d)
    mu = np.dot(w, y) / w.sum()
    return float(np.dot(w, (y - mu) ** 2))


def _morris_a(y: np.ndarray, d: np.ndarray) -> float:
    """Root of Q(A) = J - 1 on A >= 0 (0 when Q(0) <= J - 1); Q decreases in A."""
    from scipy.optimize import brentq

    target = y.size - 1
    if _q_statistic(0.0, y, d) <= target:
        return 0.0
    hi = max(float(np.var(y, ddof=1)), float(d.max()))
    while _q_statistic(hi, y, d) > target:
        hi *= 4.0
    return float(brentq(lambda a: _q_statistic(a, y, d) - target, 0.0, hi, xtol=1e-14 * hi))
