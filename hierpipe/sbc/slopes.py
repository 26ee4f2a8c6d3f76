r"""SBC cases of the correlated varying-coefficients sampler (:mod:`hierpipe.models.gibbs_lmm`).

Model ``y ~ 1 + x + (1 + x | g)``, with the proper priors SBC needs (the
sampler's default flat prior on the fixed effects cannot be drawn from):

.. math::

    \beta_0, \beta_1 \sim \mathcal N(0, 2^2), \quad
    b_g = (b_{g0}, b_{g1})^\top \sim \mathcal N_2(0, \Sigma), \quad
    y_{gi} \sim \mathcal N(\beta_0 + b_{g0} + (\beta_1 + b_{g1})\,x_{gi},\ \sigma^2),

with :math:`\Sigma` and :math:`\sigma` from the case's priors. :math:`G = 8`
groups of sizes 2, 3, 4, 6, 8, 12, 16, 24 (:math:`N = 75`); in group :math:`g`
:math:`x` takes :math:`n_g` evenly spaced values on :math:`[-1, 1]` shifted by
:math:`0.1\,g`, so intercepts and slopes are correlated a little in every
group and the smallest group has just enough data to fix a line. Each data set
is drawn row by row from the model, reduced to the cross-products
:math:`Z_g^\top Z_g, Z_g^\top X_g, X^\top X` (shared) and
:math:`Z_g^\top y_g, X^\top y, y^\top y` (one a data set), and sampled by
:func:`~hierpipe.models.gibbs_lmm.gibbs_lmm_batch`, one data set a chain.

Cases (both with the interweaving moves of the sampler on)
----------------------------------------------------------
``slopes_huang_wand``
    :math:`\Sigma` Huang & Wand (2013) with :math:`\nu = 2`, :math:`A = (1, 1)`:
    :math:`a_k \sim IG(1/2, 1/A_k^2)`,
    :math:`\Sigma \mid a \sim IW(\nu + 1, 2\nu\,\mathrm{diag}(1/a))`
    (half-:math:`t_2(0, 1)` SDs, uniform correlation); :math:`\sigma \sim C^+(0, 1)`.
``slopes_inv_wishart``
    :math:`\Sigma \sim IW(4, I_2)`; :math:`\sigma^2 \sim IG(3, 2)`.

Prior draws of :math:`\Sigma` do not use the sampler's inverse-Wishart
generator: :math:`\Sigma^{-1}` is drawn as a sum of ``df`` outer products of
:math:`\mathcal N(0, \Psi^{-1})` vectors (the Wishart's definition; ``df`` is
an integer here), so a fault in that generator cannot cancel out.

Ranked: ``b_Intercept``, ``b_x``, ``sd_g__Intercept``, ``sd_g__x``,
``cor_g__Intercept__x``, ``sigma``, and ``coef_g`` (intercept and slope) of
the smallest (``G1``, :math:`n = 2`) and the largest (``G8``, :math:`n = 24`)
group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hierpipe.models.gibbs_lmm import (
    HalfCauchySigma,
    HuangWand,
    InvGamma,
    InvWishart,
    LmmGibbsSettings,
    LmmPriors,
    NormalBeta,
    gibbs_lmm_batch,
)
from hierpipe.sbc.core import Replicates, SBCCase, SBCSettings, register

__all__ = ["LABELS", "SIZES", "design"]

SIZES = np.array([2, 3, 4, 6, 8, 12, 16, 24])
LABELS = tuple(f"G{j + 1}" for j in range(SIZES.size))
BETA_PRIOR = NormalBeta(mean=(0.0, 0.0), sd=(2.0, 2.0))
_FIRST, _LAST = LABELS[0], LABELS[-1]
NAMES = {
    "b0": "b_Intercept",
    "b1": "b_x",
    "sd0": "sd_g__Intercept",
    "sd1": "sd_g__x",
    "cor": "cor_g__Intercept__x",
    "sigma": "sigma",
    "coef0_first": f"coef_g[{_FIRST},Intercept]",
    "coef1_first": f"coef_g[{_FIRST},x]",
    "coef0_last": f"coef_g[{_LAST},Intercept]",
    "coef1_last": f"coef_g[{_LAST},x]",
}


def design() -> tuple[np.ndarray, np.ndarray]:
    """Group codes (N,) and the design ``[1, x]`` (N, 2), shared by X and Z."""
    codes = np.repeat(np.arange(SIZES.size), SIZES)
    x = np.concatenate([np.linspace(-1.0, 1.0, n) + 0.1 * g for g, n in enumerate(SIZES)])
    return codes, np.column_stack([np.ones_like(x), x])


def _wishart_inverse(rng: np.random.Generator, df: int, psi: np.ndarray) -> np.ndarray:
    r""":math:`IW(df, \Psi)` draws for a stack ``psi`` (R, q, q): the inverse of a sum of
    ``df`` outer products of :math:`N(0, \Psi^{-1})` vectors."""
    chol = np.linalg.cholesky(np.linalg.inv(psi))
    z = chol[:, None] @ rng.standard_normal((psi.shape[0], df, psi.shape[1], 1))
    return np.linalg.inv(np.einsum("rdki,rdli->rkl", z, z))


def _draw_priors(
    priors: LmmPriors, rng: np.random.Generator, reps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """beta (R, 2), Sigma (R, 2, 2) and sigma (R,) from the case's priors."""
    beta = np.asarray(BETA_PRIOR.mean) + np.asarray(BETA_PRIOR.sd) * rng.standard_normal((reps, 2))
    (block,) = priors.blocks
    if isinstance(block, HuangWand):
        scale = np.asarray(block.scale)
        a = (1.0 / scale**2) / rng.standard_gamma(0.5, size=(reps, 2))
        psi = np.zeros((reps, 2, 2))
        psi[:, [0, 1], [0, 1]] = 2.0 * block.nu / a
        Sigma = _wishart_inverse(rng, round(block.nu + 1), psi)
    else:
        assert isinstance(block, InvWishart)
        psi = np.broadcast_to(np.asarray(block.psi), (reps, 2, 2))
        Sigma = _wishart_inverse(rng, round(block.df), psi)
    if isinstance(priors.sigma, HalfCauchySigma):
        sigma = priors.sigma.scale * np.abs(rng.standard_cauchy(reps))
    else:
        sigma = np.sqrt(priors.sigma.scale / rng.standard_gamma(priors.sigma.shape, reps))
    return beta, Sigma, sigma


def _replicator(priors: LmmPriors) -> Callable[[np.random.Generator, int, SBCSettings], Replicates]:
    codes, X = design()
    G = SIZES.size
    # Shared design cross-products (X = Z = [1, x]).
    ztz = np.zeros((G, 2, 2))
    np.add.at(ztz, codes, X[:, :, None] * X[:, None, :])

    def replicate(rng: np.random.Generator, reps: int, settings: SBCSettings) -> Replicates:
        g_prior, g_data, g_fit = rng.spawn(3)
        beta, Sigma, sigma = _draw_priors(priors, g_prior, reps)
        b = (np.linalg.cholesky(Sigma)[:, None] @ g_data.standard_normal((reps, G, 2, 1)))[..., 0]
        coef = beta[:, None, :] + b  # (R, G, 2)
        mean = np.einsum("ni,rni->rn", X, coef[:, codes])
        y = mean + sigma[:, None] * g_data.standard_normal((reps, codes.size))
        zty = np.zeros((reps, G, 2))
        for k in range(2):
            for g in range(G):
                rows = codes == g
                zty[:, g, k] = y[:, rows] @ X[rows, k]
        fit = gibbs_lmm_batch(
            n_obs=codes.size,
            xtx=X.T @ X,
            ztz=ztz,
            ztx=ztz,
            xty=y @ X,
            zty=zty,
            yty=np.einsum("rn,rn->r", y, y),
            priors=priors,
            settings=LmmGibbsSettings(
                chains=reps, warmup=settings.warmup, draws=settings.draws, thin=settings.thin
            ),
            rng=g_fit,
        )
        sd = np.sqrt(np.diagonal(fit.Sigma, axis1=2, axis2=3))
        fcoef = fit.beta[:, :, None, :] + fit.b  # (R, D, G, 2)
        truth = {
            NAMES["b0"]: beta[:, 0],
            NAMES["b1"]: beta[:, 1],
            NAMES["sd0"]: np.sqrt(Sigma[:, 0, 0]),
            NAMES["sd1"]: np.sqrt(Sigma[:, 1, 1]),
            NAMES["cor"]: Sigma[:, 0, 1] / np.sqrt(Sigma[:, 0, 0] * Sigma[:, 1, 1]),
            NAMES["sigma"]: sigma,
            NAMES["coef0_first"]: coef[:, 0, 0],
            NAMES["coef1_first"]: coef[:, 0, 1],
            NAMES["coef0_last"]: coef[:, -1, 0],
            NAMES["coef1_last"]: coef[:, -1, 1],
        }
        draws = {
            NAMES["b0"]: fit.beta[:, :, 0],
            NAMES["b1"]: fit.beta[:, :, 1],
            NAMES["sd0"]: sd[:, :, 0],
            NAMES["sd1"]: sd[:, :, 1],
            NAMES["cor"]: fit.Sigma[:, :, 0, 1] / (sd[:, :, 0] * sd[:, :, 1]),
            NAMES["sigma"]: fit.sigma,
            NAMES["coef0_first"]: fcoef[:, :, 0, 0],
            NAMES["coef1_first"]: fcoef[:, :, 0, 1],
            NAMES["coef0_last"]: fcoef[:, :, -1, 0],
            NAMES["coef1_last"]: fcoef[:, :, -1, 1],
        }
        return Replicates(truth=truth, draws=draws)

    return replicate


_MODEL = (
    "y ~ 1 + x + (1 + x | g); b_Intercept, b_x ~ N(0, 2^2); "
    "G = 8 groups of sizes 2, 3, 4, 6, 8, 12, 16, 24"
)
for _name, _priors, _text in (
    (
        "slopes_huang_wand",
        LmmPriors(BETA_PRIOR, (HuangWand(scale=(1.0, 1.0), nu=2.0),), HalfCauchySigma(1.0)),
        "Sigma ~ Huang-Wand(nu = 2, A = 1, 1), sigma ~ half-Cauchy(0, 1)",
    ),
    (
        "slopes_inv_wishart",
        LmmPriors(BETA_PRIOR, (InvWishart(4.0, ((1.0, 0.0), (0.0, 1.0))),), InvGamma(3.0, 2.0)),
        "Sigma ~ inverse-Wishart(4, I), sigma^2 ~ inverse-gamma(3, 2)",
    ),
):
    register(
        SBCCase(
            name=_name,
            structure="lmm",
            description=f"{_MODEL}; {_text}; blocked Gibbs with interweaving moves",
            parameters=tuple(NAMES.values()),
            replicate=_replicator(_priors),
        )
    )
