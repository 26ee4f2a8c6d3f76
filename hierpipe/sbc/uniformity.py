r"""Is a sample of SBC ranks uniform on :math:`\{0, \dots, L\}`?

Two answers, for ``N`` ranks of one parameter:

* :func:`chi_square_uniformity`: Pearson's chi-square test on the histogram of
  ranks in ``B`` equiprobable bins (Talts et al. 2018 show such histograms;
  the test turns one into a p-value). With :math:`E = N/B` expected per bin the
  statistic :math:`\sum_b (O_b - E)^2/E` is approximately :math:`\chi^2_{B-1}`
  under uniformity when :math:`E \gtrsim 5`.
* :func:`ecdf_band`: the simultaneous :math:`1-\alpha` band of the ranks' ECDF
  of Säilynoja, Bürkner & Vehtari (2022). At the points
  :math:`z_i = i/K`, :math:`i = 1..K-1`, the count :math:`N F(z_i)` of ranks
  below :math:`z_i (L+1)` is :math:`\text{Bin}(N, z_i)` under uniformity. The
  band is :math:`[q_{\gamma/2}, q_{1-\gamma/2}]` of those binomials with
  :math:`\gamma` chosen (by simulating uniform samples, their section 2.2 and
  the ``"simulate"`` method of bayesplot) so that the whole ECDF stays inside
  with probability :math:`1-\alpha`. Plotted as :math:`F(z) - z`, the ECDF
  difference, it shows *where* the ranks depart from uniformity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["EcdfBand", "bin_counts", "chi_square_uniformity", "ecdf_band", "ecdf_counts"]


def _check_bins(draws: int, bins: int) -> int:
    if bins < 2 or (draws + 1) % bins:
        raise ValueError(f"bins ({bins}) must be >= 2 and divide L + 1 = {draws + 1}")
    return (draws + 1) // bins


def bin_counts(ranks: np.ndarray, draws: int, bins: int) -> np.ndarray:
    """Counts of ranks in ``bins`` equiprobable bins of ``0..draws`` (each ``(L+1)/bins`` ranks)."""
    width = _check_bins(draws, bins)
    r = np.asarray(ranks, dtype=np.int64)
    if r.size and (r.min() < 0 or r.max() > draws):
        raise ValueError(f"ranks must lie in 0..{draws}")
    return np.bincount(r // width, minlength=bins)


def chi_square_uniformity(ranks: np.ndarray, draws: int, bins: int) -> tuple[float, float]:
    """Pearson statistic and p-value of uniformity of ``ranks`` in ``bins`` bins (``bins-1`` df)."""
    counts = bin_counts(ranks, draws, bins)
    expected = counts.sum() / bins
    statistic = float(((counts - expected) ** 2).sum() / expected)
    return statistic, float(stats.chi2.sf(statistic, bins - 1))


def ecdf_counts(ranks: np.ndarray, draws: int, points: int) -> np.ndarray:
    r""":math:`N F(z_i)`: the count of ranks below :math:`z_i (L+1)`, :math:`z_i = i/K`, i < K."""
    return np.cumsum(bin_counts(ranks, draws, points))[:-1]


@dataclass(frozen=True)
class EcdfBand:
    """Simultaneous band of ``N`` uniform ranks' ECDF at ``z = i/K``, ``i = 1..K-1``.

    ``lower`` and ``upper`` bound the count :math:`N F(z_i)`; ``gamma`` is the
    pointwise level that makes the band simultaneous at ``1 - alpha``.
    """

    n: int
    z: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    alpha: float

    def contains(self, counts: np.ndarray) -> bool:
        """Whether an ECDF (as counts :math:`N F(z_i)`) lies inside the band everywhere."""
        c = np.asarray(counts)
        return bool(np.all((c >= self.lower) & (c <= self.upper)))


def _min_tail_probability(counts: np.ndarray, n: int, z: np.ndarray) -> np.ndarray:
    """Per row: twice the smallest binomial tail probability over the evaluation points."""
    below = stats.binom.cdf(counts, n, z)
    above = stats.binom.sf(counts - 1, n, z)
    return 2.0 * np.minimum(below, above).min(axis=-1)


def ecdf_band(
    n: int,
    points: int,
    *,
    alpha: float = 0.05,
    simulations: int = 4000,
    seed: int = 20220101,
) -> EcdfBand:
    """The simultaneous ``1 - alpha`` ECDF band for ``n`` uniform ranks at ``points`` points.

    ``gamma`` is the ``alpha`` quantile of the smallest two-sided binomial tail
    probability of ``simulations`` uniform samples (Säilynoja et al. 2022); the
    seed is fixed, so the band is a pure function of its arguments. With 4000
    simulations the band's simultaneous level is within about
    :math:`\\pm 0.7` percentage points (two binomial SEs at 95%) of ``1 - alpha``.
    """
    if n < 1 or points < 2:
        raise ValueError("ecdf_band needs n >= 1 and points >= 2")
    rng = np.random.default_rng(seed)
    z = np.arange(1, points) / points
    # Counts below z_i of uniform samples, via bin counts per simulated sample,
    # a block of samples at a time to bound memory.
    mins = []
    block = max(1, (1 << 22) // n)
    for start in range(0, simulations, block):
        m = min(block, simulations - start)
        idx = np.minimum((rng.random((m, n)) * points).astype(np.int64), points - 1)
        flat = np.bincount((idx + points * np.arange(m)[:, None]).ravel(), minlength=m * points)
        counts = np.cumsum(flat.reshape(m, points), axis=1)[:, :-1]
        mins.append(_min_tail_probability(counts, n, z))
    gamma = float(np.quantile(np.concatenate(mins), alpha))
    lower = stats.binom.ppf(gamma / 2, n, z)
    upper = stats.binom.ppf(1 - gamma / 2, n, z)
    return EcdfBand(n=n, z=z, lower=lower, upper=upper, gamma=gamma, alpha=alpha)
