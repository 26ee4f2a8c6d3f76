r"""Variance-components models with several grouping factors: statistics, criterion, fits.

Model
-----
.. math::
    y = X\beta + \sum_{k=1}^{K} Z_k b_k + e, \qquad
    b_k \sim N(0, \sigma_k^2 I_{G_k}), \qquad e \sim N(0, \sigma^2 I_n),

where :math:`Z_k` is the indicator matrix of grouping factor :math:`k` (a
varying intercept per group; nested factors such as ``school:classroom`` and
crossed ones such as ``student`` and ``teacher`` alike). With the relative
variances :math:`\theta_k^2 = \sigma_k^2/\sigma^2`, :math:`V = \sigma^2 V_\theta`,
:math:`V_\theta = I + \sum_k \theta_k^2 Z_k Z_k^\top`, and :math:`z = [X, y]`,
everything the likelihood needs is

.. math::
    \log|V_\theta| \quad\text{and}\quad Q(\theta) = z^\top V_\theta^{-1} z
    \quad ((p+1)\times(p+1)),

from which :math:`\hat\beta(\theta) = (X^\top V_\theta^{-1}X)^{-1}X^\top V_\theta^{-1}y`,
:math:`r^2(\theta) = y^\top V_\theta^{-1} y - y^\top V_\theta^{-1}X\hat\beta` and the
profiled criteria of Bates et al. (2015, sec. 3.4)

.. math::
    -2\ell_{ML}(\theta) &= \log|V_\theta| + n\,[1 + \log(2\pi r^2/n)], \\
    -2\ell_{REML}(\theta) &= \log|V_\theta| + \log|X^\top V_\theta^{-1}X|
        + (n-p)\,[1 + \log(2\pi r^2/(n-p))]

(:math:`\log|V_\theta| = \log|\Lambda Z^\top Z\Lambda + I|`, lme4's
:math:`\log|L_\theta|^2`). Both depend on the data only through the *cells*,
the distinct combinations of the factors' groups: per cell the count
:math:`n_c`, the means :math:`\bar z_c` and the within-cell cross-products
(:class:`CellStats`). Two evaluators compute :math:`(\log|V_\theta|, Q)` from
them: :mod:`hierpipe.models.nested_reml` (a recursion over the levels of a
nested hierarchy, :math:`O(\text{cells})`) and :mod:`hierpipe.models.crossed_reml`
(block elimination of the largest factor, any structure).

Fitting (:func:`fit_components`) minimises the criterion over every face of
the boundary (each subset of factors whose variance is free, the others at 0),
so a variance estimated at zero is found exactly and reported as a boundary
fit; 90% intervals for the SDs, sigma and the ICCs come from the profile of
the same criterion (:func:`profile_intervals`), with the cut-off
:math:`\chi^2_{1,0.90} = 2.706`.

References
----------
Bates, D., Mächler, M., Bolker, B. & Walker, S. (2015). Fitting linear
mixed-effects models using lme4. *J. Stat. Softw.* 67(1).

Searle, S. R., Casella, G. & McCulloch, C. E. (1992). *Variance Components*.
Wiley. (Nested ANOVA and its expected mean squares, ch. 4 and 6.)

Snijders, T. A. B. & Bosker, R. J. (2012). *Multilevel Analysis*, 2nd ed.
Sage. (Intraclass correlations in three-level models, sec. 4.9.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from scipy import optimize

from hierpipe.errors import InputError

LOG_2PI = float(np.log(2.0 * np.pi))
#: chi-square(1) 90% quantile: the rise of -2 log-likelihood that bounds a 90% profile interval.
CHI2_90 = 2.705543454095404
#: log relative variance searched within [-LOG_BOUND, LOG_BOUND]: relative SDs from
#: 3e-6 to 3e5 cover every estimate that is not on the boundary (which the face
#: search finds exactly).
LOG_BOUND = 25.0
#: Two candidate optima whose criteria differ by less than this (-2 log-lik units)
#: are equally good; the one with fewer free variances is kept (a boundary fit).
SNAP_TOL = 1e-8
#: Newton polish stops when the step in log relative variance is below this.
STEP_TOL = 1e-7
#: Step of central finite differences in log relative variance.
FD_STEP = 1e-4
#: Converged: |gradient| per log unit below this (criterion units), Hessian positive.
GRAD_TOL = 1e-3
LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10}


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class CellStats:
    """Per-cell sufficient statistics of a variance-components model.

    A cell is a distinct combination of the factors' groups. ``B`` is a leading
    batch axis (1 for one data set; one data set a chain for simulation-based
    calibration), shared by the response-dependent arrays.

    Attributes
    ----------
    factors : names of the grouping factors, in formula order.
    labels : per factor, its group labels in code order.
    codes : (cells, K) int64, each cell's group in each factor.
    n : (cells,) float64 counts.
    zbar : (B, cells, p+1) cell means of ``[X, y - shift]``.
    within : (B, cells, p+1, p+1) within-cell cross-products about the cell means.
    fixed_names : brms names of the columns of ``X``.
    shift : (B,) subtracted from ``y`` (its mean when ``X`` has an intercept
        column, else 0) so that cross-products stay small; it is added back to
        ``b_Intercept``.
    intercept : index of the all-ones column of ``X``, or None.
    """

    factors: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    codes: np.ndarray
    n: np.ndarray
    zbar: np.ndarray
    within: np.ndarray
    fixed_names: tuple[str, ...]
    shift: np.ndarray
    intercept: int | None

    @property
    def K(self) -> int:
        return len(self.factors)

    @property
    def p(self) -> int:
        return len(self.fixed_names)

    @property
    def batch(self) -> int:
        return int(self.zbar.shape[0])

    @property
    def n_cells(self) -> int:
        return int(self.n.shape[0])

    @property
    def n_obs(self) -> int:
        return round(float(self.n.sum()))

    @property
    def group_counts(self) -> tuple[int, ...]:
        return tuple(len(lab) for lab in self.labels)

    @property
    def sums(self) -> np.ndarray:
        """(B, cells, p+1) cell sums of ``[X, y - shift]``."""
        return self.n[None, :, None] * self.zbar

    @property
    def pooled_within(self) -> np.ndarray:
        """(B, p+1, p+1) within-cell cross-products summed over cells."""
        return self.within.sum(axis=1)

    def group_sizes(self, k: int) -> np.ndarray:
        """Observations per group of factor ``k``."""
        return np.bincount(self.codes[:, k], weights=self.n, minlength=len(self.labels[k]))

    def subset(self, keep: np.ndarray) -> CellStats:
        """The statistics of the cells in ``keep`` (bool mask); empty groups are dropped."""
        codes = self.codes[keep]
        new_codes = np.empty_like(codes)
        labels = []
        for k in range(self.K):
            used, inv = np.unique(codes[:, k], return_inverse=True)
            new_codes[:, k] = inv
            labels.append(tuple(self.labels[k][i] for i in used))
        return replace(
            self,
            labels=tuple(labels),
            codes=new_codes,
            n=self.n[keep],
            zbar=self.zbar[:, keep],
            within=self.within[:, keep],
        )


def intercept_column(X: np.ndarray) -> int | None:
    """Index of the first column of ``X`` that is 1 in every row, if any."""
    ones = np.flatnonzero(np.all(X == 1.0, axis=0))
    return int(ones[0]) if ones.size else None


def cell_stats(
    factors: Sequence[str],
    labels: Sequence[Sequence[str]],
    codes: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    fixed_names: Sequence[str],
) -> CellStats:
    """Reduce rows to cells in one vectorised pass.

    Parameters
    ----------
    factors, labels : factor names and each factor's labels (code order).
    codes : (n, K) int, each row's group in each factor.
    X : (n, p) fixed-effects design.
    Y : (n,) response, or (B, n) for B data sets on the same design.
    fixed_names : names of the columns of ``X``.
    """
    codes = np.asarray(codes, dtype=np.int64)
    X = np.asarray(X, dtype=np.float64)
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    n_rows = codes.shape[0]
    cells, inv = np.unique(codes, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    n_cells = cells.shape[0]
    n = np.bincount(inv, minlength=n_cells).astype(np.float64)
    icol = intercept_column(X)
    shift = Y.mean(axis=1) if icol is not None else np.zeros(Y.shape[0])
    B, p = Y.shape[0], X.shape[1]
    zbar = np.empty((B, n_cells, p + 1))
    within = np.empty((B, n_cells, p + 1, p + 1))
    for b in range(B):
        z = np.column_stack([X, Y[b] - shift[b]]) if p else (Y[b] - shift[b])[:, None]
        for a in range(p + 1):
            zbar[b, :, a] = np.bincount(inv, weights=z[:, a], minlength=n_cells) / n
        dz = z - zbar[b, inv]
        for a in range(p + 1):
            for c in range(a, p + 1):
                w = np.bincount(inv, weights=dz[:, a] * dz[:, c], minlength=n_cells)
                within[b, :, a, c] = within[b, :, c, a] = w
    if n_rows <= p:
        raise InputError(f"{n_rows} observations for {p} fixed effects")
    return CellStats(
        factors=tuple(factors),
        labels=tuple(tuple(str(s) for s in lab) for lab in labels),
        codes=cells,
        n=n,
        zbar=zbar,
        within=within,
        fixed_names=tuple(fixed_names),
        shift=shift,
        intercept=icol,
    )


def nesting_order(stats: CellStats) -> tuple[int, ...] | None:
    """Factor indices from the top level down when the factors form one nested chain.

    Factor :math:`f` is nested in :math:`g` when each group of :math:`f` lies in
    exactly one group of :math:`g`. Ordered by the number of groups, the chain
    is nested when each factor is nested in the one before; otherwise (crossed
    or partly crossed factors) None.
    """
    counts = stats.group_counts
    order = tuple(sorted(range(stats.K), key=lambda k: (counts[k], k)))
    for outer, inner in itertools.pairwise(order):
        pairs = np.unique(stats.codes[:, [outer, inner]], axis=0)
        if pairs.shape[0] != counts[inner] or counts[inner] == counts[outer]:
            return None
    return order


# --------------------------------------------------------------------------- evaluators


class Evaluator(Protocol):
    """What the fits need from a structure: see the module docstring.

    ``theta2`` has shape (C, K): relative variances in formula order, one row a
    chain (or a candidate). Response-dependent arrays broadcast a batch axis B
    of 1 or C against it.
    """

    stats: CellStats

    def terms(self, theta2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(log|V_theta|, Q)`` of shapes (C,) and (C, p+1, p+1)."""
        ...

    def modes(self, theta2: np.ndarray, sums: np.ndarray) -> list[np.ndarray]:
        """Per factor, :math:`E[b_k \\mid \\cdot]` for the columns of ``sums``.

        ``sums`` (C or B, cells, r) are cell sums of ``r`` response vectors;
        returns one (C, G_k, r) array a factor of :math:`\\theta_k^2 Z_k^\\top
        V_\\theta^{-1} a` for each column ``a`` (conditional modes of the
        effects when ``a`` is the residual).
        """
        ...

    def cond_var(self, theta2: np.ndarray) -> list[np.ndarray]:
        """Per factor, (C, G_k) diagonal of :math:`\\Lambda M^{-1}\\Lambda` (times
        :math:`\\sigma^2`: lme4's conditional variances)."""
        ...

    def draw(
        self,
        theta2: np.ndarray,
        sigma: np.ndarray,
        resid_sums: np.ndarray,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        """One draw of every factor's effects given the variances and the residual
        cell sums (C, cells): per factor (C, G_k)."""
        ...


def make_evaluator(stats: CellStats, kind: str | None = None) -> Evaluator:
    """The nested recursion when the factors are nested, else block elimination."""
    from hierpipe.models.crossed_reml import CrossedEvaluator
    from hierpipe.models.nested_reml import NestedEvaluator

    order = nesting_order(stats)
    if kind is None:
        kind = "nested" if order is not None else "crossed"
    if kind == "nested":
        if order is None:
            raise ValueError("factors are not nested")
        return NestedEvaluator(stats, order)
    return CrossedEvaluator(stats)


# --------------------------------------------------------------------------- criterion


@dataclass(frozen=True)
class Profiled:
    """The profiled criterion and what it profiles out, over a leading axis (C,)."""

    criterion: np.ndarray
    beta: np.ndarray
    r2: np.ndarray
    logdet_v: np.ndarray
    logdet_xvx: np.ndarray
    xvx: np.ndarray


def _batched_cholesky_logdet(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    chol = np.linalg.cholesky(a)
    return chol, 2.0 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(axis=-1)


def profile_out(logdet: np.ndarray, Q: np.ndarray, n: int, p: int, reml: bool) -> Profiled:
    """The ML or REML criterion from :math:`(\\log|V_\\theta|, Q)` (module docstring).

    Rows whose :math:`X^\\top V_\\theta^{-1}X` is not numerically positive definite
    (only at extreme variance ratios) get an infinite criterion.
    """
    bad = np.zeros(np.shape(logdet), dtype=bool)
    if p:
        xvx = Q[..., :p, :p]
        xvy = Q[..., :p, p]
        try:
            _, logdet_xvx = _batched_cholesky_logdet(xvx)
        except np.linalg.LinAlgError:
            bad = ~np.all(np.linalg.eigvalsh(xvx) > 0, axis=-1)
            xvx = np.where(bad[..., None, None], np.eye(p), xvx)
            _, logdet_xvx = _batched_cholesky_logdet(xvx)
        beta = np.linalg.solve(xvx, xvy[..., None])[..., 0]
        r2 = Q[..., p, p] - np.einsum("...i,...i->...", xvy, beta)
    else:
        xvx = Q[..., :0, :0]
        beta = Q[..., :0, 0]
        logdet_xvx = np.zeros_like(logdet)
        r2 = Q[..., 0, 0]
    bad = bad | ~(r2 > 0)
    r2 = np.maximum(r2, np.finfo(float).tiny)
    df = n - p if reml else n
    crit = logdet + df * (1.0 + np.log(2.0 * np.pi * r2 / df))
    if reml:
        crit = crit + logdet_xvx
    crit = np.where(bad, np.inf, crit)
    return Profiled(crit, beta, r2, logdet, logdet_xvx, xvx)


def absolute_criterion(
    logdet: np.ndarray, Q: np.ndarray, sigma2: np.ndarray, n: int, p: int, reml: bool
) -> np.ndarray:
    """-2 (restricted) log-likelihood at relative variances and an explicit sigma^2.

    .. math::
        -2\\ell = \\log|V_\\theta| + [\\log|X^\\top V_\\theta^{-1}X|]
        + d \\log(2\\pi\\sigma^2) + r^2(\\theta)/\\sigma^2,

    with :math:`d = n - p` and the bracket for REML, :math:`d = n` for ML;
    minimising over :math:`\\sigma^2` gives :func:`profile_out`.
    """
    prof = profile_out(logdet, Q, n, p, reml)
    df = n - p if reml else n
    crit = logdet + df * np.log(2.0 * np.pi * sigma2) + prof.r2 / sigma2
    crit = crit + prof.logdet_xvx if reml else crit
    return np.where(np.isfinite(prof.criterion), crit, np.inf)


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class ComponentsFit:
    """ML or REML estimates of a variance-components model.

    Attributes
    ----------
    method : ``"ML"`` or ``"REML"``.
    factors : factor names (formula order).
    theta2 : (K,) relative variances :math:`\\sigma_k^2/\\sigma^2`.
    sigma : residual SD; ``sds`` : (K,) the factors' SDs.
    beta, beta_cov : fixed effects (``shift`` added back to the intercept) and
        their covariance :math:`\\sigma^2(X^\\top V_\\theta^{-1}X)^{-1}` (lme4's ``vcov``).
    objective : the minimised criterion; ``loglik`` the ML log-likelihood at the
        estimates, ``reml_criterion`` -2 times the restricted one there.
    boundary : factor indices whose variance is estimated at 0.
    converged, convergence : checks (gradient, Hessian, one-sided boundary slopes).
    n_evaluations : criterion evaluations.
    """

    method: str
    factors: tuple[str, ...]
    theta2: np.ndarray
    sigma: float
    sds: np.ndarray
    beta: np.ndarray
    beta_cov: np.ndarray
    objective: float
    loglik: float
    reml_criterion: float
    boundary: tuple[int, ...]
    converged: bool
    convergence: dict[str, Any] = field(repr=False)
    n_evaluations: int = 0


class _Objective:
    """Criterion on one face of the boundary: free factors in log relative variance."""

    def __init__(self, ev: Evaluator, reml: bool) -> None:
        self.ev = ev
        self.reml = reml
        self.n = ev.stats.n_obs
        self.p = ev.stats.p
        self.K = ev.stats.K
        self.evaluations = 0

    def theta2(self, free: tuple[int, ...], eta: np.ndarray) -> np.ndarray:
        t = np.zeros((np.atleast_2d(eta).shape[0], self.K))
        if free:
            t[:, list(free)] = np.exp(np.atleast_2d(eta))
        return t

    def many(self, theta2: np.ndarray) -> np.ndarray:
        self.evaluations += theta2.shape[0]
        logdet, Q = self.ev.terms(theta2)
        return profile_out(logdet, Q, self.n, self.p, self.reml).criterion

    def on_face(self, free: tuple[int, ...]) -> Callable[[np.ndarray], float]:
        return lambda eta: float(self.many(self.theta2(free, np.asarray(eta)))[0])

    def batch_on_face(self, free: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
        return lambda etas: self.many(self.theta2(free, np.atleast_2d(etas)))


def with_gradient(
    fb: Callable[[np.ndarray], np.ndarray], h: float = FD_STEP
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """Value and central-difference gradient of a batched function, in one batched call.

    The evaluators take many points at once, so the 2d+1 points of a central
    difference cost about as much as one.
    """

    def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
        x = np.asarray(x, dtype=float)
        d = x.size
        pts = np.vstack([x, x + h * np.eye(d), x - h * np.eye(d)])
        v = fb(pts)
        fwd, bwd = v[1 : d + 1], v[d + 1 :]
        with np.errstate(invalid="ignore"):
            g = np.where(
                np.isfinite(fwd) & np.isfinite(bwd),
                (fwd - bwd) / (2 * h),
                np.where(np.isfinite(fwd), (fwd - v[0]) / h, (v[0] - bwd) / h),
            )
        return float(v[0]), np.where(np.isfinite(g), g, 0.0)

    return fg


def _fd_grad_hess(f: Callable[[np.ndarray], float], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient and Hessian (step FD_STEP)."""
    k, h = x.size, FD_STEP
    f0 = f(x)
    g = np.zeros(k)
    H = np.zeros((k, k))
    e = np.eye(k) * h
    fp = np.array([f(x + e[i]) for i in range(k)])
    fm = np.array([f(x - e[i]) for i in range(k)])
    g = (fp - fm) / (2 * h)
    for i in range(k):
        H[i, i] = (fp[i] - 2 * f0 + fm[i]) / h**2
        for j in range(i + 1, k):
            fpp = f(x + e[i] + e[j])
            fmm = f(x - e[i] - e[j])
            fpm = f(x + e[i] - e[j])
            fmp = f(x - e[i] + e[j])
            H[i, j] = H[j, i] = (fpp - fpm - fmp + fmm) / (4 * h**2)
    return g, H


def _newton_polish(f: Callable[[np.ndarray], float], x: np.ndarray) -> np.ndarray:
    """A few damped Newton steps on a finite-difference Hessian; only improvements kept."""
    fx = f(x)
    for _ in range(8):
        g, H = _fd_grad_hess(f, x)
        try:
            step = -np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)) or np.any(np.linalg.eigvalsh(H) <= 0):
            break
        for scale in (1.0, 0.5, 0.25):
            cand = np.clip(x + scale * step, -LOG_BOUND, LOG_BOUND)
            fc = f(cand)
            if fc <= fx:
                x, fx = cand, fc
                break
        else:
            break
        if np.max(np.abs(step)) < STEP_TOL:
            break
    return x


def _minimise_face(obj: _Objective, free: tuple[int, ...]) -> tuple[np.ndarray, float, list]:
    """Best point on one face, from two starting values, then polished."""
    if not free:
        return np.zeros(0), float(obj.many(np.zeros((1, obj.K)))[0]), []
    f = obj.on_face(free)
    fg = with_gradient(obj.batch_on_face(free))
    bounds = [(-LOG_BOUND, LOG_BOUND)] * len(free)
    best, attempts = None, []
    for start in (0.0, np.log(0.1)):
        res = optimize.minimize(
            fg,
            np.full(len(free), start),
            method="L-BFGS-B",
            jac=True,
            bounds=bounds,
            options=LBFGS_OPTIONS,
        )
        attempts.append({"start": float(start), "message": str(res.message), "fun": float(res.fun)})
        if best is None or res.fun < best.fun:
            best = res
    x = _newton_polish(f, np.asarray(best.x, dtype=float))
    return x, f(x), attempts


def _check(obj: _Objective, free: tuple[int, ...], eta: np.ndarray) -> dict[str, Any]:
    """Gradient and Hessian on the face; one-sided slopes into the interior off it."""
    out: dict[str, Any] = {}
    ok = True
    if free:
        g, H = _fd_grad_hess(obj.on_face(free), eta)
        eig = np.linalg.eigvalsh(H)
        interior = np.abs(eta) < LOG_BOUND - 1
        out["gradient"] = g.tolist()
        out["hessian_eigenvalues"] = eig.tolist()
        ok &= bool(np.all(np.abs(g[interior]) < GRAD_TOL))
        ok &= bool(eig.min() > 0)
    # Off the face: d criterion / d theta_k^2 at 0 must not be negative (else the
    # interior would be better); one-sided difference of size h in theta^2.
    base = obj.theta2(free, eta)
    f0 = float(obj.many(base)[0])
    slopes = {}
    for k in sorted(set(range(obj.K)) - set(free)):
        h = 1e-6
        t = base.copy()
        t[0, k] = h
        slopes[obj.ev.stats.factors[k]] = (float(obj.many(t)[0]) - f0) / h
    out["boundary_slopes"] = slopes
    ok &= all(s > -1e-3 for s in slopes.values())
    out["ok"] = bool(ok)
    return out


def fit_components(ev: Evaluator, method: str = "REML") -> ComponentsFit:
    """ML or REML fit by search over every face of the boundary.

    Each subset of factors with a free (positive) variance is optimised in log
    relative variance by L-BFGS-B from two starts and polished by Newton steps;
    the best criterion wins, and among candidates within ``SNAP_TOL`` of it the
    one with the fewest free variances (a boundary fit, reported as such).
    With K factors this is :math:`2^K` small problems; K is 2 or 3 in practice.
    """
    reml = {"REML": True, "ML": False}[method]
    obj = _Objective(ev, reml)
    K = obj.K
    cands = []
    record = []
    for size in range(K, -1, -1):
        for free in itertools.combinations(range(K), size):
            eta, val, attempts = _minimise_face(obj, free)
            cands.append((val, size, free, eta))
            record.append({"free": [ev.stats.factors[k] for k in free], "criterion": val})
            record[-1]["attempts"] = attempts
    best_val = min(c[0] for c in cands)
    val, _, free, eta = min((c for c in cands if c[0] <= best_val + SNAP_TOL), key=lambda c: c[1])
    theta2 = obj.theta2(free, eta)
    checks = _check(obj, free, eta)
    return _assemble(ev, method, theta2, val, free, checks, record, obj.evaluations)


def _assemble(
    ev: Evaluator,
    method: str,
    theta2: np.ndarray,
    objective: float,
    free: tuple[int, ...],
    checks: dict[str, Any],
    record: list,
    evaluations: int,
) -> ComponentsFit:
    st = ev.stats
    n, p = st.n_obs, st.p
    logdet, Q = ev.terms(theta2)
    reml = method == "REML"
    prof = profile_out(logdet, Q, n, p, reml)
    sigma2 = float(prof.r2[0]) / (n - p if reml else n)
    beta = prof.beta[0].copy()
    if st.intercept is not None:
        beta[st.intercept] += float(st.shift[0])
    beta_cov = sigma2 * np.linalg.inv(prof.xvx[0]) if p else np.zeros((0, 0))
    ml = absolute_criterion(logdet, Q, np.array([sigma2]), n, p, False)
    rc = absolute_criterion(logdet, Q, np.array([sigma2]), n, p, True)
    return ComponentsFit(
        method=method,
        factors=st.factors,
        theta2=theta2[0],
        sigma=float(np.sqrt(sigma2)),
        sds=np.sqrt(theta2[0] * sigma2),
        beta=beta,
        beta_cov=beta_cov,
        objective=float(objective),
        loglik=float(-0.5 * ml[0]),
        reml_criterion=float(rc[0]),
        boundary=tuple(k for k in range(st.K) if k not in free),
        converged=bool(checks["ok"]),
        convergence={"checks": checks, "faces": record},
        n_evaluations=evaluations,
    )


# --------------------------------------------------------------------------- ICCs


def icc_denominators(stats: CellStats, order: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    """Per factor, the factors whose variances (with sigma^2) form its ICC's denominator.

    Nested factors (``order`` from the top): :math:`\\rho_k = \\sigma_k^2 /
    (\\sigma_k^2 + \\sum_{j \\text{ below } k}\\sigma_j^2 + \\sigma^2)`, the
    correlation of two observations of the same level-:math:`k` group *within
    its parent group* (for the top level, the share of the total variance:
    :math:`\\rho_{school} = \\sigma^2_{school}/(\\sigma^2_{school} +
    \\sigma^2_{classroom} + \\sigma^2)`; for classrooms, :math:`\\sigma^2_{classroom}
    /(\\sigma^2_{classroom} + \\sigma^2)`). Crossed factors: the share of the total,
    :math:`\\sigma_k^2/(\\sum_j \\sigma_j^2 + \\sigma^2)`, the correlation of two
    observations that share only that factor's group.
    """
    if order is None:
        return [tuple(range(stats.K))] * stats.K
    return [tuple(order[order.index(k) :]) for k in range(stats.K)]


def iccs(var: np.ndarray, sigma2: np.ndarray, denominators: list[tuple[int, ...]]) -> np.ndarray:
    """ICCs (..., K) from variances (..., K) and sigma^2 (...)."""
    out = np.empty_like(var)
    for k, dens in enumerate(denominators):
        out[..., k] = var[..., k] / (var[..., list(dens)].sum(axis=-1) + sigma2)
    return out


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class _Abs:
    """-2 log-likelihood over log variances phi = (log sigma_1^2..log sigma_K^2, log sigma^2)."""

    ev: Evaluator
    reml: bool
    floor: float

    def batch(self, phi: np.ndarray) -> np.ndarray:
        st = self.ev.stats
        phi = np.atleast_2d(np.asarray(phi, dtype=float))
        var = np.exp(np.maximum(phi[:, :-1], self.floor))
        s2 = np.exp(phi[:, -1])
        logdet, Q = self.ev.terms(var / s2[:, None])
        return absolute_criterion(logdet, Q, s2, st.n_obs, st.p, self.reml)

    def __call__(self, phi: np.ndarray) -> float:
        return float(self.batch(phi)[0])


def _inner_min(
    fb: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, bounds: list
) -> tuple[float, np.ndarray]:
    """Minimum of a batched function from ``x0`` (L-BFGS-B, batched gradient)."""
    if x0.size == 0:
        return float(fb(x0[None, :])[0]), x0
    res = optimize.minimize(
        with_gradient(fb),
        x0,
        method="L-BFGS-B",
        jac=True,
        bounds=bounds,
        options={"maxiter": 500, "ftol": 1e-10, "gtol": 1e-4},
    )
    return float(res.fun), np.asarray(res.x)


def _limit(
    rise: Callable[[float], float], x_hat: float, direction: float, stop: float
) -> float | None:
    """Where the profile's rise above the optimum reaches the cut-off, going ``direction``.

    Works on :math:`\\zeta = \\sqrt{\\text{rise}}`, close to linear in a well-scaled
    parameter (exactly so for a normal likelihood). Until the cut-off is
    bracketed, steps are extrapolated from the last two points (at most four
    times the last step; doubled while the profile is flat); then the bracket
    shrinks by interpolation kept at least 10% inside it. Stops when
    :math:`\\zeta` is within 3e-4 of :math:`\\sqrt{2.706}` (the rise within 1e-3)
    or the bracket is below 1e-5 wide; None when ``stop`` is passed first.
    """
    target = float(np.sqrt(CHI2_90))

    def zeta(x: float) -> float:
        r = rise(x)
        # a non-finite criterion (a numerically singular point) is far beyond the cut-off
        return float(np.sqrt(max(r, 0.0))) if np.isfinite(r) else 1e3

    def past(x: float, edge: float) -> bool:
        return x >= edge if direction > 0 else x <= edge

    in_x, in_z = x_hat, 0.0
    prev_x, prev_z = x_hat, 0.0
    out: tuple[float, float] | None = None
    x = x_hat + 0.3 * direction
    for _ in range(80):
        z = zeta(x)
        if abs(z - target) < 3e-4:
            return x
        if z < target:
            prev_x, prev_z, in_x, in_z = in_x, in_z, x, z
        else:
            out = (x, z)
        if out is None:
            step = abs(in_x - prev_x)
            if in_z - prev_z > 1e-9:
                ext = (target - in_z) * step / (in_z - prev_z)
                step = float(np.clip(ext, 0.5 * step, 4.0 * step))
            else:
                step = 2.0 * step
            x = in_x + direction * step
            if past(x, stop):
                if past(in_x, stop) or zeta(stop) < target:
                    return None
                x = stop
        else:
            ox, oz = out
            width = abs(ox - in_x)
            if width < 1e-5:
                return 0.5 * (ox + in_x)
            frac = (target - in_z) / (oz - in_z)
            x = in_x + float(np.clip(frac, 0.1, 0.9)) * (ox - in_x)
    return x


def profile_intervals(fit: ComponentsFit, ev: Evaluator, dens: list[tuple[int, ...]]) -> dict:
    """90% profile-likelihood intervals of every SD, sigma and every ICC.

    The interval of a function :math:`\\psi` of the variances is
    :math:`\\{c : \\min_{\\psi = c} (-2\\ell) - \\min (-2\\ell) \\le 2.706\\}`; the
    criterion is the one fitted (restricted for REML, as lme4's ``profile`` of a
    REML fit). The constrained minimum fixes one log variance (for an ICC the
    one that its value and the other variances determine) and minimises over
    the others. A limit at a variance of 0 is reported as 0, one beyond
    :math:`e^{30}` times the estimate as infinite. Limits are found to 1e-4 on
    the log (SD) or logit (ICC) scale.
    """
    st = ev.stats
    K = st.K
    s2 = fit.sigma**2
    scale = float(np.sum(fit.sds**2) + s2)
    floor = float(np.log(1e-12 * scale))
    f = _Abs(ev, fit.method == "REML", floor)
    var_hat = np.maximum(fit.sds**2, 1e-12 * scale)
    phi_hat = np.log(np.append(var_hat, s2))
    best = f(phi_hat)
    out: dict[str, tuple[float, float]] = {}

    def limits(
        idx: int,
        fix: Callable,
        x_hat: float,
        to_c: Callable[[float], float],
        zero_low: bool,
        x_lo: float,
        x_hi: float,
    ) -> tuple[float, float]:
        others = [j for j in range(K + 1) if j != idx]
        # nuisance log variances within 1e-12..1e8 of the total (1e-8..1e8 for sigma^2):
        # wide enough for any profile, narrow enough to keep X'V^-1 X well conditioned
        top = float(np.log(1e8 * scale))
        bounds = [(floor, top) if j < K else (floor + np.log(1e4), top) for j in others]
        state = {"nu": phi_hat[others].copy()}

        # a second start with every variance off the floor: in log variance the
        # criterion is flat near 0, so a start on the floor would stay there
        # even where the constrained optimum has that variance positive
        lifted = np.maximum(phi_hat[others], np.log(0.05 * scale))
        n_var = sum(1 for j in others if j < K)

        def g(x: float) -> float:
            c = to_c(x)
            fb = lambda nu: f.batch(fix(c, nu))  # noqa: E731
            val, nu = _inner_min(fb, state["nu"], bounds)
            if np.any(nu[:n_var] < floor + 5.0):
                val2, nu2 = _inner_min(fb, lifted, bounds)
                if val2 < val:
                    val, nu = val2, nu2
            state["nu"] = nu
            return val - best - CHI2_90

        def rise(x: float) -> float:
            return g(x) + CHI2_90

        lo = 0.0
        if not zero_low:
            x = _limit(rise, x_hat, -1.0, x_lo)
            lo = to_c(x) if x is not None else 0.0
        state["nu"] = phi_hat[others].copy()
        x = _limit(rise, x_hat, 1.0, x_hi)
        return float(lo), float(to_c(x)) if x is not None else float("inf")

    for k in range(K + 1):

        def fix_sd(c: float, nu: np.ndarray, k: int = k) -> np.ndarray:
            nu = np.atleast_2d(nu)
            return np.insert(nu, k, 2.0 * np.log(c), axis=1)

        x_hat = 0.5 * float(phi_hat[k])
        name = "sigma" if k == K else f"sd_{st.factors[k]}__Intercept"
        out[name] = limits(
            k, fix_sd, x_hat, np.exp, k < K and k in fit.boundary, floor / 2, x_hat + 30
        )
    icc_hat = iccs(var_hat[None], np.array([s2]), dens)[0]
    for k in range(K):
        rest = [j for j in dens[k] if j != k]

        def fix_icc(c: float, nu: np.ndarray, k: int = k, rest: list = rest) -> np.ndarray:
            phi = np.insert(np.atleast_2d(nu), k, 0.0, axis=1)
            total = np.exp(np.maximum(phi[:, rest], floor)).sum(axis=1) + np.exp(phi[:, K])
            phi[:, k] = np.log(c / (1.0 - c) * total)
            return phi

        x_hat = float(np.log(icc_hat[k]) - np.log1p(-icc_hat[k]))
        out[f"icc_{st.factors[k]}"] = limits(
            k,
            fix_icc,
            x_hat,
            lambda x: float(1.0 / (1.0 + np.exp(-x))),
            k in fit.boundary,
            -30.0,
            30.0,
        )
    return out
