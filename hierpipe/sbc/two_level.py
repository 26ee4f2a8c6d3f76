r"""SBC cases of the two-level Gibbs sampler (:mod:`hierpipe.models.gibbs_twolevel`).

Model, with the proper priors SBC needs (a flat prior on ``b_Intercept`` cannot
be drawn from):

.. math::

    \mu \sim \mathcal N(0, 2^2), \quad \theta_j = \mu + r_j,\ r_j \sim \mathcal N(0, \tau^2),
    \quad \bar y_j \sim \mathcal N(\theta_j, \sigma^2/n_j),
    \quad SSW \sim \sigma^2 \chi^2_{N-J},

which is the exact distribution of the sufficient statistics of
:math:`y_{ij} \sim \mathcal N(\theta_j, \sigma^2)`, so data are drawn as the
sampler sees them. :math:`J = 8` groups of sizes 1, 2, 3, 5, 8, 12, 20 and 40,
so weakly and strongly informed groups (and a singleton) are calibrated at once.
The replications run as the chains of one vectorised sampler call: chain
:math:`c` samples the posterior of data set :math:`c`.

Cases
-----
``two_level_collapsed``
    :math:`\tau, \sigma \sim C^+(0, 1)`, the default collapsed scheme.
``two_level_asis``
    the same priors, the ASIS interweaving scheme.
``two_level_inv_gamma``
    :math:`\tau^2, \sigma^2 \sim \text{IG}(3, 2)` (on the variances), collapsed.
``two_level_known_sigma``
    :math:`\sigma = 1` known (the known-standard-error model,
    :math:`se_j = 1/\sqrt{n_j}`), :math:`\tau \sim C^+(0, 1)`, collapsed.

Ranked: ``b_Intercept``, ``sd_g__Intercept``, ``sigma`` (unless known),
``icc_g``, and ``coef_g``/``r_g`` of the smallest (``G1``, :math:`n=1`) and
the largest (``G8``, :math:`n=40`) group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hierpipe.models.gibbs_twolevel import (
    GibbsSettings,
    HalfCauchy,
    InvGamma,
    Normal,
    Priors,
    ScalePrior,
    gibbs_two_level_batch,
)
from hierpipe.sbc.core import Replicates, SBCCase, SBCSettings, register

SIZES = np.array([1, 2, 3, 5, 8, 12, 20, 40], dtype=np.float64)
LABELS = tuple(f"G{j + 1}" for j in range(SIZES.size))
MU_PRIOR = Normal(mean=0.0, sd=2.0)


def _draw_scale(prior: ScalePrior, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws of an SD from its prior: half-Cauchy on the SD, inverse gamma on the variance."""
    if isinstance(prior, HalfCauchy):
        return prior.scale * np.abs(rng.standard_cauchy(size))
    return np.sqrt(prior.scale / rng.gamma(prior.shape, 1.0, size))


def _names(group: str = "g") -> dict[str, str]:
    first, last = LABELS[0], LABELS[-1]
    return {
        "mu": "b_Intercept",
        "tau": f"sd_{group}__Intercept",
        "sigma": "sigma",
        "icc": f"icc_{group}",
        "coef_first": f"coef_{group}[{first},Intercept]",
        "coef_last": f"coef_{group}[{last},Intercept]",
        "r_first": f"r_{group}[{first},Intercept]",
        "r_last": f"r_{group}[{last},Intercept]",
    }


def _replicator(
    priors: Priors, scheme: str, sigma_fixed: float | None
) -> Callable[[np.random.Generator, int, SBCSettings], Replicates]:
    names = _names()

    def replicate(rng: np.random.Generator, reps: int, settings: SBCSettings) -> Replicates:
        g_prior, g_data, g_fit = rng.spawn(3)
        mu = MU_PRIOR.mean + MU_PRIOR.sd * g_prior.standard_normal(reps)
        tau = _draw_scale(priors.sd, g_prior, reps)
        if sigma_fixed is None:
            sigma = _draw_scale(priors.sigma, g_prior, reps)
        else:
            sigma = np.full(reps, sigma_fixed)
        J = SIZES.size
        theta = mu[:, None] + tau[:, None] * g_data.standard_normal((reps, J))
        ybar = theta + sigma[:, None] / np.sqrt(SIZES) * g_data.standard_normal((reps, J))
        ssw = sigma**2 * g_data.chisquare(SIZES.sum() - J, reps)
        sample = gibbs_two_level_batch(
            np.broadcast_to(SIZES, (reps, J)).copy(),
            ybar,
            ssw,
            priors,
            GibbsSettings(
                chains=reps,
                warmup=settings.warmup,
                draws=settings.draws,
                thin=settings.thin,
                scheme=scheme,  # type: ignore[arg-type]
                sigma_fixed=sigma_fixed,
            ),
            g_fit,
        )
        m, t, s = sample.b_Intercept, sample.sd, sample.sigma
        th = sample.theta
        truth = {
            names["mu"]: mu,
            names["tau"]: tau,
            names["sigma"]: sigma,
            names["icc"]: tau**2 / (tau**2 + sigma**2),
            names["coef_first"]: theta[:, 0],
            names["coef_last"]: theta[:, -1],
            names["r_first"]: theta[:, 0] - mu,
            names["r_last"]: theta[:, -1] - mu,
        }
        draws = {
            names["mu"]: m,
            names["tau"]: t,
            names["sigma"]: s,
            names["icc"]: t**2 / (t**2 + s**2),
            names["coef_first"]: th[:, :, 0],
            names["coef_last"]: th[:, :, -1],
            names["r_first"]: th[:, :, 0] - m,
            names["r_last"]: th[:, :, -1] - m,
        }
        return Replicates(truth=truth, draws=draws)

    return replicate


def _case(
    name: str, description: str, priors: Priors, scheme: str, sigma_fixed: float | None = None
) -> SBCCase:
    ranked = [v for k, v in _names().items() if not (sigma_fixed is not None and k == "sigma")]
    return register(
        SBCCase(
            name=name,
            structure="one_way",
            description=description,
            parameters=tuple(ranked),
            replicate=_replicator(priors, scheme, sigma_fixed),
        )
    )


_SIZES_TEXT = "J = 8 groups of sizes 1, 2, 3, 5, 8, 12, 20, 40"
_HC = Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=MU_PRIOR)

_case(
    "two_level_collapsed",
    f"y ~ 1 + (1 | g); b_Intercept ~ N(0, 2^2), sd, sigma ~ half-Cauchy(0, 1); {_SIZES_TEXT}; "
    "collapsed Gibbs (slice sampling of tau)",
    _HC,
    "collapsed",
)
_case(
    "two_level_asis",
    f"y ~ 1 + (1 | g); b_Intercept ~ N(0, 2^2), sd, sigma ~ half-Cauchy(0, 1); {_SIZES_TEXT}; "
    "ASIS interweaving Gibbs",
    _HC,
    "asis",
)
_case(
    "two_level_inv_gamma",
    f"y ~ 1 + (1 | g); b_Intercept ~ N(0, 2^2), sd^2, sigma^2 ~ inverse-gamma(3, 2); "
    f"{_SIZES_TEXT}; collapsed Gibbs",
    Priors(sd=InvGamma(3.0, 2.0), sigma=InvGamma(3.0, 2.0), b_Intercept=MU_PRIOR),
    "collapsed",
)
_case(
    "two_level_known_sigma",
    f"y ~ 1 + (1 | g) with sigma = 1 known (se_j = 1/sqrt(n_j)); b_Intercept ~ N(0, 2^2), "
    f"sd ~ half-Cauchy(0, 1); {_SIZES_TEXT}; collapsed Gibbs",
    Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=MU_PRIOR),
    "collapsed",
    sigma_fixed=1.0,
)
