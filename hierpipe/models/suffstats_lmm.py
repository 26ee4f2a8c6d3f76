r"""Sufficient statistics of a linear mixed model with one grouping factor.

The model is

.. math::
    y = X\beta + Zb + e, \qquad b_g \sim N(0, \Sigma) \text{ iid over groups } g,
    \qquad e \sim N(0, \sigma^2 I_n),

with :math:`X` the :math:`n \times p` fixed-effects design and :math:`Z` the
:math:`n \times q` design of the varying coefficients (row :math:`i` multiplies
the coefficients of its own group). Because each row belongs to one group, the
random-effects cross-product :math:`Z_{\text{full}}^\top Z_{\text{full}}` is
block diagonal and the likelihood depends on the data only through

.. math::
    Z_g^\top Z_g \;(q \times q), \quad Z_g^\top X_g \;(q \times p), \quad
    Z_g^\top y_g \;(q), \quad X^\top X, \quad X^\top y, \quad y^\top y, \quad n

(Bates, Mächler, Bolker & Walker 2015, "Fitting linear mixed-effects models
using lme4", *J. Stat. Softw.* 67(1), section 3). They are computed here with
vectorised sweeps over the rows (``np.bincount``, one per entry of the small
per-group matrices; no Python loop over rows), so a criterion evaluation later
costs :math:`O(Gq^3 + p^3)` whatever :math:`n` is.

Precision: when ``X`` has an intercept column (all ones), ``y`` and the other
columns of ``X`` are centred at their means before the products are taken.
This is an exact reparametrisation :math:`X_c = XR` with :math:`R` unit
triangular (so :math:`\det R = 1` and the REML criterion is unchanged); it keeps
:math:`y^\top y` and :math:`X^\top X` from cancelling catastrophically when the
data sit far from zero (say values around 1e6). ``Z`` is never centred: that
would change the model. The fit maps the estimates back to the caller's ``X``.

Extension to more factors: each grouping factor contributes one
:class:`TermStats`; a second, nested or crossed, factor would add the
cross-products between the two factors' designs (no longer block diagonal),
which this module does not compute yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hierpipe.errors import InputError


@dataclass(frozen=True)
class TermStats:
    """Per-group cross-products of one grouping factor's random-effects design.

    Attributes
    ----------
    n : int array (G,)
        Observations per group.
    ztz : float array (G, q, q)
        :math:`Z_g^\\top Z_g`.
    ztx : float array (G, q, p)
        :math:`Z_g^\\top X_{c,g}` (centred fixed-effects design, see module notes).
    zty : float array (G, q)
        :math:`Z_g^\\top y_{c,g}` (centred response).
    """

    n: np.ndarray
    ztz: np.ndarray
    ztx: np.ndarray
    zty: np.ndarray

    @property
    def n_groups(self) -> int:
        """Number of groups :math:`G`."""
        return int(self.n.shape[0])

    @property
    def q(self) -> int:
        """Number of varying coefficients per group."""
        return int(self.ztz.shape[1])


@dataclass(frozen=True)
class LmmStats:
    """Everything the ML/REML criterion needs, in centred coordinates.

    Attributes
    ----------
    n_obs : int
        Number of observations :math:`n`.
    xtx : float array (p, p)
        :math:`X_c^\\top X_c`.
    xty : float array (p,)
        :math:`X_c^\\top y_c`.
    yty : float
        :math:`y_c^\\top y_c`.
    terms : tuple of TermStats
        One entry a grouping factor; this version fits exactly one.
    intercept : int or None
        Index of the all-ones column of ``X`` used for centring, if any.
    x_center : float array (p,)
        Means subtracted from the columns of ``X`` (0 for the intercept column
        and everywhere when there is no intercept column).
    y_center : float
        Mean subtracted from ``y`` (0 when there is no intercept column).
    """

    n_obs: int
    xtx: np.ndarray
    xty: np.ndarray
    yty: float
    terms: tuple[TermStats, ...]
    intercept: int | None
    x_center: np.ndarray
    y_center: float

    @property
    def p(self) -> int:
        """Number of fixed effects."""
        return int(self.xtx.shape[0])

    def beta_from_centred(self, beta_c: np.ndarray) -> np.ndarray:
        r"""Fixed effects for the caller's ``X`` from those for the centred design.

        With :math:`X_c = XR`, :math:`R = I - e_j m^\top` (``j`` the intercept,
        ``m`` = ``x_center``) and :math:`y_c = y - \bar y`, the fit of
        :math:`y_c` on :math:`X_c` gives :math:`\beta = R\beta_c + \bar y e_j`.
        """
        beta = np.asarray(beta_c, dtype=np.float64).copy()
        if self.intercept is not None:
            beta[self.intercept] += self.y_center - float(self.x_center @ beta_c)
        return beta

    def transform_matrix(self) -> np.ndarray:
        """The matrix :math:`R` of :meth:`beta_from_centred` (identity without intercept)."""
        r = np.eye(self.p)
        if self.intercept is not None:
            r[self.intercept, :] -= self.x_center
        return r


def _as_2d(a: np.ndarray, name: str, n: int) -> np.ndarray:
    """Check a design matrix: float, 2-D with ``n`` rows, finite."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InputError(f"{name}: expected {n} rows, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(f"{name}: non-finite value at row {row}, column {col}")
    return arr


def _validate(
    X: np.ndarray, Z: np.ndarray, y: np.ndarray, group_codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coerce and check the inputs; raise :class:`InputError` naming the fault."""
    yv = np.asarray(y, dtype=np.float64)
    if yv.ndim != 1:
        raise InputError(f"y: expected a vector, got shape {yv.shape}")
    n = yv.shape[0]
    bad = np.flatnonzero(~np.isfinite(yv))
    if bad.size:
        raise InputError(f"y: non-finite value at row {bad[0]}")
    Xv = _as_2d(X, "X", n)
    Zv = _as_2d(Z, "Z", n)
    codes = np.asarray(group_codes)
    if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
        raise InputError(f"group codes: expected {n} integers, got {codes.dtype} {codes.shape}")
    if n_groups < 2:
        raise InputError(f"group codes: need at least two groups, got {n_groups}")
    out = np.flatnonzero((codes < 0) | (codes >= n_groups))
    if out.size:
        raise InputError(
            f"group codes: row {out[0]} has code {codes[out[0]]} outside 0..{n_groups - 1}"
        )
    return Xv, Zv, yv, codes.astype(np.intp)


def _intercept_column(X: np.ndarray) -> int | None:
    """Index of the first column of ``X`` that is exactly 1 in every row, if any."""
    ones = np.flatnonzero(np.all(X == 1.0, axis=0))
    return int(ones[0]) if ones.size else None


def _per_group(codes: np.ndarray, n_groups: int, weights: np.ndarray) -> np.ndarray:
    """Sum of ``weights`` within each group (one vectorised sweep)."""
    return np.bincount(codes, weights=weights, minlength=n_groups)


def lmm_suffstats(
    X: np.ndarray, Z: np.ndarray, y: np.ndarray, group_codes: np.ndarray, n_groups: int
) -> LmmStats:
    """Per-group and global cross-products of a one-factor linear mixed model.

    Parameters
    ----------
    X : float array (n, p)
        Fixed-effects design; an all-ones column, if present, is used to centre
        the other columns and ``y`` (exact reparametrisation, see module notes).
    Z : float array (n, q)
        Design of the varying coefficients (for ``(1 + x | g)``: ones and ``x``).
    y : float array (n,)
        Response.
    group_codes : int array (n,)
        Group of each row, in ``0 .. n_groups-1``.
    n_groups : int
        Number of groups :math:`G`; every group must have an observation.

    Returns
    -------
    LmmStats

    Raises
    ------
    InputError
        Shapes disagree, values are not finite, codes are out of range, fewer
        than two groups, or a group has no observations.
    """
    Xv, Zv, yv, codes = _validate(X, Z, y, group_codes, n_groups)
    counts = np.bincount(codes, minlength=n_groups)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise InputError(
            f"group codes: group {empty[0]} of {n_groups} has no observations "
            f"({empty.size} empty groups); drop unused levels before fitting"
        )
    intercept = _intercept_column(Xv)
    x_center = np.zeros(Xv.shape[1])
    y_center = 0.0
    if intercept is not None:
        x_center = Xv.mean(axis=0)
        x_center[intercept] = 0.0
        y_center = float(yv.mean())
    Xc = Xv - x_center
    yc = yv - y_center
    q, p = Zv.shape[1], Xv.shape[1]
    ztz = np.empty((n_groups, q, q))
    ztx = np.empty((n_groups, q, p))
    zty = np.empty((n_groups, q))
    for a in range(q):
        for b in range(a, q):
            ztz[:, a, b] = ztz[:, b, a] = _per_group(codes, n_groups, Zv[:, a] * Zv[:, b])
        for k in range(p):
            ztx[:, a, k] = _per_group(codes, n_groups, Zv[:, a] * Xc[:, k])
        zty[:, a] = _per_group(codes, n_groups, Zv[:, a] * yc)
    term = TermStats(n=counts, ztz=ztz, ztx=ztx, zty=zty)
    return LmmStats(
        n_obs=int(yv.shape[0]),
        xtx=Xc.T @ Xc,
        xty=Xc.T @ yc,
        yty=float(yc @ yc),
        terms=(term,),
        intercept=intercept,
        x_center=x_center,
        y_center=y_center,
    )


def one_way_stats(n: np.ndarray, ybar: np.ndarray, ss_within: np.ndarray) -> LmmStats:
    r"""The :class:`LmmStats` of ``y ~ 1 + (1 | g)`` from per-group summaries.

    With :math:`X = Z = 1` the cross-products are :math:`Z_g^\top Z_g = n_g`,
    :math:`Z_g^\top X_g = n_g` and, centring at the grand mean :math:`\bar y`,
    :math:`Z_g^\top y_{c,g} = n_g(\bar y_g - \bar y)`,
    :math:`X^\top y_c = 0` and :math:`y_c^\top y_c = \sum_g S_g + n_g(\bar y_g - \bar y)^2`,
    where :math:`S_g` is the within-group sum of squares.

    Parameters
    ----------
    n : array (G,)
        Observations per group (each at least 1).
    ybar : float array (G,)
        Group means.
    ss_within : float array (G,)
        Within-group sums of squares about each group's mean.

    Returns
    -------
    LmmStats
    """
    n_arr = np.asarray(n)
    yb = np.asarray(ybar, dtype=np.float64)
    ss = np.asarray(ss_within, dtype=np.float64)
    if not (n_arr.shape == yb.shape == ss.shape) or n_arr.ndim != 1:
        raise InputError(
            f"one-way statistics: n, ybar, ss_within must be vectors of one length, "
            f"got {n_arr.shape}, {yb.shape}, {ss.shape}"
        )
    if n_arr.shape[0] < 2:
        raise InputError(f"one-way statistics: need at least two groups, got {n_arr.shape[0]}")
    if np.any(n_arr < 1) or not np.all(np.isfinite(yb)) or np.any(~(ss >= 0)):
        g = int(np.flatnonzero((n_arr < 1) | ~np.isfinite(yb) | ~(ss >= 0))[0])
        raise InputError(
            f"one-way statistics: group {g} has n={n_arr[g]}, ybar={yb[g]}, ss={ss[g]}"
        )
    nf = n_arr.astype(np.float64)
    n_obs = float(nf.sum())
    grand = float(nf @ yb / n_obs)
    dev = yb - grand
    term = TermStats(
        n=n_arr.astype(np.int64),
        ztz=nf[:, None, None].copy(),
        ztx=nf[:, None, None].copy(),
        zty=(nf * dev)[:, None],
    )
    return LmmStats(
        n_obs=round(n_obs),
        xtx=np.array([[n_obs]]),
        # Exactly zero by construction of the grand mean; rounding leaves ~1e-16 n|ybar|.
        xty=np.array([float(nf @ dev)]),
        yty=float(ss.sum() + nf @ dev**2),
        terms=(term,),
        intercept=0,
        x_center=np.zeros(1),
        y_center=grand,
    )
