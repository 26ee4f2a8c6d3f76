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
iteration costs :math:`O(G(q^3 + q^2p + qp^2) + p^3)` whatever :math:`N` is.
The sampler works in the centred coordinates of the statistics and maps
:math:`\beta` back with :meth:`LmmStats.beta_from_centred`.

The response statistics (``zty``, ``xty``, ``yty``) may carry a leading chain
axis: then chain :math:`c` samples the posterior of data set :math:`c` with the
shared design (simulation-based calibration runs many data sets at once).

References
----------
Huang, A. & Wand, M. P. (2013). Simple marginally noninformative prior
distributions for covariance matrices. *Bayesian Analysis* 8(2), 439-452.
Makalic, E. & Schmidt, D. F. (2016). A simple sampler for the horseshoe
estimator. *IEEE Signal Processing Letters* 23(1), 179-182.
Liu, J. S. & Sabatti, C. (2000). Generalised Gibbs sampler and multigrid Monte
Carlo for Bayesian computation. *Biometrika* 87(2), 353-369.
Yu, Y. & Meng, X.-L. (2011). To center or not to center: that is not the
question. *J. Comput. Graph. Statist.* 20(3), 531-570.
Gelman, A. (2006). Prior distributions for variance parameters in hierarchical
models. *Bayesian Analysis* 1(3), 515-534.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    every ``thin``-th after warm-up; ``interweave`` switches the scale move.
    """

    chains: int = 4
    warmup: int = 1000
    draws: int = 1000
    thin: int = 1
    interweave: bool = True

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
    g, q, p = d.shape
    c = sigma2.shape[0]
    s_inv = np.linalg.inv(Sigma)
    m = d.ztz[None] + (sigma2[:, None, None] * s_inv)[:, None]  # (C,G,q,q)
    chol = np.linalg.cholesky(m)
    zty = np.broadcast_to(d.zty, (c, g, q))
    rhs = np.concatenate([np.broadcast_to(d.ztx, (c, g, q, p)), zty[..., None]], axis=3)
    w = np.linalg.solve(m, rhs)  # M_g^{-1}[Z'X | Z'y]
    a = d.xtx[None] - np.einsum("gqp,cgqr->cpr", d.ztx, w[..., :p])
    r = np.broadcast_to(d.xty, (c, p)) - np.einsum("gqp,cgq->cp", d.ztx, w[..., p])
    s2 = sigma2[:, None]
    beta = _mvn_from_precision(rng, a / s2[..., None] + beta_prec, r / s2 + beta_lin)
    mean_b = w[..., p] - np.einsum("cgqp,cp->cgq", w[..., :p], beta)
    z = rng.standard_normal((c, g, q))
    noise = np.linalg.solve(np.swapaxes(chol, -1, -2), z[..., None])[..., 0]
    return beta, mean_b + np.sqrt(sigma2)[:, None, None] * noise


def residual_cross(d: _Data, beta: np.ndarray) -> np.ndarray:
    r""":math:`t_g = Z_g^\top(y_g - X_g\beta)` for every chain (C,G,q)."""
    return d.zty - np.einsum("gqp,cp->cgq", d.ztx, beta)


def residual_ss(d: _Data, beta: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    r""":math:`\|y - X\beta - Zb\|^2` from the cross-products (C,)."""
    xty = np.broadcast_to(d.xty, beta.shape)
    rss = (
        d.yty
        - 2.0 * np.einsum("cp,cp->c", beta, xty)
        + np.einsum("cp,pr,cr->c", beta, d.xtx, beta)
        - 2.0 * np.einsum("cgq,cgq->c", b, t)
        + np.einsum("cgk,gkl,cgl->c", b, d.ztz, b)
    )
    # rounding can leave a tiny negative value when the fit is exact
    return np.maximum(rss, 1e-300)


def scale_move(
    rng: np.random.Generator,
    d: _Data,
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
    c, _, q = b.shape
    k = np.flatnonzero(moved)
    fixed = np.flatnonzero(~moved)
    ww = np.einsum("cgk,gkl,cgl->ckl", b, d.ztz, b)
    wr = np.einsum("cgk,cgk->ck", b, t)
    lin = wr[:, k] - ww[:, k][:, :, fixed].sum(axis=2)
    prec = ww[:, k][:, :, k] / sigma2[:, None, None]
    idx = np.arange(k.size)
    prec[:, idx, idx] += 2.0 / (scale[k] ** 2 * a[:, k])
    s = np.ones((c, q))
    s[:, k] = _mvn_from_precision(rng, prec, lin / sigma2[:, None])
    return s


def shear_moves(
    rng: np.random.Generator,
    d: _Data,
    sigma2: np.ndarray,
    b: np.ndarray,
    t: np.ndarray,
    Sigma: np.ndarray,
    psi: np.ndarray,
    pairs: list[tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """The interweaving shear moves of the module docstring, step 5.

    ``psi`` (C,q,q) is each chain's inverse-Wishart scale (block diagonal: for a
    Huang-Wand block :math:`2\\nu\\,\\mathrm{diag}(1/a)`); ``pairs`` the ordered
    (j, k) within blocks. Returns the new ``b`` and ``Sigma``.
    """
    b, Sigma = b.copy(), Sigma.copy()
    for j, k in pairs:
        prec_cov = np.linalg.inv(Sigma)
        bj = b[:, :, j].copy()
        zb_k = np.einsum("gl,cgl->cg", d.ztz[:, k, :], b)
        prec = np.einsum("cg,g->c", bj**2, d.ztz[:, k, k]) / sigma2
        lin = np.einsum("cg,cg->c", bj, t[:, :, k] - zb_k) / sigma2
        prec = prec + psi[:, j, j] * prec_cov[:, k, k]
        lin = lin + np.einsum("cl,cl->c", psi[:, j, :], prec_cov[:, :, k])
        c = lin / prec + rng.standard_normal(prec.shape) / np.sqrt(prec)
        b[:, :, k] += c[:, None] * bj
        # Sigma -> A Sigma A', A = I + c e_k e_j': row k += c row j, then column k += c column j
        Sigma[:, k, :] += c[:, None] * Sigma[:, j, :]
        Sigma[:, :, k] += c[:, None] * Sigma[:, :, j]
    return b, 0.5 * (Sigma + np.swapaxes(Sigma, 1, 2))


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
    n_keep = settings.draws
    out_beta = np.empty((c, n_keep, p))
    out_b = np.empty((c, n_keep, g, q))
    out_sigma = np.empty((c, n_keep))
    out_Sigma = np.empty((c, n_keep, q, q))
    total = settings.warmup + settings.draws * settings.thin
    for it in range(total):
        beta, b = draw_coefficients(rng, d, sigma2, Sigma, beta_prec, beta_lin)
        t = residual_cross(d, beta)
        rss = residual_ss(d, beta, b, t)
        if isinstance(priors.sigma, HalfCauchySigma):
            sigma2 = inv_gamma(rng, 0.5 * (d.n_obs + 1), 0.5 * rss + 1.0 / lam)
            lam = inv_gamma(rng, 1.0, 1.0 / priors.sigma.scale**2 + 1.0 / sigma2)
        else:
            sigma2 = inv_gamma(
                rng, priors.sigma.shape + 0.5 * d.n_obs, priors.sigma.scale + 0.5 * rss
            )
        Sigma, a = _draw_Sigma(rng, priors, slices, b, a, g)
        if moved.any():
            s = scale_move(rng, d, sigma2, b, t, moved, scale, a)
            b = b * s[:, None, :]
            Sigma = Sigma * s[:, :, None] * s[:, None, :]
            a = a / s**2
        if pairs:
            t = residual_cross(d, beta)
            b, Sigma = shear_moves(rng, d, sigma2, b, t, Sigma, _psi(priors, slices, a), pairs)
        k, rem = divmod(it - settings.warmup, settings.thin)
        if it >= settings.warmup and rem == settings.thin - 1:
            out_beta[:, k], out_b[:, k], out_Sigma[:, k] = beta, b, Sigma
            out_sigma[:, k] = np.sqrt(sigma2)
    return out_beta, out_b, out_sigma, out_Sigma


def _draw_Sigma(
    rng: np.random.Generator,
    priors: LmmPriors,
    slices: list[slice],
    b: np.ndarray,
    a: np.ndarray,
    g: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: each block of Sigma given b (and the Huang-Wand auxiliaries a)."""
    c, _, q = b.shape
    Sigma = np.zeros((c, q, q))
    a = a.copy()
    for blk, sl in zip(priors.blocks, slices, strict=True):
        bb = b[:, :, sl]
        ss = np.einsum("cgk,cgl->ckl", bb, bb)
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
    return LmmGibbsSettings(interweave=inter, **vals)


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
