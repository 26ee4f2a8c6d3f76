r"""Random-effects meta-analysis and meta-regression with known sampling variances.

The model (Hedges & Olkin 1985; DerSimonian & Laird 1986; Raudenbush 2009) is

.. math::

    y_i = x_i^\top \beta + u_i + e_i, \qquad
    u_i \sim N(0, \tau^2), \qquad e_i \sim N(0, v_i), \qquad i = 1, \dots, k,

with :math:`v_i = \mathrm{se}_i^2` known and :math:`x_i` the i-th row of a
:math:`k \times p` design matrix (a column of ones, the intercept, by default).
Marginally :math:`y \sim N(X\beta, \operatorname{diag}(v) + \tau^2 I)`.

Every quantity here is a function of the per-study triples :math:`(y_i, v_i,
x_i)`, which are the sufficient statistics of the model; one evaluation at a
given :math:`\tau^2` costs :math:`O(k p^2)` (never a :math:`k \times k`
matrix). With :math:`w_i = 1/(v_i + \tau^2)`, :math:`W = \operatorname{diag}(w)`,
:math:`A = X^\top W X` and :math:`P = W - W X A^{-1} X^\top W`, the weighted
residual sum of squares is :math:`y^\top P y = \sum_i w_i r_i^2` with
:math:`r = y - X\hat\beta(\tau^2)`, and the traces needed by the estimators are

.. math::

    \operatorname{tr} P = \textstyle\sum_i w_i - \operatorname{tr}(A^{-1} X^\top W^2 X), \qquad
    \textstyle\sum_{ij} P_{ij}^2 a_i b_j = \sum_i w_i^2 a_i b_i
        - 2 \sum_i w_i^3 a_i b_i h_{ii}
        + \operatorname{tr}(A^{-1} X^\top W^2 D_a X A^{-1} X^\top W^2 D_b X),

with :math:`h_{ii} = x_i^\top A^{-1} x_i` (expand :math:`P_{ij} = w_i\delta_{ij} -
w_i w_j h_{ij}`). Conventions (names, truncation at zero, the typical
within-study variance in :math:`I^2`, the Knapp-Hartung scale factor, the BLUPs)
follow R's metafor ``rma.uni`` (Viechtbauer 2010), so results can be checked
against it number for number.

References
----------
DerSimonian, R. & Laird, N. (1986). Meta-analysis in clinical trials.
*Controlled Clinical Trials* 7, 177-188.
Paule, R. C. & Mandel, J. (1982). Consensus values and weighting factors.
*J. Res. Natl. Bur. Stand.* 87, 377-385.
Hunter, J. E. & Schmidt, F. L. (2004). *Methods of Meta-Analysis* (2nd ed.). Sage.
Sidik, K. & Jonkman, J. N. (2005). Simple heterogeneity variance estimation for
meta-analysis. *JRSS C* 54, 367-384.
Viechtbauer, W. (2005). Bias and efficiency of meta-analytic variance estimators
in the random-effects model. *J. Educ. Behav. Stat.* 30, 261-293.
Viechtbauer, W. (2007). Confidence intervals for the amount of heterogeneity in
meta-analysis. *Statistics in Medicine* 26, 37-52.
Viechtbauer, W. (2010). Conducting meta-analyses in R with the metafor package.
*J. Stat. Softw.* 36(3), 1-48.
Knapp, G. & Hartung, J. (2003). Improved tests for a random effects
meta-regression with a single covariate. *Statistics in Medicine* 22, 2693-2710.
Higgins, J. P. T. & Thompson, S. G. (2002). Quantifying heterogeneity in a
meta-analysis. *Statistics in Medicine* 21, 1539-1558.
Higgins, J. P. T., Thompson, S. G. & Spiegelhalter, D. J. (2009). A re-evaluation
of random-effects meta-analysis. *JRSS A* 172, 137-159.
Raudenbush, S. W. (2009). Analyzing effect sizes: random-effects models. In
Cooper, Hedges & Valentine (eds.), *The Handbook of Research Synthesis and
Meta-Analysis* (2nd ed.), 295-315. Russell Sage Foundation.
Raudenbush, S. W. & Bryk, A. S. (1985). Empirical Bayes meta-analysis.
*J. Educ. Stat.* 10, 75-98.
Egger, M., Davey Smith, G., Schneider, M. & Minder, C. (1997). Bias in
meta-analysis detected by a simple, graphical test. *BMJ* 315, 629-634.
Sterne, J. A. C. & Egger, M. (2005). Regression methods to detect publication and
other bias in meta-analysis. In Rothstein, Sutton & Borenstein (eds.),
*Publication Bias in Meta-Analysis*, 99-110. Wiley.
Sterne, J. A. C. et al. (2011). Recommendations for examining and interpreting
funnel plot asymmetry in meta-analyses of randomised controlled trials. *BMJ*
343, d4002.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import linalg, optimize, stats

from hierpipe.errors import ConfigError, InputError, MethodError

__all__ = [
    "FIXED",
    "METHODS",
    "EggerTest",
    "MetaPrediction",
    "MetaResult",
    "egger_test",
    "log_risk_ratio",
    "meta_fit",
    "meta_predict",
    "q_profile_ci",
    "tau2_dl",
    "tau2_hs",
    "tau2_ml",
    "tau2_pm",
    "tau2_reml",
    "tau2_sj",
]

FloatArray = NDArray[np.float64]

METHODS: tuple[str, ...] = ("DL", "PM", "ML", "REML", "HS", "SJ")
# the fixed-effect (common-effect, inverse-variance) model: tau2 = 0 by assumption
FIXED = "FE"

_LOG_2PI = float(np.log(2.0 * np.pi))
# Fisher scoring stops when a step is below this fraction of (tau2 + median v):
# far below any printed digit, and reached in a handful of iterations.
_SCORING_RTOL = 1e-10
_SCORING_MAXITER = 500


# ----------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------


def _check_inputs(
    y: ArrayLike, v: ArrayLike, X: ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Validate and convert ``y``, ``v`` and ``X``; raise InputError with one line."""
    y_arr = np.asarray(y, dtype=np.float64)
    v_arr = np.asarray(v, dtype=np.float64)
    if y_arr.ndim != 1 or v_arr.ndim != 1:
        raise InputError("y and v must be one-dimensional (one value a study)")
    if y_arr.shape != v_arr.shape:
        raise InputError(f"y has {y_arr.size} studies but v has {v_arr.size}")
    k = y_arr.size
    if k < 2:
        raise InputError(f"meta-analysis needs at least 2 studies, got {k}")
    bad = np.flatnonzero(~np.isfinite(y_arr))
    if bad.size:
        raise InputError(f"y: effect size of study {bad[0]} is {y_arr[bad[0]]!r}, not finite")
    bad = np.flatnonzero(~(np.isfinite(v_arr) & (v_arr > 0)))
    if bad.size:
        raise InputError(
            f"v: sampling variance of study {bad[0]} is {v_arr[bad[0]]!r}; "
            "variances (se^2) must be finite and > 0"
        )
    if X is None:
        X_arr = np.ones((k, 1))
    else:
        X_arr = np.asarray(X, dtype=np.float64)
        if X_arr.ndim == 1:
            X_arr = X_arr[:, None]
        if X_arr.ndim != 2 or X_arr.shape[0] != k:
            raise InputError(f"X has {X_arr.shape[0]} rows but there are {k} studies")
        if not np.all(np.isfinite(X_arr)):
            raise InputError("X: moderators must be finite")
    p = X_arr.shape[1]
    if k <= p:
        raise InputError(f"{k} studies cannot estimate tau2 with {p} coefficients: need k > p")
    if np.linalg.matrix_rank(X_arr) < p:
        raise InputError("X is rank deficient: a moderator is a combination of the others")
    return y_arr, v_arr, X_arr


def _check_method(method: str) -> str:
    m = str(method).upper()
    if m not in METHODS and m != FIXED:
        raise ConfigError(
            f"unknown tau2 method {method!r}; choose one of {', '.join(METHODS)} (or {FIXED})"
        )
    return m


# ----------------------------------------------------------------------------
# the weighted least-squares fit at a given tau2
# ----------------------------------------------------------------------------


def _cross(a: FloatArray, b: FloatArray) -> FloatArray:
    r""":math:`A^\top B` for tall k-row matrices.

    einsum's own loops rather than BLAS: for k x p with tiny p they are as fast,
    and the sums do not depend on the BLAS thread count, so results are the same
    bits whatever ``--cores`` is (DESIGN: parquet byte-identical across runs).
    """
    return np.einsum("ki,kj->ij", a, b)


@dataclass(frozen=True)
class _Wls:
    """GLS fit of ``y`` on ``X`` with weights ``w = 1/(v + tau2)``."""

    tau2: float
    w: FloatArray
    beta: FloatArray
    vb: FloatArray  # (X'WX)^{-1}
    resid: FloatArray
    rss: float  # y'Py = sum w r^2
    tr_p: float
    tr_pp: float
    logdet_xwx: float


def _wls(y: FloatArray, v: FloatArray, X: FloatArray, tau2: float) -> _Wls:
    w = 1.0 / (v + tau2)
    xw = X * w[:, None]
    cho = linalg.cho_factor(_cross(X, xw), lower=True)
    vb = linalg.cho_solve(cho, np.eye(X.shape[1]))
    beta = vb @ np.einsum("ki,k->i", xw, y)
    resid = y - np.einsum("ki,i->k", X, beta)
    b1 = vb @ _cross(xw, xw)  # A^{-1} X'W^2X
    b3 = vb @ _cross(X, X * (w**3)[:, None])  # A^{-1} X'W^3X
    return _Wls(
        tau2=float(tau2),
        w=w,
        beta=beta,
        vb=vb,
        resid=resid,
        rss=float(np.sum(w * resid**2)),
        tr_p=float(np.sum(w) - np.trace(b1)),
        tr_pp=float(np.sum(w**2) - 2.0 * np.trace(b3) + np.sum(b1 * b1.T)),
        logdet_xwx=float(2.0 * np.sum(np.log(np.diag(cho[0])))),
    )


def _sum_p2(fit: _Wls, X: FloatArray, a: FloatArray, b: FloatArray) -> float:
    r"""Return :math:`\sum_{ij} P_{ij}^2 a_i b_j` in O(k p^2) (see module docstring)."""
    w = fit.w
    h = np.einsum("ij,jk,ik->i", X, fit.vb, X)
    ma = fit.vb @ _cross(X, X * (w**2 * a)[:, None])
    mb = fit.vb @ _cross(X, X * (w**2 * b)[:, None])
    return float(np.sum(w**2 * a * b) - 2.0 * np.sum(w**3 * a * b * h) + np.sum(ma * mb.T))


def _loglik_ml(fit: _Wls, v: FloatArray) -> float:
    k = v.size
    return -0.5 * (k * _LOG_2PI + float(np.sum(np.log(v + fit.tau2))) + fit.rss)


def _loglik_reml(fit: _Wls, v: FloatArray, X: FloatArray) -> float:
    # metafor's default (REMLf = TRUE) keeps the +1/2 log|X'X| term, which makes
    # the restricted likelihood invariant to rescaling the moderators.
    k, p = X.shape
    logdet_xx = float(np.linalg.slogdet(_cross(X, X))[1])
    return -0.5 * (
        (k - p) * _LOG_2PI
        - logdet_xx
        + float(np.sum(np.log(v + fit.tau2)))
        + fit.logdet_xwx
        + fit.rss
    )


# ----------------------------------------------------------------------------
# tau2 estimators
# ----------------------------------------------------------------------------


def tau2_dl(y: ArrayLike, v: ArrayLike, X: ArrayLike | None = None) -> float:
    r"""DerSimonian-Laird moment estimator of :math:`\tau^2` (general form for meta-regression).

    .. math::

        \hat\tau^2_{DL} = \max\left(0,\;
        \frac{Q_E - (k - p)}{\operatorname{tr} P_0}\right),

    where :math:`Q_E = y^\top P_0 y` is Cochran's (residual) heterogeneity
    statistic and :math:`P_0` is :math:`P` at :math:`\tau^2 = 0` (weights
    :math:`1/v_i`). Solves :math:`E[Q_E] = (k - p) + \tau^2 \operatorname{tr}
    P_0` (DerSimonian & Laird 1986; Raudenbush 2009 for the meta-regression form).

    Parameters
    ----------
    y : array of shape (k,)
        Observed effect sizes.
    v : array of shape (k,)
        Known sampling variances, :math:`\mathrm{se}_i^2 > 0`.
    X : array of shape (k, p), optional
        Moderators including the intercept column; default intercept only.

    Returns
    -------
    float
        The estimate, truncated at zero.
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    return _tau2_dl(y_, v_, X_)


def _tau2_dl(y: FloatArray, v: FloatArray, X: FloatArray) -> float:
    k, p = X.shape
    fit0 = _wls(y, v, X, 0.0)
    return max(0.0, (fit0.rss - (k - p)) / fit0.tr_p)


def tau2_hs(y: ArrayLike, v: ArrayLike, X: ArrayLike | None = None) -> float:
    r"""Hunter-Schmidt estimator of :math:`\tau^2`, in metafor's form.

    .. math::

        \hat\tau^2_{HS} = \max\left(0,\; \frac{Q_E - k}{\sum_i 1/v_i}\right),

    with :math:`Q_E` the fixed-effect (residual) heterogeneity statistic
    (Hunter & Schmidt 2004; Viechtbauer 2005, eq. 11). It subtracts :math:`k`,
    not :math:`k - p`, so it is negatively biased; this matches
    ``metafor::rma(method = "HS")``.

    Parameters
    ----------
    y, v, X
        As in :func:`tau2_dl`.

    Returns
    -------
    float
        The estimate, truncated at zero.
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    return _tau2_hs(y_, v_, X_)


def _tau2_hs(y: FloatArray, v: FloatArray, X: FloatArray) -> float:
    k = y.size
    fit0 = _wls(y, v, X, 0.0)
    return max(0.0, (fit0.rss - k) / float(np.sum(1.0 / v)))


def _sj_start(y: FloatArray) -> float:
    # Sidik & Jonkman's crude start, the ML variance of y about its mean; metafor
    # uses this same value also with moderators, and so do we.
    return float(np.mean((y - np.mean(y)) ** 2))


def tau2_sj(y: ArrayLike, v: ArrayLike, X: ArrayLike | None = None) -> float:
    r"""Sidik-Jonkman estimator of :math:`\tau^2`.

    With the start :math:`\hat\tau_0^2 = \frac1k \sum_i (y_i - \bar y)^2`,

    .. math::

        \hat\tau^2_{SJ} = \frac{\hat\tau_0^2}{k - p}\, y^\top P(\hat\tau_0^2)\, y
        = \frac{\hat\tau_0^2}{k - p} \sum_i \frac{(y_i - x_i^\top\hat\beta)^2}
          {v_i + \hat\tau_0^2},

    the residual mean square of the GLS fit under weights
    :math:`1/(v_i + \hat\tau_0^2)` (Sidik & Jonkman 2005). It is strictly positive
    unless all residuals vanish, so it never reports a homogeneous set of
    studies as such. The start is metafor's (``var(yi) * (k-1)/k``), also for
    meta-regression.

    Parameters
    ----------
    y, v, X
        As in :func:`tau2_dl`.

    Returns
    -------
    float
        The estimate (non-negative by construction).
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    return _tau2_sj(y_, v_, X_)


def _tau2_sj(y: FloatArray, v: FloatArray, X: FloatArray) -> float:
    k, p = X.shape
    tau0 = _sj_start(y)
    if tau0 == 0.0:
        return 0.0
    return max(0.0, tau0 * _wls(y, v, X, tau0).rss / (k - p))


def _bracket_decreasing(f: Callable[[float], float], start: float) -> float:
    """Return ``hi`` with ``f(hi) < 0`` for ``f`` decreasing to a negative limit."""
    hi = start
    for _ in range(400):
        if f(hi) < 0.0:
            return hi
        hi *= 2.0
    raise MethodError("could not bracket the root of the Q-statistic equation")


def _solve_q(y: FloatArray, v: FloatArray, X: FloatArray, target: float) -> float:
    r"""Smallest :math:`\tau^2 \ge 0` with :math:`Q(\tau^2) = y^\top P y` equal to ``target``.

    :math:`Q(\tau^2)` is strictly decreasing (its derivative is
    :math:`-y^\top P^2 y`) and tends to 0, so the root is unique when
    :math:`Q(0) > \text{target} > 0`; otherwise the answer is 0.
    """

    def f(t: float) -> float:
        return _wls(y, v, X, t).rss - target

    if f(0.0) <= 0.0:
        return 0.0
    scale = float(max(np.var(y), np.median(v)))
    hi = _bracket_decreasing(f, scale)
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-13 * scale, rtol=4 * np.finfo(float).eps))


def tau2_pm(y: ArrayLike, v: ArrayLike, X: ArrayLike | None = None) -> float:
    r"""Paule-Mandel estimator of :math:`\tau^2`.

    The root of the generalised Q-statistic equation

    .. math::

        Q(\tau^2) = \sum_i \frac{(y_i - x_i^\top\hat\beta(\tau^2))^2}{v_i + \tau^2} = k - p,

    or 0 when :math:`Q(0) < k - p` (Paule & Mandel 1982; Viechtbauer 2005 for the
    meta-regression form; equals the empirical Bayes estimator of Morris 1983).
    :math:`Q` is monotone decreasing, so the root is unique and found by Brent's
    method on a bracket grown by doubling.

    Parameters
    ----------
    y, v, X
        As in :func:`tau2_dl`.

    Returns
    -------
    float
        The estimate, zero when the equation has no non-negative root.
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    return _tau2_pm(y_, v_, X_)


def _tau2_pm(y: FloatArray, v: FloatArray, X: FloatArray) -> float:
    k, p = X.shape
    return _solve_q(y, v, X, float(k - p))


def _tau2_he(y: FloatArray, v: FloatArray, X: FloatArray) -> float:
    """Hedges' unweighted moment estimator (metafor's start for ML/REML), truncated at 0."""
    k, p = X.shape
    q, _ = np.linalg.qr(X)
    resid = y - np.einsum("ki,i->k", q, np.einsum("ki,k->i", q, y))
    lev = np.sum(q**2, axis=1)
    return max(0.0, (float(np.sum(resid**2)) - float(np.sum(v * (1.0 - lev)))) / (k - p))


def _score_info(fit: _Wls, reml: bool) -> tuple[float, float]:
    """Score and Fisher information of the (restricted) log-likelihood in tau2."""
    ypp_y = float(np.sum((fit.w * fit.resid) ** 2))  # y'PPy, since Py = W r
    if reml:
        return 0.5 * (ypp_y - fit.tr_p), 0.5 * fit.tr_pp
    return 0.5 * (ypp_y - float(np.sum(fit.w))), 0.5 * float(np.sum(fit.w**2))


def _fisher_scoring(y: FloatArray, v: FloatArray, X: FloatArray, reml: bool) -> float:
    """Maximise the (restricted) likelihood over tau2 >= 0 by Fisher scoring.

    As metafor: start at Hedges' estimate, step score/information, stay in
    [0, inf). Unlike metafor's plain scoring, each step is halved until the
    log-likelihood does not decrease, so the iteration is an ascent method and
    cannot cycle; and the converged value is compared with tau2 = 0 so that a
    boundary maximum is not missed.
    """

    def loglik(fit: _Wls) -> float:
        return _loglik_reml(fit, v, X) if reml else _loglik_ml(fit, v)

    scale = float(np.median(v))
    t = _tau2_he(y, v, X)
    fit = _wls(y, v, X, t)
    ll = loglik(fit)
    for _ in range(_SCORING_MAXITER):
        score, info = _score_info(fit, reml)
        step = score / info
        if t == 0.0 and step <= 0.0:
            break
        new_t = max(0.0, t + step)
        for _ in range(60):
            new_fit = _wls(y, v, X, new_t)
            new_ll = loglik(new_fit)
            # the tiny slack lets rounding noise at the optimum count as no decrease
            if new_ll >= ll - 1e-13 * abs(ll):
                break
            new_t = t + 0.5 * (new_t - t)
        change = abs(new_t - t)
        t, fit, ll = new_t, new_fit, new_ll
        if change <= _SCORING_RTOL * (t + scale):
            break
    else:
        name = "REML" if reml else "ML"
        raise MethodError(f"{name} Fisher scoring did not converge in {_SCORING_MAXITER} steps")
    if t > 0.0 and loglik(_wls(y, v, X, 0.0)) > ll:
        return 0.0
    return t


def tau2_ml(y: ArrayLike, v: ArrayLike, X: ArrayLike | None = None) -> float:
    r"""Maximum-likelihood estimator of :math:`\tau^2`.

    Maximises the profile log-likelihood over :math:`\tau^2 \ge 0`,

    .. math::

        \ell(\tau^2) = -\tfrac12 \Big[k \log 2\pi + \sum_i \log(v_i + \tau^2)
        + \sum_i w_i (y_i - x_i^\top \hat\beta(\tau^2))^2\Big],

    by Fisher scoring with score :math:`\tfrac12(y^\top P^2 y - \sum_i w_i)`
    and information :math:`\tfrac12 \sum_i w_i^2` (Viechtbauer 2005), with step
    halving and a final check of the boundary :math:`\tau^2 = 0`.

    Parameters
    ----------
    y, v, X
        As in :func:`tau2_dl`.

    Returns
    -------
    float
        The estimate, non-negative.
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    return _fisher_scoring(y_, v_, X_, reml=False)


def tau2_reml(y: ArrayLike, v: ArrayLike, X: ArrayLike | None = None) -> float:
    r"""Restricted maximum-likelihood estimator of :math:`\tau^2` (metafor's default).

    Maximises the restricted log-likelihood over :math:`\tau^2 \ge 0`,

    .. math::

        \ell_R(\tau^2) = -\tfrac12 \Big[(k - p)\log 2\pi - \log|X^\top X|
        + \sum_i \log(v_i + \tau^2) + \log|X^\top W X| + y^\top P y\Big],

    by Fisher scoring with score :math:`\tfrac12(y^\top P^2 y - \operatorname{tr} P)`
    and information :math:`\tfrac12 \operatorname{tr}(P^2)` (Viechtbauer 2005),
    with step halving and a final check of the boundary :math:`\tau^2 = 0`.

    Parameters
    ----------
    y, v, X
        As in :func:`tau2_dl`.

    Returns
    -------
    float
        The estimate, non-negative.
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    return _fisher_scoring(y_, v_, X_, reml=True)


_ESTIMATORS: dict[str, Callable[[FloatArray, FloatArray, FloatArray], float]] = {
    "DL": _tau2_dl,
    "PM": _tau2_pm,
    "ML": lambda y, v, X: _fisher_scoring(y, v, X, reml=False),
    "REML": lambda y, v, X: _fisher_scoring(y, v, X, reml=True),
    "HS": _tau2_hs,
    "SJ": _tau2_sj,
}


# ----------------------------------------------------------------------------
# standard error and confidence interval of tau2
# ----------------------------------------------------------------------------


def _var_quadratic_form(fit: _Wls, X: FloatArray, v: FloatArray, tau2: float) -> float:
    r"""Variance of :math:`y^\top P y` when :math:`y \sim N(X\beta, V + \tau^2 I)`.

    :math:`2\operatorname{tr}(P\Sigma P\Sigma)` with :math:`\Sigma = V + \tau^2 I`,
    expanded as :math:`2[\sum P_{ij}^2 v_i v_j + 2\tau^2 \sum P_{ij}^2 v_j +
    \tau^4 \sum P_{ij}^2]` (P annihilates X, so the mean drops out).
    """
    one = np.ones_like(v)
    return 2.0 * (
        _sum_p2(fit, X, v, v) + 2.0 * tau2 * _sum_p2(fit, X, one, v) + tau2**2 * fit.tr_pp
    )


def _se_tau2(
    method: str, y: FloatArray, v: FloatArray, X: FloatArray, tau2: float, fit: _Wls
) -> float:
    """Standard error of the tau2 estimate as metafor reports it (NaN for PM).

    ML/REML: inverse Fisher information at the estimate. DL, HS and SJ are
    constant times a quadratic form y'Py, so their SE is the exact sampling SD of
    the untruncated estimator with the estimate plugged in for tau2.
    """
    k, p = X.shape
    if method == "ML":
        return float(np.sqrt(2.0 / np.sum(fit.w**2)))
    if method == "REML":
        return float(np.sqrt(2.0 / fit.tr_pp))
    if method in ("DL", "HS"):
        fit0 = _wls(y, v, X, 0.0)
        denom = fit0.tr_p if method == "DL" else float(np.sum(1.0 / v))
        return float(np.sqrt(_var_quadratic_form(fit0, X, v, tau2)) / denom)
    if method == "SJ":
        tau0 = _sj_start(y)
        fit_s = _wls(y, v, X, tau0)
        return float(tau0 / (k - p) * np.sqrt(_var_quadratic_form(fit_s, X, v, tau2)))
    # PM is an implicit function of y; metafor's figure for it is a heuristic
    # we cannot verify independently, so none is reported.
    return float("nan")


def q_profile_ci(
    y: ArrayLike, v: ArrayLike, X: ArrayLike | None = None, level: float = 0.95
) -> tuple[float, float]:
    r"""Q-profile confidence interval for :math:`\tau^2` (Viechtbauer 2007).

    Inverts the pivot :math:`Q(\tau^2) = y^\top P(\tau^2) y \sim \chi^2_{k-p}`:
    the bounds solve

    .. math::

        Q(\tau^2_{lb}) = \chi^2_{k-p;\,1-\alpha/2}, \qquad
        Q(\tau^2_{ub}) = \chi^2_{k-p;\,\alpha/2},

    with a bound set to 0 when :math:`Q(0)` is already below its target (both
    are 0 when the data are more homogeneous than the interval allows), as in
    ``metafor::confint.rma.uni``. The interval does not depend on the estimator.

    Parameters
    ----------
    y, v, X
        As in :func:`tau2_dl`.
    level : float
        Coverage, in (0, 1).

    Returns
    -------
    (float, float)
        Lower and upper bound.
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    return _q_profile(y_, v_, X_, _check_level(level))


def _q_profile(y: FloatArray, v: FloatArray, X: FloatArray, level: float) -> tuple[float, float]:
    k, p = X.shape
    alpha = 1.0 - level
    lb = _solve_q(y, v, X, float(stats.chi2.ppf(1.0 - alpha / 2.0, k - p)))
    ub = _solve_q(y, v, X, float(stats.chi2.ppf(alpha / 2.0, k - p)))
    return lb, ub


def _check_level(level: float) -> float:
    lv = float(level)
    if not 0.0 < lv < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level!r}")
    return lv


# ----------------------------------------------------------------------------
# the fit
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MetaPrediction:
    r"""Predicted average effect :math:`x_0^\top\hat\beta` at new moderator rows.

    Attributes
    ----------
    pred, se : arrays (m,)
        Prediction and its standard error :math:`\sqrt{x_0^\top V_\beta x_0}`.
    ci_lb, ci_ub : arrays (m,)
        Confidence interval for the average effect at :math:`x_0`.
    pi_lb, pi_ub : arrays (m,)
        metafor's default prediction interval for the true effect of a new study:
        :math:`\text{pred} \pm c\sqrt{\text{se}^2 + \hat\tau^2}` with :math:`c` the
        normal quantile, or the :math:`t_{k-p}` quantile under Knapp-Hartung.
    pi_hts_lb, pi_hts_ub : arrays (m,)
        Higgins, Thompson & Spiegelhalter (2009, eq. 12) interval: the same centre
        and width factor with a :math:`t_{k-p-1}` quantile (:math:`t_{k-2}` without
        moderators; metafor's ``pi.type = "Riley"``). NaN when :math:`k - p - 1 < 1`.
    """

    pred: FloatArray
    se: FloatArray
    ci_lb: FloatArray
    ci_ub: FloatArray
    pi_lb: FloatArray
    pi_ub: FloatArray
    pi_hts_lb: FloatArray
    pi_hts_ub: FloatArray


@dataclass(frozen=True, eq=False)
class MetaResult:
    r"""A fitted random-effects meta-analysis (see :func:`meta_fit`).

    Attributes
    ----------
    method : str
        The :math:`\tau^2` estimator.
    k, p : int
        Number of studies and of coefficients.
    beta, se, vcov : arrays (p,), (p,), (p, p)
        GLS coefficients at :math:`\hat\tau^2`, their standard errors and
        covariance :math:`(X^\top \hat W X)^{-1}` (times ``s2w`` under Knapp-Hartung).
    zval, pval, ci_lb, ci_ub : arrays (p,)
        Wald statistic, two-sided p-value and confidence interval; the
        reference distribution is N(0, 1), or :math:`t_{k-p}` when ``knha``.
    test : str
        ``"z"`` or ``"t"``.
    df : float
        Degrees of freedom of the t tests (NaN for z).
    s2w : float
        Knapp-Hartung scale factor :math:`y^\top \hat P y/(k-p)` (1 without
        Knapp-Hartung); not truncated at 1, as metafor's ``test = "knha"``.
    tau2, se_tau2 : float
        Estimate and its standard error (NaN for PM).
    tau2_ci_lb, tau2_ci_ub : float
        Q-profile confidence interval (Viechtbauer 2007).
    Q, Q_df, Q_pval : float, int, float
        Cochran's Q (residual QE with moderators) with inverse-variance weights
        :math:`1/v_i`, its degrees of freedom :math:`k - p` and p-value.
    vt : float
        metafor's "typical" within-study variance :math:`(k-p)/\operatorname{tr}P_0`
        (Higgins & Thompson 2002 for :math:`p = 1`).
    I2, H2 : float
        :math:`100\,\hat\tau^2/(\hat\tau^2 + v_t)` and :math:`1 + \hat\tau^2/v_t`.
    I2_ci_lb, I2_ci_ub, H2_ci_lb, H2_ci_ub : float
        The Q-profile bounds mapped through the same formulas.
    blup, blup_se : arrays (k,)
        Best linear unbiased predictions of the study effects
        :math:`\theta_i = x_i^\top\beta + u_i` and their prediction SEs (metafor's
        ``blup``), see :func:`meta_fit`.
    pi_lb, pi_ub, pi_hts_lb, pi_hts_ub : float
        Prediction intervals for a new study (intercept-only models; NaN with
        moderators, use :func:`meta_predict`), see :class:`MetaPrediction`.
    loglik, loglik_reml : float
        Full and restricted log-likelihood at :math:`(\hat\beta, \hat\tau^2)`
        (metafor's ``fit.stats``, REML with the :math:`\tfrac12\log|X^\top X|` term).
    boundary : bool
        True when an estimator put :math:`\hat\tau^2` at 0 (never for ``"FE"``,
        where 0 is the model's assumption).
    level : float
        Coverage of all intervals.
    """

    method: str
    k: int
    p: int
    beta: FloatArray
    se: FloatArray
    vcov: FloatArray
    zval: FloatArray
    pval: FloatArray
    ci_lb: FloatArray
    ci_ub: FloatArray
    test: str
    df: float
    s2w: float
    tau2: float
    se_tau2: float
    tau2_ci_lb: float
    tau2_ci_ub: float
    Q: float
    Q_df: int
    Q_pval: float
    vt: float
    I2: float
    H2: float
    I2_ci_lb: float
    I2_ci_ub: float
    H2_ci_lb: float
    H2_ci_ub: float
    blup: FloatArray
    blup_se: FloatArray
    pi_lb: float
    pi_ub: float
    pi_hts_lb: float
    pi_hts_ub: float
    loglik: float
    loglik_reml: float
    boundary: bool
    level: float

    @property
    def tau(self) -> float:
        """Square root of the :math:`\\tau^2` estimate."""
        return float(np.sqrt(self.tau2))


def meta_fit(
    y: ArrayLike,
    v: ArrayLike,
    X: ArrayLike | None = None,
    method: str = "REML",
    knha: bool = False,
    level: float = 0.95,
) -> MetaResult:
    r"""Fit the random-effects model by one :math:`\tau^2` estimator, as ``metafor::rma``.

    Model: :math:`y_i = x_i^\top\beta + u_i + e_i`, :math:`u_i \sim N(0,\tau^2)`,
    :math:`e_i \sim N(0, v_i)`. Given :math:`\hat\tau^2`, the coefficients are
    the GLS estimate :math:`\hat\beta = (X^\top W X)^{-1} X^\top W y` with
    :math:`w_i = 1/(v_i + \hat\tau^2)` and covariance :math:`V_\beta = (X^\top W
    X)^{-1}`. Under Knapp-Hartung (``knha=True``; Knapp & Hartung 2003)
    :math:`V_\beta` is multiplied by :math:`s^2_w = y^\top P y/(k-p)` and tests
    and intervals use :math:`t_{k-p}`.

    BLUPs (Raudenbush & Bryk 1985, appendix; metafor ``blup``): with
    :math:`\lambda_i = \hat\tau^2/(\hat\tau^2 + v_i)`,

    .. math::

        \hat\theta_i = \lambda_i y_i + (1 - \lambda_i) x_i^\top\hat\beta, \qquad
        \operatorname{se}^2(\hat\theta_i) = \lambda_i v_i
            + (1 - \lambda_i)^2 x_i^\top V_\beta x_i,

    the conditional mean and variance of :math:`\theta_i` given the data, the
    second term carrying the uncertainty of :math:`\hat\beta`.

    Parameters
    ----------
    y : array (k,)
        Effect sizes.
    v : array (k,)
        Sampling variances (:math:`\mathrm{se}^2`), finite and positive.
    X : array (k, p), optional
        Design matrix including the intercept column; default intercept only.
    method : {"DL", "PM", "ML", "REML", "HS", "SJ", "FE"}
        :math:`\tau^2` estimator (see the ``tau2_*`` functions); ``"FE"`` is the
        fixed-effect (common-effect) model, :math:`\tau^2 = 0` by assumption:
        inverse-variance weights :math:`1/v_i`, no ``se_tau2``, and, as metafor's
        ``method = "FE"``, :math:`I^2 = \max(0, (Q - (k-p))/Q)` and
        :math:`H^2 = Q/(k-p)` (Higgins & Thompson 2002).
    knha : bool
        Knapp-Hartung adjustment of the coefficient tests (metafor ``test="knha"``).
    level : float
        Coverage of the intervals.

    Returns
    -------
    MetaResult

    Raises
    ------
    InputError
        Non-finite y, non-positive or non-finite v, fewer than two studies,
        X of the wrong shape or rank, or ``k <= p``.
    ConfigError
        Unknown ``method`` or ``level`` outside (0, 1).
    """
    y_, v_, X_ = _check_inputs(y, v, X)
    m = _check_method(method)
    lv = _check_level(level)
    k, p = X_.shape

    tau2 = 0.0 if m == FIXED else float(_ESTIMATORS[m](y_, v_, X_))
    fit = _wls(y_, v_, X_, tau2)
    fit0 = _wls(y_, v_, X_, 0.0)

    s2w = 1.0
    if knha:
        # metafor sets the factor to 0 when the residuals vanish to rounding
        s2w = fit.rss / (k - p) if fit.rss > np.finfo(float).eps else 0.0
    vcov = s2w * fit.vb
    se = np.sqrt(np.diag(vcov))
    with np.errstate(divide="ignore", invalid="ignore"):
        zval = fit.beta / se
    alpha = 1.0 - lv
    if knha:
        df = float(k - p)
        crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
        pval = 2.0 * stats.t.sf(np.abs(zval), df)
    else:
        df = float("nan")
        crit = float(stats.norm.ppf(1.0 - alpha / 2.0))
        pval = 2.0 * stats.norm.sf(np.abs(zval))

    q_stat = max(0.0, fit0.rss)
    vt = (k - p) / fit0.tr_p
    tau2_lb, tau2_ub = _q_profile(y_, v_, X_, lv)
    if m == FIXED:
        # metafor's FE convention: I2 and H2 from Q (Higgins & Thompson 2002, eqs. 9-10)
        i2 = max(0.0, 100.0 * (q_stat - (k - p)) / q_stat) if q_stat > 0 else 0.0
        h2 = q_stat / (k - p)
    else:
        i2, h2 = 100.0 * tau2 / (vt + tau2), 1.0 + tau2 / vt

    lam = tau2 / (tau2 + v_)
    xb = np.einsum("ki,i->k", X_, fit.beta)
    blup = lam * y_ + (1.0 - lam) * xb
    quad = np.einsum("ij,jk,ik->i", X_, vcov, X_)
    blup_se = np.sqrt(lam * v_ + (1.0 - lam) ** 2 * quad)

    res = MetaResult(
        method=m,
        k=k,
        p=p,
        beta=fit.beta,
        se=se,
        vcov=vcov,
        zval=zval,
        pval=np.asarray(pval, dtype=np.float64),
        ci_lb=fit.beta - crit * se,
        ci_ub=fit.beta + crit * se,
        test="t" if knha else "z",
        df=df,
        s2w=float(s2w),
        tau2=tau2,
        se_tau2=float("nan") if m == FIXED else _se_tau2(m, y_, v_, X_, tau2, fit),
        tau2_ci_lb=tau2_lb,
        tau2_ci_ub=tau2_ub,
        Q=q_stat,
        Q_df=k - p,
        Q_pval=float(stats.chi2.sf(q_stat, k - p)),
        vt=vt,
        I2=i2,
        H2=h2,
        I2_ci_lb=100.0 * tau2_lb / (vt + tau2_lb),
        I2_ci_ub=100.0 * tau2_ub / (vt + tau2_ub),
        H2_ci_lb=1.0 + tau2_lb / vt,
        H2_ci_ub=1.0 + tau2_ub / vt,
        blup=blup,
        blup_se=blup_se,
        pi_lb=float("nan"),
        pi_ub=float("nan"),
        pi_hts_lb=float("nan"),
        pi_hts_ub=float("nan"),
        loglik=_loglik_ml(fit, v_),
        loglik_reml=_loglik_reml(fit, v_, X_),
        boundary=tau2 == 0.0 and m != FIXED,
        level=lv,
    )
    if p == 1:
        pr = meta_predict(res, np.ones((1, 1)))
        res = replace(
            res,
            pi_lb=float(pr.pi_lb[0]),
            pi_ub=float(pr.pi_ub[0]),
            pi_hts_lb=float(pr.pi_hts_lb[0]),
            pi_hts_ub=float(pr.pi_hts_ub[0]),
        )
    return res


def meta_predict(
    result: MetaResult, x_new: ArrayLike, level: float | None = None
) -> MetaPrediction:
    r"""Average effect and prediction intervals at new moderator rows (metafor ``predict``).

    For a row :math:`x_0` (including the intercept), the prediction is
    :math:`x_0^\top\hat\beta` with standard error
    :math:`s_0 = \sqrt{x_0^\top V_\beta x_0}`; the interval for the true effect
    of a new study is :math:`x_0^\top\hat\beta \pm c\sqrt{s_0^2 + \hat\tau^2}`.
    The default :math:`c` is :math:`z_{1-\alpha/2}` (:math:`t_{k-p}` under
    Knapp-Hartung), as metafor; the Higgins-Thompson-Spiegelhalter variant
    uses :math:`t_{k-p-1}`.

    Parameters
    ----------
    result : MetaResult
        A fit from :func:`meta_fit`.
    x_new : array (m, p) or (p,)
        New rows of the design matrix.
    level : float, optional
        Coverage; defaults to the fit's.

    Returns
    -------
    MetaPrediction
    """
    lv = result.level if level is None else _check_level(level)
    x0 = np.atleast_2d(np.asarray(x_new, dtype=np.float64))
    if x0.shape[1] != result.p:
        raise InputError(f"x_new has {x0.shape[1]} columns but the model has p = {result.p}")
    pred = x0 @ result.beta
    se = np.sqrt(np.einsum("ij,jk,ik->i", x0, result.vcov, x0))
    alpha = 1.0 - lv
    if result.test == "t":
        crit = float(stats.t.ppf(1.0 - alpha / 2.0, result.df))
    else:
        crit = float(stats.norm.ppf(1.0 - alpha / 2.0))
    pi_se = np.sqrt(se**2 + result.tau2)
    df_hts = result.k - result.p - 1
    crit_hts = float(stats.t.ppf(1.0 - alpha / 2.0, df_hts)) if df_hts >= 1 else float("nan")
    return MetaPrediction(
        pred=pred,
        se=se,
        ci_lb=pred - crit * se,
        ci_ub=pred + crit * se,
        pi_lb=pred - crit * pi_se,
        pi_ub=pred + crit * pi_se,
        pi_hts_lb=pred - crit_hts * pi_se,
        pi_hts_ub=pred + crit_hts * pi_se,
    )


# ----------------------------------------------------------------------------
# effect sizes
# ----------------------------------------------------------------------------


def log_risk_ratio(
    tpos: ArrayLike, tneg: ArrayLike, cpos: ArrayLike, cneg: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    r"""Log risk ratios and their large-sample variances from 2x2 tables.

    With :math:`n_1 = a + b` treated (a events) and :math:`n_2 = c + d` controls
    (c events),

    .. math::

        y = \log\frac{a/n_1}{c/n_2}, \qquad
        v = \frac1a - \frac1{n_1} + \frac1c - \frac1{n_2}

    (delta method; metafor ``escalc(measure = "RR")`` without zero cells).

    Parameters
    ----------
    tpos, tneg, cpos, cneg : arrays (k,)
        Events and non-events in the treated and control arms.

    Returns
    -------
    (y, v) : arrays (k,)

    Raises
    ------
    InputError
        A count that is negative or not finite, or a zero event count (the log
        risk ratio is undefined; add a continuity correction first).
    """
    a, b, c, d = (np.asarray(x, dtype=np.float64) for x in (tpos, tneg, cpos, cneg))
    for name, x in (("tpos", a), ("tneg", b), ("cpos", c), ("cneg", d)):
        bad = np.flatnonzero(~(np.isfinite(x) & (x >= 0)))
        if bad.size:
            raise InputError(f"{name}: count of study {bad[0]} is {x[bad[0]]!r}, not >= 0")
    for name, x in (("tpos", a), ("cpos", c)):
        bad = np.flatnonzero(x == 0)
        if bad.size:
            raise InputError(
                f"{name}: study {bad[0]} has zero events; the log risk ratio is undefined "
                "(apply a continuity correction first)"
            )
    n1 = a + b
    n2 = c + d
    y = np.log((a / n1) / (c / n2))
    v = 1.0 / a - 1.0 / n1 + 1.0 / c - 1.0 / n2
    return y, v


# ----------------------------------------------------------------------------
# small-study effects
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EggerTest:
    r"""Egger's regression test for funnel-plot asymmetry (see :func:`egger_test`).

    Attributes
    ----------
    intercept, se : float
        The intercept :math:`\hat b_0` (the asymmetry) and its standard error.
    t, df, pval : float
        :math:`t = \hat b_0/\mathrm{se}` on :math:`k - 2` degrees of freedom and its
        two-sided p-value.
    slope, slope_se : float
        The slope (an effect estimate corrected for small-study effects) and its SE.
    """

    intercept: float
    se: float
    t: float
    df: int
    pval: float
    slope: float
    slope_se: float


def egger_test(y: ArrayLike, v: ArrayLike) -> EggerTest:
    r"""Egger's regression test (Egger, Davey Smith, Schneider & Minder 1997).

    Ordinary least squares of the standardised effect on the precision,

    .. math::

        \frac{y_i}{s_i} = b_0 + b_1 \frac{1}{s_i} + \varepsilon_i, \qquad
        s_i = \sqrt{v_i}, \qquad \varepsilon_i \sim N(0, \sigma^2),

    with :math:`H_0: b_0 = 0` (a symmetric funnel) tested by :math:`t` on
    :math:`k - 2` df. Equivalently, a weighted regression of :math:`y_i` on
    :math:`s_i` with weights :math:`1/v_i` and a free dispersion, whose slope on
    :math:`s_i` is :math:`b_0` (metafor's ``regtest(model = "lm")``, Sterne & Egger
    2005). The test has low power with few studies (Sterne et al. 2011 advise
    :math:`k \ge 10`).

    Parameters
    ----------
    y, v : arrays (k,)
        Effect sizes and sampling variances; :math:`k \ge 3`.

    Returns
    -------
    EggerTest

    Raises
    ------
    InputError
        Bad inputs, fewer than three studies, or all standard errors equal (the
        precision then does not vary and the intercept is not identified).
    """
    y_, v_, _ = _check_inputs(y, v, None)
    k = y_.size
    if k < 3:
        raise InputError(f"Egger's test needs at least 3 studies, got {k}")
    s = np.sqrt(v_)
    X = np.column_stack([np.ones(k), 1.0 / s])
    if np.ptp(X[:, 1]) <= 1e-12 * np.max(X[:, 1]):
        raise InputError("Egger's test: all standard errors are equal, so it is not defined")
    z = y_ / s
    xtx_inv = np.linalg.inv(_cross(X, X))
    b = xtx_inv @ np.einsum("ki,k->i", X, z)
    resid = z - np.einsum("ki,i->k", X, b)
    sigma2 = float(np.dot(resid, resid)) / (k - 2)
    se = np.sqrt(sigma2 * np.diag(xtx_inv))
    t = float(b[0] / se[0]) if se[0] > 0 else float("nan")
    return EggerTest(
        intercept=float(b[0]),
        se=float(se[0]),
        t=t,
        df=k - 2,
        pval=float(2.0 * stats.t.sf(abs(t), k - 2)),
        slope=float(b[1]),
        slope_se=float(se[1]),
    )
