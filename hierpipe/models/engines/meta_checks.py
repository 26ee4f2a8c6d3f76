r"""Optional engine functions of the meta-analysis engine: model checks.

The model is :math:`y_j = x_j^\top\beta + u_j + e_j`, :math:`u_j \sim N(0, \tau^2)`,
:math:`e_j \sim N(0, v_j)` with :math:`v_j` known, one estimate a study
(:mod:`hierpipe.models.engines.meta`, which re-exports everything here; the
interface is described in :mod:`hierpipe.models.engines`).

With one estimate a study there is no within-study replication: a study's SD
is undefined, its minimum and maximum are the estimate itself, and no
observation of a study can be held out while the study stays in the fit. So
the predictive check has one per-study statistic (the estimate) besides the
four overall ones, and there is no within-study K-fold (:data:`KFOLD_UNAVAILABLE`).

References
----------
Viechtbauer, W. & Cheung, M. W.-L. (2010). Outlier and influence diagnostics for
meta-analysis. *Research Synthesis Methods* 1, 112-125.
Morris, C. N. (1983). Parametric empirical Bayes inference: theory and
applications. *J. Amer. Statist. Assoc.* 78(381), 47-55.
Gelman, A., Carlin, J. B., Stern, H. S., Dunson, D. B., Vehtari, A. & Rubin,
D. B. (2013). *Bayesian Data Analysis*, 3rd ed., ch. 6.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from hierpipe.diagnostics.ppc import Replicates, thin_indices
from hierpipe.diagnostics.residuals import residual_table
from hierpipe.diagnostics.shrinkage import james_stein
from hierpipe.models.structure import Structure

if TYPE_CHECKING:
    from hierpipe.models.engines.meta import MetaData

FloatArray = NDArray[np.float64]

PPC_REPLICATES = 400
PRIOR_DRAWS = 4000
PPC_NEEDS_INFO = True
"""The diagnose stage passes ``info`` (fit.json) to :func:`ppc_replicates`: the
exact posterior of ``meta_bayes`` is recomputed from the prior it records."""
KFOLD_UNAVAILABLE = "one estimate per study, no within-study replication"
"""Why there is no within-group K-fold (the engine has no ``score_kfold``)."""


def _sd_name(structure: Structure) -> str:
    return f"sd_{structure.group}__Intercept"


def _coef_names(structure: Structure, labels: tuple[str, ...]) -> list[str]:
    return [f"coef_{structure.group}[{lab},Intercept]" for lab in labels]


def _plugin(data: MetaData, structure: Structure, summary: pd.DataFrame):
    """``(beta, tau)`` of a point fit; ``beta`` None for no pooling (no population)."""
    est = summary.set_index("parameter")["mean"]
    names = [f"b_{n}" for n in data.names]
    if not all(n in est.index for n in names):
        return None, np.nan
    tau = float(est.get(_sd_name(structure), 0.0))  # complete pooling: tau = 0
    return est[names].to_numpy(dtype=np.float64), tau


# --------------------------------------------------------------------------- PPC


def _posterior_draws(data: MetaData, info: dict[str, Any], n: int, rng: np.random.Generator):
    """Exact independent draws of ``(mu, tau, theta)`` from meta_bayes' grid posterior."""
    from hierpipe.models.engines.meta import _posterior
    from hierpipe.models.meta_bayes import draw_meta_posterior

    _, post = _posterior(data, {"prior": info["priors"]["sd"]})
    return draw_meta_posterior(post, n, rng)


def ppc_replicates(
    data: MetaData,
    structure: Structure,
    summary: pd.DataFrame,
    draws: pd.DataFrame | None,
    rng: np.random.Generator,
    replicates: int = PPC_REPLICATES,
    info: dict[str, Any] | None = None,
) -> Replicates:
    r"""Replicated estimates :math:`y^{rep}_j \sim N(\theta_j, v_j)`, one per study.

    ``gibbs``: one replicate per posterior draw, thinned evenly to
    ``replicates``, with :math:`\theta_j` the draw's ``coef_`` value (or, when
    ``draws.parquet`` lacks it, a draw from its full conditional
    :math:`N((1-B_j)y_j + B_j\mu, (1-B_j)v_j)`, :math:`B_j = v_j/(v_j+\tau^2)`).
    ``meta_bayes``: ``replicates`` exact independent draws of
    :math:`(\mu, \tau, \theta)` from its grid posterior
    (:func:`hierpipe.models.meta_bayes.draw_meta_posterior`).
    Point estimators: parametric simulation from the fitted *marginal* model,
    :math:`\theta_j \sim N(x_j^\top\hat\beta, \hat\tau^2)` afresh each replicate,
    so :math:`y^{rep}_j \sim N(x_j^\top\hat\beta, \hat\tau^2 + v_j)` (complete
    pooling: :math:`\hat\tau = 0`); this is the check of whether
    :math:`\hat\tau` accounts for the spread of the estimates. No pooling:
    :math:`\theta_j = y_j`. The statistics are each study's estimate and the
    mean, SD, minimum and maximum over the studies (``group_statistics``
    ``("mean",)``: a study's SD is undefined, its min and max are its estimate).
    """
    k = data.k
    sd_v = np.sqrt(data.v)
    is_bayes = info is not None and info.get("meta", {}).get("method") == "meta_bayes"
    if draws is not None:
        idx = thin_indices(len(draws), replicates)
        sub = draws.iloc[idx]
        names = _coef_names(structure, data.labels)
        if all(n in sub.columns for n in names):
            theta = sub[names].to_numpy(dtype=np.float64)
            how = "the draw's study effects"
        else:
            mu = sub["b_Intercept"].to_numpy(dtype=np.float64)[:, None]
            t2 = sub[_sd_name(structure)].to_numpy(dtype=np.float64)[:, None] ** 2
            b = data.v / (data.v + t2)
            mean = (1.0 - b) * data.y + b * mu
            theta = mean + np.sqrt((1.0 - b) * data.v) * rng.standard_normal(mean.shape)
            how = "study effects drawn from their full conditional given the draw's mu and tau"
        note = (
            f"one replicate per posterior draw, {idx.size} of {len(draws)} draws taken evenly; "
            f"{how}; replicated estimates y_rep_j ~ N(theta_j, v_j)"
        )
    elif is_bayes:
        theta = _posterior_draws(data, info, replicates, rng)["theta"]
        note = (
            f"{replicates} exact independent draws from the grid posterior of (mu, tau, theta); "
            "replicated estimates y_rep_j ~ N(theta_j, v_j)"
        )
    else:
        beta, tau = _plugin(data, structure, summary)
        if beta is None:
            est = summary.set_index("parameter")["mean"]
            coef = est.reindex(_coef_names(structure, data.labels)).to_numpy(dtype=np.float64)
            theta = np.broadcast_to(coef, (replicates, k))
            note = (
                f"parametric simulation: {replicates} sets of estimates y_rep_j ~ N(y_j, v_j) "
                "around each study's own estimate"
            )
        else:
            mean = data.X @ beta
            theta = mean + tau * rng.standard_normal((replicates, k))
            note = (
                f"parametric simulation from the fitted marginal model: {replicates} sets of "
                f"estimates y_rep_j ~ N(x_j'b, tau^2 + v_j) at the estimates (tau = {tau:.4g}); "
                "the estimates' uncertainty is not propagated"
            )
    y_rep = theta + sd_v * rng.standard_normal(theta.shape)
    stats = {"mean": y_rep, "sd": np.full_like(y_rep, np.nan), "min": y_rep, "max": y_rep}
    return Replicates(
        count=y_rep.shape[0],
        blocks=iter([(0, k, stats)]),
        note=note,
        group_statistics=("mean",),
    )


# --------------------------------------------------------------------------- prior predictive


def _draw_tau(spec: dict[str, Any], rng: np.random.Generator, size: int) -> FloatArray | None:
    """Draws from the prior on tau as fit.json records it; None when it is improper."""
    family, scale = spec.get("family"), spec.get("scale")
    if scale is None:  # the unbounded uniform prior (BDA3's default) is improper
        return None
    scale = float(scale)
    if family == "uniform":
        return scale * rng.random(size)
    if family == "half_cauchy":
        return scale * np.abs(rng.standard_cauchy(size))
    if family == "half_normal":
        return scale * np.abs(rng.standard_normal(size))
    raise ValueError(f"prior family '{family}' is not a prior on tau")


def prior_predictive(
    data: MetaData,
    structure: Structure,
    info: dict[str, Any],
    rng: np.random.Generator,
    size: int = PRIOR_DRAWS,
) -> pd.DataFrame | None:
    r"""What the priors imply for a new study's estimate with a typical sampling variance.

    Per draw: :math:`\tau` from its prior, a new study's true deviation
    :math:`\tau z_1` from :math:`\mu`, its estimate's deviation :math:`\tau z_1 +
    \sqrt{\tilde v} z_2` with :math:`\tilde v` the median of the studies'
    :math:`v_j`, the SD of such estimates about :math:`\mu`,
    :math:`\sqrt{\tau^2 + \tilde v}` (``outcome_sd``), and with a normal prior on
    :math:`\mu` also :math:`\mu` and the new estimate itself (NaN under the flat
    prior, which implies no distribution for the estimates' level). None when
    the fit records no priors or the prior on :math:`\tau` is improper (uniform
    without an upper bound): then no prior predictive distribution exists.
    """
    priors = info.get("priors")
    if not priors or "sd" not in priors:
        return None
    tau = _draw_tau(priors["sd"], rng, size)
    if tau is None:
        return None
    v_typ = float(np.median(data.v))
    b = priors.get("b_Intercept", {"family": "flat"})
    if b.get("family") == "normal":
        mu = float(b["mean"]) + float(b["sd"]) * rng.standard_normal(size)
    else:
        mu = np.full(size, np.nan)
    group_dev = tau * rng.standard_normal(size)
    obs_dev = group_dev + np.sqrt(v_typ) * rng.standard_normal(size)
    return pd.DataFrame(
        {
            "draw": np.arange(size, dtype=np.int64),
            "b_Intercept": mu,
            _sd_name(structure): tau,
            "typical_se": np.full(size, np.sqrt(v_typ)),
            "outcome_sd": np.sqrt(tau**2 + v_typ),
            "new_group_deviation": group_dev,
            "new_observation_deviation": obs_dev,
            "new_observation": mu + obs_dev,
        }
    )


# --------------------------------------------------------------------------- residuals


def standardized_residuals(
    y: FloatArray, v: FloatArray, X: FloatArray, tau2: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    r"""metafor's ``rstandard.rma.uni`` (marginal): fitted values, residuals and their SEs.

    With :math:`W = \operatorname{diag}(1/(v_j + \tau^2))`, :math:`\hat\beta =
    (X^\top W X)^{-1} X^\top W y` and the hat matrix :math:`H = X(X^\top W X)^{-1}X^\top W`,
    the residual :math:`e = (I - H)y` has covariance :math:`(I-H)M(I-H)^\top =
    M - X(X^\top W X)^{-1}X^\top`, :math:`M = W^{-1}`, so
    :math:`\operatorname{SE}(e_j) = \sqrt{v_j + \tau^2 - x_j^\top(X^\top W X)^{-1}x_j}`
    and the internally standardised residual is :math:`e_j/\operatorname{SE}(e_j)`
    (Viechtbauer & Cheung 2010, eq. 5).
    """
    w = 1.0 / (v + tau2)
    xtwx = X.T @ (w[:, None] * X)
    beta = np.linalg.solve(xtwx, X.T @ (w * y))
    fitted = X @ beta
    lev = np.einsum("ki,ij,kj->k", X, np.linalg.inv(xtwx), X)
    se = np.sqrt(np.maximum(v + tau2 - lev, 0.0))
    return fitted, y - fitted, se


def residuals(
    design: Any, data: MetaData, structure: Structure, summary: pd.DataFrame
) -> pd.DataFrame:
    r"""Standardised residuals of each study's estimate (metafor's ``rstandard``).

    Columns of :mod:`hierpipe.diagnostics.residuals` in study order: ``fitted``
    is :math:`x_j^\top\hat\beta(\hat\tau)`, the GLS fit at the fit's
    :math:`\hat\tau` (its estimate; the posterior mean for Bayesian fits; 0 for
    complete pooling), ``standardised`` the residual over its SE
    (:func:`standardized_residuals`), and ``se`` that SE. No pooling fits each
    study by its own estimate, so its residuals are zero and ``standardised``
    is NaN. The externally standardised (leave-one-out, ``rstudent``) residual
    is the ``std_residual`` column of the leave-one-study-out CV table.
    """
    beta, tau = _plugin(data, structure, summary)
    codes = np.arange(data.k)
    if beta is None:
        table = residual_table(data.y, data.y, np.nan, codes, data.labels)
        table["se"] = np.nan
        return table
    fitted, resid, se = standardized_residuals(data.y, data.v, data.X, tau**2)
    table = residual_table(data.y, fitted, 1.0, codes, data.labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["standardised"] = np.where(se > 0, resid / se, np.nan)
    table["se"] = se
    return table


# --------------------------------------------------------------------------- James-Stein


def morris_estimate(y: FloatArray, v: FloatArray, X: FloatArray) -> dict[str, Any]:
    r"""Morris's (1983, sec. 4) empirical Bayes estimate with known unequal variances.

    :math:`\hat A \ge 0` solves :math:`\sum_j (y_j - x_j^\top\hat\beta_A)^2/(A + v_j) = k - p`
    (0 when the left side is at most :math:`k-p` at :math:`A = 0`), with
    :math:`\hat\beta_A` the GLS estimate at :math:`A`; then
    :math:`B_j = \frac{k-p-2}{k-p}\frac{v_j}{v_j + \hat A}` and
    :math:`\hat\theta_j = x_j^\top\hat\beta + (1 - B_j)(y_j - x_j^\top\hat\beta)`.
    With :math:`p = 1` this is :func:`hierpipe.diagnostics.shrinkage.james_stein`
    (Efron & Morris 1973, 1975); with equal :math:`v_j` and :math:`\hat A > 0`, the
    positive-part James–Stein estimate.
    """
    from scipy.optimize import brentq

    k, p = X.shape

    def gls(a: float) -> tuple[FloatArray, float]:
        w = 1.0 / (a + v)
        beta = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * y))
        return beta, float(np.dot(w, (y - X @ beta) ** 2))

    target = k - p
    if gls(0.0)[1] <= target:
        a_hat = 0.0
    else:
        hi = max(float(np.var(y, ddof=1)), float(v.max()))
        while gls(hi)[1] > target:
            hi *= 4.0
        a_hat = float(brentq(lambda a: gls(a)[1] - target, 0.0, hi, xtol=1e-14 * hi))
    beta = gls(a_hat)[0]
    b = max(k - p - 2, 0) / (k - p) * v / (v + a_hat)
    centre = X @ beta
    return {"estimate": centre + (1.0 - b) * (y - centre), "shrinkage": b, "a_hat": a_hat,
            "centre": centre}  # fmt: skip


def james_stein_table(
    data: MetaData, structure: Structure
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Efron–Morris (or James–Stein, equal variances) estimates of the study effects.

    The studies' sampling variances :math:`v_j` are known, so nothing is
    estimated for them. Intercept only: :func:`hierpipe.diagnostics.shrinkage.james_stein`;
    with moderators: :func:`morris_estimate` (shrinking towards the regression
    :math:`x_j^\\top\\hat\\beta`). None when there are no more studies than coefficients.
    """
    if data.k - data.X.shape[1] < 1:
        return None
    if data.intercept_only:
        js = james_stein(data.y, data.v)
        estimate, b, centre, a_hat, form = js.estimate, js.shrinkage, js.centre, js.a_hat, js.form
    else:
        m = morris_estimate(data.y, data.v, data.X)
        estimate, b, a_hat, form = m["estimate"], m["shrinkage"], m["a_hat"], "morris_regression"
        centre = float("nan")  # a regression line, not one value
    table = pd.DataFrame(
        {
            "group": pd.Series(data.labels, dtype=str),
            "james_stein": np.asarray(estimate, dtype=np.float64),
            "js_shrinkage": np.asarray(b, dtype=np.float64),
        }
    )
    facts = {
        "form": form,
        "known_variances": True,
        "a_hat": float(a_hat),
        "centre": float(centre) if np.isfinite(centre) else None,
        "effective_parameters": float(np.sum(1.0 - np.asarray(b))),
    }
    return table, facts
