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

Engines hand over the replicated statistics a block of groups at a time
(:class:`Replicates`), and the tables are built block by block, so memory is
bounded by a block (:data:`BLOCK_VALUES` values a statistic), not by
replicates times groups (400 x 10^5 groups would be 320 MB a statistic).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtri

STATISTICS = ("mean", "sd", "min", "max")
P_EXTREME = (0.025, 0.975)
BLOCK_VALUES = 1 << 21
"""Replicates x groups in one block of replicated statistics (16 MB a float64 array)."""
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
_QUANTILES = [0.025, 0.05, 0.95, 0.975]

Block = tuple[int, int, dict[str, np.ndarray]]


@dataclass(frozen=True)
class Replicates:
    """Test statistics of replicated data sets, a block of groups at a time.

    Attributes
    ----------
    count : R, the number of replicated data sets.
    blocks : iterable of ``(start, stop, stats)``, consecutive blocks of groups
        covering all of them in order; ``stats`` maps each of :data:`STATISTICS`
        to an array (R, stop - start). Consumed once.
    note : how the replicates were drawn, for the report.
    group_statistics : the statistics with per-group rows in ``ppc.parquet``
        (default all four). A meta-analysis has one estimate a study, whose SD
        is undefined and whose minimum and maximum are the estimate itself, so
        its engine keeps ``("mean",)``; the overall statistics are always all four.
    """

    count: int
    blocks: Iterable[Block]
    note: str
    group_statistics: tuple[str, ...] = STATISTICS


@dataclass(frozen=True)
class Observed:
    """The observed statistics: per group (J,) and overall (scalars)."""

    n: np.ndarray
    group: dict[str, np.ndarray]
    overall: dict[str, float]


def block_size(replicates: int) -> int:
    """Groups a block: :data:`BLOCK_VALUES` / R (at least one)."""
    return max(1, BLOCK_VALUES // max(1, replicates))


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


def normal_group_statistics(
    theta: np.ndarray, sigma: np.ndarray, n: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Replicated statistics of :math:`y_{ij} \\sim N(\\theta_j, \\sigma^2)` (module docstring).

    Parameters
    ----------
    theta : ndarray (R, b)
        Group means, one row a replicate.
    sigma : ndarray (R,)
        Residual SD, one a replicate.
    n : ndarray (b,)
        Group sizes.
    rng : generator.

    Returns
    -------
    dict statistic -> ndarray (R, b)
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
    return {
        "mean": mean,
        "sd": sd,
        "min": theta + s * ndtri(lower),
        "max": theta - s * ndtri(upper),
    }


def p_values(observed: np.ndarray, replicated: np.ndarray) -> np.ndarray:
    """Share of replicates at or above the observed value, per column (NaN where undefined)."""
    rep = np.asarray(replicated, dtype=np.float64)
    obs = np.asarray(observed, dtype=np.float64)
    valid = np.isfinite(rep)
    count = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.sum(valid & (rep >= obs), axis=0) / count
    return np.where(np.isfinite(obs) & (count > 0), p, np.nan)


def _rows(scope: str, labels, n, stat: str, obs, rep: np.ndarray) -> pd.DataFrame:
    rep2 = rep if rep.ndim == 2 else rep[:, None]
    obs1 = np.atleast_1d(np.asarray(obs, dtype=np.float64))
    if np.isnan(rep2).any():
        with warnings.catch_warnings():
            # All-NaN columns (the SD of single-observation groups) are expected.
            warnings.simplefilter("ignore", RuntimeWarning)
            rep_mean = np.nanmean(rep2, axis=0)
            q = np.nanquantile(rep2, _QUANTILES, axis=0)
    else:  # the NaN-aware versions are several times slower
        rep_mean = rep2.mean(axis=0)
        q = np.quantile(rep2, _QUANTILES, axis=0)
    p = p_values(obs1, rep2)
    return pd.DataFrame(
        {
            "scope": scope,
            "group": pd.Series(labels, dtype=str),
            "n": np.asarray(n, dtype=np.float64),
            "statistic": stat,
            "observed": obs1,
            "rep_mean": rep_mean,
            "rep_q025": q[0],
            "rep_q5": q[1],
            "rep_q95": q[2],
            "rep_q975": q[3],
            "p_value": p,
            "extreme": (p < P_EXTREME[0]) | (p > P_EXTREME[1]),
        }
    )


class _Overall:
    """Running overall statistics of each replicate over blocks of groups.

    With :math:`c` the observed overall mean (a shift that keeps precision),
    :math:`A = \\sum_j n_j(\\bar y_j - c)`, :math:`B = \\sum_j n_j(\\bar y_j - c)^2`
    and :math:`W = \\sum_j (n_j - 1) s_j^2`, the overall mean is :math:`c + A/N`
    and the total sum of squares :math:`W + B - A^2/N`.
    """

    def __init__(self, replicates: int, centre: float, total: float) -> None:
        self.c, self.total = centre, total
        self.a = np.zeros(replicates)
        self.b = np.zeros(replicates)
        self.w = np.zeros(replicates)
        self.lo = np.full(replicates, np.inf)
        self.hi = np.full(replicates, -np.inf)

    def add(self, n: np.ndarray, stats: dict[str, np.ndarray]) -> None:
        dev = stats["mean"] - self.c
        self.a += dev @ n
        self.b += dev**2 @ n
        self.w += np.nan_to_num(stats["sd"] ** 2) @ np.maximum(n - 1.0, 0.0)
        self.lo = np.minimum(self.lo, stats["min"].min(axis=1))
        self.hi = np.maximum(self.hi, stats["max"].max(axis=1))

    def result(self) -> dict[str, np.ndarray]:
        tss = self.w + self.b - self.a**2 / self.total
        sd = np.sqrt(np.maximum(tss, 0.0) / (self.total - 1)) if self.total > 1 else np.nan * tss
        return {"mean": self.c + self.a / self.total, "sd": sd, "min": self.lo, "max": self.hi}


def ppc_tables(
    observed: Observed, replicates: Replicates, labels: tuple[str, ...]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``ppc.parquet`` and ``ppc_overall.parquet`` tables, built block by block.

    ``ppc``: one row an overall statistic (``scope`` "overall", ``group`` "")
    and one a (group, statistic): observed value, replicated mean and
    quantiles, p-value, extreme. ``ppc_overall``: the overall statistics of
    every replicate.
    """
    total = float(observed.n.sum())
    acc = _Overall(replicates.count, observed.overall["mean"], total)
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in STATISTICS}
    covered = 0
    for start, stop, stats in replicates.blocks:
        if start != covered:
            raise ValueError(f"replicate blocks must be consecutive: {start} after {covered}")
        n = observed.n[start:stop]
        acc.add(n, stats)
        for s in replicates.group_statistics:
            obs = observed.group[s][start:stop]
            parts[s].append(_rows("group", labels[start:stop], n, s, obs, stats[s]))
        covered = stop
    if covered != len(labels):
        raise ValueError(f"replicate blocks cover {covered} of {len(labels)} groups")
    overall = acc.result()
    rows = [_rows("overall", [""], [total], s, observed.overall[s], overall[s]) for s in STATISTICS]
    rows += [df for s in replicates.group_statistics for df in parts[s]]
    table = pd.concat(rows, ignore_index=True)[PPC_COLUMNS]
    table = table.astype({"scope": str, "group": str, "statistic": str, "extreme": bool})
    reps = pd.DataFrame({"replicate": np.arange(replicates.count, dtype=np.int64)})
    for s in STATISTICS:
        reps[s] = np.asarray(overall[s], dtype=np.float64)
    return table, reps


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
