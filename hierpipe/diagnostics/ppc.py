r"""Posterior (and parametric) predictive checks with per-group test statistics.

For each replicate :math:`y^{rep}` of the data (one per thinned posterior draw
for samplers; draws from the model at the estimates for point estimators) the
test statistics :math:`T` are each group's mean, SD, minimum and maximum and the
same four over all observations. The posterior predictive p-value of a
statistic is :math:`p = \Pr(T(y^{rep}) \ge T(y))`, estimated by the share of
replicates at or above the observed value (Gelman, Carlin, Stern, Dunson,
Vehtari & Rubin 2013, BDA3 ch. 6). A p-value below 0.025 or above 0.975 marks
the statistic as extreme: the model rarely reproduces it; up to the replicates'
discreteness, that is an observed value outside the central 95% of the
replicated ones (``rep_q025`` to ``rep_q975``).

Replicates never touch the raw data: for the normal model
:math:`y_{ij} \sim N(\theta_j, \sigma^2)`, given :math:`(\theta, \sigma)` each
statistic is drawn from its exact sampling distribution,

.. math::
    \bar y_j \sim N(\theta_j, \sigma^2 / n_j), \quad
    S_j \sim \sigma^2 \chi^2_{n_j - 1}, \quad
    \max_i y_{ij} = \theta_j + \sigma \Phi^{-1}(U^{1/n_j}), \quad
    \min_i y_{ij} = \theta_j - \sigma \Phi^{-1}(V^{1/n_j}),

with :math:`U, V` uniform (the largest of :math:`n` uniforms is
:math:`U^{1/n}`), so a replicate costs :math:`O(J)` whatever the number of
observations. :math:`\bar y_j` and :math:`S_j` are independent, so the overall
mean and SD are exact; the overall minimum and maximum are the extremes of the
independent groups' ones. Within one replicate the minimum and maximum of a
group are drawn independently of each other and of its mean: each p-value uses
only its own statistic's distribution, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtri

STATISTICS = ("mean", "sd", "min", "max")
P_EXTREME = (0.025, 0.975)
PPC_COLUMNS = [
    "scope",
    "group",
    "n",
    "statistic",
    "observed",
    "rep_mean",
    "rep_q025",
    "rep_q5",
    "rep_q95",
    "rep_q975",
    "p_value",
    "extreme",
]


@dataclass(frozen=True)
class Replicates:
    """Test statistics of replicated data sets.

    Attributes
    ----------
    group : dict statistic -> ndarray (R, J)
    overall : dict statistic -> ndarray (R,)
    note : how the replicates were drawn, for the report.
    """

    group: dict[str, np.ndarray]
    overall: dict[str, np.ndarray]
    note: str


@dataclass(frozen=True)
class Observed:
    """The observed statistics: per group (J,) and overall (scalars)."""

    n: np.ndarray
    group: dict[str, np.ndarray]
    overall: dict[str, float]


def observed_statistics(y: np.ndarray, codes: np.ndarray, n_groups: int) -> Observed:
    """Per-group and overall mean, SD (ddof 1), minimum and maximum, in one pass over ``y``."""
    y = np.asarray(y, dtype=np.float64)
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    mean = np.bincount(codes, weights=y, minlength=n_groups) / n
    ss = np.bincount(codes, weights=(y - mean[codes]) ** 2, minlength=n_groups)
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, codes, y)
    np.maximum.at(hi, codes, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(n > 1, np.sqrt(ss / (n - 1)), np.nan)
    overall = {
        "mean": float(y.mean()),
        "sd": float(y.std(ddof=1)) if y.size > 1 else np.nan,
        "min": float(y.min()),
        "max": float(y.max()),
    }
    return Observed(n=n, group={"mean": mean, "sd": sd, "min": lo, "max": hi}, overall=overall)


def normal_group_replicates(
    theta: np.ndarray, sigma: np.ndarray, n: np.ndarray, rng: np.random.Generator, note: str
) -> Replicates:
    """Statistics of replicates of :math:`y_{ij} \\sim N(\\theta_j, \\sigma^2)` (module docstring).

    Parameters
    ----------
    theta : ndarray (R, J)
        Group means, one row a replicate.
    sigma : ndarray (R,)
        Residual SD, one a replicate.
    n : ndarray (J,)
        Group sizes.
    rng : generator.
    note : how ``theta`` and ``sigma`` were chosen.
    """
    theta = np.asarray(theta, dtype=np.float64)
    r, j = theta.shape
    s = np.asarray(sigma, dtype=np.float64)[:, None]
    n = np.asarray(n, dtype=np.float64)
    mean = theta + s / np.sqrt(n) * rng.standard_normal((r, j))
    df = np.maximum(n - 1.0, 1.0)
    ss = np.where(n > 1, s**2 * rng.chisquare(np.broadcast_to(df, (r, j))), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(n > 1, np.sqrt(ss / df), np.nan)
    # The upper tail beyond the largest of n normals is 1 - U^(1/n) = -expm1(log U / n):
    # computed so, it keeps full precision when n is large and U^(1/n) is near 1.
    upper = -np.expm1(np.log(rng.random((r, j))) / n)
    lower = -np.expm1(np.log(rng.random((r, j))) / n)
    hi = theta - s * ndtri(upper)
    lo = theta + s * ndtri(lower)
    total_n = n.sum()
    grand = mean @ n / total_n
    tss = ss.sum(axis=1) + ((mean - grand[:, None]) ** 2) @ n
    overall = {
        "mean": grand,
        "sd": np.sqrt(tss / (total_n - 1)) if total_n > 1 else np.full(r, np.nan),
        "min": lo.min(axis=1),
        "max": hi.max(axis=1),
    }
    return Replicates(
        group={"mean": mean, "sd": sd, "min": lo, "max": hi}, overall=overall, note=note
    )


def p_values(observed: np.ndarray, replicated: np.ndarray) -> np.ndarray:
    """Share of replicates at or above the observed value, per column (NaN where undefined)."""
    rep = np.asarray(replicated, dtype=np.float64)
    obs = np.asarray(observed, dtype=np.float64)
    valid = np.isfinite(rep)
    count = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.sum(valid & (rep >= obs), axis=0) / count
    return np.where(np.isfinite(obs) & (count > 0), p, np.nan)


def _rows(scope, labels, n, stat, obs, rep) -> pd.DataFrame:
    rep2 = rep if rep.ndim == 2 else rep[:, None]
    obs1 = np.atleast_1d(np.asarray(obs, dtype=np.float64))
    p = p_values(obs1, rep2)
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(rep2), rep2, np.nan)
        rep_mean = np.nanmean(finite, axis=0) if finite.size else np.nan
        q025, q5, q95, q975 = np.nanquantile(finite, [0.025, 0.05, 0.95, 0.975], axis=0)
    return pd.DataFrame(
        {
            "scope": scope,
            "group": pd.Series(labels, dtype=str),
            "n": np.asarray(n, dtype=np.float64),
            "statistic": stat,
            "observed": obs1,
            "rep_mean": rep_mean,
            "rep_q025": q025,
            "rep_q5": q5,
            "rep_q95": q95,
            "rep_q975": q975,
            "p_value": p,
            "extreme": (p < P_EXTREME[0]) | (p > P_EXTREME[1]),
        }
    )


def ppc_table(observed: Observed, replicates: Replicates, labels: tuple[str, ...]) -> pd.DataFrame:
    """One row a (group, statistic) and one an overall statistic: observed, replicated, p-value."""
    import warnings

    parts = []
    with warnings.catch_warnings():
        # All-NaN columns (the SD of single-observation groups) are expected.
        warnings.simplefilter("ignore", RuntimeWarning)
        for stat in STATISTICS:
            parts.append(
                _rows(
                    "overall",
                    [""],
                    [observed.n.sum()],
                    stat,
                    observed.overall[stat],
                    replicates.overall[stat],
                )
            )
        for stat in STATISTICS:
            parts.append(
                _rows(
                    "group", labels, observed.n, stat, observed.group[stat], replicates.group[stat]
                )
            )
    out = pd.concat(parts, ignore_index=True)[PPC_COLUMNS]
    return out.astype({"scope": str, "group": str, "statistic": str, "extreme": bool})


def overall_table(replicates: Replicates) -> pd.DataFrame:
    """The overall statistics of every replicate (for the report's histograms)."""
    r = next(iter(replicates.overall.values())).size
    cols = {"replicate": np.arange(r, dtype=np.int64)}
    cols.update({s: np.asarray(replicates.overall[s], dtype=np.float64) for s in STATISTICS})
    return pd.DataFrame(cols)


def empty_ppc() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Zero-row tables with the right columns, for fits whose engine has no replicates."""
    ppc = pd.DataFrame({c: pd.Series(dtype=float) for c in PPC_COLUMNS}).astype(
        {"scope": str, "group": str, "statistic": str, "extreme": bool}
    )
    overall = pd.DataFrame(
        {"replicate": pd.Series(dtype=np.int64), **{s: pd.Series(dtype=float) for s in STATISTICS}}
    )
    return ppc, overall


def thin_indices(total: int, keep: int) -> np.ndarray:
    """``keep`` evenly spaced indices into ``total`` draws (all when there are fewer)."""
    if total <= keep:
        return np.arange(total)
    return (np.arange(keep) * total) // keep
