r"""ML and REML for linear mixed models with one grouping factor, as lme4 does it.

Model
-----
.. math::
    y = X\beta + Zb + e, \qquad b_g \sim N(0, \Sigma)\ \text{iid over groups}, \qquad
    e \sim N(0, \sigma^2 I_n),

with :math:`p` fixed effects and :math:`q` correlated varying coefficients per
group. Following Bates, Mächler, Bolker & Walker (2015, "Fitting linear
mixed-effects models using lme4", *J. Stat. Softw.* 67(1), sections 3.1-3.4),
write :math:`\Sigma = \sigma^2 \Lambda\Lambda^\top` with :math:`\Lambda` lower
triangular (the *relative covariance factor*; its lower triangle, column by
column, is the vector :math:`\theta`, diagonal :math:`\ge 0`). With
:math:`b_g = \Lambda u_g` the penalised least-squares problem

.. math::
    r^2(\theta) = \min_{u, \beta} \|y - X\beta - Z(I_G\otimes\Lambda)u\|^2 + \|u\|^2

is solved in closed form, and :math:`\beta` and :math:`\sigma` are profiled out:

.. math::
    -2\ell_{\text{ML}}(\theta) &= \log|L_\theta|^2 + n\left[1 + \log\frac{2\pi r^2}{n}\right],\\
    -2\ell_{\text{REML}}(\theta) &= \log|L_\theta|^2 + \log|R_X|^2
        + (n-p)\left[1 + \log\frac{2\pi r^2}{n-p}\right],

with :math:`L_\theta L_\theta^\top = \Lambda^\top Z^\top Z\Lambda + I` and
:math:`R_X^\top R_X = X^\top V_\theta^{-1} X`, :math:`V_\theta = I + Z\Lambda\Lambda^\top Z^\top`
(Bates et al. 2015, sec. 3). One grouping factor makes :math:`L_\theta` block diagonal:
group :math:`g` needs only :math:`M_g = \Lambda^\top Z_g^\top Z_g \Lambda + I`
(:math:`q\times q`), so a criterion evaluation is :math:`G` small Cholesky
factorisations, done together entry by entry over a group axis (see
:class:`_Blocks`), plus :math:`p\times p` work: :math:`O(Gq^3 + p^3)`,
independent of :math:`n` (the data enter through
:mod:`hierpipe.models.suffstats_lmm`).

The criterion depends on :math:`\Lambda` only through :math:`\Lambda\Lambda^\top`,
so it is defined, smooth and sign-symmetric in every column for all real
:math:`\theta`. It is minimised without bounds by L-BFGS-B with its exact
gradient (derived below, checked against finite differences in the tests),
polished by Newton steps on a finite-difference Hessian of that gradient, and
only then put in lme4's form (diagonal :math:`\ge 0`, near-boundary values
on the boundary). Without bounds a boundary optimum is an ordinary stationary
point; with lme4's bounds the last diagonal element is a stationary point *on*
its bound whatever the curvature (the criterion is even in it), where a
gradient method can stop at a saddle. Convergence is then checked as lme4's
``checkConv`` does: finite-difference gradient small relative to the Hessian,
Hessian positive definite (semidefinite at a singular fit, where rotations of
a zero column are flat directions).

Gradient. With :math:`A_g = Z_g^\top Z_g`, :math:`B_g = Z_g^\top X_g`,
:math:`c_g = Z_g^\top y_g`, :math:`P_g = M_g^{-1}\Lambda^\top B_g`,
:math:`C = R_X^\top R_X` and the conditional modes :math:`u_g`, the matrix
derivatives are

.. math::
    \partial_\Lambda \log|L|^2 &= 2\textstyle\sum_g A_g\Lambda M_g^{-1}, \\
    \partial_\Lambda r^2 &= -2\textstyle\sum_g s_g u_g^\top,\quad
        s_g = c_g - B_g\hat\beta - A_g\Lambda u_g \quad\text{(envelope theorem)},\\
    \partial_\Lambda \log|R_X|^2 &= -2\textstyle\sum_g W_g C^{-1} W_g^\top \Lambda,\quad
        W_g = B_g - A_g\Lambda P_g,

and the gradient in :math:`\theta` is the lower triangle of their combination.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import linalg as sla
from scipy import optimize
from scipy.special import ndtri

from hierpipe.errors import ConfigError, InputError, MethodError
from hierpipe.models.suffstats_lmm import LmmStats, lmm_suffstats, one_way_stats

LOG_2PI = float(np.log(2.0 * np.pi))

#: lme4's ``isSingular`` tolerance: a diagonal element of the relative factor
#: (an SD relative to sigma) below this counts as estimated at the boundary.
SINGULAR_TOL = 1e-4
#: 1 - |cor| below this counts as a correlation estimated at +-1. Boundary
#: estimates are put exactly on the boundary (see ``canonical``), where
#: |cor| = 1 to rounding.
COR_TOL = 1e-6
#: Largest rise of the criterion (-2 log-likelihood units) accepted when a
#: near-boundary optimum is put on the boundary: 5e-9 in log-likelihood is far
#: below any statistical meaning and close to the rounding of the criterion.
SNAP_TOL = 1e-8
#: Largest Newton step (theta units: SDs relative to sigma) still called
#: converged. lme4 applies 2e-3 to the same scaled gradient; we polish with
#: Newton steps first, so we can ask for 20 times less.
STEP_TOL = 1e-4
#: Hessian eigenvalues below this times the largest count as flat (not positive).
FLAT_TOL = 1e-8
#: ... and below minus this times the largest as negative: finite-difference
#: Hessians carry relative errors around 1e-7 (HESS_STEP), so smaller negative
#: values are noise.
NEGATIVE_TOL = 1e-6
#: Step of the finite-difference gradient of the criterion (lme4's deriv12 uses 1e-4).
FD_STEP = 1e-4
#: Relative step of the finite-difference Hessian taken from the exact gradient:
#: truncation error ~HESS_STEP**2 and rounding ~1e-16 n / HESS_STEP, both small.
HESS_STEP = 1e-5
#: L-BFGS-B stopping rules: tight, because the Newton polish and the checks
#: afterwards decide convergence, not the optimiser's own message.
LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-9, "maxcor": 20}
#: The derivative-free second attempt (only run when the first fails its checks).
NM_OPTIONS = {"maxiter": 4000, "xatol": 1e-10, "fatol": 1e-12, "adaptive": True}
#: One-way shortcut: log variance ratio searched over [-LOG_RATIO_BOUND, +LOG_RATIO_BOUND].
LOG_RATIO_BOUND = float(np.log(1e10))


@dataclass(frozen=True)
class LmmFit:
    """Estimates of a one-factor linear mixed model by ML or REML.

    Attributes
    ----------
    method : ``"ML"`` or ``"REML"``.
    fixed_names, coef_names, group_name : names of the columns of ``X``, of
        ``Z`` and of the grouping factor (brms names are built from them).
    beta : (p,) fixed effects (GLS estimate at the fitted covariance).
    beta_cov : (p, p) their covariance :math:`\\hat\\sigma^2 (X^\\top V_\\theta^{-1} X)^{-1}`
        (lme4's ``vcov``; conditional on the covariance parameters).
    beta_se : (p,) square roots of its diagonal.
    sigma : residual SD (REML: :math:`r^2/(n-p)`, ML: :math:`r^2/n`, squared).
    Sigma : (q, q) covariance of a group's coefficients, :math:`\\sigma^2\\Lambda\\Lambda^\\top`.
    sds : (q,) their SDs (brms ``sd_g__name``).
    cor : (q, q) their correlations (brms ``cor_g__a__b``; NaN where an SD is 0).
    theta : lme4's theta: lower triangle of :math:`\\Lambda`, column by column.
    objective : the criterion minimised: ``deviance`` (ML) or ``reml_criterion`` (REML).
    deviance : :math:`-2\\times` the ML log-likelihood at the fitted
        :math:`(\\theta, \\beta, \\sigma)`; for REML fits, at the REML estimates.
    loglik : the ML log-likelihood at the fitted values, ``-deviance / 2``.
    reml_criterion : :math:`-2\\times` the restricted log-likelihood at the fitted
        :math:`(\\theta, \\sigma)` (lme4's ``REMLcrit`` for REML fits; for ML fits
        it is evaluated at the ML estimates, for reference).
    b_hat : (G, q) conditional modes of the group deviations (lme4 ``ranef``).
    b_sd : (G, q) conditional SDs of :math:`b_g \\mid y` at the estimates, with
        :math:`\\beta` held at :math:`\\hat\\beta` (lme4 ``condVar``): beta's
        uncertainty is NOT included.
    b_sd_total : (G, q) SDs of :math:`b_g - \\hat b_g` including the uncertainty of
        :math:`\\hat\\beta` (Henderson's prediction-error variance); still
        conditional on the covariance parameters.
    boundary : flags such as ``"sd_g__x estimated at 0"`` or
        ``"cor_g__Intercept__x estimated at -1"``.
    singular : lme4's ``isSingular``: some diagonal element of :math:`\\Lambda` < 1e-4.
    converged : the post-hoc checks passed (see ``convergence``).
    convergence : JSON-able record: each optimiser attempt and its message,
        the polish, finite-difference gradient, Hessian and its eigenvalues,
        the outcome of each check.
    n_evaluations : criterion evaluations in all (optimiser, polish and checks).
    n_obs, n_groups : data size.
    block_sizes : sizes of the diagonal blocks of :math:`\\Sigma`; coefficients in
        different blocks are uncorrelated by the model (``||``). One block of
        ``q`` for a fully correlated term.
    """

    method: str
    fixed_names: tuple[str, ...]
    coef_names: tuple[str, ...]
    group_name: str
    beta: np.ndarray
    beta_cov: np.ndarray
    beta_se: np.ndarray
    sigma: float
    Sigma: np.ndarray
    sds: np.ndarray
    cor: np.ndarray
    theta: np.ndarray
    objective: float
    deviance: float
    loglik: float
    reml_criterion: float
    b_hat: np.ndarray
    b_sd: np.ndarray
    b_sd_total: np.ndarray
    boundary: tuple[str, ...]
    singular: bool
    converged: bool
    convergence: dict[str, Any] = field(repr=False)
    n_evaluations: int
    n_obs: int
    n_groups: int
    block_sizes: tuple[int, ...] = ()

    @property
    def restricted_loglik(self) -> float:
        """The restricted (REML) log-likelihood at the fitted values, ``-reml_criterion / 2``."""
        return -0.5 * self.reml_criterion

    @property
    def lme4_loglik(self) -> float:
        """What lme4's ``logLik`` reports: ``-objective / 2`` (restricted for REML fits)."""
        return -0.5 * self.objective


# --------------------------------------------------------------------------------------
# theta <-> Lambda


def check_block_sizes(q: int, block_sizes: Sequence[int] | None) -> tuple[int, ...]:
    """Sizes of the diagonal blocks of :math:`\\Sigma` (default: one block of ``q``).

    Coefficients in different blocks are uncorrelated by the model (lme4's
    ``(1 + x || g)``, which it writes as the two terms ``(1 | g) + (0 + x | g)``).
    """
    if block_sizes is None:
        return (q,)
    sizes = tuple(int(k) for k in block_sizes)
    if any(k < 1 for k in sizes) or sum(sizes) != q:
        raise InputError(f"block sizes {sizes} must be positive and add up to q = {q}")
    return sizes


def lower_index(q: int, block_sizes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the free entries of :math:`\\Lambda`, column by column.

    One block: the lower triangle (lme4's order). Several blocks: the lower
    triangle of each diagonal block, block after block, which is lme4's theta
    for the equivalent list of terms (each term's theta in turn).
    """
    rows_all, cols_all = [], []
    start = 0
    for size in check_block_sizes(q, block_sizes):
        cols, rows = np.triu_indices(size)
        rows_all.append(rows + start)
        cols_all.append(cols + start)
        start += size
    return np.concatenate(rows_all), np.concatenate(cols_all)


def n_theta(q: int, block_sizes: Sequence[int] | None = None) -> int:
    """Length of theta for ``q`` varying coefficients in blocks of ``block_sizes``."""
    return sum(k * (k + 1) // 2 for k in check_block_sizes(q, block_sizes))


def theta_to_factor(
    theta: np.ndarray, q: int, block_sizes: Sequence[int] | None = None
) -> np.ndarray:
    """The lower-triangular (block-diagonal) relative factor :math:`\\Lambda` from theta."""
    lam = np.zeros((q, q))
    lam[lower_index(q, block_sizes)] = theta
    return lam


def factor_to_theta(lam: np.ndarray, block_sizes: Sequence[int] | None = None) -> np.ndarray:
    """lme4's theta from a lower-triangular (block-diagonal) :math:`\\Lambda`."""
    lam = np.asarray(lam, dtype=np.float64)
    return lam[lower_index(lam.shape[0], block_sizes)].copy()


# --------------------------------------------------------------------------------------
# batched small-matrix algebra, group index last


@dataclass(frozen=True)
class _Blocks:
    """Per-group cross-products laid out with the group index last.

    Entry ``[i, j]`` of every group's matrix is then one contiguous vector of
    length :math:`G`, so the per-group algebra below is a Python loop over the
    :math:`q^2` entries with vector operations over groups. numpy's stacked
    ``linalg`` routines call LAPACK once per group, which for :math:`q \\le 3`
    costs several times more than the arithmetic (measured).
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray

    @classmethod
    def of(cls, stats: LmmStats) -> _Blocks:
        """:math:`A_g = Z_g^\\top Z_g` (q,q,G), :math:`B_g = Z_g^\\top X_g` (q,p,G),
        :math:`c_g = Z_g^\\top y_g` (q,G)."""
        term = stats.terms[0]
        return cls(
            a=np.ascontiguousarray(np.moveaxis(term.ztz, 0, -1)),
            b=np.ascontiguousarray(np.moveaxis(term.ztx, 0, -1)),
            c=np.ascontiguousarray(term.zty.T),
        )


def _batched_cholesky(m: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of a (q, q, G) stack of matrices :math:`M_g \\succeq I`.

    The pivots of a matrix whose eigenvalues are all at least 1 are at least 1
    (each is the reciprocal of a diagonal entry of the inverse of a leading
    block), so no pivot can vanish.
    """
    q = m.shape[0]
    chol = np.zeros_like(m)
    for j in range(q):
        chol[j, j] = np.sqrt(m[j, j] - np.sum(chol[j, :j] ** 2, axis=0))
        for i in range(j + 1, q):
            chol[i, j] = (m[i, j] - np.sum(chol[i, :j] * chol[j, :j], axis=0)) / chol[j, j]
    return chol


def _batched_solve(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve :math:`L_g L_g^\\top x_g = r_g` for every group; ``rhs`` is (q, r, G)."""
    q = chol.shape[0]
    z = np.empty_like(rhs)
    for i in range(q):
        acc = rhs[i].copy()
        for k in range(i):
            acc -= chol[i, k] * z[k]
        z[i] = acc / chol[i, i]
    x = np.empty_like(rhs)
    for i in reversed(range(q)):
        acc = z[i].copy()
        for k in range(i + 1, q):
            acc -= chol[k, i] * x[k]
        x[i] = acc / chol[i, i]
    return x


# --------------------------------------------------------------------------------------
# the profiled criterion


@dataclass(frozen=True)
class _Decomp:
    """The penalised least-squares solution at one theta (centred coordinates).

    Per-group arrays have the group index last: ``chol`` (q,q,G) factors
    :math:`M_g`, ``p_mat`` (q,p,G) is :math:`P_g = M_g^{-1}\\Lambda^\\top B_g`,
    ``m_inv_lam_a`` (q,q,G) is :math:`M_g^{-1}\\Lambda^\\top A_g`, ``u`` (q,G)
    the spherical conditional modes.
    """

    logdet_l: float
    logdet_rx: float
    r2: float
    beta_c: np.ndarray
    u: np.ndarray
    chol: np.ndarray
    p_mat: np.ndarray
    m_inv_lam_a: np.ndarray
    c_inv: np.ndarray


def _decompose(stats: LmmStats, blocks: _Blocks, lam: np.ndarray) -> _Decomp:
    """Solve the penalised least-squares problem at factor ``lam`` (Bates et al. 2015, sec. 3)."""
    q, p = lam.shape[0], stats.p
    lam_a = np.einsum("ka,kbg->abg", lam, blocks.a)
    m = np.einsum("akg,kb->abg", lam_a, lam)
    m[np.arange(q), np.arange(q)] += 1.0
    chol = _batched_cholesky(m)
    lam_b = np.einsum("ka,kbg->abg", lam, blocks.b)
    lam_c = lam.T @ blocks.c
    sol = _batched_solve(chol, np.concatenate([lam_b, lam_c[:, None, :], lam_a], axis=1))
    p_mat, u0 = sol[:, :p], sol[:, p]
    cmat = stats.xtx - np.einsum("kig,kjg->ij", lam_b, p_mat)
    chol_c = np.linalg.cholesky(0.5 * (cmat + cmat.T))
    d = stats.xty - np.einsum("kig,kg->i", lam_b, u0)
    beta_c = sla.cho_solve((chol_c, True), d)
    r2 = stats.yty - float(np.sum(lam_c * u0)) - float(d @ beta_c)
    if not r2 > 0.0:
        raise InputError(
            "the model fits the response exactly (penalised residual sum of squares "
            f"{r2:.3g} <= 0): no residual variance to estimate"
        )
    return _Decomp(
        logdet_l=2.0 * float(np.log(chol[np.arange(q), np.arange(q)]).sum()),
        logdet_rx=2.0 * float(np.log(np.diag(chol_c)).sum()),
        r2=r2,
        beta_c=beta_c,
        u=u0 - np.einsum("kig,i->kg", p_mat, beta_c),
        chol=chol,
        p_mat=p_mat,
        m_inv_lam_a=sol[:, p + 1 :],
        c_inv=sla.cho_solve((chol_c, True), np.eye(p)),
    )


def _profiled(dec: _Decomp, n: int, p: int, reml: bool) -> float:
    """Profiled deviance (ML) or REML criterion from a decomposition (module docstring)."""
    if reml:
        df = n - p
        return dec.logdet_l + dec.logdet_rx + df * (1.0 + np.log(2.0 * np.pi * dec.r2 / df))
    return dec.logdet_l + n * (1.0 + np.log(2.0 * np.pi * dec.r2 / n))


def _gradient_factor(
    stats: LmmStats, blocks: _Blocks, lam: np.ndarray, dec: _Decomp, reml: bool
) -> np.ndarray:
    """Derivative of the profiled criterion in the entries of ``lam`` (module docstring)."""
    # sum_g A_g Lam M_g^-1 is the transpose of sum_g M_g^-1 Lam' A_g (both symmetric).
    g_logdet_l = 2.0 * dec.m_inv_lam_a.sum(axis=2).T
    a_lam_u = np.einsum("klg,lg->kg", blocks.a, lam @ dec.u)
    resid = blocks.c - np.einsum("kig,i->kg", blocks.b, dec.beta_c) - a_lam_u
    g_r2 = -2.0 * resid @ dec.u.T
    if not reml:
        return g_logdet_l + stats.n_obs / dec.r2 * g_r2
    a_lam = np.einsum("klg,lj->kjg", blocks.a, lam)
    w = blocks.b - np.einsum("kjg,jig->kig", a_lam, dec.p_mat)
    w_cinv = np.einsum("kig,ij->kjg", w, dec.c_inv)
    g_logdet_rx = -2.0 * np.einsum("kjg,ljg->kl", w_cinv, w) @ lam
    return g_logdet_l + g_logdet_rx + (stats.n_obs - stats.p) / dec.r2 * g_r2


def _check_method(method: str) -> bool:
    """Validate ``method``; return True for REML."""
    if method not in ("ML", "REML"):
        raise ConfigError(f"LMM method must be 'ML' or 'REML', got {method!r}")
    return method == "REML"


def criterion(
    stats: LmmStats,
    theta: np.ndarray,
    method: str = "REML",
    block_sizes: Sequence[int] | None = None,
) -> float:
    """Profiled deviance (``"ML"``) or REML criterion at lme4's ``theta``.

    Parameters
    ----------
    stats : LmmStats
        From :func:`~hierpipe.models.suffstats_lmm.lmm_suffstats`.
    theta : array (q(q+1)/2,), or (:func:`n_theta`,) with ``block_sizes``
        Lower triangle of the relative factor, column by column.
    method : ``"ML"`` or ``"REML"``.
    block_sizes : sizes of the diagonal blocks of :math:`\\Sigma` (default: one
        block, every pair of coefficients correlated; see :func:`check_block_sizes`).

    Returns
    -------
    float
        :math:`-2\\ell` with :math:`\\beta` and :math:`\\sigma` profiled out
        (module docstring); equals lme4's ``devfun(theta)``.
    """
    obj = _Objective(stats, _check_method(method), block_sizes)
    return obj.value(np.asarray(theta, dtype=np.float64))


def criterion_gradient(
    stats: LmmStats,
    theta: np.ndarray,
    method: str = "REML",
    block_sizes: Sequence[int] | None = None,
) -> np.ndarray:
    """Exact gradient of :func:`criterion` with respect to ``theta`` (module docstring).

    With several blocks it is the full-factor gradient at the free entries
    (the others are held at zero by the model).
    """
    obj = _Objective(stats, _check_method(method), block_sizes)
    return obj.grad(np.asarray(theta, dtype=np.float64))


class _Objective:
    """The criterion and its gradient as functions of theta, counting evaluations."""

    def __init__(
        self, stats: LmmStats, reml: bool, block_sizes: Sequence[int] | None = None
    ) -> None:
        self.stats = stats
        self.blocks = _Blocks.of(stats)
        self.reml = reml
        self.q = stats.terms[0].q
        self.block_sizes = check_block_sizes(self.q, block_sizes)
        self.index = lower_index(self.q, self.block_sizes)
        self.n_evaluations = 0

    def to_factor(self, theta: np.ndarray) -> np.ndarray:
        """:math:`\\Lambda` from theta (zero outside the free entries)."""
        lam = np.zeros((self.q, self.q))
        lam[self.index] = theta
        return lam

    def to_theta(self, lam: np.ndarray) -> np.ndarray:
        """Theta from :math:`\\Lambda` (its free entries)."""
        return np.asarray(lam, dtype=np.float64)[self.index].copy()

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self.n_evaluations += 1
        lam = self.to_factor(theta)
        dec = _decompose(self.stats, self.blocks, lam)
        f = float(_profiled(dec, self.stats.n_obs, self.stats.p, self.reml))
        return f, _gradient_factor(self.stats, self.blocks, lam, dec, self.reml)[self.index]

    def value(self, theta: np.ndarray) -> float:
        self.n_evaluations += 1
        dec = _decompose(self.stats, self.blocks, self.to_factor(theta))
        return float(_profiled(dec, self.stats.n_obs, self.stats.p, self.reml))

    def grad(self, theta: np.ndarray) -> np.ndarray:
        return self.value_and_grad(theta)[1]


# --------------------------------------------------------------------------------------
# optimisation, polish and convergence checks


def _fd_hessian(obj: _Objective, theta: np.ndarray) -> np.ndarray:
    """Hessian by central differences of the exact gradient, symmetrised."""
    k = theta.size
    hess = np.empty((k, k))
    for i in range(k):
        step = np.zeros(k)
        step[i] = HESS_STEP * max(1.0, abs(theta[i]))
        hess[:, i] = (obj.grad(theta + step) - obj.grad(theta - step)) / (2.0 * step[i])
    return 0.5 * (hess + hess.T)


def _fd_gradient(obj: _Objective, theta: np.ndarray) -> np.ndarray:
    """Gradient by central differences of the criterion (as lme4's ``deriv12``)."""
    k = theta.size
    grad = np.empty(k)
    for i in range(k):
        step = np.zeros(k)
        step[i] = FD_STEP * max(1.0, abs(theta[i]))
        grad[i] = (obj.value(theta + step) - obj.value(theta - step)) / (2.0 * step[i])
    return grad


def _newton_step(hess: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, float]:
    """Newton step on the positive eigenspace of ``hess``, and its smallest relative eigenvalue.

    Directions with eigenvalue below ``FLAT_TOL`` times the largest are left
    alone: at a singular fit the criterion is flat along them (rotations of
    the factor that leave :math:`\\Lambda\\Lambda^\\top` unchanged).
    """
    eig, vec = np.linalg.eigh(hess)
    top = max(float(np.max(np.abs(eig))), np.finfo(float).tiny)
    keep = eig > FLAT_TOL * top
    step = -vec[:, keep] @ ((vec[:, keep].T @ grad) / eig[keep])
    return step, float(eig[0] / top)


def _newton_polish(
    obj: _Objective, theta: np.ndarray, f: float, max_steps: int = 5
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Newton steps from a finite-difference Hessian; each kept only if it does not raise f."""
    record: dict[str, Any] = {"objective_before": f, "steps": 0, "stopped": "max_steps"}
    for _ in range(max_steps):
        step, rel_min = _newton_step(_fd_hessian(obj, theta), obj.grad(theta))
        if rel_min < -NEGATIVE_TOL:
            record["stopped"] = f"negative curvature (relative eigenvalue {rel_min:.3g})"
            break
        trial = theta + step
        f_trial = obj.value(trial)
        if not f_trial <= f:
            record["stopped"] = "step did not lower the criterion"
            break
        theta, f = trial, f_trial
        record["steps"] += 1
        if np.max(np.abs(step)) < 1e-12:
            record["stopped"] = "step below 1e-12"
            break
    record["objective_after"] = f
    return theta, f, record


def semidefinite_cholesky(s: np.ndarray) -> np.ndarray:
    """Lower factor of a positive semidefinite matrix, a zero column wherever a pivot is ~0."""
    q = s.shape[0]
    lam = np.zeros((q, q))
    tiny = 1e-14 * max(1.0, float(np.max(np.diag(s))))
    for j in range(q):
        pivot = s[j, j] - lam[j, :j] @ lam[j, :j]
        if pivot <= tiny:
            continue
        lam[j, j] = np.sqrt(pivot)
        lam[j + 1 :, j] = (s[j + 1 :, j] - lam[j + 1 :, :j] @ lam[j, :j]) / lam[j, j]
    return lam


def canonical_theta(
    obj: _Objective, theta: np.ndarray, f: float
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """lme4's form of the optimum: diagonal >= 0, and near-boundary values put on the boundary.

    The criterion depends on :math:`\\Lambda` only through :math:`\\Lambda\\Lambda^\\top`,
    so flipping the sign of a column changes nothing: columns with a negative
    diagonal are flipped. Then rows with norm below ``SINGULAR_TOL`` (an SD
    below 1e-4 sigma) are zeroed, as are diagonal entries below it, and the
    factor is rebuilt by a semidefinite Cholesky; that boundary point is kept
    only if the criterion rises by at most ``SNAP_TOL``.
    """
    lam = obj.to_factor(theta)
    lam = lam * np.where(np.diag(lam) < 0.0, -1.0, 1.0)
    theta = obj.to_theta(lam)
    record: dict[str, Any] = {"snapped": False}
    small_row = np.sqrt((lam**2).sum(axis=1)) < SINGULAR_TOL
    small_diag = np.diag(lam) < SINGULAR_TOL
    if not (small_row.any() or small_diag.any()):
        return theta, f, record
    snap = lam.copy()
    snap[small_row, :] = 0.0
    snap[np.diag_indices(obj.q)] = np.where(small_diag, 0.0, np.diag(snap))
    # The semidefinite Cholesky factor of a block-diagonal matrix is block diagonal.
    snap_theta = obj.to_theta(semidefinite_cholesky(snap @ snap.T))
    f_snap = obj.value(snap_theta)
    record["criterion_change"] = f_snap - f
    if f_snap <= f + SNAP_TOL:
        record["snapped"] = True
        return snap_theta, f_snap, record
    return theta, f, record


def _check_convergence(obj: _Objective, theta: np.ndarray) -> dict[str, Any]:
    """lme4-style checks at the optimum; every number recorded, JSON-able.

    Passed when the Newton step :math:`H^{-1}g` built from the
    finite-difference gradient is below ``STEP_TOL`` and the Hessian is
    positive definite (relative smallest eigenvalue above ``FLAT_TOL``), or,
    at a singular fit, positive semidefinite (above ``-NEGATIVE_TOL``; flat
    directions are expected there, see :func:`_newton_step`).
    """
    lam = obj.to_factor(theta)
    singular = bool(np.any(np.diag(lam) < SINGULAR_TOL))
    g_fd = _fd_gradient(obj, theta)
    hess = _fd_hessian(obj, theta)
    step, rel_min = _newton_step(hess, g_fd)
    step_max = float(np.max(np.abs(step)))
    hessian_ok = rel_min > (-NEGATIVE_TOL if singular else FLAT_TOL)
    gradient_ok = step_max < STEP_TOL
    return {
        "theta": theta.tolist(),
        "singular": singular,
        "fd_gradient": g_fd.tolist(),
        "exact_gradient": obj.grad(theta).tolist(),
        "hessian": hess.tolist(),
        "hessian_eigenvalues": np.linalg.eigvalsh(hess).tolist(),
        "hessian_relative_min_eigenvalue": rel_min,
        "newton_step_max": step_max,
        "gradient_ok": bool(gradient_ok),
        "hessian_ok": bool(hessian_ok),
        "passed": bool(gradient_ok and hessian_ok),
    }


def _run_attempt(
    obj: _Objective, start: np.ndarray, optimizer: str
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """One optimiser run from ``start``, then polish, canonical form and the checks."""
    if optimizer == "L-BFGS-B":
        res = optimize.minimize(
            obj.value_and_grad, start, jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS
        )
    else:
        res = optimize.minimize(obj.value, start, method="Nelder-Mead", options=NM_OPTIONS)
    theta = np.asarray(res.x, dtype=np.float64)
    f = obj.value(theta)
    theta, f, polish = _newton_polish(obj, theta, f)
    theta, f, canonical = canonical_theta(obj, theta, f)
    record = {
        "optimizer": optimizer,
        "start": start.tolist(),
        "success": bool(res.success),
        "message": str(res.message),
        "iterations": int(res.get("nit", -1)),
        "optimizer_evaluations": int(res.nfev),
        "optimizer_objective": float(res.fun),
        "polish": polish,
        "canonical": canonical,
        "objective": f,
        "checks": _check_convergence(obj, theta),
    }
    return theta, f, record


def _optimise(obj: _Objective) -> tuple[np.ndarray, dict[str, Any]]:
    """Minimise over theta from the identity; a second, derivative-free run only if checks fail.

    Every attempt is recorded; the one with the lower criterion is kept.
    """
    start = obj.to_theta(np.eye(obj.q))
    theta, f, record = _run_attempt(obj, start, "L-BFGS-B")
    attempts = [record]
    if not record["checks"]["passed"]:
        theta2, f2, record2 = _run_attempt(obj, start, "Nelder-Mead")
        attempts.append(record2)
        if f2 < f:
            theta, f, record = theta2, f2, record2
    return theta, {
        "attempts": attempts,
        "chosen_attempt": attempts.index(record),
        "converged": bool(record["checks"]["passed"]),
    }


# --------------------------------------------------------------------------------------
# results


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only float copy, so a frozen result cannot be changed through its arrays."""
    out = np.array(a, dtype=np.float64)
    out.setflags(write=False)
    return out


def boundary_flags(
    lam: np.ndarray, cor: np.ndarray, group: str, coef_names: Sequence[str]
) -> tuple[tuple[str, ...], bool]:
    """brms-named boundary flags and lme4's ``isSingular`` from the relative factor."""
    q = lam.shape[0]
    row_norm = np.sqrt((lam**2).sum(axis=1))
    zero = row_norm < SINGULAR_TOL
    flags = [f"sd_{group}__{coef_names[k]} estimated at 0" for k in np.flatnonzero(zero)]
    for j in range(q):
        for k in range(j + 1, q):
            if not (zero[j] or zero[k]) and 1.0 - abs(cor[j, k]) < COR_TOL:
                sign = "+1" if cor[j, k] > 0 else "-1"
                flags.append(f"cor_{group}__{coef_names[j]}__{coef_names[k]} estimated at {sign}")
    singular = bool(np.any(np.diag(lam) < SINGULAR_TOL))
    if singular and not flags:
        flags.append(
            f"Sigma_{group} estimated singular: a combination of "
            f"{', '.join(coef_names)} has variance 0"
        )
    return tuple(flags), singular


def _names(given: Sequence[str] | None, k: int, prefix: str, what: str) -> tuple[str, ...]:
    """Column names, defaulting to ``prefix0, prefix1, ...``; length checked."""
    if given is None:
        return tuple(f"{prefix}{i}" for i in range(k))
    names = tuple(str(s) for s in given)
    if len(names) != k:
        raise InputError(f"{what}: {len(names)} names for {k} columns")
    return names


def _conditional_sds(lam: np.ndarray, dec: _Decomp, sigma2: float) -> tuple[np.ndarray, np.ndarray]:
    r"""Conditional SDs of the group deviations, (G, q) each.

    With :math:`b_g = \Lambda u_g`: :math:`\operatorname{Var}(b_g \mid y, \hat\beta)
    = \sigma^2\Lambda M_g^{-1}\Lambda^\top` (lme4 ``condVar``), and, letting
    :math:`\hat\beta` vary too, the :math:`u`-block of the inverse of the mixed-model
    equations, :math:`\sigma^2\Lambda(M_g^{-1} + P_g C^{-1}P_g^\top)\Lambda^\top`
    (Henderson, C. R. 1975, "Best linear unbiased estimation and prediction
    under a selection model", *Biometrics* 31, 423-447).
    """
    q, g = dec.u.shape
    m_inv = _batched_solve(dec.chol, np.broadcast_to(np.eye(q)[:, :, None], (q, q, g)))
    p_cinv = np.einsum("kig,ij->kjg", dec.p_mat, dec.c_inv)
    pev = m_inv + np.einsum("kjg,ljg->klg", p_cinv, dec.p_mat)

    def diag_of_sandwich(mid: np.ndarray) -> np.ndarray:
        # diag(Lam mid_g Lam') for each group, as (G, q)
        return np.einsum("ikg,ik->gi", np.einsum("ij,jkg->ikg", lam, mid), lam)

    return np.sqrt(sigma2 * diag_of_sandwich(m_inv)), np.sqrt(sigma2 * diag_of_sandwich(pev))


def _assemble(
    stats: LmmStats,
    theta: np.ndarray,
    method: str,
    names: tuple[tuple[str, ...], tuple[str, ...], str],
    convergence: dict[str, Any],
    n_evaluations: int,
    block_sizes: Sequence[int] | None = None,
) -> LmmFit:
    """All reported quantities at the fitted theta (module docstring for the formulas)."""
    fixed_names, coef_names, group = names
    reml = method == "REML"
    q, n, p = stats.terms[0].q, stats.n_obs, stats.p
    blocks = check_block_sizes(q, block_sizes)
    lam = theta_to_factor(theta, q, blocks)
    dec = _decompose(stats, _Blocks.of(stats), lam)
    sigma2 = dec.r2 / (n - p if reml else n)
    r_mat = stats.transform_matrix()
    beta_cov = sigma2 * r_mat @ dec.c_inv @ r_mat.T
    big_sigma = sigma2 * lam @ lam.T
    sds = np.sqrt(np.diag(big_sigma))
    with np.errstate(invalid="ignore", divide="ignore"):
        cor = big_sigma / np.outer(sds, sds)
    np.fill_diagonal(cor, 1.0)
    b_sd, b_sd_total = _conditional_sds(lam, dec, sigma2)
    quad = dec.r2 / sigma2
    deviance = n * (LOG_2PI + np.log(sigma2)) + dec.logdet_l + quad
    reml_crit = (n - p) * (LOG_2PI + np.log(sigma2)) + dec.logdet_l + dec.logdet_rx + quad
    flags, singular = boundary_flags(lam, cor, group, coef_names)
    return LmmFit(
        method=method,
        fixed_names=fixed_names,
        coef_names=coef_names,
        group_name=group,
        beta=_frozen(stats.beta_from_centred(dec.beta_c)),
        beta_cov=_frozen(beta_cov),
        beta_se=_frozen(np.sqrt(np.diag(beta_cov))),
        sigma=float(np.sqrt(sigma2)),
        Sigma=_frozen(big_sigma),
        sds=_frozen(sds),
        cor=_frozen(cor),
        theta=_frozen(theta),
        objective=float(reml_crit if reml else deviance),
        deviance=float(deviance),
        loglik=float(-0.5 * deviance),
        reml_criterion=float(reml_crit),
        b_hat=_frozen((lam @ dec.u).T),
        b_sd=_frozen(b_sd),
        b_sd_total=_frozen(b_sd_total),
        boundary=flags,
        singular=singular,
        converged=bool(convergence["converged"]),
        convergence=convergence,
        n_evaluations=int(n_evaluations),
        n_obs=n,
        n_groups=stats.terms[0].n_groups,
        block_sizes=blocks,
    )


def _check_identifiable(stats: LmmStats) -> None:
    """Refuse what cannot be fitted: several factors, too few rows, collinear X.

    As lme4 (``check.nobs.vs.nRE``), the observations must outnumber the random
    effects :math:`Gq`, or the residual variance is not identified.
    """
    if len(stats.terms) != 1:
        raise MethodError(
            f"this LMM engine fits one grouping factor; got {len(stats.terms)} "
            "(nested and crossed factors are not implemented yet)"
        )
    n, p = stats.n_obs, stats.p
    n_re = stats.terms[0].n_groups * stats.terms[0].q
    if n <= p or n <= n_re:
        raise InputError(
            f"{n} observations are too few for {p} fixed effects and {n_re} random effects "
            "(the residual variance would not be identified)"
        )
    scale = np.sqrt(np.diag(stats.xtx))
    if np.any(scale == 0.0):
        k = int(np.flatnonzero(scale == 0.0)[0])
        raise InputError(f"X: column {k} is zero (or constant besides the intercept)")
    eig = np.linalg.eigvalsh(stats.xtx / np.outer(scale, scale))
    # The scaled cross-product has unit diagonal; an eigenvalue below 1e-10 means some
    # combination of columns has norm below 1e-5 of theirs: collinear for our purposes.
    if eig[0] < 1e-10:
        raise InputError(f"X: the fixed-effects design is rank deficient (eigenvalue {eig[0]:.2g})")


def fit_lmm_from_stats(
    stats: LmmStats,
    *,
    method: str = "REML",
    fixed_names: Sequence[str] | None = None,
    coef_names: Sequence[str] | None = None,
    group_name: str = "g",
    block_sizes: Sequence[int] | None = None,
) -> LmmFit:
    """Fit by ML or REML from precomputed statistics.

    Parameters
    ----------
    stats : LmmStats
        From :func:`~hierpipe.models.suffstats_lmm.lmm_suffstats`.
    method : ``"ML"`` or ``"REML"``.
    fixed_names : names of the columns of ``X`` (default ``X0, X1, ...``).
    coef_names : names of the columns of ``Z`` (default ``Z0, Z1, ...``); with
        ``group_name`` they name the boundary flags in brms style.
    group_name : name of the grouping factor.
    block_sizes : sizes of the diagonal blocks of :math:`\\Sigma`, in the order of
        the columns of ``Z`` (default: one block, all coefficients correlated).
        ``(1 + x || g)`` is ``(1, 1)``: :math:`\\Lambda`, and so :math:`\\Sigma`, is
        constrained to be diagonal, as lme4 does for the terms
        ``(1 | g) + (0 + x | g)``.

    Returns
    -------
    LmmFit

    Notes
    -----
    The optimiser starts at :math:`\\Lambda = I` (lme4's start). If the checks
    fail after the L-BFGS-B run, one Nelder-Mead run from the same start
    follows; both are recorded in ``convergence["attempts"]`` and the lower
    criterion is kept. Nothing is retried silently.
    """
    reml = _check_method(method)
    _check_identifiable(stats)
    q = stats.terms[0].q
    names = (
        _names(fixed_names, stats.p, "X", "fixed_names"),
        _names(coef_names, q, "Z", "coef_names"),
        str(group_name),
    )
    obj = _Objective(stats, reml, block_sizes)
    theta, convergence = _optimise(obj)
    return _assemble(stats, theta, method, names, convergence, obj.n_evaluations, obj.block_sizes)


def fit_lmm(
    X: np.ndarray,
    Z: np.ndarray,
    y: np.ndarray,
    group_codes: np.ndarray,
    n_groups: int,
    *,
    method: str = "REML",
    fixed_names: Sequence[str] | None = None,
    coef_names: Sequence[str] | None = None,
    group_name: str = "g",
    block_sizes: Sequence[int] | None = None,
) -> LmmFit:
    """Fit :math:`y = X\\beta + Zb + e`, :math:`b_g \\sim N(0, \\Sigma)`, by ML or REML.

    One pass over the rows builds the sufficient statistics
    (:func:`~hierpipe.models.suffstats_lmm.lmm_suffstats`); the optimisation
    then never touches the rows again (:func:`fit_lmm_from_stats`).

    Parameters
    ----------
    X : float array (n, p)
        Fixed-effects design.
    Z : float array (n, q)
        Design of the varying coefficients.
    y : float array (n,)
        Response.
    group_codes : int array (n,)
        Group of each row, ``0 .. n_groups-1``; every group must occur.
    n_groups : int
        Number of groups.
    method, fixed_names, coef_names, group_name, block_sizes
        As in :func:`fit_lmm_from_stats`.

    Returns
    -------
    LmmFit

    References
    ----------
    Bates, D., Mächler, M., Bolker, B. and Walker, S. (2015). Fitting linear
    mixed-effects models using lme4. *Journal of Statistical Software* 67(1), 1-48.
    """
    stats = lmm_suffstats(X, Z, y, group_codes, n_groups)
    return fit_lmm_from_stats(
        stats,
        method=method,
        fixed_names=fixed_names,
        coef_names=coef_names,
        group_name=group_name,
        block_sizes=block_sizes,
    )


# --------------------------------------------------------------------------------------
# quantities at a fitted model


def _at_fit(stats: LmmStats, fit: LmmFit) -> tuple[np.ndarray, _Decomp]:
    """The relative factor and the decomposition at the fitted theta.

    ``stats`` must be the statistics the fit was made from (same centring).
    """
    q = stats.terms[0].q
    if fit.n_groups != stats.terms[0].n_groups or fit.n_obs != stats.n_obs:
        raise InputError(
            f"statistics of {stats.n_obs} rows in {stats.terms[0].n_groups} groups do not "
            f"belong to a fit of {fit.n_obs} rows in {fit.n_groups} groups"
        )
    lam = theta_to_factor(np.asarray(fit.theta), q, fit.block_sizes or None)
    return lam, _decompose(stats, _Blocks.of(stats), lam)


def prediction_error_variances(
    stats: LmmStats,
    fit: LmmFit,
    groups: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
) -> np.ndarray:
    r"""Variances of the errors of predicted group-level linear combinations.

    For row :math:`i` with group :math:`g`, fixed-effects row :math:`x` (the
    caller's coordinates) and random-effects row :math:`z`, the prediction
    :math:`x^\top\hat\beta + z^\top\hat b_g` of :math:`x^\top\beta + z^\top b_g`
    has error variance (Henderson 1975: the inverse of the mixed-model
    equations, at the fitted covariance parameters)

    .. math::
        \sigma^2\left[w^\top M_g^{-1} w + d^\top C^{-1} d\right],\qquad
        w = \Lambda^\top z,\quad d = R^\top x - P_g^\top w,

    with :math:`M_g, P_g, C` as in the module docstring and :math:`R` the
    centring transform (:meth:`~hierpipe.models.suffstats_lmm.LmmStats.transform_matrix`).
    It counts the uncertainty of :math:`\hat\beta` and its covariance with
    :math:`\hat b_g`; not that of the covariance parameters (a plug-in, as
    every empirical-Bayes interval). With :math:`x = 0` it is ``b_sd_total``
    squared; with :math:`z = 0` it is :math:`x^\top \mathrm{vcov}(\hat\beta)\, x`.

    Parameters
    ----------
    stats : the statistics ``fit`` was computed from.
    fit : LmmFit
    groups : int array (k,)
        Group index of each row.
    x : float array (k, p)
    z : float array (k, q)

    Returns
    -------
    float array (k,)

    References
    ----------
    Henderson, C. R. (1975). Best linear unbiased estimation and prediction under
    a selection model. *Biometrics* 31, 423-447.
    """
    lam, dec = _at_fit(stats, fit)
    g = np.asarray(groups, dtype=np.intp)
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    w = (z @ lam).T  # (q, k): Lambda' z for each row
    m_inv_w = _batched_solve(dec.chol[:, :, g], w[:, None, :])[:, 0, :]
    a = (x @ stats.transform_matrix()).T  # (p, k): R' x
    d = a - np.einsum("qpk,qk->pk", dec.p_mat[:, :, g], w)
    quad = np.sum(w * m_inv_w, axis=0) + np.einsum("pk,pr,rk->k", d, dec.c_inv, d)
    return fit.sigma**2 * quad


def effective_group_parameters(stats: LmmStats, fit: LmmFit) -> float:
    r"""Effective number of group parameters, :math:`\sum_g \operatorname{tr}(H_g)`.

    :math:`H_g = Z_g\Lambda M_g^{-1}\Lambda^\top Z_g^\top` maps a group's data
    (less :math:`X_g\beta`) to its fitted random part, so
    :math:`\operatorname{tr} H_g = q - \operatorname{tr} M_g^{-1}`: between 0
    (complete pooling) and the rank of :math:`Z_g` (no pooling). For the
    varying intercept it is :math:`\sum_g B_g`, :math:`B_g` the shrinkage weight
    on the group's own mean (Hodges & Sargent 2001, "Counting degrees of
    freedom in hierarchical and other richly-parameterised models",
    *Biometrika* 88, 367-379).
    """
    _, dec = _at_fit(stats, fit)
    q, _, g = dec.chol.shape
    m_inv = _batched_solve(dec.chol, np.broadcast_to(np.eye(q)[:, :, None], (q, q, g)))
    return float(q * g - np.trace(m_inv).sum())


def _psi_blocks(fit: LmmFit) -> list[tuple[int, int]]:
    """Index pairs ``(j, k)``, ``j < k``, of coefficients in the same block."""
    pairs, start = [], 0
    for size in fit.block_sizes or (len(fit.coef_names),):
        pairs += [(start + j, start + k) for j in range(size) for k in range(j + 1, size)]
        start += size
    return pairs


def _psi_to_theta(psi: np.ndarray, q: int, pairs: list[tuple[int, int]], obj: _Objective):
    """Theta from log relative SDs (q) and Fisher z of the in-block correlations."""
    s = np.exp(psi[:q])
    corr = np.eye(q)
    for (j, k), zval in zip(pairs, psi[q:], strict=True):
        corr[j, k] = corr[k, j] = np.tanh(zval)
    return obj.to_theta(np.linalg.cholesky(corr * np.outer(s, s)))


def correlation_intervals(
    stats: LmmStats, fit: LmmFit, level: float = 0.90
) -> dict[tuple[int, int], dict[str, float]]:
    r"""Wald intervals for the correlations of the varying coefficients, on Fisher's z.

    The fitted covariance is re-expressed as :math:`\psi` = (log of each SD
    relative to :math:`\sigma`, :math:`z_{jk} = \operatorname{atanh}\rho_{jk}` of
    each in-block correlation); correlations do not depend on :math:`\sigma`,
    so the criterion with :math:`\beta` and :math:`\sigma` profiled out is a
    profile (restricted) likelihood for them, and

    .. math::
        \widehat{\operatorname{Var}}(\hat\psi) = 2 H_\psi^{-1},\qquad
        z_{jk} \pm z_{(1+\text{level})/2}\,\mathrm{se}(z_{jk}),

    :math:`H_\psi` the Hessian of the criterion (:math:`-2\ell`) in :math:`\psi`,
    by central differences of its exact gradient (chain rule through
    :math:`\theta(\psi)`, whose Jacobian is taken by central differences of
    the smooth map). The interval is mapped back by tanh, so it stays inside
    (-1, 1) (Fisher 1921; the usual Wald interval for correlations, e.g.
    Pinheiro & Bates 2000, sec. 2.4.3, use the same transform).

    Returns one entry per in-block pair ``(j, k)``: ``cor``, ``se`` (delta
    method, :math:`(1-\rho^2)\,\mathrm{se}(z)`), ``se_z``, ``lo``, ``hi``. At a
    singular fit (an SD at 0 or a correlation at +-1) :math:`\psi` is at
    infinity and the entries are NaN.
    """
    pairs = _psi_blocks(fit)
    if not pairs:
        return {}
    nan = {"cor": np.nan, "se": np.nan, "se_z": np.nan, "lo": np.nan, "hi": np.nan}
    cor = np.asarray(fit.cor)
    if fit.singular or any(1.0 - abs(cor[j, k]) < COR_TOL for j, k in pairs):
        return {pr: {**nan, "cor": float(cor[pr])} for pr in pairs}
    q = len(fit.coef_names)
    obj = _Objective(stats, fit.method == "REML", fit.block_sizes or None)
    rel = np.asarray(fit.Sigma) / fit.sigma**2
    psi0 = np.concatenate([0.5 * np.log(np.diag(rel)), np.arctanh([cor[j, k] for j, k in pairs])])

    def grad_psi(psi: np.ndarray) -> np.ndarray:
        jac = np.empty((obj.index[0].size, psi.size))
        for i in range(psi.size):
            h = np.zeros(psi.size)
            h[i] = 1e-6
            jac[:, i] = (
                _psi_to_theta(psi + h, q, pairs, obj) - _psi_to_theta(psi - h, q, pairs, obj)
            ) / 2e-6
        return jac.T @ obj.grad(_psi_to_theta(psi, q, pairs, obj))

    k = psi0.size
    hess = np.empty((k, k))
    for i in range(k):
        h = np.zeros(k)
        h[i] = HESS_STEP * max(1.0, abs(psi0[i]))
        hess[:, i] = (grad_psi(psi0 + h) - grad_psi(psi0 - h)) / (2.0 * h[i])
    hess = 0.5 * (hess + hess.T)
    try:
        cov = 2.0 * np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        return {pr: {**nan, "cor": float(cor[pr])} for pr in pairs}
    zq = float(ndtri(0.5 + level / 2.0))
    out = {}
    for m, (j, kk) in enumerate(pairs):
        var_z = cov[q + m, q + m]
        se_z = float(np.sqrt(var_z)) if var_z > 0 else np.nan
        z = psi0[q + m]
        rho = float(cor[j, kk])
        out[(j, kk)] = {
            "cor": rho,
            "se": (1.0 - rho**2) * se_z,
            "se_z": se_z,
            "lo": float(np.tanh(z - zq * se_z)),
            "hi": float(np.tanh(z + zq * se_z)),
        }
    return out


# --------------------------------------------------------------------------------------
# one-way shortcut


@dataclass(frozen=True)
class _OneWay:
    """Per-group summaries of ``y ~ 1 + (1 | g)`` with the response centred."""

    n: np.ndarray
    dev: np.ndarray
    ssw: float
    reml: bool

    @property
    def n_obs(self) -> float:
        return float(self.n.sum())


def _one_way_parts(ow: _OneWay, ratio: float) -> tuple[np.ndarray, float, float, float]:
    """Weights :math:`w_g = n_g/(1+\\lambda n_g)`, their sum, the GLS mean and :math:`r^2`."""
    w = ow.n / (1.0 + ratio * ow.n)
    sw = float(w.sum())
    mu = float(w @ ow.dev) / sw
    r2 = ow.ssw + float(w @ (ow.dev - mu) ** 2)
    return w, sw, mu, r2


def _one_way_criterion(ow: _OneWay, ratio: float) -> float:
    r"""Profiled criterion of the one-way model at ratio :math:`\lambda=\tau^2/\sigma^2`.

    .. math::
        r^2 = S_W + \sum_g w_g(\bar y_g - \hat\mu)^2,\quad
        -2\ell_{\text{ML}} = \sum_g\log(1+\lambda n_g) + n[1+\log(2\pi r^2/n)],\\
        -2\ell_{\text{REML}} = \sum_g\log(1+\lambda n_g) + \log\sum_g w_g
        + (n-1)[1+\log(2\pi r^2/(n-1))].

    :math:`r^2` is a sum of non-negative terms, so it has no cancellation.
    """
    _, sw, _, r2 = _one_way_parts(ow, ratio)
    logdet = float(np.log1p(ratio * ow.n).sum())
    n = ow.n_obs
    if ow.reml:
        df = n - 1.0
        return logdet + np.log(sw) + df * (1.0 + np.log(2.0 * np.pi * r2 / df))
    return logdet + n * (1.0 + np.log(2.0 * np.pi * r2 / n))


def _one_way_derivative(ow: _OneWay, ratio: float) -> float:
    """Derivative of :func:`_one_way_criterion` in the ratio (envelope theorem for the mean)."""
    w, sw, mu, r2 = _one_way_parts(ow, ratio)
    d_r2 = -float(w**2 @ (ow.dev - mu) ** 2)
    d = float(w.sum())
    if ow.reml:
        return d - float((w**2).sum()) / sw + (ow.n_obs - 1.0) * d_r2 / r2
    return d + ow.n_obs * d_r2 / r2


def _one_way_optimise(ow: _OneWay) -> tuple[float, dict[str, Any]]:
    """Brent on log ratio, a root polish of the exact derivative, and the check at 0."""
    count = {"criterion": 0, "derivative": 0}

    def crit(ratio: float) -> float:
        count["criterion"] += 1
        return _one_way_criterion(ow, ratio)

    def deriv(ratio: float) -> float:
        count["derivative"] += 1
        return _one_way_derivative(ow, ratio)

    res = optimize.minimize_scalar(
        lambda s: crit(float(np.exp(s))),
        bounds=(-LOG_RATIO_BOUND, LOG_RATIO_BOUND),
        method="bounded",
        options={"xatol": 1e-10, "maxiter": 500},
    )
    ratio = float(np.exp(res.x))
    record: dict[str, Any] = {
        "optimizer": "Brent (bounded, log ratio)",
        "success": bool(res.success),
        "message": str(res.message),
        "optimizer_evaluations": int(res.nfev),
        "brent_ratio": ratio,
    }
    # Brent on function values is limited to ~sqrt(eps) in the argument; the
    # derivative is exact, so its root pins the ratio to rounding.
    lo, hi = ratio * np.exp(-1e-3), ratio * np.exp(1e-3)
    if deriv(lo) < 0.0 < deriv(hi):
        ratio = float(optimize.brentq(deriv, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps))
        record["polish"] = "root of the exact derivative"
    else:
        record["polish"] = "none: derivative has no sign change around the Brent optimum"
    f_opt, f_zero = crit(ratio), crit(0.0)
    record["objective_interior"] = f_opt
    record["objective_at_zero"] = f_zero
    record["derivative_at_zero"] = deriv(0.0)
    if f_zero <= f_opt:
        ratio = 0.0
        record["boundary"] = "ratio 0 (tau = 0) gives the lower criterion"
    record["one_way_evaluations"] = count["criterion"] + count["derivative"]
    return ratio, record


def one_way_reml(
    n: np.ndarray,
    ybar: np.ndarray,
    ss_within: np.ndarray,
    method: str = "REML",
    *,
    group_name: str = "g",
) -> LmmFit:
    r"""ML or REML fit of ``y ~ 1 + (1 | g)`` from per-group summaries only.

    For :math:`y_{gi} = \beta_0 + b_g + e_{gi}`, :math:`b_g\sim N(0,\tau^2)`, the
    profiled criterion depends on the data through :math:`n_g`,
    :math:`\bar y_g` and the within-group sums of squares :math:`S_g` (see
    :func:`_one_way_criterion`); it is minimised over the single ratio
    :math:`\lambda = \tau^2/\sigma^2` by bounded Brent on :math:`\log\lambda`,
    the optimum pinned by a root search on the exact derivative, and compared
    with :math:`\lambda = 0` (the boundary). The result is assembled by the
    general engine at :math:`\theta = \sqrt\lambda`, so every field matches
    :func:`fit_lmm` (``fixed_names = coef_names = ("Intercept",)``), and the
    general engine's convergence checks are run there.

    Parameters
    ----------
    n : array (G,)
        Observations per group.
    ybar : float array (G,)
        Group means.
    ss_within : float array (G,)
        Within-group sums of squares :math:`\sum_i (y_{gi}-\bar y_g)^2`.
    method : ``"ML"`` or ``"REML"``.
    group_name : name of the grouping factor (for the boundary flags).

    Returns
    -------
    LmmFit

    References
    ----------
    Searle, S. R., Casella, G. and McCulloch, C. E. (1992). *Variance
    Components*. Wiley, chapter 3 (the one-way classification).
    """
    reml = _check_method(method)
    stats = one_way_stats(n, ybar, ss_within)
    _check_identifiable(stats)
    dev = np.asarray(ybar, dtype=np.float64) - stats.y_center
    ow = _OneWay(
        n=np.asarray(n, dtype=np.float64), dev=dev, ssw=float(np.sum(ss_within)), reml=reml
    )
    ratio, record = _one_way_optimise(ow)
    theta = np.array([np.sqrt(ratio)])
    obj = _Objective(stats, reml)
    checks = _check_convergence(obj, theta)
    record["general_criterion"] = obj.value(theta)
    record["checks"] = checks
    convergence = {"attempts": [record], "chosen_attempt": 0, "converged": checks["passed"]}
    names = (("Intercept",), ("Intercept",), str(group_name))
    return _assemble(
        stats, theta, method, names, convergence, record["one_way_evaluations"] + obj.n_evaluations
    )
