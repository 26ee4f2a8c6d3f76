r"""Engine of linear mixed models with one grouping factor: predictors and varying slopes.

The model (structure kind ``"lmm"``: one grouping factor :math:`g` with
predictors or varying slopes, e.g. ``score ~ 1 + ses + (1 + ses | school)``) is

.. math::
    y_{gi} = x_{gi}^\top\beta + z_{gi}^\top b_g + e_{gi},\qquad
    b_g \sim N_q(0, \Sigma),\qquad e_{gi} \sim N(0, \sigma^2),

with :math:`x` a row of the fixed-effects design (treatment-coded, brms
names) and :math:`z` a row of the varying coefficients' design. ``(1 + x | g)``
leaves :math:`\Sigma` unstructured; ``(1 + x || g)`` (lme4's
``(1 | g) + (0 + x | g)``) makes it diagonal, and in general every varying term
of the formula is one diagonal block of :math:`\Sigma`.

Methods
-------
``complete_pooling``
    OLS of :math:`y` on :math:`X` (no group effects); t intervals on
    :math:`n - p` degrees of freedom.
``no_pooling``
    Every group gets its own varying coefficients by least squares; fixed
    effects that do not vary are shared (one regression with group-specific
    columns, solved group by group by the Frisch-Waugh-Lovell projection).
    A group whose :math:`Z_g` has rank below :math:`q` (too few rows, or a
    slope variable constant within it) is left out: its coefficients are NaN
    and its rows do not enter the shared coefficients or :math:`\sigma`; the
    warning names the groups.
``eb_ml``, ``eb_reml``
    :func:`hierpipe.models.lmm.fit_lmm_from_stats` (Bates et al. 2015) from
    per-group cross-products computed once; summaries at the estimates
    (Henderson's prediction-error variances; Wald intervals for the fixed
    effects and, on Fisher's z, for the correlations).
``gibbs``
    Delegated to ``hierpipe.models.gibbs_lmm.gibbs_lmm(data, settings, rng)``
    when that module exists (it receives this module's :class:`LmmData` and
    returns a :class:`~hierpipe.models.result.FitResult` whose draws have brms
    column names ``b_*``, ``sd_g__*``, ``cor_g__*__*``, ``sigma``; leave-one-
    group-out scoring reads those columns). Until then a clear MethodError.

Leave-one-group-out (:func:`score_held_out`) refits without the group and
scores the group's observations as a new group's by the exact multivariate
normal density

.. math::
    y_j \sim N\!\left(X_j\hat\beta,\; Z_j\hat\Sigma Z_j^\top + \hat\sigma^2 I
    + X_j \widehat{\operatorname{Cov}}(\hat\beta) X_j^\top\right),

evaluated through the Woodbury identity in :math:`O(n_j (p+q)^2)`
(:func:`group_log_density`).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import logsumexp, stdtrit

from hierpipe.errors import ConfigError, InputError, MethodError
from hierpipe.models.lmm import (
    LmmFit,
    correlation_intervals,
    effective_group_parameters,
    fit_lmm_from_stats,
    prediction_error_variances,
)
from hierpipe.models.result import FitResult, normal_row, point_row, summary_frame
from hierpipe.models.structure import Structure
from hierpipe.models.suffstats_lmm import LmmStats, TermStats, lmm_suffstats

METHODS = ("complete_pooling", "no_pooling", "eb_ml", "eb_reml", "gibbs")
Z90 = 1.6448536269514722
LOG_2PI = float(np.log(2.0 * np.pi))
#: A group's Z_g'Z_g (scaled to unit diagonal) with smallest eigenvalue below
#: this is rank deficient for no pooling: some combination of its columns has
#: norm below 1e-5 of theirs.
RANK_TOL = 1e-10
COR_INTERVAL = (
    "Wald interval on Fisher's z = atanh(cor), from the curvature of the profiled "
    "criterion (beta and sigma profiled out), mapped back by tanh"
)


# --------------------------------------------------------------------------------------
# the prepared data


@dataclass(frozen=True, eq=False)
class LmmData:
    """A one-factor LMM's data: the design rows and their sufficient statistics.

    Attributes
    ----------
    group : name of the grouping factor (brms ``sd_<group>__...``).
    labels : group labels, in code order.
    codes : int array (n,), each row's group.
    X, Z, y : the fixed-effects design (n, p), the varying coefficients' design
        (n, q) and the response (n,); read-only.
    fixed_names, coef_names : brms names of the columns of X and Z.
    block_sizes : sizes of the diagonal blocks of Sigma, one a varying term.
    ref_levels : reference level of each treatment-coded categorical variable.
    numeric_predictors : numeric variables of the formula (for the prediction grid).
    stats : :class:`~hierpipe.models.suffstats_lmm.LmmStats` of all rows.
    """

    group: str
    labels: tuple[str, ...]
    codes: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    y: np.ndarray
    fixed_names: tuple[str, ...]
    coef_names: tuple[str, ...]
    block_sizes: tuple[int, ...]
    ref_levels: dict[str, str]
    numeric_predictors: tuple[str, ...]
    stats: LmmStats

    @property
    def n_groups(self) -> int:
        return len(self.labels)

    @property
    def n_obs(self) -> int:
        return int(self.y.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        """Observations per group."""
        return np.asarray(self.stats.terms[0].n)

    @property
    def correlated(self) -> bool:
        """Whether Sigma is one unstructured block."""
        return len(self.block_sizes) == 1

    @cached_property
    def group_gram(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-group :math:`X_{c,g}^\\top X_{c,g}` (G,p,p), :math:`X_{c,g}^\\top y_{c,g}`
        (G,p) and :math:`y_{c,g}^\\top y_{c,g}` (G,), centred as ``stats`` is.

        Computed on first use (leave-one-group-out needs them to drop a group
        from the global cross-products without another pass over the rows).
        """
        g = self.n_groups
        xc = self.X - self.stats.x_center
        yc = self.y - self.stats.y_center
        p = xc.shape[1]
        xtx = np.empty((g, p, p))
        xty = np.empty((g, p))
        for a in range(p):
            for b in range(a, p):
                xtx[:, a, b] = xtx[:, b, a] = np.bincount(
                    self.codes, xc[:, a] * xc[:, b], minlength=g
                )
            xty[:, a] = np.bincount(self.codes, xc[:, a] * yc, minlength=g)
        yty = np.bincount(self.codes, yc * yc, minlength=g)
        return xtx, xty, yty

    @cached_property
    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.sizes)])
        return order, starts

    def rows(self, j: int) -> np.ndarray:
        """Row indices of group ``j``."""
        order, starts = self._order
        return order[starts[j] : starts[j + 1]]

    def without(self, j: int) -> LmmData:
        """The data with group ``j`` left out; statistics by subtraction of whole groups.

        The centring constants of ``stats`` are kept: centring at any constants
        is an exact reparametrisation (:mod:`hierpipe.models.suffstats_lmm`).
        """
        keep_g = np.arange(self.n_groups) != j
        keep = self.codes != j
        term = self.stats.terms[0]
        xtx_g, xty_g, yty_g = self.group_gram
        stats = LmmStats(
            n_obs=int(keep.sum()),
            xtx=xtx_g[keep_g].sum(axis=0),
            xty=xty_g[keep_g].sum(axis=0),
            yty=float(yty_g[keep_g].sum()),
            terms=(
                TermStats(
                    n=term.n[keep_g],
                    ztz=term.ztz[keep_g],
                    ztx=term.ztx[keep_g],
                    zty=term.zty[keep_g],
                ),
            ),
            intercept=self.stats.intercept,
            x_center=self.stats.x_center,
            y_center=self.stats.y_center,
        )
        codes = self.codes[keep]
        out = LmmData(
            group=self.group,
            labels=tuple(lab for k, lab in enumerate(self.labels) if k != j),
            codes=codes - (codes > j),
            X=self.X[keep],
            Z=self.Z[keep],
            y=self.y[keep],
            fixed_names=self.fixed_names,
            coef_names=self.coef_names,
            block_sizes=self.block_sizes,
            ref_levels=self.ref_levels,
            numeric_predictors=self.numeric_predictors,
            stats=stats,
        )
        out.__dict__["group_gram"] = (xtx_g[keep_g], xty_g[keep_g], yty_g[keep_g])
        return out


def prepare(design: Any, structure: Structure) -> LmmData:
    """Reduce a design with one grouping factor to :class:`LmmData`.

    Every varying term of the factor contributes its columns to :math:`Z` and
    one diagonal block to :math:`\\Sigma` (``||`` splits a term into one term a
    coefficient, so its coefficients are uncorrelated).
    """
    random = design.random
    names = {rd.name for rd in random}
    if len(names) != 1:
        raise MethodError(
            f"the LMM engine fits one grouping factor; got {', '.join(sorted(names))}"
        )
    first = random[0]
    for rd in random[1:]:
        if not np.array_equal(rd.codes, first.codes):  # same factor, so same codes
            raise MethodError(f"varying terms of '{first.name}' disagree on the groups")
    Z = np.column_stack([rd.Z for rd in random])
    coef_names = tuple(n for rd in random for n in rd.z_names)
    stats = lmm_suffstats(design.X, Z, design.y, first.codes, first.n_groups)
    Z.flags.writeable = False
    categorical = set(design.levels)
    fixed_vars = {v for t in design.formula.fixed for v in t}
    slope_vars = {v for rt in design.formula.random for t in rt.terms for v in t}
    numeric = tuple(sorted((fixed_vars | slope_vars) - categorical))
    return LmmData(
        group=first.name,
        labels=first.labels,
        codes=first.codes,
        X=design.X,
        Z=Z,
        y=design.y,
        fixed_names=tuple(design.fixed_names),
        coef_names=coef_names,
        block_sizes=tuple(rd.Z.shape[1] for rd in random),
        ref_levels=dict(design.ref_levels),
        numeric_predictors=numeric,
        stats=stats,
    )


def group_labels(data: LmmData) -> tuple[str, ...]:
    return data.labels


# --------------------------------------------------------------------------------------
# names and prediction points


def _fixed_index(data: LmmData) -> np.ndarray:
    """For each varying coefficient, the column of X with the same name (-1: none)."""
    where = {n: k for k, n in enumerate(data.fixed_names)}
    return np.array([where.get(c, -1) for c in data.coef_names], dtype=np.intp)


def _cor_pairs(data: LmmData) -> list[tuple[int, int]]:
    """Pairs of varying coefficients in the same block (correlated by the model)."""
    pairs, start = [], 0
    for size in data.block_sizes:
        pairs += [(start + a, start + b) for a in range(size) for b in range(a + 1, size)]
        start += size
    return pairs


@dataclass(frozen=True)
class Point:
    """A covariate point for predictions: rows of X and Z and how it was chosen."""

    at: str
    x: np.ndarray
    z: np.ndarray


def prediction_points(data: LmmData) -> list[Point]:
    """Where predictions are reported.

    The *mean row*: every column of :math:`X` and :math:`Z` at its sample mean
    (numeric predictors at their means, categorical indicators at their sample
    shares), so the fitted value there is the average fitted value. Then, for
    the first varying slope that is a numeric predictor entering no
    interaction, that predictor at its mean minus and plus one SD, the rest at
    the mean row. Predictions for existing groups (fitted mean, new
    observation; :func:`example_groups`) are reported at the mean row, those for
    a new group at every point.
    """
    x0, z0 = data.X.mean(axis=0), data.Z.mean(axis=0)
    shown = [(n, x0[k]) for k, n in enumerate(data.fixed_names) if n != "Intercept"][:4]
    text = ", ".join(f"{n} = {v:.4g}" for n, v in shown) if shown else "intercept only"
    points = [Point(f"mean row ({text})", x0, z0)]
    fixed, coefs = data.fixed_names, data.coef_names
    for c in coefs:
        if c == "Intercept" or c not in data.numeric_predictors:
            continue
        if any(c in name.split(":") for name in (*fixed, *coefs) if ":" in name):
            continue
        kx = fixed.index(c) if c in fixed else None
        kz = coefs.index(c)
        sd = float(data.Z[:, kz].std(ddof=1)) if data.n_obs > 1 else 0.0
        for sign, word in ((-1.0, "minus"), (1.0, "plus")):
            x1, z1 = x0.copy(), z0.copy()
            z1[kz] += sign * sd
            if kx is not None:
                x1[kx] += sign * sd
            points.append(Point(f"{c} = {z1[kz]:.4g} (mean {word} 1 SD)", x1, z1))
        break
    return points


def example_groups(data: LmmData) -> list[int]:
    """Groups shown in the predictions: the smallest and the largest (first and last if equal)."""
    n = data.sizes
    lo, hi = int(np.argmin(n)), int(np.argmax(n))
    if lo == hi or n[lo] == n[hi]:
        lo, hi = 0, data.n_groups - 1
    return [lo, hi]


def _prediction(target: str, at: str, mean: float, sd: float, kind: str, t: float = Z90):
    return {
        "target": target,
        "at": at,
        "mean": float(mean),
        "sd": float(sd),
        "q5": float(mean - t * sd),
        "q50": float(mean),
        "q95": float(mean + t * sd),
        "kind": kind,
    }


def group_rows(
    prefix: str, data: LmmData, mean: np.ndarray, sd: np.ndarray, half: float | np.ndarray
) -> pd.DataFrame:
    """Summary rows ``prefix[label,coef]``, group by group, from (G, q) arrays.

    The interval is ``mean -+ half * sd`` (``half`` 1.645 for normal rows, a t
    quantile for least squares). Built as arrays: a study may have 10^4 groups.
    """
    g, q = mean.shape
    names = [f"{prefix}[{lab},{c}]" for lab in data.labels for c in data.coef_names]
    m, s = mean.reshape(g * q), sd.reshape(g * q)
    h = np.broadcast_to(np.asarray(half, dtype=np.float64), (g, q)).reshape(g * q)
    return pd.DataFrame(
        {"parameter": names, "mean": m, "sd": s, "q5": m - h * s, "q50": m, "q95": m + h * s}
    )


def _summary(rows: list[dict[str, Any]], *blocks: pd.DataFrame) -> pd.DataFrame:
    """The summary table: population rows, then the per-group blocks."""
    return summary_frame(pd.concat([pd.DataFrame(rows), *blocks], ignore_index=True))


# --------------------------------------------------------------------------------------
# complete pooling


@dataclass(frozen=True)
class Ols:
    """OLS of y on X: coefficients (caller's coordinates), their covariance, s^2, df."""

    beta: np.ndarray
    cov: np.ndarray
    s2: float
    df: int


def ols(data: LmmData) -> Ols:
    """Least squares from the (centred) cross-products; residuals from the rows.

    The residual sum of squares is summed over the rows (one pass), not taken
    as :math:`y^\\top y - \\hat\\beta^\\top X^\\top y`, which cancels when the fit is close.
    """
    st = data.stats
    try:
        beta_c = np.linalg.solve(st.xtx, st.xty)
    except np.linalg.LinAlgError:
        raise InputError("X: the fixed-effects design is rank deficient") from None
    beta = st.beta_from_centred(beta_c)
    resid = data.y - data.X @ beta
    df = data.n_obs - st.p
    if df <= 0:
        raise InputError(f"{data.n_obs} observations cannot estimate {st.p} fixed effects")
    s2 = float(resid @ resid) / df
    r = st.transform_matrix()
    cov = s2 * r @ np.linalg.inv(st.xtx) @ r.T
    return Ols(beta=beta, cov=cov, s2=s2, df=df)


def complete_pooling(data: LmmData) -> FitResult:
    r"""One regression for everyone: :math:`y \sim N(X\beta, \sigma^2 I)`.

    Every group's coefficient is the fixed effect of the same name (0 for a
    varying coefficient without one); t intervals on :math:`n-p` df.
    """
    fit = ols(data)
    se = np.sqrt(np.diag(fit.cov))
    t = float(stdtrit(fit.df, 0.95))
    rows = [
        point_row(f"b_{n}", b, s, b - t * s, b + t * s)
        for n, b, s in zip(data.fixed_names, fit.beta, se, strict=True)
    ]
    rows.append(point_row("sigma", np.sqrt(fit.s2)))
    # every group has the fixed effect of the coefficient's name; 0 (no SE) without one
    idx = _fixed_index(data)
    has = idx >= 0
    mean = np.where(has, fit.beta[np.maximum(idx, 0)], 0.0)
    sd = np.where(has, se[np.maximum(idx, 0)], np.nan)
    tile = (data.n_groups, 1)
    block = group_rows(f"coef_{data.group}", data, np.tile(mean, tile), np.tile(sd, tile), t)
    preds = []
    for pt in prediction_points(data):
        m = float(pt.x @ fit.beta)
        v = float(pt.x @ fit.cov @ pt.x)
        how = f"t interval on {fit.df} df; every group has the population line"
        preds.append(_prediction("new_group_mean", pt.at, m, np.sqrt(v), how, t))
        preds.append(
            _prediction(
                "new_observation_new_group",
                pt.at,
                m,
                np.sqrt(v + fit.s2),
                how + "; sigma^2 added",
                t,
            )
        )
    info = {
        "df": fit.df,
        "reference_levels": data.ref_levels,
        "effective_parameters": 0.0,
        "predictions": preds,
        "warnings": [],
    }
    return FitResult(summary=_summary(rows, block), info=info)


# --------------------------------------------------------------------------------------
# no pooling


@dataclass(frozen=True)
class NoPooling:
    """Per-group least squares of the varying coefficients, shared fixed effects.

    ``coef`` (G, q) is NaN for groups left out; ``gamma`` the shared effects
    (columns ``shared`` of X), ``gamma_cov`` their covariance; ``zinv`` (G,q,q)
    :math:`(Z_g^\\top Z_g)^{-1}`, ``a`` (G,q,s) :math:`(Z_g^\\top Z_g)^{-1}Z_g^\\top X_{s,g}`.
    """

    coef: np.ndarray
    coef_se: np.ndarray
    gamma: np.ndarray
    gamma_cov: np.ndarray
    shared: list[int]
    dropped: list[int]
    used: np.ndarray
    sigma2: float
    df: int
    zinv: np.ndarray
    a: np.ndarray


def _project_out(zg: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Residual of ``m`` after least squares on the columns of ``zg``."""
    if m.shape[1] == 0:
        return m
    sol, *_ = np.linalg.lstsq(zg, m, rcond=None)
    return m - zg @ sol


def no_pooling_estimates(data: LmmData) -> NoPooling:
    r"""Fit :math:`y_g = X_{s,g}\gamma + Z_g c_g + e_g` for every group.

    :math:`X_s` holds the fixed columns that do not vary by group. By
    Frisch-Waugh-Lovell, :math:`\hat\gamma` is the pooled regression of the
    within-group residuals of :math:`y` on those of :math:`X_s` (after least
    squares on :math:`Z_g` in each group), and
    :math:`\hat c_g = (Z_g^\top Z_g)^{-1}Z_g^\top (y_g - X_{s,g}\hat\gamma)`, with
    :math:`\operatorname{Var}\hat c_g = \sigma^2 (Z_g^\top Z_g)^{-1} + A_g
    \operatorname{Var}(\hat\gamma) A_g^\top` (the two parts are uncorrelated).
    Shared columns that are combinations of the group columns within groups
    (e.g. a group-level predictor) are not estimable and are dropped.

    One Python iteration a group (small least-squares problems on its rows).
    """
    q, G = len(data.coef_names), data.n_groups
    shared = [k for k, n in enumerate(data.fixed_names) if n not in data.coef_names]
    term = data.stats.terms[0]
    scale = np.sqrt(np.einsum("gii->gi", term.ztz))
    used = np.zeros(G, dtype=bool)
    for g in range(G):
        if np.all(scale[g] > 0):
            eig = np.linalg.eigvalsh(term.ztz[g] / np.outer(scale[g], scale[g]))
            used[g] = eig[0] > RANK_TOL
    xs_res, y_res = [], []
    for g in np.flatnonzero(used):
        idx = data.rows(g)
        zg = data.Z[idx]
        xs_res.append(_project_out(zg, data.X[np.ix_(idx, shared)]))
        y_res.append(_project_out(zg, data.y[idx, None])[:, 0])
    xs_w = np.vstack(xs_res) if xs_res else np.empty((0, len(shared)))
    y_w = np.concatenate(y_res) if y_res else np.empty(0)
    dropped: list[int] = []
    if shared and xs_w.shape[0]:
        r = np.linalg.qr(xs_w, mode="r")
        raw = np.linalg.norm(data.X[:, shared], axis=0)
        bad = np.abs(np.diag(r)) <= 1e-8 * np.maximum(raw, np.finfo(float).tiny)
        dropped = [shared[k] for k in np.flatnonzero(bad)]
        keep = ~bad
        shared = [s for s, k in zip(shared, keep, strict=True) if k]
        xs_w = xs_w[:, keep]
    s = len(shared)
    xtx_w = xs_w.T @ xs_w
    gamma = np.linalg.solve(xtx_w, xs_w.T @ y_w) if s else np.zeros(0)
    rss = float(np.sum((y_w - xs_w @ gamma) ** 2))
    df = int(data.sizes[used].sum()) - q * int(used.sum()) - s
    sigma2 = rss / df if df > 0 else np.nan
    gamma_cov = sigma2 * np.linalg.inv(xtx_w) if s else np.zeros((0, 0))
    coef = np.full((G, q), np.nan)
    coef_se = np.full((G, q), np.nan)
    zinv = np.full((G, q, q), np.nan)
    a = np.full((G, q, s), np.nan)
    for g in np.flatnonzero(used):
        idx = data.rows(g)
        zg = data.Z[idx]
        zinv[g] = np.linalg.inv(term.ztz[g])
        a[g] = zinv[g] @ (zg.T @ data.X[np.ix_(idx, shared)])
        coef[g] = zinv[g] @ (zg.T @ (data.y[idx] - data.X[np.ix_(idx, shared)] @ gamma))
        cov = sigma2 * zinv[g] + a[g] @ gamma_cov @ a[g].T
        coef_se[g] = np.sqrt(np.diag(cov))
    return NoPooling(coef, coef_se, gamma, gamma_cov, shared, dropped, used, sigma2, df, zinv, a)


def no_pooling(data: LmmData) -> FitResult:
    """Summary of :func:`no_pooling_estimates`: ``coef_`` rows, shared ``b_`` rows, sigma."""
    est = no_pooling_estimates(data)
    warnings = []
    left_out = [data.labels[g] for g in np.flatnonzero(~est.used)]
    coefs = " and ".join(data.coef_names)
    if left_out:
        shown = ", ".join(left_out[:10]) + (" ..." if len(left_out) > 10 else "")
        warnings.append(
            f"no pooling: {len(left_out)} {data.group} groups have too few observations or too "
            f"few distinct predictor values to fit their own {coefs} ({shown}); their "
            "coefficients are not estimated and their rows are left out"
        )
    for k in est.dropped:
        warnings.append(
            f"no pooling: b_{data.fixed_names[k]} is not estimated: within {data.group} groups "
            "it is a combination of the group's own coefficients"
        )
    if not est.df > 0:
        warnings.append("no pooling: no residual degrees of freedom; sigma and SEs undefined")
    t = float(stdtrit(est.df, 0.95)) if est.df > 0 else np.nan
    rows = []
    for k, gval in zip(est.shared, est.gamma, strict=True):
        s = float(np.sqrt(est.gamma_cov[est.shared.index(k), est.shared.index(k)]))
        rows.append(point_row(f"b_{data.fixed_names[k]}", gval, s, gval - t * s, gval + t * s))
    rows.append(point_row("sigma", np.sqrt(est.sigma2)))
    block = group_rows(f"coef_{data.group}", data, est.coef, est.coef_se, t)
    preds = []
    for i, pt in enumerate(prediction_points(data)):
        xs = pt.x[est.shared]
        for g in example_groups(data) if i == 0 else []:
            lab = data.labels[g]
            if not est.used[g]:
                continue
            m = float(pt.z @ est.coef[g] + xs @ est.gamma)
            d = xs - est.a[g].T @ pt.z
            v = est.sigma2 * float(pt.z @ est.zinv[g] @ pt.z) + float(d @ est.gamma_cov @ d)
            how = f"the group's own least-squares line; t interval on {est.df} df"
            preds.append(_prediction(f"fitted_mean[{lab}]", pt.at, m, np.sqrt(v), how, t))
            preds.append(
                _prediction(
                    f"new_observation[{lab}]",
                    pt.at,
                    m,
                    np.sqrt(v + est.sigma2),
                    how + "; sigma^2 added",
                    t,
                )
            )
        for target in ("new_group_mean", "new_observation_new_group") if i == 0 else ():
            preds.append(
                {
                    **_prediction(target, pt.at, np.nan, np.nan, ""),
                    "kind": "not defined: no pooling has no population of groups",
                }
            )
    info = {
        "df": est.df,
        "groups_left_out": left_out,
        # each group's own q coefficients (the rank of Z_g for the groups used)
        "effective_parameters": float(len(data.coef_names) * est.used.sum()),
        "reference_levels": data.ref_levels,
        "predictions": preds,
        "warnings": warnings,
    }
    return FitResult(summary=_summary(rows, block), info=info)


# --------------------------------------------------------------------------------------
# empirical Bayes: ML and REML


def eb_lmm(data: LmmData, method: str) -> LmmFit:
    """The ML (``eb_ml``) or REML (``eb_reml``) fit from the sufficient statistics."""
    return fit_lmm_from_stats(
        data.stats,
        method="REML" if method == "eb_reml" else "ML",
        fixed_names=data.fixed_names,
        coef_names=data.coef_names,
        group_name=data.group,
        block_sizes=data.block_sizes,
    )


def coef_estimates(data: LmmData, fit: LmmFit) -> tuple[np.ndarray, np.ndarray]:
    r"""``coef_`` means and SDs (G, q): fixed effect plus deviation, and its prediction error.

    The SD is that of :math:`(\hat\beta_k + \hat b_{gk}) - (\beta_k + b_{gk})`,
    counting the uncertainty of :math:`\hat\beta` and its covariance with
    :math:`\hat b_g` (:func:`~hierpipe.models.lmm.prediction_error_variances`);
    a coefficient without a fixed effect of its name has fixed part 0.
    """
    q, G, p = len(data.coef_names), data.n_groups, len(data.fixed_names)
    idx = _fixed_index(data)
    fixed = np.where(idx >= 0, np.asarray(fit.beta)[np.maximum(idx, 0)], 0.0)
    mean = fixed[None, :] + np.asarray(fit.b_hat)
    x = np.zeros((q, p))
    x[np.flatnonzero(idx >= 0), idx[idx >= 0]] = 1.0
    groups = np.repeat(np.arange(G), q)
    var = prediction_error_variances(
        data.stats, fit, groups, np.tile(x, (G, 1)), np.tile(np.eye(q), (G, 1))
    )
    return mean, np.sqrt(np.maximum(var, 0.0)).reshape(G, q)


def _convergence_summary(fit: LmmFit) -> dict[str, Any]:
    """The parts of the convergence record a reader needs (the full one is in lmm.py)."""
    conv = fit.convergence
    attempts = []
    for a in conv["attempts"]:
        checks = a.get("checks", {})
        attempts.append(
            {
                "optimizer": a.get("optimizer"),
                "message": a.get("message"),
                "objective": a.get("objective", a.get("objective_interior")),
                "polish": a.get("polish"),
                "newton_step_max": checks.get("newton_step_max"),
                "hessian_relative_min_eigenvalue": checks.get("hessian_relative_min_eigenvalue"),
                "gradient_ok": checks.get("gradient_ok"),
                "hessian_ok": checks.get("hessian_ok"),
                "passed": checks.get("passed"),
            }
        )
    return {
        "converged": bool(fit.converged),
        "chosen_attempt": conv.get("chosen_attempt"),
        "attempts": attempts,
        "theta": [float(t) for t in fit.theta],
        "evaluations": int(fit.n_evaluations),
    }


def _structure_text(data: LmmData) -> str:
    if data.correlated:
        return "unstructured: every pair of varying coefficients correlated"
    blocks, start = [], 0
    for size in data.block_sizes:
        blocks.append("(" + ", ".join(data.coef_names[start : start + size]) + ")")
        start += size
    return "block diagonal (||): correlated only within " + ", ".join(blocks)


def eb_fit(data: LmmData, method: str) -> FitResult:
    """Summary, predictions and fit.json facts of an ML or REML fit."""
    fit = eb_lmm(data, method)
    g = data.group
    rows = [
        normal_row(f"b_{n}", b, s)
        for n, b, s in zip(data.fixed_names, fit.beta, fit.beta_se, strict=True)
    ]
    rows += [point_row(f"sd_{g}__{c}", s) for c, s in zip(data.coef_names, fit.sds, strict=True)]
    intervals = correlation_intervals(data.stats, fit)
    for j, k in _cor_pairs(data):
        ci = intervals[(j, k)]
        rows.append(
            point_row(
                f"cor_{g}__{data.coef_names[j]}__{data.coef_names[k]}",
                fit.cor[j, k],
                ci["se"],
                ci["lo"],
                ci["hi"],
            )
        )
    rows.append(point_row("sigma", fit.sigma))
    notes = []
    if data.coef_names == ("Intercept",):
        tau2 = float(fit.sds[0]) ** 2
        rows.append(point_row(f"icc_{g}", tau2 / (tau2 + fit.sigma**2)))
        if len(data.fixed_names) > 1:
            notes.append(
                f"icc_{g} is the share of the residual variance (given the predictors) "
                f"that lies between {g} groups"
            )
    else:
        notes.append(
            f"icc_{g} is not reported: it is defined for a varying intercept alone; with "
            f"varying {', '.join(c for c in data.coef_names if c != 'Intercept')} the share of "
            "variance between groups depends on the predictors' values"
        )
    coef_mean, coef_sd = coef_estimates(data, fit)
    blocks = (
        group_rows(f"r_{g}", data, np.asarray(fit.b_hat), np.asarray(fit.b_sd), Z90),
        group_rows(f"coef_{g}", data, coef_mean, coef_sd, Z90),
    )
    boundary = [f"boundary fit: {flag}" for flag in fit.boundary]
    warnings = list(boundary)
    if not fit.converged:
        warnings.append(
            f"{fit.method} optimiser convergence checks did not pass (see fit.json convergence)"
        )
    info = {
        "criterion": fit.method,
        "loglik": fit.loglik,
        "deviance": fit.deviance,
        "reml_criterion": fit.reml_criterion,
        "objective": fit.objective,
        "converged": bool(fit.converged),
        "optimizer_evaluations": int(fit.n_evaluations),
        "convergence": _convergence_summary(fit),
        "boundary": boundary,
        "singular": bool(fit.singular),
        "covariance_structure": _structure_text(data),
        "cor_interval": COR_INTERVAL,
        "b_interval": "Wald: estimate +- 1.645 SE, SE from sigma^2 (X'V^-1X)^-1 (lme4's vcov)",
        "r_sd": "conditional SD given beta (lme4 condVar)",
        "coef_sd": "prediction-error SD including beta's uncertainty (Henderson 1975)",
        "reference_levels": data.ref_levels,
        "effective_parameters": effective_group_parameters(data.stats, fit),
        "notes": notes,
        "predictions": eb_predictions(data, fit),
        "warnings": warnings,
    }
    return FitResult(summary=_summary(rows, *blocks), info=info)


def eb_predictions(data: LmmData, fit: LmmFit) -> list[dict[str, Any]]:
    """Fitted values and new observations in example groups, and a new group's, per point.

    Existing group :math:`g` at :math:`(x, z)`: mean :math:`x^\\top\\hat\\beta +
    z^\\top\\hat b_g`, SD from Henderson's prediction-error variance (with
    :math:`\\hat\\beta`'s uncertainty); a new observation adds :math:`\\sigma^2`.
    New group: :math:`x^\\top\\hat\\beta`, variance :math:`z^\\top\\Sigma z +
    x^\\top\\operatorname{Cov}(\\hat\\beta)x` (+ :math:`\\sigma^2`). Normal
    approximations with the covariance parameters plugged in.
    """
    s2 = fit.sigma**2
    beta, cov, big = np.asarray(fit.beta), np.asarray(fit.beta_cov), np.asarray(fit.Sigma)
    out = []
    groups = example_groups(data)
    for i, pt in enumerate(prediction_points(data)):
        # existing groups at the mean row only; the new group along the grid too
        pev = prediction_error_variances(
            data.stats, fit, np.array(groups), np.tile(pt.x, (2, 1)), np.tile(pt.z, (2, 1))
        )
        for g, v in zip(groups, pev, strict=True) if i == 0 else ():
            lab = data.labels[g]
            m = float(pt.x @ beta + pt.z @ fit.b_hat[g])
            how = "existing group: fixed + conditional mode; SE with beta's uncertainty"
            out.append(_prediction(f"fitted_mean[{lab}]", pt.at, m, np.sqrt(v), how))
            out.append(
                _prediction(
                    f"new_observation[{lab}]", pt.at, m, np.sqrt(v + s2), how + "; sigma^2 added"
                )
            )
        m = float(pt.x @ beta)
        v = float(pt.z @ big @ pt.z + pt.x @ cov @ pt.x)
        how = "new group: normal approximation, z'Sigma z + x'Cov(beta)x, variances plugged in"
        out.append(_prediction("new_group_mean", pt.at, m, np.sqrt(v), how))
        out.append(
            _prediction(
                "new_observation_new_group", pt.at, m, np.sqrt(v + s2), how + "; sigma^2 added"
            )
        )
    return out


# --------------------------------------------------------------------------------------
# gibbs (delegated)


def _gibbs_module():
    """``hierpipe.models.gibbs_lmm`` if it exists; a clear MethodError otherwise."""
    if importlib.util.find_spec("hierpipe.models.gibbs_lmm") is None:
        raise MethodError("gibbs for varying slopes is not available yet")
    return importlib.import_module("hierpipe.models.gibbs_lmm")


def run_gibbs(data: LmmData, settings: dict[str, Any], rng: np.random.Generator) -> FitResult:
    """``gibbs_lmm(data, settings, rng)`` of :mod:`hierpipe.models.gibbs_lmm`."""
    return _gibbs_module().gibbs_lmm(data, settings, rng)


# --------------------------------------------------------------------------------------
# dispatch


def fit(
    data: LmmData,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> FitResult:
    """Fit the one-factor LMM by ``method`` (see the module docstring)."""
    if method == "complete_pooling":
        return complete_pooling(data)
    if method == "no_pooling":
        return no_pooling(data)
    if method in ("eb_ml", "eb_reml"):
        return eb_fit(data, method)
    if method == "gibbs":
        return run_gibbs(data, settings, rng)
    raise ConfigError(f"unknown fit method '{method}'")


# --------------------------------------------------------------------------------------
# leave one group out


@dataclass(frozen=True)
class Population:
    """Population parameters for a new group, one row a draw (one row for plug-in fits).

    ``beta`` (S,p), ``beta_cov`` (S,p,p) (zero for posterior draws, which carry
    beta's uncertainty themselves), ``Sigma`` (S,q,q), ``sigma2`` (S,).
    """

    beta: np.ndarray
    beta_cov: np.ndarray
    Sigma: np.ndarray
    sigma2: np.ndarray


def _population_from_draws(data: LmmData, draws: pd.DataFrame) -> Population:
    """Population draws from a sampler's draws table (brms column names)."""
    g, q, p = data.group, len(data.coef_names), len(data.fixed_names)
    s = len(draws)
    beta = np.column_stack([draws[f"b_{n}"].to_numpy(float) for n in data.fixed_names])
    sds = np.column_stack([draws[f"sd_{g}__{c}"].to_numpy(float) for c in data.coef_names])
    corr = np.broadcast_to(np.eye(q), (s, q, q)).copy()
    for j, k in _cor_pairs(data):
        col = draws[f"cor_{g}__{data.coef_names[j]}__{data.coef_names[k]}"].to_numpy(float)
        corr[:, j, k] = corr[:, k, j] = col
    big = corr * sds[:, :, None] * sds[:, None, :]
    return Population(
        beta=beta,
        beta_cov=np.zeros((s, p, p)),
        Sigma=big,
        sigma2=draws["sigma"].to_numpy(float) ** 2,
    )


def population(
    data: LmmData, method: str, settings: dict[str, Any], rng: np.random.Generator
) -> Population:
    """The new-group predictive's parameters after fitting ``data`` by ``method``."""
    q = len(data.coef_names)
    if method == "complete_pooling":
        f = ols(data)
        return Population(f.beta[None], f.cov[None], np.zeros((1, q, q)), np.array([f.s2]))
    if method in ("eb_ml", "eb_reml"):
        f = eb_lmm(data, method)
        return Population(
            np.asarray(f.beta)[None],
            np.asarray(f.beta_cov)[None],
            np.asarray(f.Sigma)[None],
            np.array([f.sigma**2]),
        )
    if method == "gibbs":
        result = run_gibbs(data, settings, rng)
        if result.draws is None:
            raise MethodError("gibbs_lmm returned no draws, so a new group cannot be scored")
        return _population_from_draws(data, result.draws)
    raise ConfigError(
        f"fit method '{method}' cannot predict a new group, so it has no leave-one-group-out "
        "score (no pooling has no population of groups)"
    )


def _psd_factor(d: np.ndarray) -> np.ndarray:
    """Factors :math:`F_s` with :math:`F_sF_s^\\top = D_s` of a (S,k,k) stack of PSD matrices."""
    evals, evecs = np.linalg.eigh(0.5 * (d + np.swapaxes(d, 1, 2)))
    return evecs * np.sqrt(np.clip(evals, 0.0, None))[:, None, :]


def group_log_density(
    resid: np.ndarray, w: np.ndarray, d: np.ndarray, sigma2: np.ndarray
) -> np.ndarray:
    r"""Log density of :math:`N(0, \sigma^2 I + W D W^\top)` at ``resid``, for S parameter sets.

    With :math:`D = FF^\top` and :math:`G = WF/\sigma`, the Woodbury identity and
    the matrix determinant lemma give

    .. math::
        \log|V| = n\log\sigma^2 + \log|I + G^\top G|,\qquad
        r^\top V^{-1} r = \frac{r^\top r - \|L^{-1}G^\top r\|^2}{\sigma^2},

    :math:`LL^\top = I + G^\top G` (:math:`k\times k`), so no :math:`n\times n`
    matrix is formed and a singular :math:`D` (an SD at 0) is fine.

    Parameters
    ----------
    resid : (S, n) observations minus their means.
    w : (n, k) the columns that carry random variation (here ``[Z_j, X_j]``).
    d : (S, k, k) their covariance (positive semidefinite).
    sigma2 : (S,) residual variance.
    """
    n = resid.shape[1]
    sd = np.sqrt(sigma2)
    gmat = np.einsum("nk,skm->snm", w, _psd_factor(d)) / sd[:, None, None]
    k = gmat.shape[2]
    chol = np.linalg.cholesky(np.eye(k) + np.einsum("snk,snm->skm", gmat, gmat))
    logdet = n * np.log(sigma2) + 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    gr = np.einsum("snk,sn->sk", gmat, resid)
    sol = np.linalg.solve(chol, gr[:, :, None])[:, :, 0]
    quad = (np.einsum("sn,sn->s", resid, resid) / sigma2) - np.sum(sol**2, axis=1) / sigma2
    return -0.5 * (n * LOG_2PI + logdet + quad)


def _new_group_log_density(
    pop: Population, x: np.ndarray, z: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per draw: log density of ``y`` as a new group's, and its mean's predictive mean and SD."""
    s = pop.beta.shape[0]
    q = z.shape[1]
    mean = pop.beta @ x.T  # (S, n)
    w = np.hstack([z, x])
    d = np.zeros((s, w.shape[1], w.shape[1]))
    d[:, :q, :q] = pop.Sigma
    d[:, q:, q:] = pop.beta_cov
    logp = group_log_density(y[None, :] - mean, w, d, pop.sigma2)
    n = y.size
    ones_w = w.sum(axis=0)
    ybar_sd = np.sqrt((n * pop.sigma2 + np.einsum("k,skm,m->s", ones_w, d, ones_w)) / n**2)
    return logp, mean.mean(axis=1), ybar_sd


def new_group_scores(
    pop: Population,
    x: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    log_weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """elpd and a 90% interval for the mean of a new group's observations ``y``.

    One parameter set: the normal interval. Draws: the mixture over draws
    (elpd a log-mean-exp; interval from one simulated mean per draw), or, with
    normalised ``log_weights`` (PSIS), the weighted mixture (as
    :func:`hierpipe.cv.logo.score_group`).
    """
    from hierpipe.cv.psis import weighted_quantile

    logp, ybar_mean, ybar_sd = _new_group_log_density(pop, x, z, y)
    s = logp.size
    if log_weights is not None:
        lw = np.asarray(log_weights, dtype=np.float64)
        wts = np.exp(lw)
        elpd = float(logsumexp(logp + lw))
        sims = ybar_mean + ybar_sd * rng.standard_normal(s)
        centre = float(np.dot(wts, ybar_mean) / wts.sum())
        lo, hi = (float(v) for v in weighted_quantile(sims, wts, np.array([0.05, 0.95])))
    elif s == 1:
        elpd = float(logp[0])
        centre = float(ybar_mean[0])
        lo, hi = centre - Z90 * float(ybar_sd[0]), centre + Z90 * float(ybar_sd[0])
    else:
        elpd = float(logsumexp(logp) - np.log(s))
        sims = ybar_mean + ybar_sd * rng.standard_normal(s)
        centre = float(ybar_mean.mean())
        lo, hi = (float(v) for v in np.quantile(sims, [0.05, 0.95]))
    ybar = float(y.mean())
    return {
        "elpd": elpd,
        "pred_mean": centre,
        "pred_q5": lo,
        "pred_q95": hi,
        "observed_mean": ybar,
        "error": ybar - centre,
        "covered": bool(lo <= ybar <= hi),
    }


def score_held_out(
    data: LmmData, j: int, method: str, settings: dict[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    """Refit without group ``j`` and score its observations as a new group's."""
    try:
        pop = population(data.without(j), method, settings, rng)
    except InputError as exc:
        # e.g. a categorical level seen only in this group leaves a zero column in X
        raise InputError(f"leaving out {data.group} '{data.labels[j]}': {exc}") from None
    idx = data.rows(j)
    scores = new_group_scores(pop, data.X[idx], data.Z[idx], data.y[idx], rng)
    return {"group": data.labels[j], "n": float(idx.size), **scores}


def logo_log_lik(data: LmmData, structure: Structure, draws: pd.DataFrame) -> np.ndarray:
    """:math:`\\log p(y_j \\mid \\beta, \\Sigma, \\sigma)` per draw and group, shape (S, G).

    The group's coefficients are integrated out (:func:`group_log_density`
    with :math:`W = Z_j`), so leaving group :math:`j` out reweights the draws by
    :math:`1/p(y_j \\mid \\phi)` exactly (PSIS-LOGO, :mod:`hierpipe.cv.folds`).
    Reads the sampler's brms-named columns (``b_*``, ``sd_g__*``, ``cor_g__*``, ``sigma``).
    """
    pop = _population_from_draws(data, draws)
    out = np.empty((pop.beta.shape[0], data.n_groups))
    for j in range(data.n_groups):
        idx = data.rows(j)
        out[:, j] = _new_group_log_density(pop, data.X[idx], data.Z[idx], data.y[idx])[0]
    return out


def score_held_out_weighted(
    data: LmmData,
    j: int,
    structure: Structure,
    draws: pd.DataFrame,
    log_weights: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Group ``j``'s CV row from full-data draws reweighted to leave it out (PSIS)."""
    idx = data.rows(j)
    pop = _population_from_draws(data, draws)
    scores = new_group_scores(pop, data.X[idx], data.Z[idx], data.y[idx], rng, log_weights)
    return {"group": data.labels[j], "n": float(idx.size), **scores}


# --------------------------------------------------------------------------------------
# shrinkage


def shrinkage(
    data: LmmData, structure: Structure, summary: pd.DataFrame, info: dict[str, Any]
) -> pd.DataFrame:
    """Per group: own least-squares coefficient, the fit's, the population value, the weight.

    The first varying coefficient (normally the intercept) fills the standard
    columns ``no_pooling, estimate, population, weight, shrinkage``; each
    further one adds ``no_pooling__c, estimate__c, population__c, weight__c``.
    The weight :math:`\\lambda` solves :math:`\\hat c_g = \\lambda\\,c^{\\text{own}}_g
    + (1-\\lambda)\\,\\hat c^{\\text{pop}}` coefficient by coefficient; with
    correlated coefficients it is descriptive (shrinkage is a matrix), and the
    effective number of parameters is reported separately (fit.json).
    ``no_pooling`` is NaN for groups too small for their own regression.
    """
    est = summary.set_index("parameter")["mean"]
    own = no_pooling_estimates(data).coef
    g = data.group
    table: dict[str, Any] = {
        "group": pd.Series(data.labels, dtype=str),
        "n": data.sizes.astype(np.float64),
    }
    for k, c in enumerate(data.coef_names):
        pop = float(est.get(f"b_{c}", 0.0))
        fitted = np.array([est.get(f"coef_{g}[{lab},{c}]", np.nan) for lab in data.labels])
        dev = own[:, k] - pop
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.where(np.abs(dev) > 1e-12 * (1 + abs(pop)), (fitted - pop) / dev, np.nan)
        suffix = "" if k == 0 else f"__{c}"
        table[f"no_pooling{suffix}"] = own[:, k].astype(np.float64)
        table[f"estimate{suffix}"] = fitted.astype(np.float64)
        table[f"population{suffix}"] = np.full(data.n_groups, pop, dtype=np.float64)
        table[f"weight{suffix}"] = lam.astype(np.float64)
        if k == 0:
            table["shrinkage"] = (1.0 - lam).astype(np.float64)
    return pd.DataFrame(table)


# Optional engine functions (model checks, within-group K-fold); see
# hierpipe.models.engines for the interface. Kept in their own module.
from hierpipe.models.engines.lmm_checks import (  # noqa: E402, F401
    james_stein_table,
    james_stein_unavailable,
    kfold_split,
    ppc_replicates,
    prior_predictive,
    residuals,
    score_kfold,
)
