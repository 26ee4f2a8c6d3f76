r"""MCMC convergence diagnostics: rank-normalised split R-hat, ESS and MCSE.

Everything here follows Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021)
and reproduces the numbers of ArviZ (``arviz.rhat(method="rank")``,
``arviz.ess(method="bulk" | "tail" | "mean")``, ``arviz.mcse(method="mean" |
"quantile")``) with numpy and scipy alone; ArviZ is a test dependency, never a
run-time one. One deliberate difference: ArviZ returns NaN for the R-hat of a
single chain, while here, as in Stan's ``posterior`` package, that chain is
split in two and R-hat compares its halves.

Every public function takes draws of shape ``(chains, draws)`` and returns a
float, or a batch of shape ``(chains, draws, k)`` and returns an array of
shape ``(k,)``, one value a column, computed for all columns at once: the
leading autocovariances are summed directly for the whole batch (the FFT over
the batch serves only the columns whose Geyer sequence runs past them) and the
ranks come from one sort, so there is no Python loop over parameters.
:func:`diagnose_draws` (and :func:`summarise_draws`, :func:`summarise_array`)
computes every summary at once, sharing that sort between the quantiles, the
bulk and folded ranks and the quantile MCSEs, a cache-sized chunk of
parameters at a time.

Conventions shared by all functions (the ArviZ ones):

* fewer than 4 draws, no chains, or a NaN anywhere in a column gives NaN;
* "split" means each chain's first and last ``draws // 2`` draws become two
  chains (the middle draw of an odd-length chain is dropped);
* a column whose (transformed) draws are all equal has ESS equal to its number
  of split draws and R-hat NaN (0/0 variance ratio).

References
----------
.. [1] Vehtari, A., Gelman, A., Simpson, D., Carpenter, B. and Bürkner, P.-C.
   (2021). Rank-normalization, folding, and localization: an improved
   :math:`\widehat{R}` for assessing convergence of MCMC. *Bayesian
   Analysis* 16(2), 667-718. doi:10.1214/20-BA1221
.. [2] Gelman, A. and Rubin, D. B. (1992). Inference from iterative simulation
   using multiple sequences. *Statistical Science* 7(4), 457-472.
.. [3] Geyer, C. J. (1992). Practical Markov chain Monte Carlo. *Statistical
   Science* 7(4), 473-483.
.. [4] Blom, G. (1958). *Statistical Estimates and Transformed Beta-Variables.*
   Wiley, New York.
.. [5] Kumar, R., Carroll, C., Hartikainen, A. and Martin, O. (2019). ArviZ a
   unified library for exploratory analysis of Bayesian models in Python.
   *Journal of Open Source Software* 4(33), 1143. doi:10.21105/joss.01143
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import fft, special, stats

from hierpipe.errors import InputError
from hierpipe.models.result import SAMPLER_COLUMNS, SUMMARY_COLUMNS, summary_frame

__all__ = [
    "ConvergenceFlag",
    "convergence_flags",
    "diagnose_draws",
    "ess_bulk",
    "ess_mean",
    "ess_tail",
    "flag_convergence",
    "mcse_mean",
    "mcse_quantile",
    "rhat_bulk",
    "rhat_tail",
    "split_rhat",
    "summarise_array",
    "summarise_draws",
]

FloatArray = NDArray[np.float64]

MIN_DRAWS = 4
"""Fewer draws per chain than this and every diagnostic is NaN (as in ArviZ)."""

TAIL_PROBS = (0.05, 0.95)
"""Quantiles whose indicator ESS defines the tail ESS ([1]_, section 4.3)."""

# Phi(-1) and Phi(1) to the 7 digits ArviZ uses; with more digits the order
# statistics picked by mcse_quantile could differ from ArviZ's at the edges.
_MCSE_Q_PROBS = np.array([0.1586553, 0.8413447])


# --------------------------------------------------------------------------
# Array plumbing. Internally a batch is (k, chains, draws): the draws axis is
# last and contiguous, which is what the FFT and the sort run along.


def _as_batch(x: ArrayLike) -> tuple[FloatArray, bool]:
    """Return draws as a contiguous (k, chains, draws) array and whether k was absent."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        return a[np.newaxis], True
    if a.ndim == 3:
        return np.ascontiguousarray(np.moveaxis(a, 2, 0)), False
    raise ValueError(f"draws must have shape (chains, draws) or (chains, draws, k), got {a.shape}")


def _unbatch(values: FloatArray, single: bool) -> float | FloatArray:
    return float(values[0]) if single else values


def _invalid(x: FloatArray) -> NDArray[np.bool_]:
    """Columns on which every diagnostic is NaN: too few draws/chains, or a NaN draw."""
    k, chains, draws = x.shape
    if chains < 1 or draws < MIN_DRAWS:
        return np.ones(k, dtype=bool)
    return np.isnan(x).any(axis=(1, 2))


def _split_chains(x: FloatArray) -> FloatArray:
    """(k, c, n) -> (k, 2c, n // 2): first and last halves of every chain ([1]_, sec. 4.1)."""
    n = x.shape[-1]
    half = n // 2
    return np.concatenate((x[..., :half], x[..., n - half :]), axis=1)


def _pooled(x: FloatArray) -> FloatArray:
    """(k, c, n) -> (k, c * n): all chains pooled, one row a column."""
    return x.reshape(x.shape[0], -1)


def _sort_rows(v: FloatArray) -> tuple[NDArray[np.intp], FloatArray]:
    """Sorting permutation of each row of (k, m) and the sorted rows."""
    order = np.argsort(v, axis=-1)
    return order, _take_rows(v, order)


def _take_rows(a: NDArray, index: NDArray[np.intp]) -> NDArray:
    """``np.take_along_axis(a, index, axis=-1)`` for 2-d arrays, by one flat gather.

    take_along_axis builds broadcast index grids, which costs more than the
    gather itself on (k, m) blocks.
    """
    k, m = a.shape
    flat = index + (np.arange(k) * m)[:, np.newaxis]
    return np.ascontiguousarray(a).reshape(-1)[flat]


def _tie_groups(tied: NDArray[np.bool_]) -> tuple[NDArray[np.intp], FloatArray]:
    """Tied elements of sorted (k, m) rows: flat indices and average ranks (1-based).

    ``tied`` is (k, m - 1), True where a sorted value equals its predecessor.
    Work is proportional to the number of tied elements, not to k * m, since
    continuous draws have few ties (the folded draws always have one: the two
    order statistics either side of the median).
    """
    k, m = tied.shape[0], tied.shape[1] + 1
    # Pad a False column on each side so that no run of ties crosses a row end.
    t = np.zeros((k, m + 1), dtype=bool)
    t[:, 1:m] = tied
    starts = np.flatnonzero(~t[:, :-1] & t[:, 1:])
    ends = np.flatnonzero(t[:, :-1] & ~t[:, 1:])
    lengths = ends - starts + 1
    ranks = (starts + ends) / 2.0 - (starts // m) * m + 1.0
    first = np.cumsum(lengths) - lengths
    within = np.arange(lengths.sum()) - np.repeat(first, lengths)
    return np.repeat(starts, lengths) + within, np.repeat(ranks, lengths)


def _z_from_sorted(order: NDArray[np.intp], ordered: FloatArray) -> FloatArray:
    r"""Rank-normalised values of (k, m) rows, given their sort ([1]_, eq. 14).

    .. math:: z = \Phi^{-1}\!\left(\frac{r - 3/8}{m + 1/4}\right)

    with :math:`r` the average rank (tied values share the mean of their
    ranks, as ``scipy.stats.rankdata(method="average")``) and the offset 3/8
    of Blom [4]_. Rows without ties all have ranks 1..m, so their normal
    scores are computed once and shared.
    """
    k, m = ordered.shape
    positions = np.arange(1.0, m + 1.0)
    scores = np.broadcast_to(special.ndtri((positions - 0.375) / (m + 0.25)), (k, m))
    tied = ordered[:, 1:] == ordered[:, :-1]
    if tied.any():
        index, ranks = _tie_groups(tied)
        scores = scores.copy()
        scores.reshape(-1)[index] = special.ndtri((ranks - 0.375) / (m + 0.25))
    # One flat scatter: cheaper than put_along_axis, which builds index grids.
    z = np.empty(k * m)
    z[(order + (np.arange(k) * m)[:, np.newaxis]).reshape(-1)] = scores.reshape(-1)
    return z.reshape(k, m)


def _z_scale(x: FloatArray) -> FloatArray:
    """Rank-normalise each column of (k, c, n) draws over all its chains pooled."""
    return _z_from_sorted(*_sort_rows(_pooled(x))).reshape(x.shape)


def _z_bulk_and_tail(
    split: FloatArray, sorted_rows: tuple[NDArray[np.intp], FloatArray] | None = None
) -> tuple[FloatArray, FloatArray]:
    """Rank-normalised draws and rank-normalised folded draws, sharing one sort.

    Folding is the absolute deviation from the pooled median ([1]_, eq. 15).
    Applied to the sorted draws it gives a descending then an ascending run,
    which a stable (run-merging) sort orders in about linear time, so the
    folded ranks cost much less than a second full sort. ``sorted_rows`` is
    :func:`_sort_rows` of the pooled split draws when the caller has it.
    """
    order, ordered = _sort_rows(_pooled(split)) if sorted_rows is None else sorted_rows
    z_bulk = _z_from_sorted(order, ordered).reshape(split.shape)
    m = ordered.shape[1]
    # np.median's value: the mean of the middle two order statistics.
    median = 0.5 * (ordered[:, (m - 1) // 2] + ordered[:, m // 2])
    folded = np.abs(ordered - median[:, np.newaxis])
    sub = np.argsort(folded, axis=-1, kind="stable")
    z_tail = _z_from_sorted(_take_rows(order, sub), _take_rows(folded, sub))
    return z_bulk, z_tail.reshape(split.shape)


# --------------------------------------------------------------------------
# The two estimators every diagnostic is built from.


def _gelman_rubin(x: FloatArray) -> FloatArray:
    r"""Potential scale reduction of (k, c, n) draws, c >= 2 ([2]_; [1]_, eqs. 1-4).

    .. math::

        B = \frac{n}{c - 1}\sum_j (\bar\theta_{\cdot j} - \bar\theta_{\cdot\cdot})^2,
        \quad W = \frac{1}{c}\sum_j s_j^2, \quad
        \widehat{R} = \sqrt{\frac{(n - 1)/n \; W + B/n}{W}}.
    """
    n = x.shape[-1]
    between = n * np.var(x.mean(axis=-1), axis=-1, ddof=1)
    within = np.var(x, axis=-1, ddof=1).mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt((between / within + n - 1.0) / n)


def _mean_autocovariance(x: FloatArray) -> FloatArray:
    r"""Biased autocovariance at every lag, averaged over chains: (k, c, n) -> (k, n).

    .. math:: \hat\gamma_t = \frac{1}{c}\sum_j \frac{1}{n}
              \sum_{i=1}^{n-t} (\theta_{ij} - \bar\theta_{\cdot j})
              (\theta_{i+t,j} - \bar\theta_{\cdot j})

    by FFT with zero padding to at least :math:`2n`, so the circular
    correlation equals the linear one. Averaging the power spectra before the
    inverse transform (it is linear) saves one inverse FFT per chain.
    """
    n = x.shape[-1]
    m = fft.next_fast_len(2 * n, real=True)
    spectrum = fft.rfft(x - x.mean(axis=-1, keepdims=True), n=m, axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).mean(axis=1)
    return fft.irfft(power, n=m, axis=-1)[:, :n] / n


# Lags summed directly before falling back to the FFT, in stages. Geyer's
# sequence stops at the first non-positive pair sum; for draws that mix well
# that is within the first few pairs (for iid draws each pair ends it with
# probability about 1/2), so a few lags settle almost every column at a
# fraction of the FFT's cost, and only slowly mixing columns get every lag.
_DIRECT_LAG_STAGES = (8, 32)


def _autocovariance_lags(centred: FloatArray, start: int, stop: int) -> FloatArray:
    """Lags ``start .. stop-1`` of :func:`_mean_autocovariance`, summed directly."""
    k, chains, n = centred.shape
    rows = centred.reshape(k * chains, n)
    out = np.empty((k * chains, stop - start))
    for t in range(start, stop):
        out[:, t - start] = np.einsum("ij,ij->i", rows[:, : n - t], rows[:, t:])
    return out.reshape(k, chains, stop - start).sum(axis=1) / (n * chains)


def _geyer_ess(
    acov: FloatArray, between: FloatArray, chains: int, n: int
) -> tuple[FloatArray, NDArray[np.bool_]]:
    """Geyer's initial monotone sequence on the leading autocovariances (see _ess_of_split).

    ``acov`` holds lags ``0 .. L-1`` (``L <= n``). Returns the ESS and whether
    it is final: False where every pair sum that ``acov`` covers is positive
    and the chain is long enough for more, i.e. where more lags are needed.
    """
    k, lags = acov.shape
    size = chains * n
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_var = acov[:, 0] * n / (n - 1.0)
        var_plus = acov[:, 0] + between
        rho = 1.0 - (mean_var[:, np.newaxis] - acov) / var_plus[:, np.newaxis]
    rho[:, 0] = 1.0

    # Pairs j = 1..j_max are the ones the ArviZ loop can reach (t = 2j - 1 < n - 3);
    # with L lags only the pairs j <= (L - 2) // 2 are known.
    j_max = max((n - 3) // 2, 0)
    m = min(j_max, (lags - 2) // 2) if lags < n else j_max
    pairs = rho[:, 0 : 2 * m + 1 : 2] + rho[:, 1 : 2 * m + 2 : 2]
    # Pair j is examined only while every earlier pair sum was positive.
    last = np.cumprod(pairs[:, :m] > 0.0, axis=1).sum(axis=1)
    final = (last < m) | (m == j_max)
    monotone = np.minimum.accumulate(pairs, axis=1)
    head = np.concatenate((np.zeros((k, 1)), np.cumsum(monotone, axis=1)), axis=1)
    head = np.take_along_axis(head, last[:, np.newaxis], axis=1)[:, 0]
    rho_even = np.take_along_axis(rho, 2 * last[:, np.newaxis], axis=1)[:, 0]
    pair_last = np.take_along_axis(pairs, last[:, np.newaxis], axis=1)[:, 0]
    kept = (pair_last >= 0.0) | (rho_even > 0.0)
    tail = np.where(last == 0, 1.0, np.where(kept, rho_even, 0.0))
    tau = np.maximum(-1.0 + 2.0 * head + tail, 1.0 / math.log10(size))
    ess = size / tau
    # Non-finite rho (zero or NaN variance) is the same at every lag.
    ess = np.where(np.isfinite(rho).all(axis=1), ess, np.nan)
    return ess, final


def _ess_of_split(x: FloatArray) -> FloatArray:
    r"""Effective sample size of already split (k, c, n) draws ([1]_, sec. 3.2; [3]_).

    The multi-chain autocorrelation estimate ([1]_, eq. 10) is

    .. math::

        \hat\rho_t = 1 - \frac{W - \bar\gamma_t}{\widehat{\mathrm{var}}^+},
        \quad W = \frac{n}{n-1}\bar\gamma_0, \quad
        \widehat{\mathrm{var}}^+ = \frac{n-1}{n}W + \frac{B}{n},

    and :math:`\hat\rho_0 = 1`. With the pair sums
    :math:`P_j = \hat\rho_{2j} + \hat\rho_{2j+1}`, Geyer's initial positive
    sequence stops at the first :math:`J` with :math:`P_J \le 0` (or at the end
    of the chain); the initial monotone sequence replaces :math:`P_j` by
    :math:`\min_{i \le j} P_i`; then

    .. math::

        \hat\tau = -1 + 2\sum_{j<J}\min_{i\le j}P_i + \hat\rho_{2J}^{+},
        \qquad \widehat{S}_{\rm eff} = \frac{cn}{\max(\hat\tau, 1/\log_{10}(cn))},

    where :math:`\hat\rho_{2J}^{+}` is the last even-lag autocorrelation when it
    is kept (ArviZ and Stan keep it if :math:`P_J \ge 0` or it is positive).
    The loop of ArviZ is evaluated here for all columns at once, with the same
    boundary rules, so the result agrees with it to rounding. The first
    autocovariances are summed directly (``_DIRECT_LAG_STAGES``); only the
    columns whose sequence has not stopped by then get every lag by FFT.
    """
    k, chains, n = x.shape
    size = chains * n
    centred = x - x.mean(axis=-1, keepdims=True)
    between = np.var(x.mean(axis=-1), axis=-1, ddof=1) if chains > 1 else np.zeros(k)
    ess = np.full(k, np.nan)
    todo = np.arange(k)
    acov = np.empty((k, 0))
    with np.errstate(invalid="ignore", over="ignore"):
        for stage in _DIRECT_LAG_STAGES:
            if stage >= n or todo.size == 0:
                break
            rows = centred if todo.size == k else centred[todo]
            acov = np.concatenate((acov, _autocovariance_lags(rows, acov.shape[1], stage)), axis=1)
            value, final = _geyer_ess(acov, between[todo], chains, n)
            ess[todo[final]] = value[final]
            todo, acov = todo[~final], acov[~final]
        if todo.size:
            ess[todo], _ = _geyer_ess(_mean_autocovariance(x[todo]), between[todo], chains, n)
    # A constant column has no autocorrelation to estimate; ArviZ and Stan report
    # its ESS as the number of draws rather than 0/0.
    spread = np.ptp(_pooled(x), axis=1)
    ess = np.where(spread < np.finfo(np.float64).resolution, float(size), ess)
    return np.where(np.isnan(spread), np.nan, ess)


# --------------------------------------------------------------------------
# Batch kernels on (k, c, n); NaN where _invalid.


def _masked(values: FloatArray, invalid: NDArray[np.bool_]) -> FloatArray:
    return np.where(invalid, np.nan, values)


def _rhat_parts(x: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Bulk R-hat, tail R-hat and the z-scaled split draws (reused for bulk ESS)."""
    z_bulk, z_tail = _z_bulk_and_tail(_split_chains(x))
    return _gelman_rubin(z_bulk), _gelman_rubin(z_tail), z_bulk


def _quantile_ess(x: FloatArray, quantile: FloatArray) -> FloatArray:
    """ESS of the indicator I(theta <= q) for a per-column q ([1]_, sec. 4.3)."""
    indicator = (x <= quantile[:, np.newaxis, np.newaxis]).astype(np.float64)
    return _ess_of_split(_split_chains(indicator))


def _batch_ess_tail(x: FloatArray, q_low: FloatArray, q_high: FloatArray) -> FloatArray:
    return np.minimum(_quantile_ess(x, q_low), _quantile_ess(x, q_high))


def _type7_quantile(x: FloatArray, prob: float | Sequence[float]) -> FloatArray:
    """Pooled quantile with linear interpolation (Hyndman-Fan type 7, numpy default)."""
    return np.quantile(_pooled(x), prob, axis=-1)


# --------------------------------------------------------------------------
# Public per-quantity functions.


def rhat_bulk(x: ArrayLike) -> float | FloatArray:
    """Rank-normalised split R-hat of the bulk ([1]_, sec. 4.2).

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws; a third axis holds k parameters.

    Returns
    -------
    float or ndarray of shape (k,)
        Split R-hat of the rank-normalised draws; NaN when undefined.
    """
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    return _unbatch(_masked(_gelman_rubin(_z_scale(_split_chains(xb))), invalid), single)


def rhat_tail(x: ArrayLike) -> float | FloatArray:
    """Folded rank-normalised split R-hat, sensitive to the tails ([1]_, sec. 4.2).

    The draws are replaced by their absolute deviation from the pooled
    median of the split chains before rank normalisation.

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws.

    Returns
    -------
    float or ndarray of shape (k,)
    """
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    _, z_tail = _z_bulk_and_tail(_split_chains(xb))
    return _unbatch(_masked(_gelman_rubin(z_tail), invalid), single)


def split_rhat(x: ArrayLike) -> float | FloatArray:
    r"""Rank-normalised split R-hat: the larger of bulk and tail R-hat ([1]_, sec. 4.2).

    .. math:: \widehat{R} = \max\bigl(\widehat{R}_{\rm bulk},\,
              \widehat{R}_{\rm tail}\bigr)

    Values above 1.01 suggest the chains have not mixed ([1]_, sec. 4.3). A
    single chain is split in two, so R-hat still detects drift within it
    (ArviZ returns NaN there). A tail R-hat that is NaN because the folded
    draws are all equal (e.g. a two-valued parameter) is ignored, as in ArviZ.

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws; a third axis holds k parameters.

    Returns
    -------
    float or ndarray of shape (k,)
        NaN for fewer than 4 draws, NaN draws, or draws that are all equal.
    """
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    bulk, tail, _ = _rhat_parts(xb)
    return _unbatch(_masked(np.fmax(bulk, tail), invalid), single)


def ess_bulk(x: ArrayLike) -> float | FloatArray:
    """Bulk effective sample size: ESS of the rank-normalised split draws ([1]_, sec. 4.3).

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws; a third axis holds k parameters.

    Returns
    -------
    float or ndarray of shape (k,)
        Multi-chain ESS by Geyer's initial monotone sequence on FFT
        autocovariances ([1]_, eq. 10; [3]_).
    """
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    return _unbatch(_masked(_ess_of_split(_z_scale(_split_chains(xb))), invalid), single)


def ess_tail(x: ArrayLike) -> float | FloatArray:
    r"""Tail effective sample size ([1]_, sec. 4.3).

    .. math:: \min\bigl(S_{\rm eff}(I(\theta \le q_{0.05})),\,
              S_{\rm eff}(I(\theta \le q_{0.95}))\bigr)

    with :math:`q_p` the pooled type-7 quantile and :math:`S_{\rm eff}` the
    split-chain ESS of the indicator draws.

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws.

    Returns
    -------
    float or ndarray of shape (k,)
    """
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    q_low, q_high = _type7_quantile(xb, TAIL_PROBS)
    return _unbatch(_masked(_batch_ess_tail(xb, q_low, q_high), invalid), single)


def ess_mean(x: ArrayLike) -> float | FloatArray:
    """Effective sample size for the mean: split draws, no rank normalisation ([1]_, sec. 3.2).

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws.

    Returns
    -------
    float or ndarray of shape (k,)
    """
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    return _unbatch(_masked(_ess_of_split(_split_chains(xb)), invalid), single)


def mcse_mean(x: ArrayLike) -> float | FloatArray:
    r"""Monte Carlo standard error of the posterior mean ([1]_, sec. 3.2).

    .. math:: \mathrm{MCSE}(\bar\theta) = \frac{s}{\sqrt{S_{\rm eff}^{\rm mean}}}

    with :math:`s` the pooled standard deviation (ddof 1) and
    :math:`S_{\rm eff}^{\rm mean}` from :func:`ess_mean`.

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws.

    Returns
    -------
    float or ndarray of shape (k,)
    """
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    sd = np.std(_pooled(xb), axis=-1, ddof=1)
    return _unbatch(_masked(sd / np.sqrt(_ess_of_split(_split_chains(xb))), invalid), single)


def mcse_quantile(x: ArrayLike, prob: float) -> float | FloatArray:
    r"""Monte Carlo standard error of the ``prob`` quantile ([1]_, sec. 4.3, appendix).

    With :math:`S` the ESS of the indicator :math:`I(\theta \le q_p)`, the
    posterior of the probability mass below the estimate is approximately
    :math:`\mathrm{Beta}(Sp + 1, S(1-p) + 1)`; its :math:`\Phi(\mp 1)`
    quantiles :math:`a_\mp`, mapped to order statistics of the pooled sorted
    draws :math:`\theta_{(i)}` (0-based), give

    .. math:: \mathrm{MCSE}(q_p) = \tfrac12\bigl(
              \theta_{(\lceil \min(a_+ N - 1,\; N - 1)\rceil)} -
              \theta_{(\lfloor \max(a_- N - 1,\; 0)\rfloor)}\bigr).

    Parameters
    ----------
    x : array_like, shape (chains, draws) or (chains, draws, k)
        Posterior draws.
    prob : float
        Quantile level, strictly between 0 and 1.

    Returns
    -------
    float or ndarray of shape (k,)
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be strictly between 0 and 1, got {prob}")
    xb, single = _as_batch(x)
    invalid = _invalid(xb)
    if invalid.all():
        return _unbatch(np.full(xb.shape[0], np.nan), single)
    quantile = _type7_quantile(xb, prob)
    ess = _quantile_ess(xb, quantile)
    ordered = np.sort(_pooled(xb), axis=-1)
    return _unbatch(_masked(_mcse_from_sorted(ordered, ess, prob), invalid), single)


def _mcse_from_sorted(ordered: FloatArray, ess: FloatArray, prob: float) -> FloatArray:
    """MCSE of the ``prob`` quantile from sorted pooled (k, N) draws and the indicator ESS."""
    with np.errstate(invalid="ignore"):
        a_low, a_high = stats.beta.ppf(
            _MCSE_Q_PROBS[:, np.newaxis], ess * prob + 1.0, ess * (1.0 - prob) + 1.0
        )
    size = ordered.shape[1]
    # fmax/fmin drop a NaN bound the way ArviZ's nanmax/nanmin do.
    lo = np.floor(np.fmax(a_low * size - 1.0, 0.0)).astype(np.intp)
    hi = np.ceil(np.fmin(a_high * size - 1.0, size - 1.0)).astype(np.intp)
    th_lo = np.take_along_axis(ordered, lo[:, np.newaxis], axis=1)[:, 0]
    th_hi = np.take_along_axis(ordered, hi[:, np.newaxis], axis=1)[:, 0]
    return (th_hi - th_lo) / 2.0


def _quantiles_from_sorted(ordered: FloatArray, probs: Sequence[float]) -> list[FloatArray]:
    """``np.quantile(..., axis=-1)`` (linear, type 7) of rows already sorted, bit for bit.

    The virtual index, the two neighbours and numpy's two-sided ``_lerp`` are
    those of numpy's own implementation, so the values (and hence the output
    bytes) are the same as before the sort was shared; a row with a NaN gives NaN.
    """
    m = ordered.shape[1]
    has_nan = np.isnan(ordered[:, -1])
    out = []
    for prob in probs:
        virtual = (m - 1) * prob
        lower = math.floor(virtual)
        gamma = virtual - lower
        a = ordered[:, lower]
        b = ordered[:, min(lower + 1, m - 1)]
        diff = b - a
        value = b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma
        out.append(np.where(has_nan, np.nan, value))
    return out


DIAGNOSTIC_COLUMNS = (
    "mean",
    "sd",
    "q5",
    "q50",
    "q95",
    "rhat",
    "ess_bulk",
    "ess_tail",
    "mcse_mean",
    "mcse_q5",
    "mcse_q95",
)
"""Keys of :func:`diagnose_draws`, in order."""


def diagnose_draws(x: ArrayLike) -> dict[str, FloatArray]:
    """Every summary and diagnostic of a block of parameters, sharing the work.

    The same numbers as :func:`split_rhat`, :func:`ess_bulk`, :func:`ess_tail`,
    :func:`mcse_mean` and :func:`mcse_quantile` (at 5% and 95%) called one by
    one, plus the pooled mean, SD (ddof 1) and type-7 quantiles; but one sort
    of the pooled draws serves the quantiles, the rank normalisation, the
    folded ranks and the quantile MCSEs (for an even number of draws a chain,
    where the split chains hold every draw), and the indicator ESS at the 5%
    and 95% quantiles serves both the tail ESS and the quantile MCSEs.

    Parameters
    ----------
    x : array_like, shape (chains, draws, k)
        Posterior draws of k parameters.

    Returns
    -------
    dict of str to ndarray of shape (k,)
        Keyed by :data:`DIAGNOSTIC_COLUMNS`. Diagnostics are NaN where the
        per-quantity functions give NaN (fewer than 4 draws, a NaN draw).
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"draws must have shape (chains, draws, k), got {a.shape}")
    return _diagnose(np.ascontiguousarray(np.moveaxis(a, 2, 0)))


# Parameters diagnosed together. The sorts, rank scatters and lag sums run on
# (chunk, chains x draws) arrays; at 128 parameters of 2,000 draws (2 MB a
# copy) they stay in cache, which measured 1.6x faster than 4,096 at once.
_CHUNK = 128


def _diagnose(x: FloatArray) -> dict[str, FloatArray]:
    """:func:`diagnose_draws` on a (k, c, n) batch, a chunk of parameters at a time."""
    k = x.shape[0]
    if k <= _CHUNK:
        return _diagnose_chunk(x)
    parts = [_diagnose_chunk(x[a : a + _CHUNK]) for a in range(0, k, _CHUNK)]
    return {key: np.concatenate([p[key] for p in parts]) for key in DIAGNOSTIC_COLUMNS}


def _diagnose_chunk(x: FloatArray) -> dict[str, FloatArray]:
    """:func:`diagnose_draws` on one (k, c, n) chunk."""
    k, _, n = x.shape
    pooled = _pooled(x)
    size = pooled.shape[1]
    nan = np.full(k, np.nan)
    out = dict.fromkeys(DIAGNOSTIC_COLUMNS, nan)
    if size == 0:
        return out
    out["mean"] = pooled.mean(axis=-1)
    out["sd"] = np.std(pooled, axis=-1, ddof=1) if size > 1 else nan
    invalid = _invalid(x)
    if invalid.all():
        ordered = np.sort(pooled, axis=-1)
        out["q5"], out["q50"], out["q95"] = _quantiles_from_sorted(
            ordered, (TAIL_PROBS[0], 0.5, TAIL_PROBS[1])
        )
        return out

    split = _split_chains(x)
    sorted_split = _sort_rows(_pooled(split))
    # With an even chain length the split chains are a permutation of all
    # draws, so their sorted values are the pooled sorted draws.
    ordered = sorted_split[1] if n % 2 == 0 else np.sort(pooled, axis=-1)
    q5, q50, q95 = _quantiles_from_sorted(ordered, (TAIL_PROBS[0], 0.5, TAIL_PROBS[1]))
    out["q5"], out["q50"], out["q95"] = q5, q50, q95

    z_bulk, z_tail = _z_bulk_and_tail(split, sorted_split)
    out["rhat"] = _masked(np.fmax(_gelman_rubin(z_bulk), _gelman_rubin(z_tail)), invalid)
    out["ess_bulk"] = _masked(_ess_of_split(z_bulk), invalid)
    ess_q5 = _ess_of_split((split <= q5[:, np.newaxis, np.newaxis]).astype(np.float64))
    ess_q95 = _ess_of_split((split <= q95[:, np.newaxis, np.newaxis]).astype(np.float64))
    out["ess_tail"] = _masked(np.minimum(ess_q5, ess_q95), invalid)
    out["mcse_mean"] = _masked(out["sd"] / np.sqrt(_ess_of_split(split)), invalid)
    out["mcse_q5"] = _masked(_mcse_from_sorted(ordered, ess_q5, TAIL_PROBS[0]), invalid)
    out["mcse_q95"] = _masked(_mcse_from_sorted(ordered, ess_q95, TAIL_PROBS[1]), invalid)
    return out


# --------------------------------------------------------------------------
# Summary table and flags.


def summarise_draws(draws: Mapping[str, ArrayLike]) -> pd.DataFrame:
    """Summary table of sampler draws, one row a parameter, in the contract's columns.

    Columns: ``parameter, mean, sd, q5, q50, q95, rhat, ess_bulk, ess_tail,
    mcse_mean`` (see :mod:`hierpipe.models.result`). ``sd`` uses ddof 1;
    quantiles are numpy's default (linear, type 7) over all chains pooled;
    ``rhat`` is :func:`split_rhat`. All parameters are diagnosed in one batch;
    the rank normalisation is shared by R-hat and bulk ESS, and the 5% and 95%
    quantiles by ``q5``/``q95`` and the tail ESS.

    Parameters
    ----------
    draws : mapping of str to array_like of shape (chains, draws)
        Draws per parameter, all of the same shape. Rows follow the mapping's
        order.

    Returns
    -------
    pandas.DataFrame
    """
    columns = SUMMARY_COLUMNS + SAMPLER_COLUMNS
    names = list(draws)
    if not names:
        empty_row = {"parameter": "", **dict.fromkeys(columns[1:], np.nan)}
        return summary_frame([empty_row]).iloc[:0].reset_index(drop=True)
    arrays = [np.asarray(draws[name], dtype=np.float64) for name in names]
    shape = arrays[0].shape
    for name, a in zip(names, arrays, strict=True):
        if a.ndim != 2 or a.shape != shape:
            raise ValueError(
                f"draws of {name!r} have shape {a.shape}; all parameters need the same "
                f"(chains, draws) shape, here {shape}"
            )
    return _summary_table(names, np.stack(arrays))


def summarise_array(names: Sequence[str], x: ArrayLike) -> pd.DataFrame:
    """:func:`summarise_draws` of a (chains, draws, k) array, one name a column of it.

    For blocks of many parameters (e.g. every group's coefficient): no
    per-parameter arrays or dictionaries are built.

    Parameters
    ----------
    names : sequence of str, length k
        Parameter names, in the order of the last axis.
    x : array_like, shape (chains, draws, k)
        Posterior draws.

    Returns
    -------
    pandas.DataFrame
        As :func:`summarise_draws`.
    """
    a = np.asarray(x, dtype=np.float64)
    names = list(names)
    if a.ndim != 3 or a.shape[2] != len(names):
        raise ValueError(
            f"draws must have shape (chains, draws, {len(names)}) for {len(names)} names, "
            f"got {a.shape}"
        )
    if not names:
        return summarise_draws({})
    return _summary_table(names, np.ascontiguousarray(np.moveaxis(a, 2, 0)))


def _summary_table(names: list[str], x: FloatArray) -> pd.DataFrame:
    """The summary frame of (k, chains, draws) draws, built a column at a time."""
    values = _diagnose(x)
    table = pd.DataFrame({"parameter": pd.Series(names, dtype=object).astype(str)})
    for column in SUMMARY_COLUMNS[1:] + SAMPLER_COLUMNS:
        table[column] = np.asarray(values[column], dtype=np.float64)
    return table


@dataclass(frozen=True)
class ConvergenceFlag:
    """One diagnostic of one parameter outside its threshold.

    Attributes
    ----------
    parameter : the parameter's name (brms style).
    quantity : ``"rhat"``, ``"ess_bulk"`` or ``"ess_tail"``.
    value : the diagnostic's value (NaN when it could not be computed).
    threshold : the limit it broke: maximum for R-hat, minimum for ESS.
    """

    parameter: str
    quantity: str
    value: float
    threshold: float

    @property
    def message(self) -> str:
        """One line for people naming the parameter and the numbers."""
        label = _QUANTITY_LABELS[self.quantity]
        if math.isnan(self.value):
            return (
                f"{self.parameter}: {label} could not be computed (NaN: constant, "
                f"non-finite or fewer than {MIN_DRAWS} draws)"
            )
        if self.quantity == "rhat":
            return f"{self.parameter}: {label} {self.value:.3f} > {self.threshold:g}"
        return f"{self.parameter}: {label} {self.value:.0f} < {self.threshold:g}"


_QUANTITY_LABELS = {"rhat": "R-hat", "ess_bulk": "bulk ESS", "ess_tail": "tail ESS"}


def convergence_flags(
    summary: pd.DataFrame,
    parameters: Sequence[str] | None = None,
    rhat_max: float = 1.01,
    ess_min: float = 400.0,
) -> list[ConvergenceFlag]:
    """Parameters whose R-hat or ESS breaks the thresholds of Vehtari et al. (2021).

    The defaults are the paper's recommendation ([1]_, sec. 4.3): R-hat below
    1.01 and bulk and tail ESS of at least 100 a chain for 4 chains. A NaN
    diagnostic is flagged too, since it means convergence could not be
    checked. Flags come in the summary's row order, R-hat first.

    Parameters
    ----------
    summary : pandas.DataFrame
        A sampler summary (columns ``parameter, rhat, ess_bulk, ess_tail``),
        as from :func:`summarise_draws`.
    parameters : sequence of str, optional
        Parameters to check; all rows when omitted.
    rhat_max, ess_min : float
        Thresholds.

    Returns
    -------
    list of ConvergenceFlag

    Raises
    ------
    InputError
        If the summary lacks a diagnostic column or a named parameter.
    """
    missing_cols = [c for c in ("parameter", *_QUANTITY_LABELS) if c not in summary.columns]
    if missing_cols:
        raise InputError(f"summary has no column {', '.join(missing_cols)}; not a sampler fit")
    rows = summary
    if parameters is not None:
        wanted = list(parameters)
        absent = sorted(set(wanted) - set(summary["parameter"]))
        if absent:
            raise InputError(f"summary has no parameter {', '.join(absent)}")
        rows = summary[summary["parameter"].isin(wanted)]
    flags = []
    for row in rows.itertuples(index=False):
        rhat = float(row.rhat)
        if math.isnan(rhat) or rhat > rhat_max:
            flags.append(ConvergenceFlag(str(row.parameter), "rhat", rhat, rhat_max))
        for quantity in ("ess_bulk", "ess_tail"):
            ess = float(getattr(row, quantity))
            if math.isnan(ess) or ess < ess_min:
                flags.append(ConvergenceFlag(str(row.parameter), quantity, ess, ess_min))
    return flags


def flag_convergence(
    summary_df: pd.DataFrame,
    parameters: Sequence[str] | None = None,
    rhat_max: float = 1.01,
    ess_min: float = 400.0,
) -> list[str]:
    """Human-readable lines for :func:`convergence_flags`, one a broken threshold.

    Example line: ``"sd_school__Intercept: R-hat 1.043 > 1.01"``.

    Parameters
    ----------
    summary_df, parameters, rhat_max, ess_min
        As for :func:`convergence_flags`.

    Returns
    -------
    list of str
        Empty when every checked parameter passes.
    """
    return [f.message for f in convergence_flags(summary_df, parameters, rhat_max, ess_min)]
