r"""Gibbs sampler for the one-factor linear mixed model, from per-group cross-products.

Model (brms names in brackets)
------------------------------
.. math::

    y = X\beta + Zb + e,\qquad b_g \sim N_q(0, \Sigma)\ \text{iid over groups } g,
    \qquad e \sim N(0, \sigma^2 I_N),

:math:`\beta` = ``b_<x>``, :math:`\sqrt{\Sigma_{kk}}` = ``sd_<g>__<z_k>``,
:math:`\Sigma_{jk}/\sqrt{\Sigma_{jj}\Sigma_{kk}}` = ``cor_<g>__<z_j>__<z_k>``,
:math:`b_{gk}` = ``r_<g>[level,z_k]``, :math:`\beta_k + b_{gk}` =
``coef_<g>[level,z_k]``. :math:`\Sigma` is block diagonal, one block a varying
term of the formula (``(1 + x | g)`` one block, ``(1 + x || g)`` two).

Priors
------
* :math:`\beta`: flat (default) or independent normals.
* :math:`\sigma`: half-Cauchy :math:`C^+(0, A_\sigma)` (default; Makalic & Schmidt
  2016 auxiliary: :math:`\sigma^2 \mid \lambda \sim IG(1/2, 1/\lambda)`,
  :math:`\lambda \sim IG(1/2, 1/A_\sigma^2)`) or :math:`\sigma^2 \sim IG(\alpha, \beta)`.
* A block of size 1: half-Cauchy on its SD (default) or inverse-gamma on its
  variance. The half-Cauchy is the Huang & Wand prior below with
  :math:`q = 1, \nu = 1`, which is exactly Makalic & Schmidt's augmentation.
* A block of size :math:`q \ge 2`: Huang & Wand (2013) (default, :math:`\nu = 2`:
  half-:math:`t_\nu(0, A_k)` SDs and marginally uniform correlations),

  .. math::
      \Sigma \mid a \sim IW\big(\nu + q - 1,\ 2\nu\,\mathrm{diag}(1/a)\big),\qquad
      a_k \sim IG(1/2, 1/A_k^2),

  or an inverse-Wishart :math:`IW(d, \Psi)`.

One iteration (all chains advance together; chains are the leading array axis)
------------------------------------------------------------------------------
0. Marginal move (``marginal=True``, after warm-up iteration 50): a
   multiple-proposal independence update (Tjelmeland 2004) of
   :math:`(\sigma^2, \Sigma)` on their marginal posterior, with
   :math:`(\beta, b)` and the prior's auxiliary variables integrated out in
   closed form: :math:`\log p(y \mid \sigma^2, \Sigma)` from per-group
   :math:`q \times q` factorisations (:func:`_log_marginal`), the half-Cauchy
   density of :math:`\sigma` and Huang & Wand's (2013, eq. 2) density
   :math:`p(\Sigma) \propto |\Sigma|^{-(\nu+2q)/2}\prod_k(\nu(\Sigma^{-1})_{kk}
   + 1/A_k^2)^{-(\nu+q)/2}` (or the inverse-Wishart / inverse-gamma density).
   Three points are drawn from a multivariate :math:`t_2` fitted to the chain's
   own warm-up draws of :math:`x = (\log\sigma^2`, log-Cholesky factor of
   :math:`\Sigma)` (refitted at warm-up iterations 50, 100, 200, ... and at the
   end of warm-up, to the second half of the draws so far; fixed afterwards),
   and the chain moves to one of the four points with probability proportional
   to target over proposal density. Points where
   :math:`\max_g \mathrm{tr}(\Sigma Z_g^\top Z_g)/\sigma^2 > 10^6`, where rounding
   swamps the marginal density, get weight 0, and a chain at such a point stays
   (exact: a move of the posterior restricted to the rest). The auxiliaries are then drawn given the
   new :math:`(\sigma^2, \Sigma)`, and step 1 draws :math:`(\beta, b)`, so the
   block is an exact collapsed update. It moves :math:`\sigma` and the SDs
   together, which the conditional steps below cannot when every group is
   small (the residual and the group-level variance then trade off along a
   ridge): in the weak regime of ``benchmarks/bench_gibbs_lmm.py`` it raises
   the ESS per draw of the SDs and sigma 3-6 fold.
1. :math:`(\beta, b) \mid \sigma^2, \Sigma` jointly: :math:`\beta` from its
   distribution with :math:`b` integrated out, then :math:`b \mid \beta`. With
   :math:`M_g = Z_g^\top Z_g + \sigma^2\Sigma^{-1}` (one batched
   :math:`(C, G, q, q)` factorisation),

   .. math::
      X^\top V^{-1}X = \frac{X^\top X - \sum_g X_g^\top Z_g M_g^{-1} Z_g^\top X_g}{\sigma^2},
      \quad
      X^\top V^{-1}y = \frac{X^\top y - \sum_g X_g^\top Z_g M_g^{-1} Z_g^\top y_g}{\sigma^2},

   :math:`b_g \mid \beta \sim N(M_g^{-1}Z_g^\top(y_g - X_g\beta),\ \sigma^2 M_g^{-1})`.
   The joint draw removes the correlation between :math:`\beta` and the mean of
   the :math:`b_g` that slows a one-at-a-time sampler.
2. :math:`\sigma^2 \mid \beta, b` from the residual sum of squares expanded in
   the cross-products,
   :math:`y^\top y - 2\beta^\top X^\top y + \beta^\top X^\top X\beta - 2\sum_g b_g^\top
   (Z_g^\top y_g - Z_g^\top X_g\beta) + \sum_g b_g^\top Z_g^\top Z_g b_g`.
3. :math:`\Sigma \mid b, a` per block (conjugate: :math:`S = \sum_g b_g b_g^\top`,
   :math:`IW(\nu + q - 1 + G, 2\nu\,\mathrm{diag}(1/a) + S)`), then
   :math:`a_k \mid \Sigma \sim IG((\nu + q)/2, \nu(\Sigma^{-1})_{kk} + 1/A_k^2)`.
4. Interweaving scale move (``interweave=True``, for the coefficients with a
   Huang-Wand or half-Cauchy prior). A generalised Gibbs step (Liu & Sabatti
   2000) over the group of per-coefficient rescalings
   :math:`(b_{\cdot k}, \Sigma, a_k) \mapsto (s_k b_{\cdot k}, S\Sigma S, a_k/s_k^2)`,
   :math:`S = \mathrm{diag}(s)`, :math:`s_k \ne 0`, with Haar measure
   :math:`\prod_k ds_k/|s_k|`. The prior factors' Jacobians cancel exactly
   (the IW normaliser :math:`|\Psi|^{(\nu+q-1)/2}` against :math:`|\Sigma|`, the
   :math:`b_g` density against its Jacobian, :math:`p(a_k)` leaves
   :math:`|s_k|\,e^{-s_k^2/(A_k^2 a_k)}`), so

   .. math::
      s \sim N_q\big(Q^{-1}m, Q^{-1}\big),\quad
      Q = \frac{W^\top W}{\sigma^2} + 2\,\mathrm{diag}\Big(\frac{1}{A_k^2 a_k}\Big),\quad
      m = \frac{W^\top (y - X\beta)}{\sigma^2},

   :math:`W^\top W = \sum_g \mathrm{diag}(b_g) Z_g^\top Z_g \mathrm{diag}(b_g)`,
   :math:`W^\top(y - X\beta) = \sum_g b_g \circ (Z_g^\top y_g - Z_g^\top X_g\beta)`:
   an exact draw. It is the ancillary (non-centred) half of ASIS (Yu & Meng
   2011) for the scales: when the data on each group are weak, :math:`\Sigma
   \mid b` is nearly fixed by :math:`b` and the centred steps crawl along the
   funnel; this move rescales the :math:`b_g` and :math:`\Sigma` together, by
   the likelihood and the prior scale. Inverse-gamma and inverse-Wishart
   blocks are left out of the move (their prior factor in :math:`s` is not
   Gaussian).
5. Interweaving shear moves (``interweave=True``, every ordered pair
   :math:`j \ne k` within a block, Huang-Wand or inverse-Wishart): the same
   generalised Gibbs step over the additive group
   :math:`(b_g, \Sigma) \mapsto (Ab_g, A\Sigma A^\top)`,
   :math:`A = I + c\,e_ke_j^\top` (Haar measure :math:`dc`). :math:`\det A = 1`,
   so the :math:`b_g` density, :math:`|\Sigma|` and both Jacobians are
   unchanged; with :math:`P = \Sigma^{-1}` and the inverse-Wishart scale
   :math:`\Psi`, :math:`\mathrm{tr}(\Psi A^{-\top}PA^{-1})` is quadratic in
   :math:`c`, and so is the likelihood, so

   .. math::
      c \sim N(m/h, 1/h),\quad
      h = \frac{\sum_g b_{gj}^2 (Z_g^\top Z_g)_{kk}}{\sigma^2} + \Psi_{jj}P_{kk},\quad
      m = \frac{\sum_g b_{gj}\,(t_g - Z_g^\top Z_g b_g)_k}{\sigma^2} + (\Psi P)_{jk},

   :math:`t_g = Z_g^\top(y_g - X_g\beta)`. The scale move cannot change a
   correlation; this one moves it together with the :math:`b_g`, which a
   centred :math:`\Sigma \mid b` step cannot when groups are small.

Everything comes from :func:`hierpipe.models.suffstats_lmm.lmm_suffstats`, so an
iteration costs :math:`O(G(q^3 + q^2p + qp^2) + p^3)` whatever :math:`N` is. The
per-group :math:`q \times q` factorisations and solves run on a component-major
layout (entry :math:`(i, j)` of every chain's and group's matrix is one
contiguous array), as :math:`O(q^3)` whole-array numpy operations rather than
one LAPACK call a group.
The sampler works in the centred coordinates of the statistics and maps
:math:`\beta` back with :meth:`LmmStats.beta_from_centred`.

The response statistics (``zty``, ``xty``, ``yty``) may carry a leading chain
axis: then chain :math:`c` samples the posterior of data set :math:`c` with the
shared design (simulation-based calibration runs many data sets at once).

Back ends (``LmmGibbsSettings.backend``): the numpy code here, or a numba kernel
(:mod:`hierpipe.models.gibbs_lmm_numba`, the ``fast`` extra) that runs a whole
iteration in one compiled call (``"auto"`` takes numba when it is installed; the
default is numpy, as for the two-level sampler). Both use the same algorithm on
the same random numbers, which numpy draws in the same order for both
(:func:`_numba_variates`), so their draws agree to rounding (about 1e-13 over a
run; ``tests/test_gibbs_lmm.py``).
On ``benchmarks/bench_peers.py``'s set (d) (100 groups, 4 chains) the numba
iteration costs about 0.18 ms against numpy's 1.45 ms (the numpy one is nearly
all the fixed cost of small array calls; about half of the numba one is numpy
drawing the random numbers); with 200 chains (simulation-based calibration)
about 4.4 ms against 12 ms.

References
----------
Huang, A. & Wand, M. P. (2013). Simple marginally noninformative prior
distributions for covariance matrices. *Bayesian Analysis* 8(2), 439-452.
Makalic, E. & Schmidt, D. F. (2016). A simple sampler for the horseshoe
estimator. *IEEE Signal Processing Letters* 23(1), 179-182.
Liu, J. S. & Sabatti, C. (2000). Generalised Gibbs sampler and multigrid Monte
Carlo for Bayesian computation. *Biometrika* 87(2), 353-369.
Tjelmeland, H. (2004). Using all Metropolis-Hastings proposals. Technical
report, Norwegian University of Science and Technology, Trondheim.
Yu, Y. & Meng, X.-L. (2011). To center or not to center: that is not the
question. *J. Comput. Graph. Statist.* 20(3), 531-570.
Gelman, A. (2006). Prior distributions for variance parameters in hierarchical
models. *Bayesian Analysis* 1(3), 515-534.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hierpipe.diagnostics.convergence import summarise_draws
from hierpipe.errors import ConfigError, InputError
from hierpipe.models.gibbs_fit import draws_frame, stored_groups
from hierpipe.models.result import FitResult
from hierpipe.models.suffstats_lmm import LmmStats

#: values (chain x draw x group x coefficient) summarised at once for group parameters
_BLOCK_VALUES = 1 << 22
# Marginal move: _MP_M multivariate-t proposals (_MP_DF degrees of freedom, scale the
# covariance of the chain's own warm-up draws, each SD at least _MP_SD_FLOOR) an
# iteration, first fitted after warm-up iteration _MP_START (Gibbs steps only before).
_MP_M = 3
_MP_DF = 2.0
_MP_SD_FLOOR = 1e-3
_MP_START = 50
_X_MAX = 200.0
# The marginal move acts only where max_g tr(Sigma Z_g'Z_g) / sigma^2, which bounds
# cond(K_g) - 1 in _log_marginal, is at most _K_COND_MAX: the cancellations of
# _log_marginal cost the log target about eps * cond(K) * y'V^-1y-scale terms, roughly
# eps * G * ratio^2 (2e-3 for G = 8 at the bound, 0.02 for G = 100), while far beyond
# it the target is noise that can exceed the true log density by 1e42 (SBC,
# slopes_huang_wand: a chain jumped to sigma^2 = 3e-35, Sigma_11 = 3e38 and the next
# step failed). Outside, only the conditional steps move the chain.
_K_COND_MAX = 1e6

if TYPE_CHECKING:  # the engine imports this module lazily; avoid a cycle
    from hierpipe.models.engines.lmm import LmmData

# --------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class FlatBeta:
    """Improper flat prior on every fixed effect (brms's default)."""

    def to_dict(self) -> dict[str, Any]:
        return {"family": "flat"}


@dataclass(frozen=True)
class NormalBeta:
    r"""Independent :math:`N(\text{mean}_k, \text{sd}_k^2)` priors on the fixed effects."""

    mean: tuple[float, ...]
    sd: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"family": "normal", "mean": list(self.mean), "sd": list(self.sd)}


@dataclass(frozen=True)
class HalfCauchySigma:
    r"""Half-Cauchy :math:`C^+(0, \text{scale})` on ``sigma``."""

    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {"family": "half_cauchy", "on": "sd", "scale": float(self.scale)}


@dataclass(frozen=True)
class InvGamma:
    r"""Inverse-gamma :math:`IG(\text{shape}, \text{scale})` on a *variance*."""

    shape: float
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": "inv_gamma",
            "on": "variance",
            "shape": float(self.shape),
            "scale": float(self.scale),
        }


@dataclass(frozen=True)
class HuangWand:
    r"""Huang & Wand (2013) prior on one block: half-:math:`t_\nu(0, A_k)` SDs.

    With one coefficient and :math:`\nu = 1` it is the half-Cauchy :math:`C^+(0, A)`.
    """

    scale: tuple[float, ...]
    nu: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        if len(self.scale) == 1 and self.nu == 1.0:
            return {"family": "half_cauchy", "on": "sd", "scale": float(self.scale[0])}
        return {"family": "huang_wand", "nu": float(self.nu), "scale": list(self.scale)}


@dataclass(frozen=True)
class InvWishart:
    r"""Inverse-Wishart :math:`IW(\text{df}, \Psi)` on one block."""

    df: float
    psi: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"family": "inv_wishart", "df": float(self.df), "scale": [list(r) for r in self.psi]}


BlockPrior = HuangWand | InvGamma | InvWishart


@dataclass(frozen=True)
class LmmPriors:
    """Priors of the LMM: fixed effects, one prior a block of Sigma, sigma."""

    beta: FlatBeta | NormalBeta
    blocks: tuple[BlockPrior, ...]
    sigma: HalfCauchySigma | InvGamma

    def to_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta.to_dict(),
            "blocks": [b.to_dict() for b in self.blocks],
            "sigma": self.sigma.to_dict(),
        }


@dataclass(frozen=True)
class LmmGibbsSettings:
    """Sampler settings, recorded in ``fit.json``.

    ``chains`` chains each run ``warmup + draws * thin`` iterations and keep
    every ``thin``-th after warm-up; ``interweave`` switches the scale and
    shear moves, ``marginal`` the marginal move (step 0 of the module docstring).
    ``backend`` is how an iteration is computed, not what it draws: ``"numpy"``
    (default, no extra dependency), ``"numba"`` (compiled,
    :mod:`hierpipe.models.gibbs_lmm_numba`; the ``fast`` extra) or ``"auto"``
    (numba when it is installed, else numpy). Both consume the same random
    numbers and agree to rounding.
    """

    chains: int = 4
    warmup: int = 1000
    draws: int = 1000
    thin: int = 1
    interweave: bool = True
    marginal: bool = True
    backend: str = "numpy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LmmDraws:
    """Posterior draws; leading axes (chain, draw).

    ``beta`` (C,D,p) for the caller's X (not centred), ``b`` (C,D,G,q),
    ``sigma`` (C,D), ``Sigma`` (C,D,q,q).
    """

    beta: np.ndarray
    b: np.ndarray
    sigma: np.ndarray
    Sigma: np.ndarray
    settings: LmmGibbsSettings
    priors: LmmPriors

    def info(self) -> dict[str, Any]:
        """JSON-able facts for ``fit.json``."""
        return {
            "sampler": "gibbs_lmm",
            "settings": self.settings.to_dict(),
            "priors": self.priors.to_dict(),
        }


# --------------------------------------------------------------------------- random draws


def inv_gamma(rng: np.random.Generator, shape: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """:math:`IG(\\text{shape}, \\text{rate})` draws (density :math:`\\propto v^{-a-1}e^{-b/v}`)."""
    return np.asarray(rate) / rng.standard_gamma(shape, size=np.shape(rate))


def inv_wishart(rng: np.random.Generator, df: float, psi: np.ndarray) -> np.ndarray:
    r""":math:`IW(\text{df}, \Psi)` draws for a stack ``psi`` (C,k,k) (Bartlett decomposition).

    :math:`\Sigma^{-1} \sim W(\text{df}, \Psi^{-1})`; with :math:`\Psi = LL^\top`
    and :math:`A` Bartlett's lower-triangular factor
    (:math:`A_{ii}^2 \sim \chi^2_{\text{df}-i}`, :math:`A_{ij} \sim N(0,1)`, i > j),
    :math:`\Sigma^{-1} = L^{-\top}AA^\top L^{-1}`, so
    :math:`\Sigma = LA^{-\top}A^{-1}L^\top`.
    """
    c, k, _ = psi.shape
    chol = np.linalg.cholesky(psi)
    a = np.tril(rng.standard_normal((c, k, k)), -1)
    idx = np.arange(k)
    a[:, idx, idx] = np.sqrt(rng.chisquare(df - idx, size=(c, k)))
    t = chol @ np.linalg.inv(np.swapaxes(a, 1, 2))  # L A^{-T}
    out = t @ np.swapaxes(t, 1, 2)
    return 0.5 * (out + np.swapaxes(out, 1, 2))


def _mvn_from_precision(rng: np.random.Generator, prec: np.ndarray, lin: np.ndarray) -> np.ndarray:
    """Draws of :math:`N(P^{-1}m, P^{-1})` for stacks ``prec`` (...,k,k), ``lin`` (...,k)."""
    chol = np.linalg.cholesky(prec)
    mean = np.linalg.solve(prec, lin[..., None])[..., 0]
    z = rng.standard_normal(lin.shape)
    return mean + np.linalg.solve(np.swapaxes(chol, -1, -2), z[..., None])[..., 0]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Data:
    """Cross-products in the sampler's layout (response parts may have a chain axis)."""

    n_obs: int
    ztz: np.ndarray  # (G,q,q)
    ztx: np.ndarray  # (G,q,p)
    zty: np.ndarray  # (G,q) or (C,G,q)
    xtx: np.ndarray  # (p,p)
    xty: np.ndarray  # (p,) or (C,p)
    yty: np.ndarray  # () or (C,)

    @property
    def shape(self) -> tuple[int, int, int]:
        g, q, p = self.ztx.shape
        return g, q, p


def _data(stats: LmmStats) -> _Data:
    term = stats.terms[0]
    return _Data(
        n_obs=int(stats.n_obs),
        ztz=np.asarray(term.ztz, float),
        ztx=np.asarray(term.ztx, float),
        zty=np.asarray(term.zty, float),
        xtx=np.asarray(stats.xtx, float),
        xty=np.asarray(stats.xty, float),
        yty=np.asarray(stats.yty, float),
    )


def block_slices(block_sizes: tuple[int, ...]) -> list[slice]:
    """Index ranges of the diagonal blocks of Sigma."""
    out, start = [], 0
    for size in block_sizes:
        out.append(slice(start, start + size))
        start += size
    return out


# --------------------------------------------------------------------------- conditionals
#
# The per-group work runs on a component-major layout: a (q, q) stack over
# (chain, group) is held as an array (q, q, C, G), so entry (i, j) of every
# group's matrix is one contiguous (C, G) array. The Cholesky factorisation and
# the triangular solves of the q x q systems are then O(q^3) whole-array numpy
# operations, each over C x G numbers, instead of C x G separate LAPACK calls.


@dataclass(frozen=True)
class _Layout:
    """Cross-products in the component-major layout (built once per run)."""

    ztz: np.ndarray  # (q,q,G)
    ztx: np.ndarray  # (q,p,G)
    zty: np.ndarray  # (q,C,G)
    xtx: np.ndarray  # (p,p)
    xty: np.ndarray  # (C,p)
    yty: np.ndarray  # (C,)


def _layout(d: _Data, c: int) -> _Layout:
    g, q, p = d.shape
    zty = np.broadcast_to(d.zty, (c, g, q))
    return _Layout(
        ztz=np.ascontiguousarray(d.ztz.transpose(1, 2, 0)),
        ztx=np.ascontiguousarray(d.ztx.transpose(1, 2, 0)),
        zty=np.ascontiguousarray(zty.transpose(2, 0, 1)),
        xtx=d.xtx,
        xty=np.ascontiguousarray(np.broadcast_to(d.xty, (c, p))),
        yty=np.broadcast_to(d.yty, (c,)).astype(float),
    )


def _cholesky(m: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of a component-major stack ``m`` (q,q,...) (upper part 0)."""
    q = m.shape[0]
    chol = np.zeros_like(m)
    for j in range(q):
        diag = m[j, j] - np.einsum("k...,k...->...", chol[j, :j], chol[j, :j])
        chol[j, j] = np.sqrt(diag)
        for i in range(j + 1, q):
            off = m[i, j] - np.einsum("k...,k...->...", chol[i, :j], chol[j, :j])
            chol[i, j] = off / chol[j, j]
    return chol


def _solve_lower(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """:math:`L^{-1}` rhs; ``rhs`` (q, r..., C, G) broadcasts against ``chol[i, j]`` (C, G)."""
    out = np.empty(np.broadcast_shapes(rhs.shape, (chol.shape[0], *chol.shape[2:])))
    for i in range(chol.shape[0]):
        acc = rhs[i]
        for k in range(i):
            acc = acc - chol[i, k] * out[k]
        out[i] = acc / chol[i, i]
    return out


def _solve_upper(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """:math:`L^{-\\top}` rhs for the factor ``chol`` of :func:`_cholesky`, rhs (q, C, G)."""
    q = chol.shape[0]
    out = np.empty_like(rhs)
    for i in range(q - 1, -1, -1):
        acc = rhs[i].copy()
        for k in range(i + 1, q):
            acc -= chol[k, i] * out[k]
        out[i] = acc / chol[i, i]
    return out


def _draw_coefficients(
    rng: np.random.Generator,
    lay: _Layout,
    sigma2: np.ndarray,
    Sigma: np.ndarray,
    beta_prec: np.ndarray,
    beta_lin: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of the module docstring in the component-major layout: ``beta`` (C,p), ``b`` (q,C,G).

    With :math:`M_g = LL^\\top`, :math:`U = L^{-1}[Z^\\top X \\mid Z^\\top y]`
    gives :math:`X^\\top Z M^{-1} Z^\\top X = U_x^\\top U_x` (and so on), and
    :math:`b = L^{-\\top}(U_y - U_x\\beta + \\sigma z)` has mean
    :math:`M^{-1}Z^\\top(y - X\\beta)` and covariance :math:`\\sigma^2 M^{-1}`:
    one back-substitution gives the mean and the noise together.
    """
    q, c, g = lay.zty.shape
    s_inv = np.linalg.inv(Sigma)
    m = lay.ztz[:, :, None, :] + (sigma2 * s_inv.transpose(1, 2, 0))[..., None]  # (q,q,C,G)
    chol = _cholesky(m)
    ux = _solve_lower(chol[:, :, None], lay.ztx[:, :, None, :])  # (q,p,C,G)
    uy = _solve_lower(chol, lay.zty)  # (q,C,G)
    a = lay.xtx[None] - np.einsum("kpcg,krcg->cpr", ux, ux)
    r = lay.xty - np.einsum("kpcg,kcg->cp", ux, uy)
    s2 = sigma2[:, None]
    beta = _mvn_from_precision(rng, a / s2[..., None] + beta_prec, r / s2 + beta_lin)
    z = rng.standard_normal((c, g, q)).transpose(2, 0, 1)
    v = uy - np.einsum("kpcg,cp->kcg", ux, beta) + np.sqrt(sigma2)[:, None] * z
    return beta, _solve_upper(chol, v)


def draw_coefficients(
    rng: np.random.Generator,
    d: _Data,
    sigma2: np.ndarray,
    Sigma: np.ndarray,
    beta_prec: np.ndarray,
    beta_lin: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Joint draw of :math:`(\beta, b) \mid \sigma^2, \Sigma, y` (centred coordinates).

    ``sigma2`` (C,), ``Sigma`` (C,q,q); ``beta_prec`` (p,p) and ``beta_lin`` (p,)
    are the prior's precision and precision times mean (zeros for flat).
    Returns ``beta`` (C,p) and ``b`` (C,G,q). See the module docstring, step 1.
    """
    beta, b = _draw_coefficients(
        rng, _layout(d, sigma2.shape[0]), sigma2, Sigma, beta_prec, beta_lin
    )
    return beta, b.transpose(1, 2, 0)


def _zb(lay: _Layout, b: np.ndarray) -> np.ndarray:
    r""":math:`Z_g^\top Z_g b_g` (q,C,G)."""
    return np.einsum("klg,lcg->kcg", lay.ztz, b)


def _residual_ss(
    lay: _Layout, beta: np.ndarray, b: np.ndarray, t: np.ndarray, zb: np.ndarray
) -> np.ndarray:
    r""":math:`\|y - X\beta - Zb\|^2` from the cross-products (C,).

    ``t`` is :math:`Z_g^\top(y_g - X_g\beta)` and ``zb`` :math:`Z_g^\top Z_g b_g` (q,C,G).
    """
    rss = (
        lay.yty
        - 2.0 * np.einsum("cp,cp->c", beta, lay.xty)
        + np.einsum("cp,pr,cr->c", beta, lay.xtx, beta)
        + np.einsum("kcg,kcg->c", b, zb - 2.0 * t)
    )
    # rounding can leave a tiny negative value when the fit is exact
    return np.maximum(rss, 1e-300)


def _scale_move(
    rng: np.random.Generator,
    lay: _Layout,
    sigma2: np.ndarray,
    b: np.ndarray,
    t: np.ndarray,
    moved: np.ndarray,
    scale: np.ndarray,
    a: np.ndarray,
) -> np.ndarray:
    """The interweaving rescaling ``s`` (C,q) of the module docstring, step 4.

    ``moved`` (q,) bool marks the coefficients that move (others get s = 1);
    ``scale`` (q,) their :math:`A_k`, ``a`` (C,q) their auxiliaries.
    """
    q, c, _ = b.shape
    k = np.flatnonzero(moved)
    fixed = np.flatnonzero(~moved)
    ww = np.einsum("kcg,klg,lcg->ckl", b, lay.ztz, b)
    wr = np.einsum("kcg,kcg->ck", b, t)
    lin = wr[:, k] - ww[:, k][:, :, fixed].sum(axis=2)
    prec = ww[:, k][:, :, k] / sigma2[:, None, None]
    idx = np.arange(k.size)
    prec[:, idx, idx] += 2.0 / (scale[k] ** 2 * a[:, k])
    s = np.ones((c, q))
    s[:, k] = _mvn_from_precision(rng, prec, lin / sigma2[:, None])
    return s


def _shear_moves(
    rng: np.random.Generator,
    lay: _Layout,
    sigma2: np.ndarray,
    b: np.ndarray,
    t: np.ndarray,
    Sigma: np.ndarray,
    psi: np.ndarray,
    pairs: list[tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """The interweaving shear moves of the module docstring, step 5 (``b`` is (q,C,G)).

    ``psi`` (C,q,q) is each chain's inverse-Wishart scale (block diagonal: for a
    Huang-Wand block :math:`2\\nu\\,\\mathrm{diag}(1/a)`); ``pairs`` the ordered
    (j, k) within blocks. Returns the new ``b`` and ``Sigma``.
    """
    b, Sigma = b.copy(), Sigma.copy()
    for j, k in pairs:
        prec_cov = np.linalg.inv(Sigma)
        bj = b[j]
        zb_k = np.einsum("lg,lcg->cg", lay.ztz[k], b)
        prec = np.einsum("cg,g->c", bj * bj, lay.ztz[k, k]) / sigma2
        lin = np.einsum("cg,cg->c", bj, t[k] - zb_k) / sigma2
        prec = prec + psi[:, j, j] * prec_cov[:, k, k]
        lin = lin + np.einsum("cl,cl->c", psi[:, j, :], prec_cov[:, :, k])
        c = lin / prec + rng.standard_normal(prec.shape) / np.sqrt(prec)
        b[k] += c[:, None] * bj
        # Sigma -> A Sigma A', A = I + c e_k e_j': row k += c row j, then column k += c column j
        Sigma[:, k, :] += c[:, None] * Sigma[:, j, :]
        Sigma[:, :, k] += c[:, None] * Sigma[:, :, j]
    return b, 0.5 * (Sigma + np.swapaxes(Sigma, 1, 2))


def _log_marginal(
    lay: _Layout,
    n_obs: int,
    sigma2: np.ndarray,
    chol_s: np.ndarray,
    beta_prec: np.ndarray,
    beta_lin: np.ndarray,
) -> np.ndarray:
    r""":math:`\log p(y \mid \sigma^2, \Sigma)` up to a constant, :math:`(\beta, b)` integrated out.

    ``sigma2`` (M, C) and ``chol_s`` (q, q, M, C), the Cholesky factor :math:`L`
    of :math:`\Sigma` in the component-major layout: M points for each chain's
    data. With :math:`K_g = L^\top Z_g^\top Z_g L + \sigma^2 I = CC^\top` (well
    conditioned however close :math:`\Sigma` is to singular, unlike :math:`M_g`),
    :math:`\log|V_g| = (n_g - q)\log\sigma^2 + \log|K_g|`, and with
    :math:`U = C^{-1}L^\top[Z^\top X \mid Z^\top y]`,
    :math:`X^\top V^{-1}X = (X^\top X - \sum_g U_x^\top U_x)/\sigma^2` and so on. The
    normal (or flat) prior of :math:`\beta` is integrated with
    :math:`Q = X^\top V^{-1}X + P_0`, :math:`h = X^\top V^{-1}y + P_0m_0`:

    .. math::
        -\tfrac12\big[\log|V| + \log|Q| + y^\top V^{-1}y - h^\top Q^{-1}h\big].
    """
    q, _, g = lay.zty.shape
    p = lay.xtx.shape[0]
    lo = chol_s[..., None]  # (q,q,M,C,1): L is lower triangular, so sums start at the diagonal
    # K = L'(Z'Z)L + sigma^2 I and L'[Z'X | Z'y], entry by entry over (M, C, G)
    zl = [[sum(lay.ztz[k, m] * lo[m, j] for m in range(j, q)) for j in range(q)] for k in range(q)]
    k_mat = np.empty((q, q, *sigma2.shape, g))
    for i in range(q):
        for j in range(i + 1):
            k_mat[i, j] = sum(lo[m, i] * zl[m][j] for m in range(i, q))
            k_mat[j, i] = k_mat[i, j]
        k_mat[i, i] += sigma2[..., None]
    ltx = np.stack(
        [[sum(lo[m, i] * lay.ztx[m, r] for m in range(i, q)) for r in range(p)] for i in range(q)]
    )
    lty = np.stack([sum(lo[m, i] * lay.zty[m] for m in range(i, q)) for i in range(q)])
    chol = _cholesky(k_mat)  # (q,q,M,C,G)
    ux = _solve_lower(chol[:, :, None], ltx)
    uy = _solve_lower(chol, lty)
    logdet_k = 2.0 * np.log(np.einsum("kk...->k...", chol)).sum(axis=(0, -1))
    a = lay.xtx[..., None, None] - np.einsum("kpmcg,krmcg->prmc", ux, ux)
    r = lay.xty.T[:, None] - np.einsum("kpmcg,kmcg->pmc", ux, uy)
    # Q and h in the component-major layout (p,p,M,C), so that a point whose Q is not
    # numerically positive definite gives NaN (weight 0) instead of an exception
    cq = _cholesky(a / sigma2 + beta_prec[..., None, None])
    v = _solve_lower(cq, r / sigma2 + beta_lin[:, None, None])
    quad = (lay.yty - np.einsum("kmcg,kmcg->mc", uy, uy)) / sigma2 - np.einsum("imc,imc->mc", v, v)
    logdet_q = 2.0 * np.log(np.einsum("ii...->i...", cq)).sum(axis=0)
    return -0.5 * ((n_obs - g * q) * np.log(sigma2) + logdet_k + logdet_q + quad)


@dataclass(frozen=True)
class _Marginal:
    """Coordinates of the marginal move: ``x = (log sigma^2, log-Cholesky entries of Sigma)``.

    ``rows``/``cols`` index the lower-triangular entries of each block of Sigma's
    Cholesky factor; ``diag`` marks the diagonal ones (stored as logs) and
    ``jac`` their exponent in the Jacobian (below).
    """

    q: int
    rows: np.ndarray
    cols: np.ndarray
    diag: np.ndarray
    jac: np.ndarray

    @property
    def dim(self) -> int:
        return 1 + self.rows.size


def _marginal_coords(slices: list[slice], q: int) -> _Marginal:
    rows, cols, jac = [], [], []
    for sl in slices:
        k = sl.stop - sl.start
        for i in range(k):
            for j in range(i + 1):
                rows.append(sl.start + i)
                cols.append(sl.start + j)
                # |d Sigma / d L| = 2^k prod_i L_ii^(k - i), i = 0..k-1, times dL_ii/dl_i = L_ii
                jac.append(float(k - i + 1) if i == j else 0.0)
    rows_a, cols_a = np.asarray(rows), np.asarray(cols)
    return _Marginal(q, rows_a, cols_a, rows_a == cols_a, np.asarray(jac))


def _to_x(mc: _Marginal, sigma2: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    """Coordinates (..., dim) of ``sigma2`` (...) and block-diagonal ``Sigma`` (..., q, q)."""
    chol = np.linalg.cholesky(Sigma)
    ent = chol[..., mc.rows, mc.cols]
    ent = np.where(mc.diag, np.log(np.where(mc.diag, ent, 1.0)), ent)
    return np.concatenate([np.log(sigma2)[..., None], ent], axis=-1)


def _from_x(mc: _Marginal, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ent = np.where(mc.diag, np.exp(np.where(mc.diag, x[..., 1:], 0.0)), x[..., 1:])
    chol = np.zeros((*x.shape[:-1], mc.q, mc.q))
    chol[..., mc.rows, mc.cols] = ent
    return np.exp(x[..., 0]), chol @ np.swapaxes(chol, -1, -2)


def _log_prior_marginal(
    priors: LmmPriors,
    slices: list[slice],
    sigma2: np.ndarray,
    s_inv: np.ndarray,
    log_sd: np.ndarray,
) -> np.ndarray:
    r"""Log prior density of :math:`(\sigma^2, \Sigma)` with the auxiliaries integrated out.

    Half-Cauchy :math:`\sigma`: :math:`p(\sigma^2) \propto \sigma^{-1}(1 +
    \sigma^2/A^2)^{-1}`. Huang & Wand (2013, eq. 2): :math:`p(\Sigma) \propto
    |\Sigma|^{-(\nu + 2q)/2}\prod_k(\nu(\Sigma^{-1})_{kk} + 1/A_k^2)^{-(\nu+q)/2}`.
    Inverse-Wishart and inverse-gamma blocks: their densities. ``s_inv`` is
    :math:`\Sigma^{-1}`, ``log_sd`` (..., q) the logs of the diagonal of
    :math:`\Sigma`'s Cholesky factor (so a block's :math:`\log|\Sigma|` is twice their sum).
    """
    if isinstance(priors.sigma, HalfCauchySigma):
        out = -0.5 * np.log(sigma2) - np.log1p(sigma2 / priors.sigma.scale**2)
    else:
        out = -(priors.sigma.shape + 1.0) * np.log(sigma2) - priors.sigma.scale / sigma2
    for blk, sl in zip(priors.blocks, slices, strict=True):
        k = sl.stop - sl.start
        logdet = 2.0 * log_sd[..., sl].sum(axis=-1)
        inv = s_inv[..., sl, sl]
        if isinstance(blk, HuangWand):
            pdiag = np.diagonal(inv, axis1=-2, axis2=-1)
            out = out - 0.5 * (blk.nu + 2 * k) * logdet
            out = out - 0.5 * (blk.nu + k) * np.log(
                blk.nu * pdiag + 1.0 / np.asarray(blk.scale) ** 2
            ).sum(axis=-1)
        elif isinstance(blk, InvWishart):
            tr = np.einsum("ij,...ji->...", np.asarray(blk.psi), inv)
            out = out - 0.5 * (blk.df + k + 1) * logdet - 0.5 * tr
        else:
            out = out - (blk.shape + 1.0) * logdet - blk.scale * inv[..., 0, 0]
    return out


def _log_target_x(
    mc: _Marginal,
    priors: LmmPriors,
    slices: list[slice],
    lay: _Layout,
    n_obs: int,
    x: np.ndarray,
    beta_prec: np.ndarray,
    beta_lin: np.ndarray,
) -> np.ndarray:
    r"""Log marginal posterior density of the coordinates ``x`` (M, C, dim), Jacobian included.

    Points outside the region :math:`A` where it is computed reliably get
    :math:`-\infty`: a coordinate beyond :data:`_X_MAX` in absolute value (a
    variance outside :math:`e^{\pm 200}`), or
    :math:`\max_g \mathrm{tr}(\Sigma Z_g^\top Z_g)/\sigma^2 > ` :data:`_K_COND_MAX`.
    :func:`_marginal_move` leaves a chain outside :math:`A` where it is, so the
    move is exact for the whole posterior (restricted to :math:`A` it is a move
    invariant for the posterior restricted to :math:`A`, elsewhere the identity).
    """
    inside = np.all(np.abs(x) <= _X_MAX, axis=-1)
    x = np.where(inside[..., None], x, 0.0)
    ent = np.where(mc.diag, np.exp(np.where(mc.diag, x[..., 1:], 0.0)), x[..., 1:])
    chol = np.zeros((mc.q, mc.q, *x.shape[:-1]))
    chol[mc.rows, mc.cols] = np.moveaxis(ent, -1, 0)
    with np.errstate(over="ignore", invalid="ignore"):
        sig = np.einsum("ikmc,jkmc->ijmc", chol, chol)
        ratio = np.einsum("ijmc,jig->mcg", sig, lay.ztz).max(axis=-1) / np.exp(x[..., 0])
    inside &= ratio <= _K_COND_MAX
    chol_inv = _solve_lower(chol, np.eye(mc.q)[:, :, None, None])  # (q,q,M,C)
    s_inv = np.einsum("kimc,kjmc->mcij", chol_inv, chol_inv)
    log_sd = np.zeros((*x.shape[:-1], mc.q))
    log_sd[..., mc.rows[mc.diag]] = x[..., 1:][..., mc.diag]
    sigma2 = np.exp(x[..., 0])
    jac = x[..., 0] + np.einsum("...d,d->...", x[..., 1:], mc.jac)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out = (
            _log_marginal(lay, n_obs, sigma2, chol, beta_prec, beta_lin)
            + _log_prior_marginal(priors, slices, sigma2, s_inv, log_sd)
            + jac
        )
    return np.where(np.isfinite(out) & inside, out, -np.inf)


def _marginal_move(
    rng: np.random.Generator,
    mc: _Marginal,
    priors: LmmPriors,
    slices: list[slice],
    lay: _Layout,
    n_obs: int,
    sigma2: np.ndarray,
    Sigma: np.ndarray,
    loc: np.ndarray,
    chol: np.ndarray,
    beta_prec: np.ndarray,
    beta_lin: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Multiple-proposal independence update of :math:`(\sigma^2, \Sigma)` on their marginal.

    Tjelmeland (2004), as in :func:`hierpipe.models.gibbs_twolevel.multi_proposal_update`:
    :data:`_MP_M` points from a multivariate :math:`t_{\nu}` with location
    ``loc`` (C, dim) and scale factor ``chol`` (C, dim, dim), fitted to the
    chain's warm-up draws; the next state is one of the proposals or the
    current point with probability proportional to target over proposal
    density (a Gibbs step on the M + 1 points, so exact for any proposal).
    """
    c, dim = loc.shape
    x0 = _to_x(mc, sigma2, Sigma)
    z = rng.standard_normal((_MP_M, c, dim))
    w = np.sqrt(rng.chisquare(_MP_DF, size=(_MP_M, c)) / _MP_DF)
    xp = loc + np.einsum("cij,mcj->mci", chol, z) / w[..., None]
    x = np.concatenate([x0[None], xp])
    std = np.linalg.solve(chol, (x - loc).transpose(1, 2, 0)).transpose(2, 0, 1)
    log_q = -0.5 * (_MP_DF + dim) * np.log1p(np.einsum("mci,mci->mc", std, std) / _MP_DF)
    logw = _log_target_x(mc, priors, slices, lay, n_obs, x, beta_prec, beta_lin) - log_q
    with np.errstate(invalid="ignore"):  # NaN where every point has weight 0; such chains stay
        cw = np.cumsum(np.exp(logw - logw.max(axis=0)), axis=0)
    u = rng.uniform(size=c)
    idx = (cw < u * cw[-1]).sum(axis=0)
    # A chain outside the region of _log_target_x (weight 0 at its own point) stays.
    idx = np.where(np.isfinite(logw[0]), idx, 0)
    return _from_x(mc, x[idx, np.arange(c)])


def _fit_proposal(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Location (C, dim) and scale factor (C, dim, dim) of the t proposal from draws (W, C, dim).

    Mean and covariance of the draws, each SD floored at :data:`_MP_SD_FLOOR`.
    """
    loc = trace.mean(axis=0)
    dev = trace - loc
    cov = np.einsum("wci,wcj->cij", dev, dev) / max(trace.shape[0] - 1, 1)
    cov += np.eye(trace.shape[2]) * _MP_SD_FLOOR**2
    return loc, np.linalg.cholesky(cov)


def _adapt_points(warmup: int) -> set[int]:
    """Warm-up iterations after which the proposal is (re)fitted: 50, 100, 200, ... and the end."""
    points, it = set(), _MP_START
    while it < warmup:
        points.add(it)
        it *= 2
    if warmup >= _MP_START:
        points.add(warmup)
    return points


def _psi(priors: LmmPriors, slices: list[slice], a: np.ndarray) -> np.ndarray:
    """Each chain's block-diagonal inverse-Wishart scale (zero for 1-coefficient blocks)."""
    c, q = a.shape
    psi = np.zeros((c, q, q))
    for blk, sl in zip(priors.blocks, slices, strict=True):
        if isinstance(blk, HuangWand) and sl.stop - sl.start > 1:
            idx = np.arange(sl.start, sl.stop)
            psi[:, idx, idx] = 2.0 * blk.nu / a[:, sl]
        elif isinstance(blk, InvWishart):
            psi[:, sl, sl] = np.asarray(blk.psi)
    return psi


# --------------------------------------------------------------------------- the sampler


def _initial(
    rng: np.random.Generator, d: _Data, chains: int, priors: LmmPriors
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dispersed starts: sigma^2 and Sigma's diagonal at data scale times U(0.5, 2)."""
    q = d.shape[1]
    var_y = float(np.mean(d.yty)) / max(d.n_obs, 1)
    var_y = var_y if np.isfinite(var_y) and var_y > 0 else 1.0
    zz = np.einsum("gkk->k", d.ztz) / max(d.n_obs, 1)  # mean square of each z column
    zz = np.where(zz > 0, zz, 1.0)
    sigma2 = var_y * rng.uniform(0.5, 2.0, size=chains)
    diag = (var_y / zz) * rng.uniform(0.25, 1.0, size=(chains, q))
    Sigma = np.zeros((chains, q, q))
    Sigma[:, np.arange(q), np.arange(q)] = diag
    a = np.empty((chains, q))
    for blk, sl in zip(priors.blocks, block_slices(_sizes(priors)), strict=True):
        a[:, sl] = np.asarray(blk.scale) ** 2 if isinstance(blk, HuangWand) else 1.0
    lam = np.full(
        chains, priors.sigma.scale**2 if isinstance(priors.sigma, HalfCauchySigma) else 1.0
    )
    return sigma2, Sigma, a, lam


def _sizes(priors: LmmPriors) -> tuple[int, ...]:
    out = []
    for blk in priors.blocks:
        if isinstance(blk, HuangWand):
            out.append(len(blk.scale))
        elif isinstance(blk, InvWishart):
            out.append(len(blk.psi))
        else:
            out.append(1)
    return tuple(out)


def _validate(d: _Data, priors: LmmPriors, settings: LmmGibbsSettings) -> None:
    _, q, p = d.shape
    if sum(_sizes(priors)) != q:
        raise ConfigError(
            f"priors cover {sum(_sizes(priors))} varying coefficients, the model has {q}"
        )
    if isinstance(priors.beta, NormalBeta) and (
        len(priors.beta.mean) != p or len(priors.beta.sd) != p
    ):
        raise ConfigError(f"normal prior on beta needs {p} means and SDs")
    for blk in priors.blocks:
        if isinstance(blk, InvWishart):
            k = len(blk.psi)
            if blk.df <= k - 1:
                raise ConfigError(f"inv_wishart prior: df must exceed {k - 1}, got {blk.df}")
            if np.any(np.linalg.eigvalsh(np.asarray(blk.psi)) <= 0):
                raise ConfigError("inv_wishart prior: scale matrix must be positive definite")
        elif isinstance(blk, HuangWand):
            if blk.nu <= 0 or min(blk.scale) <= 0:
                raise ConfigError("huang_wand prior: nu and every scale must be > 0")
        elif blk.shape <= 0 or blk.scale <= 0:
            raise ConfigError("inv_gamma prior: shape and scale must be > 0")
    if settings.chains < 1 or settings.warmup < 0 or settings.draws < 1 or settings.thin < 1:
        raise ConfigError("gibbs settings: chains, draws, thin >= 1 and warmup >= 0")
    if d.n_obs <= p:
        raise InputError(f"{d.n_obs} observations cannot identify {p} fixed effects and sigma")


def sample_lmm(
    d: _Data,
    priors: LmmPriors,
    settings: LmmGibbsSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the sampler on prepared cross-products (centred coordinates).

    Returns ``beta`` (C,D,p), ``b`` (C,D,G,q), ``sigma`` (C,D), ``Sigma`` (C,D,q,q).
    """
    _validate(d, priors, settings)
    g, q, p = d.shape
    c = settings.chains
    if isinstance(priors.beta, NormalBeta):
        sd = np.asarray(priors.beta.sd, float)
        beta_prec = np.diag(1.0 / sd**2)
        beta_lin = np.asarray(priors.beta.mean, float) / sd**2
    else:
        beta_prec, beta_lin = np.zeros((p, p)), np.zeros(p)
    slices = block_slices(_sizes(priors))
    scale = np.ones(q)
    moved = np.zeros(q, bool)
    for blk, sl in zip(priors.blocks, slices, strict=True):
        if isinstance(blk, HuangWand):
            scale[sl] = blk.scale
            moved[sl] = settings.interweave
    pairs = []
    if settings.interweave:
        for sl in slices:
            idx = range(sl.start, sl.stop)
            pairs += [(j, k) for j in idx for k in idx if j != k]
    sigma2, Sigma, a, lam = _initial(rng, d, c, priors)
    lay = _layout(d, c)
    mc = _marginal_coords(slices, q)
    adapt = _adapt_points(settings.warmup) if settings.marginal else set()
    trace = np.empty((settings.warmup, c, mc.dim)) if adapt else None
    proposal = None
    n_keep = settings.draws
    out_beta = np.empty((c, n_keep, p))
    out_b = np.empty((c, n_keep, g, q))
    out_sigma = np.empty((c, n_keep))
    out_Sigma = np.empty((c, n_keep, q, q))
    total = settings.warmup + settings.draws * settings.thin
    if _resolve_backend(settings.backend) == "numba":
        outs = (out_beta, out_b, out_sigma, out_Sigma)
        state = (sigma2, Sigma, a, lam)
        _numba_loop(rng, d, priors, settings, slices, mc, adapt, state, outs, beta_prec, beta_lin)
        return out_beta, out_b, out_sigma, out_Sigma
    for it in range(total):
        if proposal is not None:
            sigma2, Sigma = _marginal_move(
                rng, mc, priors, slices, lay, d.n_obs, sigma2, Sigma, *proposal, beta_prec, beta_lin
            )
            a = _draw_aux(rng, priors, slices, Sigma, a)
            if isinstance(priors.sigma, HalfCauchySigma):
                lam = inv_gamma(rng, 1.0, 1.0 / priors.sigma.scale**2 + 1.0 / sigma2)
        beta, b = _draw_coefficients(rng, lay, sigma2, Sigma, beta_prec, beta_lin)
        t = lay.zty - np.einsum("kpg,cp->kcg", lay.ztx, beta)  # Z'(y - X beta)
        rss = _residual_ss(lay, beta, b, t, _zb(lay, b))
        if isinstance(priors.sigma, HalfCauchySigma):
            sigma2 = inv_gamma(rng, 0.5 * (d.n_obs + 1), 0.5 * rss + 1.0 / lam)
            lam = inv_gamma(rng, 1.0, 1.0 / priors.sigma.scale**2 + 1.0 / sigma2)
        else:
            sigma2 = inv_gamma(
                rng, priors.sigma.shape + 0.5 * d.n_obs, priors.sigma.scale + 0.5 * rss
            )
        Sigma, a = _draw_Sigma(rng, priors, slices, b, a, g)
        if moved.any():
            s = _scale_move(rng, lay, sigma2, b, t, moved, scale, a)
            b = b * s.T[:, :, None]
            Sigma = Sigma * s[:, :, None] * s[:, None, :]
            a = a / s**2
        if pairs:
            b, Sigma = _shear_moves(rng, lay, sigma2, b, t, Sigma, _psi(priors, slices, a), pairs)
        if trace is not None and it < settings.warmup:
            trace[it] = _to_x(mc, sigma2, Sigma)
            if it + 1 in adapt:
                proposal = _fit_proposal(trace[(it + 1) // 2 : it + 1])
        k, rem = divmod(it - settings.warmup, settings.thin)
        if it >= settings.warmup and rem == settings.thin - 1:
            out_beta[:, k], out_Sigma[:, k] = beta, Sigma
            out_b[:, k] = b.transpose(1, 2, 0)
            out_sigma[:, k] = np.sqrt(sigma2)
    return out_beta, out_b, out_sigma, out_Sigma


# --------------------------------------------------------------------------- numba back end


def numba_available() -> bool:
    """Whether the optional ``numba`` back end can be used."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    """``"numpy"`` or ``"numba"`` for a setting (``"auto"``: numba when installed)."""
    if backend == "auto":
        return "numba" if numba_available() else "numpy"
    if backend not in ("numpy", "numba"):
        raise ConfigError(f"gibbs_lmm: backend must be 'numpy', 'numba' or 'auto', got {backend!r}")
    if backend == "numba" and not numba_available():
        raise ConfigError(
            "gibbs_lmm: backend 'numba' needs the numba package (the 'fast' extra); "
            "install it or use backend 'numpy'"
        )
    return backend


@dataclass(frozen=True)
class _Plan:
    """The priors as the numba kernel's flat arrays (block type 0 Huang-Wand, 1 IW, 2 IG)."""

    sig_hc: bool
    sig_par: np.ndarray  # (A, shape, scale) of sigma's prior
    blk_start: np.ndarray
    blk_size: np.ndarray
    blk_type: np.ndarray
    blk_par: np.ndarray  # nu, df or shape
    blk_scale: np.ndarray  # an inverse-gamma block's scale
    inv_a2: np.ndarray  # (q,) 1 / A_k^2 of Huang-Wand coefficients
    psi_iw: np.ndarray  # (q,q) inverse-Wishart scales, block diagonal


def _plan(priors: LmmPriors, slices: list[slice], q: int) -> _Plan:
    n = len(slices)
    start, size = np.empty(n, np.int64), np.empty(n, np.int64)
    typ, par, bscale = np.empty(n, np.int64), np.zeros(n), np.zeros(n)
    inv_a2, psi = np.ones(q), np.zeros((q, q))
    for i, (blk, sl) in enumerate(zip(priors.blocks, slices, strict=True)):
        start[i], size[i] = sl.start, sl.stop - sl.start
        if isinstance(blk, HuangWand):
            typ[i], par[i] = 0, blk.nu
            inv_a2[sl] = 1.0 / np.asarray(blk.scale) ** 2
        elif isinstance(blk, InvWishart):
            typ[i], par[i] = 1, blk.df
            psi[sl, sl] = np.asarray(blk.psi)
        else:
            typ[i], par[i], bscale[i] = 2, blk.shape, blk.scale
    hc = isinstance(priors.sigma, HalfCauchySigma)
    sig_par = (
        np.array([priors.sigma.scale, 0.0, 0.0])
        if isinstance(priors.sigma, HalfCauchySigma)
        else np.array([1.0, priors.sigma.shape, priors.sigma.scale])
    )
    return _Plan(hc, sig_par, start, size, typ, par, bscale, inv_a2, psi)


def _numba_variates(
    rng: np.random.Generator,
    priors: LmmPriors,
    slices: list[slice],
    dims: tuple[int, int, int, int, int, int, int],
    marginal: bool,
    n_obs: int,
) -> tuple[np.ndarray, ...]:
    """One iteration's random numbers, drawn in exactly the numpy back end's order.

    ``dims`` is (C, G, q, p, dim of the marginal coordinates, number of moved
    coefficients, number of shear pairs). A block's draws go to its
    coefficients' positions; unused arrays are placeholders the kernel ignores.
    """
    c, g, q, p, dim, n_moved, n_pairs = dims
    hc = isinstance(priors.sigma, HalfCauchySigma)
    mz, mchi, mu = np.zeros((0, c, dim)), np.zeros((0, c)), np.zeros(c)
    aux_gam, lam_gam = np.ones((c, q)), np.ones(c)
    if marginal:
        mz = rng.standard_normal((_MP_M, c, dim))
        mchi = rng.chisquare(_MP_DF, size=(_MP_M, c))
        mu = rng.random(c)  # the same doubles as the numpy back end's uniform(size=c), faster
        for blk, sl in zip(priors.blocks, slices, strict=True):
            if isinstance(blk, HuangWand):
                k = sl.stop - sl.start
                aux_gam[:, sl] = rng.standard_gamma(0.5 * (blk.nu + k), size=(c, k))
        if hc:
            lam_gam = rng.standard_gamma(1.0, size=(c,))
    zbeta = rng.standard_normal((c, p))
    zb = rng.standard_normal((c, g, q))
    sig_gam = np.empty((c, 2))
    if hc:
        sig_gam[:, 0] = rng.standard_gamma(0.5 * (n_obs + 1), size=(c,))
        sig_gam[:, 1] = rng.standard_gamma(1.0, size=(c,))
    else:
        sig_gam[:, 0] = rng.standard_gamma(priors.sigma.shape + 0.5 * n_obs, size=(c,))
    sig_nrm = np.zeros((c, q, q))
    sig_chi = np.ones((c, q))
    blk_gam = np.ones((c, q))
    for blk, sl in zip(priors.blocks, slices, strict=True):
        k = sl.stop - sl.start
        idx = np.arange(k)
        if isinstance(blk, HuangWand):
            sig_nrm[:, sl, sl] = rng.standard_normal((c, k, k))
            sig_chi[:, sl] = rng.chisquare(blk.nu + k - 1 + g - idx, size=(c, k))
            blk_gam[:, sl] = rng.standard_gamma(0.5 * (blk.nu + k), size=(c, k))
        elif isinstance(blk, InvWishart):
            sig_nrm[:, sl, sl] = rng.standard_normal((c, k, k))
            sig_chi[:, sl] = rng.chisquare(blk.df + g - idx, size=(c, k))
        else:
            blk_gam[:, sl.start] = rng.standard_gamma(blk.shape + 0.5 * g, size=(c,))
    zs = rng.standard_normal((c, n_moved)) if n_moved else np.zeros((c, 0))
    zshear = np.empty((n_pairs, c))
    for i in range(n_pairs):
        zshear[i] = rng.standard_normal((c,))
    return (
        mz,
        mchi,
        mu,
        aux_gam,
        lam_gam,
        zbeta,
        zb,
        sig_gam,
        sig_nrm,
        sig_chi,
        blk_gam,
        zs,
        zshear,
    )


def _numba_loop(
    rng: np.random.Generator,
    d: _Data,
    priors: LmmPriors,
    settings: LmmGibbsSettings,
    slices: list[slice],
    mc: _Marginal,
    adapt: set[int],
    state: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    outs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    beta_prec: np.ndarray,
    beta_lin: np.ndarray,
) -> None:
    """:func:`sample_lmm`'s loop on the compiled kernel; fills ``outs`` in place."""
    from hierpipe.models.gibbs_lmm_numba import iterate

    g, q, p = d.shape
    c = settings.chains
    plan = _plan(priors, slices, q)
    scale = np.ones(q)
    moved = np.zeros(q, bool)
    for blk, sl in zip(priors.blocks, slices, strict=True):
        if isinstance(blk, HuangWand):
            scale[sl] = blk.scale
            moved[sl] = settings.interweave
    pairs_l = []
    if settings.interweave:
        for sl in slices:
            idx = range(sl.start, sl.stop)
            pairs_l += [(j, k) for j in idx for k in idx if j != k]
    pairs = np.asarray(pairs_l, np.int64).reshape(-1, 2)
    # writable C-ordered copies: numba compiles a separate kernel for read-only arrays
    ztz, ztx, xtx = (np.array(v, dtype=float, order="C") for v in (d.ztz, d.ztx, d.xtx))
    zty = np.array(np.broadcast_to(d.zty, (c, g, q)), dtype=float, order="C")
    xty = np.array(np.broadcast_to(d.xty, (c, p)), dtype=float, order="C")
    yty = np.array(np.broadcast_to(d.yty, (c,)), dtype=float)
    beta_prec, beta_lin = np.array(beta_prec, dtype=float), np.array(beta_lin, dtype=float)
    # the marginal move's per-group loops run on the component-major layout (group last)
    ztz_cm = np.ascontiguousarray(ztz.transpose(1, 2, 0))
    ztx_cm = np.ascontiguousarray(ztx.transpose(1, 2, 0))
    zty_cm = np.ascontiguousarray(zty.transpose(0, 2, 1))
    sigma2, Sigma, a, lam = (np.array(v, dtype=float) for v in state)
    beta, b = np.zeros((c, p)), np.zeros((c, g, q))
    out_beta, out_b, out_sigma, out_Sigma = outs
    trace = np.empty((settings.warmup, c, mc.dim)) if adapt else None
    no_trace = np.empty((c, mc.dim))
    proposal = None
    dims = (c, g, q, p, mc.dim, int(moved.sum()), len(pairs))
    rows, cols = mc.rows.astype(np.int64), mc.cols.astype(np.int64)
    no_proposal = (np.zeros((c, mc.dim)), np.zeros((c, mc.dim, mc.dim)))
    for it in range(settings.warmup + settings.draws * settings.thin):
        marginal = proposal is not None
        var = _numba_variates(rng, priors, slices, dims, marginal, d.n_obs)
        do_trace = trace is not None and it < settings.warmup
        iterate(
            ztz, ztx, zty, ztz_cm, ztx_cm, zty_cm, xtx, xty, yty, float(d.n_obs),
            beta_prec, beta_lin,
            plan.sig_hc, plan.sig_par, plan.blk_start, plan.blk_size, plan.blk_type,
            plan.blk_par, plan.blk_scale, plan.inv_a2, plan.psi_iw,
            scale, moved, pairs, rows, cols, mc.diag, mc.jac, _MP_DF, _X_MAX, _K_COND_MAX,
            sigma2, Sigma, a, lam, beta, b,
            marginal, *(proposal if marginal else no_proposal), *var,
            do_trace, trace[it] if do_trace and trace is not None else no_trace,
        )  # fmt: skip
        if do_trace and it + 1 in adapt:
            proposal = _fit_proposal(trace[(it + 1) // 2 : it + 1])
        k, rem = divmod(it - settings.warmup, settings.thin)
        if it >= settings.warmup and rem == settings.thin - 1:
            out_beta[:, k], out_Sigma[:, k] = beta, Sigma
            out_b[:, k] = b
            out_sigma[:, k] = np.sqrt(sigma2)


def _draw_aux(
    rng: np.random.Generator,
    priors: LmmPriors,
    slices: list[slice],
    Sigma: np.ndarray,
    a: np.ndarray,
) -> np.ndarray:
    """The Huang-Wand auxiliaries given Sigma (step 3's second half)."""
    a = a.copy()
    for blk, sl in zip(priors.blocks, slices, strict=True):
        if isinstance(blk, HuangWand):
            k = sl.stop - sl.start
            prec_diag = np.diagonal(np.linalg.inv(Sigma[:, sl, sl]), axis1=1, axis2=2)
            a[:, sl] = inv_gamma(
                rng, 0.5 * (blk.nu + k), blk.nu * prec_diag + 1.0 / np.asarray(blk.scale) ** 2
            )
    return a


def _draw_Sigma(
    rng: np.random.Generator,
    priors: LmmPriors,
    slices: list[slice],
    b: np.ndarray,
    a: np.ndarray,
    g: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: each block of Sigma given ``b`` (q,C,G) (and the Huang-Wand auxiliaries a)."""
    q, c, _ = b.shape
    Sigma = np.zeros((c, q, q))
    a = a.copy()
    for blk, sl in zip(priors.blocks, slices, strict=True):
        bb = b[sl]
        ss = np.einsum("kcg,lcg->ckl", bb, bb)
        k = ss.shape[1]
        if isinstance(blk, HuangWand):
            nu = blk.nu
            psi = ss.copy()
            idx = np.arange(k)
            psi[:, idx, idx] += 2.0 * nu / a[:, sl]
            block = inv_wishart(rng, nu + k - 1 + g, psi)
            prec_diag = np.diagonal(np.linalg.inv(block), axis1=1, axis2=2)
            a[:, sl] = inv_gamma(
                rng, 0.5 * (nu + k), nu * prec_diag + 1.0 / np.asarray(blk.scale) ** 2
            )
        elif isinstance(blk, InvWishart):
            block = inv_wishart(rng, blk.df + g, ss + np.asarray(blk.psi)[None])
        else:
            block = inv_gamma(rng, blk.shape + 0.5 * g, blk.scale + 0.5 * ss[:, 0, 0])[
                :, None, None
            ]
        Sigma[:, sl, sl] = block
    return Sigma, a


def gibbs_lmm_stats(
    stats: LmmStats,
    priors: LmmPriors,
    settings: LmmGibbsSettings,
    rng: np.random.Generator,
) -> LmmDraws:
    """Sample the posterior of the LMM whose cross-products are ``stats``.

    ``beta`` is returned for the caller's (uncentred) X.
    """
    if len(stats.terms) != 1:
        raise InputError("gibbs_lmm fits one grouping factor")
    # record the back end that ran ("auto" resolved), so fit.json says how draws were computed
    settings = replace(settings, backend=_resolve_backend(settings.backend))
    beta_c, b, sigma, Sigma = sample_lmm(_data(stats), priors, settings, rng)
    beta = beta_c.copy()
    if stats.intercept is not None:
        beta[..., stats.intercept] += stats.y_center - beta_c @ stats.x_center
    return LmmDraws(beta=beta, b=b, sigma=sigma, Sigma=Sigma, settings=settings, priors=priors)


# --------------------------------------------------------------------------- config


def default_priors(data: LmmData) -> dict[str, Any]:
    """Weakly informative priors scaled to the data (stated in fit.json and the report).

    ``sigma``: half-Cauchy with scale the outcome's SD :math:`s_y`. Each varying
    coefficient :math:`k`: half-Cauchy (one-coefficient block) or Huang-Wand
    :math:`\\nu = 2` half-t SDs (larger blocks) with scale :math:`s_y / s_{z_k}`
    (:math:`s_{z_k}` the SD of the column, or its root mean square when it is
    constant, e.g. 1 for the intercept): an SD of the slope's size that moves
    the outcome by its own spread. Fixed effects: flat.
    """
    y = data.y
    sy = float(np.std(y, ddof=1)) if y.size > 1 else 1.0
    sy = sy if np.isfinite(sy) and sy > 0 else 1.0
    zs = []
    for k in range(data.Z.shape[1]):
        col = data.Z[:, k]
        s = float(np.std(col))
        s = s if s > 1e-12 * (1 + float(np.max(np.abs(col)))) else float(np.sqrt(np.mean(col**2)))
        zs.append(s if s > 0 else 1.0)
    scales = [sy / s for s in zs]
    blocks = []
    for sl in block_slices(data.block_sizes):
        sc = scales[sl]
        if len(sc) == 1:
            blocks.append({"family": "half_cauchy", "scale": sc[0]})
        else:
            blocks.append({"family": "huang_wand", "nu": 2.0, "scale": sc})
    return {"b": {"family": "flat"}, "sd": blocks, "sigma": {"family": "half_cauchy", "scale": sy}}


def resolve_priors(data: LmmData, given: dict[str, Any] | None) -> dict[str, Any]:
    """Config priors over the defaults.

    Keys: ``b`` (``{family: flat}`` or ``{family: normal, location, scale}``,
    one for all fixed effects), ``sigma`` (``half_cauchy`` with ``scale`` or
    ``inv_gamma`` with ``shape``, ``scale`` on the variance), ``sd`` (one entry
    for every block, or a list of one per block: ``half_cauchy`` /
    ``inv_gamma`` for one-coefficient blocks, ``huang_wand`` (``nu``, ``scale``)
    / ``inv_wishart`` (``df``, ``scale`` a number times the identity or a
    matrix) for larger ones). A family given without a scale keeps the
    data-scaled default scale.
    """
    out = default_priors(data)
    given = dict(given or {})
    if "b_Intercept" in given:
        # The config schema names the fixed-effect prior as the two-level model does.
        given["b"] = given.pop("b_Intercept")
    unknown = set(given) - {"b", "sd", "sigma"}
    if unknown:
        raise ConfigError(f"gibbs priors: unknown key(s) {sorted(unknown)} (use b, sd, sigma)")
    for key in ("b", "sigma"):
        if key in given:
            spec = dict(given[key])
            if "scale" not in spec and "scale" in out[key] and spec.get("family") == "half_cauchy":
                spec["scale"] = out[key]["scale"]
            out[key] = spec
    if "sd" in given:
        sd = given["sd"]
        specs = list(sd) if isinstance(sd, list) else [sd] * len(out["sd"])
        if len(specs) != len(out["sd"]):
            raise ConfigError(
                f"gibbs priors: sd has {len(specs)} entries for {len(out['sd'])} blocks"
            )
        merged = []
        for spec, default in zip(specs, out["sd"], strict=True):
            spec = dict(spec)
            if spec.get("family") in ("half_cauchy", "huang_wand") and "scale" not in spec:
                spec["scale"] = default["scale"]
            merged.append(spec)
        out["sd"] = merged
    return out


def priors_from_config(spec: dict[str, Any], data: LmmData) -> LmmPriors:
    """Prior objects from resolved config dictionaries."""
    p = len(data.fixed_names)
    bspec = spec["b"]
    if bspec.get("family") == "flat":
        beta: FlatBeta | NormalBeta = FlatBeta()
    elif bspec.get("family") == "normal":
        if "scale" not in bspec:
            raise ConfigError("gibbs prior 'b': normal needs a scale (its SD)")
        beta = NormalBeta(
            mean=(float(bspec.get("location", 0.0)),) * p, sd=(float(bspec["scale"]),) * p
        )
    else:
        raise ConfigError(f"gibbs prior 'b': family {bspec.get('family')!r} must be flat or normal")
    blocks: list[BlockPrior] = []
    for k, (bs, size) in enumerate(zip(spec["sd"], data.block_sizes, strict=True)):
        fam = bs.get("family")
        if size == 1 and fam == "half_cauchy":
            sc = bs["scale"]
            blocks.append(HuangWand(scale=(float(np.ravel(sc)[0]),), nu=1.0))
        elif size == 1 and fam == "inv_gamma":
            blocks.append(InvGamma(shape=float(bs["shape"]), scale=float(bs["scale"])))
        elif size > 1 and fam == "huang_wand":
            sc = np.broadcast_to(np.asarray(bs["scale"], float), (size,))
            blocks.append(HuangWand(scale=tuple(float(v) for v in sc), nu=float(bs.get("nu", 2.0))))
        elif size > 1 and fam == "inv_wishart":
            psi = np.asarray(bs["scale"], float)
            psi = psi * np.eye(size) if psi.ndim == 0 else psi
            if psi.shape != (size, size):
                raise ConfigError(f"gibbs prior sd[{k}]: inv_wishart scale must be {size}x{size}")
            blocks.append(
                InvWishart(df=float(bs.get("df", size + 1)), psi=tuple(map(tuple, psi.tolist())))
            )
        else:
            allowed = "half_cauchy or inv_gamma" if size == 1 else "huang_wand or inv_wishart"
            raise ConfigError(
                f"gibbs prior sd[{k}] (block of {size}): family {fam!r} is not available; "
                f"use {allowed}"
            )
    sspec = spec["sigma"]
    if sspec.get("family") == "half_cauchy":
        sigma: HalfCauchySigma | InvGamma = HalfCauchySigma(scale=float(sspec["scale"]))
    elif sspec.get("family") == "inv_gamma":
        sigma = InvGamma(shape=float(sspec["shape"]), scale=float(sspec["scale"]))
    else:
        raise ConfigError(
            f"gibbs prior 'sigma': family {sspec.get('family')!r} must be half_cauchy or inv_gamma"
        )
    return LmmPriors(beta=beta, blocks=tuple(blocks), sigma=sigma)


def settings_from_config(settings: dict[str, Any]) -> LmmGibbsSettings:
    """Sampler settings from the study's ``gibbs`` block."""
    vals: dict[str, Any] = {}
    for key, default, low in (
        ("chains", 4, 1),
        ("warmup", 1000, 0),
        ("draws", 1000, 10),
        ("thin", 1, 1),
    ):
        v = settings.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
            raise ConfigError(f"gibbs setting '{key}' must be an integer >= {low}, got {v!r}")
        vals[key] = int(v)
    inter = settings.get("interweave", True)
    if not isinstance(inter, bool):
        raise ConfigError(f"gibbs setting 'interweave' must be true or false, got {inter!r}")
    backend = settings.get("backend", "numpy")
    if backend not in ("numpy", "numba"):
        raise ConfigError(f"gibbs setting 'backend' must be numpy or numba, got {backend!r}")
    return LmmGibbsSettings(interweave=inter, backend=backend, **vals)


# --------------------------------------------------------------------------- outputs


def parameter_arrays(
    draws: LmmDraws,
    group: str,
    fixed_names: tuple[str, ...],
    coef_names: tuple[str, ...],
    block_sizes: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """Population-level draws with brms names: b_*, sd_g__*, cor_g__*__*, sigma."""
    arrays = {f"b_{n}": draws.beta[..., k] for k, n in enumerate(fixed_names)}
    sd = np.sqrt(np.diagonal(draws.Sigma, axis1=2, axis2=3))
    for k, n in enumerate(coef_names):
        arrays[f"sd_{group}__{n}"] = sd[..., k]
    for sl in block_slices(block_sizes):
        for j in range(sl.start, sl.stop):
            for k in range(j + 1, sl.stop):
                cor = draws.Sigma[..., j, k] / (sd[..., j] * sd[..., k])
                arrays[f"cor_{group}__{coef_names[j]}__{coef_names[k]}"] = cor
    arrays["sigma"] = draws.sigma
    return arrays


def group_arrays(
    draws: LmmDraws,
    group: str,
    labels: tuple[str, ...],
    fixed_names: tuple[str, ...],
    coef_names: tuple[str, ...],
    groups: np.ndarray,
) -> dict[str, np.ndarray]:
    """``r_g[level,z]`` then ``coef_g[level,z]`` draws of the groups ``groups``.

    ``coef`` adds the fixed effect of the same name when there is one (a
    varying coefficient without a fixed counterpart has population mean 0).
    """
    r, coef = {}, {}
    for k, n in enumerate(coef_names):
        fixed = draws.beta[..., fixed_names.index(n)] if n in fixed_names else 0.0
        for j in groups:
            r[f"r_{group}[{labels[j]},{n}]"] = draws.b[:, :, j, k]
            coef[f"coef_{group}[{labels[j]},{n}]"] = draws.b[:, :, j, k] + fixed
    return {**r, **coef}


def draws_outputs(
    draws: LmmDraws,
    group: str,
    labels: tuple[str, ...],
    fixed_names: tuple[str, ...],
    coef_names: tuple[str, ...],
    block_sizes: tuple[int, ...],
    store_group_draws: Any = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Summary (every parameter, every group), draws table (population + stored groups)
    and the fit.json facts on which groups' draws are stored."""
    pop = parameter_arrays(draws, group, fixed_names, coef_names, block_sizes)
    n_groups = len(labels)
    parts = [summarise_draws(pop)]
    # r_ then coef_ rows, a block of groups at a time, so the summary's work arrays stay
    # bounded by the block rather than by (chains x draws x groups x coefficients)
    size = max(1, _BLOCK_VALUES // max(1, draws.sigma.size * len(coef_names)))
    blocks = [np.arange(a, min(a + size, n_groups)) for a in range(0, n_groups, size)]
    for prefix in ("r_", "coef_"):
        for idx in blocks:
            arrays = group_arrays(draws, group, labels, fixed_names, coef_names, idx)
            parts.append(summarise_draws({k: v for k, v in arrays.items() if k.startswith(prefix)}))
    summary = pd.concat(parts, ignore_index=True)
    keep = stored_groups(n_groups, store_group_draws)
    stored = {**pop, **group_arrays(draws, group, labels, fixed_names, coef_names, keep)}
    all_stored = len(keep) == n_groups
    facts = {
        "stored": "all" if all_stored else "sample",
        "groups": len(keep),
        "of": n_groups,
        "labels": None if all_stored else [labels[j] for j in keep],
    }
    return summary, draws_frame(stored), facts


def _draw_row(target: str, at: str, values: np.ndarray, kind: str) -> dict[str, Any]:
    q5, q50, q95 = np.quantile(values, [0.05, 0.5, 0.95])
    return {
        "target": target,
        "at": at,
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)),
        "q5": float(q5),
        "q50": float(q50),
        "q95": float(q95),
        "kind": kind,
    }


def posterior_predictions(
    data: LmmData, draws: LmmDraws, rng: np.random.Generator
) -> list[dict[str, Any]]:
    r"""Posterior predictive rows at the engine's prediction points.

    Existing groups (the engine's example groups, at the mean row):
    :math:`x^\top\beta + z^\top b_g` per draw, and a new observation adding
    :math:`N(0, \sigma^2)`. A new group (every point): :math:`b_{new} \sim
    N(0, \Sigma)` per draw, so the rows carry the uncertainty of
    :math:`\beta`, :math:`\Sigma` and :math:`\sigma`. Intervals are the draws'
    5% and 95% quantiles.
    """
    from hierpipe.models.engines.lmm import example_groups, prediction_points

    beta = draws.beta.reshape(-1, draws.beta.shape[-1])
    sig = draws.sigma.reshape(-1)
    big = draws.Sigma.reshape(-1, *draws.Sigma.shape[-2:])
    s = beta.shape[0]
    eps = rng.standard_normal((2, s))
    b_new = np.einsum("skl,sl->sk", _chol_psd(big), rng.standard_normal((s, big.shape[1])))
    rows = []
    kind_old = "existing group: posterior draws of x'beta + z'b_g"
    kind_new = "new group: posterior predictive draws, b_new ~ N(0, Sigma) per draw"
    for i, pt in enumerate(prediction_points(data)):
        if i == 0:
            for g in example_groups(data):
                lab = data.labels[g]
                m = beta @ pt.x + draws.b[:, :, g, :].reshape(s, -1) @ pt.z
                rows.append(_draw_row(f"fitted_mean[{lab}]", pt.at, m, kind_old))
                rows.append(
                    _draw_row(f"new_observation[{lab}]", pt.at, m + sig * eps[0], kind_old + " + e")
                )
        m = beta @ pt.x + b_new @ pt.z
        rows.append(_draw_row("new_group_mean", pt.at, m, kind_new))
        rows.append(
            _draw_row("new_observation_new_group", pt.at, m + sig * eps[1], kind_new + " + e")
        )
    return rows


def _chol_psd(m: np.ndarray) -> np.ndarray:
    """Factors F with F F' = m for a stack of PSD matrices (eigen, so a zero SD is fine)."""
    w, v = np.linalg.eigh(0.5 * (m + np.swapaxes(m, -1, -2)))
    return v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]


def gibbs_lmm(data: LmmData, settings: dict[str, Any], rng: np.random.Generator) -> FitResult:
    """The ``gibbs`` method of the ``lmm`` engine: sample, then brms-named outputs."""
    cfg = settings_from_config(settings)
    stored_groups(1, settings.get("store_group_draws"))  # fail before sampling
    prior_cfg = resolve_priors(data, settings.get("priors"))
    priors = priors_from_config(prior_cfg, data)
    draws = gibbs_lmm_stats(data.stats, priors, cfg, rng)
    summary, table, facts = draws_outputs(
        draws,
        data.group,
        data.labels,
        data.fixed_names,
        data.coef_names,
        data.block_sizes,
        settings.get("store_group_draws"),
    )
    info = {
        **draws.info(),
        "priors_config": prior_cfg,
        "group_draws": facts,
        "predictions": posterior_predictions(data, draws, rng),
        "warnings": [],
    }
    return FitResult(summary=summary, draws=table, info=info)


def gibbs_lmm_batch(
    n_obs: int,
    xtx: np.ndarray,
    ztz: np.ndarray,
    ztx: np.ndarray,
    xty: np.ndarray,
    zty: np.ndarray,
    yty: np.ndarray,
    priors: LmmPriors,
    settings: LmmGibbsSettings,
    rng: np.random.Generator,
) -> LmmDraws:
    r"""Sample many data sets on one design at once, one a chain, from cross-products.

    The model, priors and conditionals are those of the module docstring. The
    design parts are shared; the response parts carry a leading axis of length
    ``settings.chains`` (chain :math:`c` samples the posterior of data set
    :math:`c`), as simulation-based calibration (:mod:`hierpipe.sbc.slopes`)
    needs. Nothing is centred: :math:`\beta` is for the ``X`` given, so a
    normal prior on :math:`\beta` is a prior on these coefficients.

    Parameters
    ----------
    n_obs : number of observations :math:`N` (each data set).
    xtx : (p, p) :math:`X^\top X`.
    ztz : (G, q, q) :math:`Z_g^\top Z_g`.
    ztx : (G, q, p) :math:`Z_g^\top X_g`.
    xty : (C, p) :math:`X^\top y` per data set.
    zty : (C, G, q) :math:`Z_g^\top y_g` per data set.
    yty : (C,) :math:`y^\top y` per data set.
    priors, settings, rng : as :func:`gibbs_lmm_stats`.

    Returns
    -------
    LmmDraws
        Chain :math:`c`'s draws belong to data set :math:`c`.
    """
    from hierpipe.models.suffstats_lmm import TermStats

    c = settings.chains
    g, q, p = np.shape(ztx)
    if np.shape(zty) != (c, g, q) or np.shape(xty) != (c, p) or np.shape(yty) != (c,):
        raise InputError(
            f"gibbs_lmm_batch: response cross-products need a leading axis of {c} data sets: "
            f"zty {np.shape(zty)}, xty {np.shape(xty)}, yty {np.shape(yty)}"
        )
    term = TermStats(
        n=np.zeros(g, dtype=np.int64),  # not used by the sampler
        ztz=np.asarray(ztz, float),
        ztx=np.asarray(ztx, float),
        zty=np.asarray(zty, float),
    )
    stats = LmmStats(
        n_obs=int(n_obs),
        xtx=np.asarray(xtx, float),
        xty=np.asarray(xty, float),
        yty=np.asarray(yty, float),  # type: ignore[arg-type]  # one a data set
        terms=(term,),
        intercept=None,
        x_center=np.zeros(p),
        y_center=0.0,
    )
    return gibbs_lmm_stats(stats, priors, settings, rng)
