r"""Two-level varying-intercept model fitted by pooling and empirical Bayes.

The model is

.. math::
    y_{ij} = \beta_0 + r_j + e_{ij}, \qquad r_j \sim N(0, \tau^2), \qquad
    e_{ij} \sim N(0, \sigma^2),

written in brms names as ``b_Intercept`` (:math:`\beta_0`),
``sd_{g}__Intercept`` (:math:`\tau`), ``sigma``, ``r_{g}[j,Intercept]`` and
``coef_{g}[j,Intercept]`` (:math:`\beta_0 + r_j`). Every function here works from
:class:`~hierpipe.data.groups.GroupStats` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import stdtrit

from hierpipe.data.groups import GroupStats
from hierpipe.models.result import FitResult, normal_row, point_row, summary_frame

Z90 = 1.6448536269514722


@dataclass(frozen=True)
class Prediction:
    """Predictive distribution for a new group, as mean, sd and 90% interval."""

    target: str
    mean: float
    sd: float
    q5: float
    q95: float
    kind: str


def prediction_rows(preds: list[Prediction]) -> list[dict]:
    return [
        {
            "target": p.target,
            "mean": p.mean,
            "sd": p.sd,
            "q5": p.q5,
            "q50": p.mean,
            "q95": p.q95,
            "kind": p.kind,
        }
        for p in preds
    ]


def complete_pooling(stats: GroupStats, group: str) -> FitResult:
    r"""One mean for everyone: :math:`y_{ij} \sim N(\beta_0, \sigma^2)`.

    :math:`\hat\beta_0 = \bar y`, its SE :math:`s/\sqrt N` with the total SD
    :math:`s`, a t interval on :math:`N-1` df; every group's coefficient is
    :math:`\hat\beta_0`.
    """
    n_obs = stats.n_obs
    mu = stats.grand_mean
    ss_total = stats.ssw + float(np.dot(stats.n, (stats.ybar - mu) ** 2))
    sigma = np.sqrt(ss_total / (n_obs - 1)) if n_obs > 1 else np.nan
    se = sigma / np.sqrt(n_obs)
    t = stdtrit(n_obs - 1, 0.95) if n_obs > 1 else np.nan
    rows = [
        point_row("b_Intercept", mu, se, mu - t * se, mu + t * se),
        point_row("sigma", sigma),
    ]
    rows += [
        point_row(f"coef_{group}[{lab},Intercept]", mu, se, mu - t * se, mu + t * se)
        for lab in stats.labels
    ]
    sd_new = np.sqrt(sigma**2 + se**2)
    preds = [
        Prediction(
            "new_group_mean",
            mu,
            se,
            mu - t * se,
            mu + t * se,
            "complete pooling: every group has the common mean",
        ),
        Prediction(
            "new_observation_new_group",
            mu,
            sd_new,
            mu - t * sd_new,
            mu + t * sd_new,
            "t interval on N-1 df with the SE of the mean added",
        ),
    ]
    info = {"df": n_obs - 1, "predictions": prediction_rows(preds), "warnings": []}
    return FitResult(summary=summary_frame(rows), info=info)


def no_pooling(stats: GroupStats, group: str) -> FitResult:
    r"""A separate mean per group, :math:`y_{ij} \sim N(\theta_j, \sigma^2)`.

    :math:`\hat\theta_j = \bar y_j`, SE :math:`\hat\sigma/\sqrt{n_j}` with the
    pooled within-group :math:`\hat\sigma^2 = \sum_j S_j/(N-J)`, t interval on
    :math:`N-J` df. No pooling cannot predict a new group.
    """
    df = stats.n_obs - stats.n_groups
    warnings = []
    if df > 0:
        sigma = np.sqrt(stats.ssw / df)
        t = stdtrit(df, 0.95)
    else:
        sigma, t = np.nan, np.nan
        warnings.append("no within-group replication: sigma and the standard errors are undefined")
    se = sigma / np.sqrt(stats.n)
    rows = [point_row("sigma", sigma)]
    rows += [
        point_row(f"coef_{group}[{lab},Intercept]", m, s, m - t * s, m + t * s)
        for lab, m, s in zip(stats.labels, stats.ybar, se, strict=True)
    ]
    preds = [
        Prediction(
            target,
            np.nan,
            np.nan,
            np.nan,
            np.nan,
            "not defined: no pooling has no population of groups",
        )
        for target in ("new_group_mean", "new_observation_new_group")
    ]
    info = {"df": df, "predictions": prediction_rows(preds), "warnings": warnings}
    return FitResult(summary=summary_frame(rows), info=info)


def moments_variances(stats: GroupStats) -> tuple[float, float, float]:
    r"""One-way ANOVA moment estimates :math:`(\hat\tau^2, \hat\sigma^2, n_0)`.

    :math:`\hat\sigma^2 = MSW`, :math:`\hat\tau^2 = (MSB - MSW)/n_0` with
    :math:`n_0 = (N - \sum n_j^2/N)/(J-1)` for unbalanced groups (Searle,
    Casella & McCulloch 1992, §3.5). :math:`\hat\tau^2` is returned unclipped:
    a negative value is the caller's to report as a boundary.
    """
    n_obs, g = stats.n_obs, stats.n_groups
    msw = stats.ssw / (n_obs - g) if n_obs > g else np.nan
    msb = float(np.dot(stats.n, (stats.ybar - stats.grand_mean) ** 2)) / (g - 1)
    n0 = (n_obs - float(np.sum(stats.n**2)) / n_obs) / (g - 1)
    return (msb - msw) / n0, msw, n0


def eb_fit(stats: GroupStats, group: str, tau2: float, sigma2: float, *, info: dict) -> FitResult:
    r"""Summary of the varying-intercept model at plug-in variances.

    Given :math:`\tau^2, \sigma^2`: :math:`w_j = 1/(\tau^2 + \sigma^2/n_j)`,
    :math:`\hat\beta_0 = \sum w_j \bar y_j / \sum w_j` with SE
    :math:`(\sum w_j)^{-1/2}`; shrinkage :math:`B_j = \tau^2 w_j`;
    conditional mean :math:`\hat\theta_j = \hat\beta_0 + B_j(\bar y_j - \hat\beta_0)`.
    ``r_`` SDs are the conditional SDs given :math:`\beta_0` (lme4's
    ``condVar``), :math:`\sqrt{B_j \sigma^2/n_j}`; ``coef_`` SDs add the
    uncertainty of :math:`\hat\beta_0`: :math:`(1-B_j)^2 \mathrm{SE}^2`
    (metafor's ``blup``). Intervals are normal; the variances' own uncertainty
    is ignored, as in every empirical-Bayes plug-in.
    """
    v = sigma2 / stats.n
    w = 1.0 / (tau2 + v)
    mu = float(np.dot(w, stats.ybar) / w.sum())
    se_mu = float(np.sqrt(1.0 / w.sum()))
    shrink = tau2 * w
    r = shrink * (stats.ybar - mu)
    r_sd = np.sqrt(shrink * v)
    coef_sd = np.sqrt(r_sd**2 + (1.0 - shrink) ** 2 * se_mu**2)
    tau, sigma = float(np.sqrt(tau2)), float(np.sqrt(sigma2))
    rows = [
        normal_row("b_Intercept", mu, se_mu),
        point_row(f"sd_{group}__Intercept", tau),
        point_row("sigma", sigma),
        point_row(f"icc_{group}", tau2 / (tau2 + sigma2)),
    ]
    summary = pd.concat(
        [
            summary_frame(rows),
            _normal_rows(f"r_{group}[", stats.labels, r, r_sd),
            _normal_rows(f"coef_{group}[", stats.labels, mu + r, coef_sd),
        ],
        ignore_index=True,
    )
    sd_mean = np.sqrt(tau2 + se_mu**2)
    sd_obs = np.sqrt(tau2 + sigma2 + se_mu**2)
    preds = [
        Prediction(
            "new_group_mean",
            mu,
            sd_mean,
            mu - Z90 * sd_mean,
            mu + Z90 * sd_mean,
            "normal approximation: tau^2 + SE(b_Intercept)^2, variances plugged in",
        ),
        Prediction(
            "new_observation_new_group",
            mu,
            sd_obs,
            mu - Z90 * sd_obs,
            mu + Z90 * sd_obs,
            "normal approximation: tau^2 + sigma^2 + SE(b_Intercept)^2",
        ),
    ]
    out = dict(info)
    out["predictions"] = prediction_rows(preds)
    out["shrinkage"] = dict(zip(stats.labels, shrink.tolist(), strict=True))
    return FitResult(summary=summary, info=out)


def _normal_rows(
    prefix: str, labels: tuple[str, ...], estimate: np.ndarray, se: np.ndarray
) -> pd.DataFrame:
    """:func:`normal_row` for every group at once (``prefix + label + ",Intercept]"``).

    Same float64 operations as the row function, so the same values bit for
    bit, without a dictionary a group (10^4-10^5 groups at scale).
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    se = np.asarray(se, dtype=np.float64)
    names = pd.Series([f"{prefix}{lab},Intercept]" for lab in labels], dtype=object)
    return pd.DataFrame(
        {
            "parameter": names.astype(str),
            "mean": estimate,
            "sd": se,
            "q5": estimate - Z90 * se,
            "q50": estimate,
            "q95": estimate + Z90 * se,
        }
    )
