r"""ML and REML for nested linear mixed models with varying slopes at any level.

Model
-----
Grouping factors :math:`\ell = 0, \dots, L-1` nest from the top down (``school``,
``school:classroom``, ...); a group :math:`h` of level :math:`\ell` has
:math:`q_\ell` varying coefficients:

.. math::
    y = X\beta + \sum_{\ell} Z_\ell b_\ell + e, \qquad
    b_{\ell h} \sim N_{q_\ell}(0, \sigma^2\Lambda_\ell\Lambda_\ell^\top), \qquad
    e \sim N(0, \sigma^2 I_n),

:math:`\Lambda_\ell` lower triangular and block diagonal by varying term (one block
for ``(1 + x | g)``, one a coefficient for ``(1 + x || g)``), parametrised by
lme4's :math:`\theta` (:func:`hierpipe.models.lmm.factor_to_theta`).

Criterion
---------
As in Bates, Mächler, Bolker & Walker (2015, *J. Stat. Softw.* 67(1), sec. 3),
with :math:`V_\theta = I + Z\Lambda\Lambda^\top Z^\top` and :math:`w = [X, y]`,

.. math::
    -2\ell_{ML} &= \log|V_\theta| + n[1 + \log(2\pi r^2/n)],\\
    -2\ell_{REML} &= \log|V_\theta| + \log|X^\top V_\theta^{-1}X| + (n-p)[1 + \log(2\pi r^2/(n-p))],

from :math:`\log|V_\theta|` and :math:`Q = w^\top V_\theta^{-1} w`
(:func:`hierpipe.models.variance_components.profile_out`). :math:`V_\theta` is
block diagonal by top-level group, and inside one group the nesting makes
:math:`\Lambda^\top Z^\top Z\Lambda + I` a tree of blocks, which is factorised
from the leaves up without fill-in: for each innermost group :math:`c` the
cross-products :math:`S_c = [Z_0, \dots, Z_{L-1}, X, y]_c^\top[\cdot]_c` are
scaled by :math:`T = \operatorname{diag}(\Lambda_0, \dots, \Lambda_{L-1}, I)`;
then, level by level from the bottom, each group's own block
:math:`M_h = \Lambda_\ell^\top Z_h^\top Z_h \Lambda_\ell + I` (after its children are
eliminated) is factorised, :math:`\log|M_h|` is added to :math:`\log|V_\theta|`, and
the Schur complement of the remaining columns (ancestors' coefficients, X, y)
is summed into the parent. This is Woodbury's identity applied by level (lme4's
sparse Cholesky factor for this tree ordering); after the top level what remains
is each top-level group's share of :math:`Q`. One evaluation costs
:math:`O(\sum_\ell G_\ell (Q_{\le\ell} + p + 1)^3)`, independent of :math:`n`.

The per-top-group terms also give the leave-one-group-out density in closed form:
with :math:`\beta` integrated out against a flat prior,
:math:`\log p(y_j \mid y_{-j}) = \log m(y) - \log m(y_{-j})` and both marginal
likelihoods are sums of the same per-group terms (:func:`log_marginal`).

Optimisation: L-BFGS-B over :math:`\theta` (unbounded; the criterion depends on
:math:`\Lambda` only through :math:`\Lambda\Lambda^\top`) with a central-difference
gradient, Newton steps on a finite-difference Hessian, then lme4's canonical form
(:func:`hierpipe.models.lmm.canonical_theta`: diagonal :math:`\ge 0`, near-zero SDs put
on the boundary when the criterion allows) and lme4-style convergence checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from hierpipe.errors import InputError, MethodError
from hierpipe.models.lmm import (
    SINGULAR_TOL,
    boundary_flags,
    canonical_theta,
    check_block_sizes,
    lower_index,
)
from hierpipe.models.variance_components import absolute_criterion, profile_out

#: Central-difference step of the gradient (theta units, relative above 1): near
#: eps**(1/3), balancing truncation (h^2 f''') against rounding (eps |f| / h).
GRAD_STEP = 5e-6
#: Step of the second-difference Hessian: rounding error eps |f| / h^2 ~ 1e-5 relative
#: for criteria of order 1e3, truncation h^2 f'''' far smaller.
HESS_STEP = 1e-4
#: Converged when the Newton step from the finite-difference gradient and Hessian
#: is below this (theta units: SDs relative to sigma), as lmm.STEP_TOL.
STEP_TOL = 1e-4
#: Hessian eigenvalues above -this times the largest count as non-negative: the
#: second-difference Hessian carries relative errors near 1e-5 (HESS_STEP).
NEGATIVE_TOL = 1e-4
LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10, "maxcor": 20}


@dataclass(frozen=True)
class Level:
    """One grouping factor of the hierarchy.

    name : lme4's name (``"school:classroom"``); coef_names : brms names of its
    varying coefficients; block_sizes : one block a varying term; labels : its
    groups; parent : (G,) index of each group's group one level up (None at the top).
    """

    name: str
    coef_names: tuple[str, ...]
    block_sizes: tuple[int, ...]
    labels: tuple[str, ...]
    parent: np.ndarray | None

    @property
    def q(self) -> int:
        return len(self.coef_names)


@dataclass(frozen=True)
class NestedStats:
    """Per-innermost-group cross-products of ``[Z_0, ..., Z_{L-1}, X, y - shift]``.

    cross : (C, D, D), D = sum q + p + 1; sums : (C, D) column sums; n : (C,) counts;
    ancestors : (C, L) each innermost group's group at every level (top first);
    shift : subtracted from y (its mean when X has an intercept) and added back to
    b_Intercept.
    """

    levels: tuple[Level, ...]
    fixed_names: tuple[str, ...]
    intercept: int | None
    shift: float
    cross: np.ndarray
    sums: np.ndarray
    n: np.ndarray
    ancestors: np.ndarray

    @property
    def p(self) -> int:
        return len(self.fixed_names)

    @property
    def n_obs(self) -> int:
        return round(float(self.n.sum()))

    @property
    def q_total(self) -> int:
        return sum(lv.q for lv in self.levels)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum([0] + [lv.q for lv in self.levels]))

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b for lv in self.levels for b in lv.block_sizes)

    def without_top(self, j: int) -> NestedStats:
        """The statistics with top-level group ``j`` left out (groups renumbered)."""
        keep = self.ancestors[:, 0] != j
        anc = self.ancestors[keep]
        levels, new_anc = [], np.empty_like(anc)
        maps = []
        for ell, lv in enumerate(self.levels):
            present = np.unique(anc[:, ell])
            remap = np.full(len(lv.labels), -1)
            remap[present] = np.arange(present.size)
            maps.append((present, remap))
            new_anc[:, ell] = remap[anc[:, ell]]
            parent = None
            if lv.parent is not None:
                parent = maps[ell - 1][1][lv.parent[present]]
            labels = tuple(lv.labels[g] for g in present)
            levels.append(Level(lv.name, lv.coef_names, lv.block_sizes, labels, parent))
        return NestedStats(
            tuple(levels),
            self.fixed_names,
            self.intercept,
            self.shift,
            self.cross[keep],
            self.sums[keep],
            self.n[keep],
            new_anc,
        )


def nested_stats(
    levels: Sequence[tuple[str, tuple[str, ...], tuple[int, ...], tuple[str, ...]]],
    codes: np.ndarray,
    Z: Sequence[np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    fixed_names: Sequence[str],
) -> NestedStats:
    """Reduce rows to per-innermost-group cross-products in one pass.

    Parameters
    ----------
    levels : per level from the top, (name, coef_names, block_sizes, labels).
    codes : (n, L) each row's group at each level (top first).
    Z : per level, its (n, q_l) varying-coefficient design.
    X, y : fixed-effects design and response.
    fixed_names : names of the columns of X.

    Raises
    ------
    MethodError
        When a level's groups do not each lie in one group of the level above.
    """
    codes = np.asarray(codes, dtype=np.int64)
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    icol = next((i for i in range(X.shape[1]) if np.all(X[:, i] == 1.0)), None)
    shift = float(y.mean()) if icol is not None else 0.0
    L = codes.shape[1]
    out_levels = []
    for ell, (name, coefs, blocks, labels) in enumerate(levels):
        parent = None
        if ell > 0:
            pairs = np.unique(codes[:, [ell - 1, ell]], axis=0)
            if pairs.shape[0] != len(labels):
                raise MethodError(
                    f"grouping factor '{name}' is not nested in '{levels[ell - 1][0]}': "
                    "models with crossed grouping factors are fitted with a varying intercept "
                    "only, (1 | factor), in this version (varying slopes need nested factors)"
                )
            parent = np.empty(len(labels), dtype=np.int64)
            parent[pairs[:, 1]] = pairs[:, 0]
        out_levels.append(Level(name, tuple(coefs), tuple(blocks), tuple(labels), parent))
    W = np.column_stack([*Z, X, y - shift])
    inner = codes[:, L - 1]
    order = np.argsort(inner, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inner[order]) != 0])
    Ws = W[order]
    cross = np.add.reduceat(Ws[:, :, None] * Ws[:, None, :], starts, axis=0)
    sums = np.add.reduceat(Ws, starts, axis=0)
    n = np.diff(np.r_[starts, inner.size]).astype(np.float64)
    ancestors = codes[order][starts]
    if n.size != len(levels[-1][3]):
        raise InputError(f"innermost factor '{levels[-1][0]}' has groups without rows")
    return NestedStats(
        tuple(out_levels), tuple(fixed_names), icol, shift, cross, sums, n, ancestors
    )


# --------------------------------------------------------------------------- criterion


@dataclass(frozen=True)
class Terms:
    """Per-top-group pieces of the criterion at one theta.

    logdet : (G0,) each top group's :math:`\\log|V_j|`; schur : (G0, p+1, p+1) its
    :math:`w_j^\\top V_j^{-1} w_j`; top : (G0, q0+p+1, q0+p+1) its cross-products
    with the lower levels eliminated (columns :math:`\\Lambda_0 u_0`, X, y), for the modes.
    """

    logdet: np.ndarray
    schur: np.ndarray
    top: np.ndarray


def split_factor(lam: np.ndarray, stats: NestedStats) -> list[np.ndarray]:
    """The per-level diagonal blocks of the block-diagonal factor."""
    off = stats.offsets
    return [lam[off[i] : off[i + 1], off[i] : off[i + 1]] for i in range(len(stats.levels))]


def evaluate(stats: NestedStats, lam: np.ndarray) -> Terms:
    """Eliminate every level's coefficients from the bottom up (module docstring)."""
    Qt, p = stats.q_total, stats.p
    D = Qt + p + 1
    T = np.eye(D)
    T[:Qt, :Qt] = lam
    cur = np.einsum("ba,cbd,de->cae", T, stats.cross, T, optimize=True)
    off = stats.offsets
    logdet = np.zeros(cur.shape[0])
    L = len(stats.levels)
    top = cur
    for ell in range(L - 1, -1, -1):
        lo, hi = off[ell], off[ell + 1]
        q = hi - lo
        if ell == 0:
            top = cur
        rest = np.r_[0:lo, hi : cur.shape[1]]
        m = cur[:, lo:hi, lo:hi] + np.eye(q)
        chol = np.linalg.cholesky(m)
        logdet = logdet + 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        r = np.linalg.solve(chol, cur[:, lo:hi][:, :, rest])
        schur = cur[:, rest][:, :, rest] - np.einsum("gki,gkj->gij", r, r)
        if ell > 0:
            parent = stats.levels[ell].parent
            G = len(stats.levels[ell - 1].labels)
            nxt = np.zeros((G, *schur.shape[1:]))
            np.add.at(nxt, parent, schur)
            logdet = np.bincount(parent, weights=logdet, minlength=G)
            cur = nxt
        else:
            cur = schur
    return Terms(logdet, cur, top)


def profiled(stats: NestedStats, lam: np.ndarray, reml: bool):
    """:func:`~hierpipe.models.variance_components.profile_out` at factor ``lam``."""
    t = evaluate(stats, lam)
    return profile_out(
        np.array([t.logdet.sum()]), t.schur.sum(axis=0)[None], stats.n_obs, stats.p, reml
    )


def log_marginal(terms: Terms, keep: np.ndarray, n: int, p: int, sigma2: float) -> float:
    """:math:`\\log m(y_S)` of the top groups ``keep`` at relative factor and sigma^2.

    :math:`m` integrates :math:`\\beta` against a flat prior:
    :math:`-2\\log m = \\log|V| + \\log|X^\\top V^{-1}X|
    + (n-p)\\log(2\\pi\\sigma^2) + r^2/\\sigma^2`
    (:func:`~hierpipe.models.variance_components.absolute_criterion`, REML form).
    """
    crit = absolute_criterion(
        np.array([terms.logdet[keep].sum()]),
        terms.schur[keep].sum(axis=0)[None],
        np.array([sigma2]),
        n,
        p,
        True,
    )
    return float(-0.5 * crit[0])


# --------------------------------------------------------------------------- optimisation


class _Objective:
    """The profiled criterion over lme4's theta (duck-types lmm's objective for canonical_theta)."""

    def __init__(self, stats: NestedStats, reml: bool) -> None:
        self.stats = stats
        self.reml = reml
        self.q = stats.q_total
        self.index = lower_index(self.q, check_block_sizes(self.q, stats.block_sizes))
        self.n_evaluations = 0

    def to_factor(self, theta: np.ndarray) -> np.ndarray:
        lam = np.zeros((self.q, self.q))
        lam[self.index] = theta
        return lam

    def to_theta(self, lam: np.ndarray) -> np.ndarray:
        return np.asarray(lam, dtype=np.float64)[self.index].copy()

    def value(self, theta: np.ndarray) -> float:
        self.n_evaluations += 1
        return float(profiled(self.stats, self.to_factor(theta), self.reml).criterion[0])

    def grad(self, theta: np.ndarray, h: float = GRAD_STEP) -> np.ndarray:
        g = np.empty(theta.size)
        for i in range(theta.size):
            e = np.zeros(theta.size)
            e[i] = h * max(1.0, abs(theta[i]))
            g[i] = (self.value(theta + e) - self.value(theta - e)) / (2.0 * e[i])
        return g

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        return self.value(theta), self.grad(theta)

    def hessian(self, theta: np.ndarray) -> np.ndarray:
        k = theta.size
        steps = HESS_STEP * np.maximum(1.0, np.abs(theta))
        f0 = self.value(theta)
        hess = np.empty((k, k))
        for i in range(k):
            ei = np.zeros(k)
            ei[i] = steps[i]
            hess[i, i] = (self.value(theta + ei) - 2.0 * f0 + self.value(theta - ei)) / steps[
                i
            ] ** 2
            for j in range(i):
                ej = np.zeros(k)
                ej[j] = steps[j]
                hess[i, j] = hess[j, i] = (
                    self.value(theta + ei + ej)
                    - self.value(theta + ei - ej)
                    - self.value(theta - ei + ej)
                    + self.value(theta - ei - ej)
                ) / (4.0 * steps[i] * steps[j])
        return hess


def _newton_step(hess: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, float]:
    """Newton step on the clearly positive eigenspace; and the relative smallest eigenvalue."""
    eig, vec = np.linalg.eigh(hess)
    top = max(float(np.max(np.abs(eig))), np.finfo(float).tiny)
    keep = eig > NEGATIVE_TOL * top
    step = -vec[:, keep] @ ((vec[:, keep].T @ grad) / eig[keep])
    return step, float(eig[0] / top)


def _optimise(obj: _Objective) -> tuple[np.ndarray, float, dict[str, Any]]:
    start = obj.to_theta(np.eye(obj.q))
    res = optimize.minimize(
        obj.value_and_grad, start, jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS
    )
    theta = np.asarray(res.x, dtype=np.float64)
    f = obj.value(theta)
    polish = {"steps": 0, "objective_before": f}
    for _ in range(8):
        step, _rel = _newton_step(obj.hessian(theta), obj.grad(theta))
        trial = theta + step
        f_trial = obj.value(trial)
        if not f_trial <= f:
            break
        theta, f = trial, f_trial
        polish["steps"] += 1
        if np.max(np.abs(step)) < 1e-12:
            break
    polish["objective_after"] = f
    theta, f, canonical = canonical_theta(obj, theta, f)
    lam = obj.to_factor(theta)
    g = obj.grad(theta)
    hess = obj.hessian(theta)
    step, rel_min = _newton_step(hess, g)
    singular = bool(np.any(np.diag(lam) < SINGULAR_TOL))
    step_max = float(np.max(np.abs(step))) if step.size else 0.0
    hessian_ok = rel_min > (-NEGATIVE_TOL if singular else NEGATIVE_TOL)
    checks = {
        "theta": theta.tolist(),
        "singular": singular,
        "fd_gradient": g.tolist(),
        "hessian_eigenvalues": np.linalg.eigvalsh(hess).tolist(),
        "hessian_relative_min_eigenvalue": rel_min,
        "newton_step_max": step_max,
        "gradient_ok": bool(step_max < STEP_TOL),
        "hessian_ok": bool(hessian_ok),
        "passed": bool(step_max < STEP_TOL and hessian_ok),
    }
    record = {
        "optimizer": "L-BFGS-B (central-difference gradient) + Newton polish",
        "success": bool(res.success),
        "message": str(res.message),
        "iterations": int(res.get("nit", -1)),
        "polish": polish,
        "canonical": canonical,
        "objective": f,
        "checks": checks,
    }
    return theta, f, record


# --------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class NestedFit:
    """ML or REML estimates of a nested LMM.

    beta : (p,) with the shift added back; beta_cov : :math:`\\hat\\sigma^2(X^\\top
    V^{-1}X)^{-1}`; lams : per level its relative factor; sds, cors : per level
    the SDs and the correlation matrix of its coefficients; criterion : the
    minimised -2 (restricted) log-likelihood; boundary : brms-named flags.
    """

    method: str
    theta: np.ndarray
    lams: tuple[np.ndarray, ...]
    sigma: float
    beta: np.ndarray
    beta_cov: np.ndarray
    sds: tuple[np.ndarray, ...]
    cors: tuple[np.ndarray, ...]
    criterion: float
    converged: bool
    convergence: dict[str, Any]
    boundary: tuple[str, ...]
    singular: bool
    n_evaluations: int

    @property
    def big_factor(self) -> np.ndarray:
        from scipy.linalg import block_diag

        return block_diag(*self.lams)


def fit_nested(stats: NestedStats, method: str = "REML") -> NestedFit:
    """Minimise the profiled ML or REML criterion over theta (module docstring)."""
    if method not in ("ML", "REML"):
        raise MethodError(f"nested LMM method must be 'ML' or 'REML', got {method!r}")
    reml = method == "REML"
    obj = _Objective(stats, reml)
    theta, f, record = _optimise(obj)
    lam = obj.to_factor(theta)
    prof = profiled(stats, lam, reml)
    n, p = stats.n_obs, stats.p
    sigma2 = float(prof.r2[0]) / (n - p if reml else n)
    beta = prof.beta[0].copy()
    if stats.intercept is not None:
        beta[stats.intercept] += stats.shift
    cov = sigma2 * np.linalg.inv(prof.xvx[0]) if p else np.zeros((0, 0))
    lams, sds, cors, flags, singular = [], [], [], [], False
    for lv, lam_l in zip(stats.levels, split_factor(lam, stats), strict=True):
        s = sigma2 * lam_l @ lam_l.T
        sd = np.sqrt(np.diag(s))
        with np.errstate(invalid="ignore", divide="ignore"):
            cor = s / np.outer(sd, sd)
        lams.append(lam_l)
        sds.append(sd)
        cors.append(cor)
        fl, sing = boundary_flags(lam_l, cor, lv.name, lv.coef_names)
        flags += fl
        singular = singular or sing
    return NestedFit(
        method=method,
        theta=theta,
        lams=tuple(lams),
        sigma=float(np.sqrt(sigma2)),
        beta=beta,
        beta_cov=cov,
        sds=tuple(sds),
        cors=tuple(cors),
        criterion=f,
        converged=bool(record["checks"]["passed"]),
        convergence=record,
        boundary=tuple(flags),
        singular=singular,
        n_evaluations=obj.n_evaluations,
    )


def top_effects(stats: NestedStats, fit: NestedFit) -> tuple[np.ndarray, np.ndarray]:
    """Top-level conditional modes (G0, q0) and their covariances given beta (G0, q0, q0).

    With the lower levels eliminated, a top group's spherical effect has
    :math:`M_j u_j = c_{uy} - C_{uX}\\hat\\beta` and
    :math:`\\operatorname{Var}(b_j \\mid y, \\beta) = \\sigma^2\\Lambda_0 M_j^{-1}\\Lambda_0^\\top`
    (lme4's ``condVar``).
    """
    t = evaluate(stats, fit.big_factor)
    q0, p = stats.levels[0].q, stats.p
    beta_c = fit.beta.copy()
    if stats.intercept is not None:
        beta_c[stats.intercept] -= stats.shift
    top = t.top
    m = top[:, :q0, :q0] + np.eye(q0)
    rhs = top[:, :q0, q0 + p] - top[:, :q0, q0 : q0 + p] @ beta_c
    u = np.linalg.solve(m, rhs[..., None])[..., 0]
    lam0 = fit.lams[0]
    modes = u @ lam0.T
    m_inv = np.linalg.inv(m)
    cov = fit.sigma**2 * np.einsum("ab,gbc,dc->gad", lam0, m_inv, lam0)
    return modes, cov


def top_mode_gradient(stats: NestedStats, fit: NestedFit) -> np.ndarray:
    """:math:`\\partial\\hat b_j/\\partial\\beta = -\\Lambda_0 M_j^{-1} C_{uX}` (G0, q0, p)."""
    t = evaluate(stats, fit.big_factor)
    q0, p = stats.levels[0].q, stats.p
    m = t.top[:, :q0, :q0] + np.eye(q0)
    sol = np.linalg.solve(m, t.top[:, :q0, q0 : q0 + p])
    return -np.einsum("ab,gbk->gak", fit.lams[0], sol)


def all_modes(stats: NestedStats, lam: np.ndarray, beta: np.ndarray) -> list[np.ndarray]:
    """Conditional modes of every level's effects, (G_l, q_l) each, given beta.

    The upward pass leaves each level-:math:`\\ell` group with its block
    :math:`M_h` and cross-products with its ancestors' spherical effects
    :math:`u_A`, X and y; going down from the top,
    :math:`M_h u_h = c_{hy} - C_{hX}\\beta - C_{hA}u_A` and :math:`b_h = \\Lambda_\\ell u_h`
    (the penalised least-squares solution, Bates et al. 2015, sec. 3.3).
    """
    Qt, p = stats.q_total, stats.p
    off = stats.offsets
    beta_c = np.asarray(beta, dtype=np.float64).copy()
    if stats.intercept is not None:
        beta_c[stats.intercept] -= stats.shift
    D = Qt + p + 1
    T = np.eye(D)
    T[:Qt, :Qt] = lam
    cur = np.einsum("ba,cbd,de->cae", T, stats.cross, T, optimize=True)
    kept = []
    for ell in range(len(stats.levels) - 1, -1, -1):
        lo, hi = off[ell], off[ell + 1]
        kept.append(cur)
        rest = np.r_[0:lo, hi : cur.shape[1]]
        m = cur[:, lo:hi, lo:hi] + np.eye(hi - lo)
        r = np.linalg.solve(np.linalg.cholesky(m), cur[:, lo:hi][:, :, rest])
        schur = cur[:, rest][:, :, rest] - np.einsum("gki,gkj->gij", r, r)
        if ell > 0:
            nxt = np.zeros((len(stats.levels[ell - 1].labels), *schur.shape[1:]))
            np.add.at(nxt, stats.levels[ell].parent, schur)
            cur = nxt
    kept.reverse()
    u_levels: list[np.ndarray] = []
    for ell, lv in enumerate(stats.levels):
        lo, hi = off[ell], off[ell + 1]
        c = kept[ell]
        rhs = c[:, lo:hi, hi + p] - c[:, lo:hi, hi : hi + p] @ beta_c
        if ell > 0:
            anc = [lv.parent]
            for k in range(ell - 1, 0, -1):
                anc.insert(0, stats.levels[k].parent[anc[0]])
            u_anc = np.concatenate([u_levels[k][anc[k]] for k in range(ell)], axis=1)
            rhs = rhs - np.einsum("gab,gb->ga", c[:, lo:hi, :lo], u_anc)
        m = c[:, lo:hi, lo:hi] + np.eye(hi - lo)
        u_levels.append(np.linalg.solve(m, rhs[..., None])[..., 0])
    lams = split_factor(lam, stats)
    return [u @ la.T for u, la in zip(u_levels, lams, strict=True)]
