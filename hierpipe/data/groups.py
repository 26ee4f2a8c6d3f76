"""Per-group sufficient statistics of a one-way layout.

Everything the two-level estimators and the Gibbs sampler need from the data is
here: per group the count :math:`n_j`, mean :math:`\\bar y_j` and within-group
sum of squares :math:`S_j = \\sum_i (y_{ij} - \\bar y_j)^2`. They are computed
with vectorised sweeps over the observations (no Python loop over rows); the
squares are taken about each group's own mean, so values around 1e12 keep
their precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupStats:
    """Sufficient statistics of :math:`y_{ij} \\sim N(\\theta_j, \\sigma^2)`."""

    labels: tuple[str, ...]
    n: np.ndarray
    ybar: np.ndarray
    ss: np.ndarray
    # Names for error messages: the file, the outcome column and the grouping factor.
    source: str = "data"
    response: str = "y"
    group: str = "group"

    @property
    def n_groups(self) -> int:
        return len(self.labels)

    @property
    def n_obs(self) -> int:
        return int(self.n.sum())

    @property
    def ssw(self) -> float:
        """Pooled within-group sum of squares."""
        return float(self.ss.sum())

    @property
    def grand_mean(self) -> float:
        return float(np.dot(self.n, self.ybar) / self.n.sum())

    def without(self, j: int) -> GroupStats:
        """The statistics with group ``j`` left out (for leave-one-group-out)."""
        keep = np.arange(self.n_groups) != j
        return GroupStats(
            labels=tuple(lab for k, lab in enumerate(self.labels) if k != j),
            n=self.n[keep],
            ybar=self.ybar[keep],
            ss=self.ss[keep],
            source=self.source,
            response=self.response,
            group=self.group,
        )


def group_stats(y: np.ndarray, codes: np.ndarray, labels: tuple[str, ...]) -> GroupStats:
    """Per-group count, mean and within-group sum of squares.

    Parameters
    ----------
    y : float array (N,)
    codes : int array (N,) with values in ``0 .. len(labels)-1``
    labels : group labels, in code order
    """
    g = len(labels)
    n = np.bincount(codes, minlength=g).astype(np.float64)
    # Shift each group by its first value: deviations from a member are small, so
    # the sums keep their precision at large offsets (values around 1e12), and a
    # group whose values are all equal gets exactly that mean and S_j = 0, which
    # the engines test for (zero within-group variance).
    first = np.full(g, codes.size, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(codes.size, dtype=np.int64))
    shift = y[np.minimum(first, codes.size - 1)] if codes.size else np.zeros(g)
    ybar = shift + np.bincount(codes, weights=y - shift[codes], minlength=g) / n
    ss = np.bincount(codes, weights=(y - ybar[codes]) ** 2, minlength=g)
    return GroupStats(labels=tuple(labels), n=n, ybar=ybar, ss=ss)


def factorize(values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes and sorted string labels of a group column."""
    labels, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    return codes.astype(np.int64), tuple(str(x) for x in labels)
