r"""SBC cases of the known-SE meta-analysis Gibbs sampler (:mod:`hierpipe.models.gibbs_meta`).

Model, with the proper priors SBC needs (the sampler's default flat prior on
``b_Intercept`` cannot be drawn from, so the cases use its normal option):

.. math::

    \mu \sim \mathcal N(0, 2^2), \quad \tau \sim p(\tau), \quad
    \theta_j = \mu + \tau\eta_j,\ \eta_j \sim \mathcal N(0, 1), \quad
    y_j \sim \mathcal N(\theta_j, \mathrm{se}_j^2), \quad j = 1..k,

with the standard errors known and fixed by the design. :math:`k = 8` studies
with :math:`\mathrm{se}_j` = 0.25, 0.35, 0.5, 0.7, 1, 1.4, 2, 2.8 (a factor 11
between the most and the least precise study, so both studies that pin their
effect down and studies that are shrunk hard are calibrated). The replications
run as the chains of one vectorised call of
:func:`~hierpipe.models.gibbs_meta.gibbs_meta_batch`: chain :math:`c` samples
the posterior of data set :math:`c`.

Cases (all with the ASIS interweaving scheme)
---------------------------------------------
``meta_half_cauchy``
    :math:`\tau \sim C^+(0, 1)` (Gelman 2006).
``meta_half_normal``
    :math:`\tau \sim N^+(0, 1)`.
``meta_uniform``
    :math:`\tau \sim U(0, 3)`.

Ranked: ``b_Intercept``, ``sd_study__Intercept``, and ``coef_study``/``r_study``
of the most precise (``S1``) and the least precise (``S8``) study.

:func:`meta_replicator` also builds deliberately wrong samplers (standard
errors misstated to the sampler) for the test that shows SBC detects them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hierpipe.models.gibbs_meta import TauPrior, gibbs_meta_batch
from hierpipe.models.gibbs_twolevel import Normal
from hierpipe.sbc.core import Replicates, SBCCase, SBCSettings, register

__all__ = ["LABELS", "MU_PRIOR", "SE", "meta_replicator"]

SE = np.array([0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8])
LABELS = tuple(f"S{j + 1}" for j in range(SE.size))
MU_PRIOR = Normal(mean=0.0, sd=2.0)
_FIRST, _LAST = LABELS[0], LABELS[-1]
NAMES = {
    "mu": "b_Intercept",
    "tau": "sd_study__Intercept",
    "coef_first": f"coef_study[{_FIRST},Intercept]",
    "coef_last": f"coef_study[{_LAST},Intercept]",
    "r_first": f"r_study[{_FIRST},Intercept]",
    "r_last": f"r_study[{_LAST},Intercept]",
}


def _draw_tau(prior: TauPrior, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws of tau from its (proper) prior."""
    if prior.family == "half_cauchy":
        return prior.scale * np.abs(rng.standard_cauchy(size))
    if prior.family == "half_normal":
        return prior.scale * np.abs(rng.standard_normal(size))
    if prior.scale is None:
        raise ValueError("SBC needs a proper prior on tau: give the uniform prior a bound")
    return prior.scale * rng.random(size)


def meta_replicator(
    prior: TauPrior, scheme: str = "asis", *, assumed_se_factor: float = 1.0
) -> Callable[[np.random.Generator, int, SBCSettings], Replicates]:
    """The ``replicate`` function of a meta case.

    ``assumed_se_factor`` multiplies the standard errors the *sampler* is told
    (the data are always drawn with :data:`SE`); anything but 1 makes a wrong
    sampler, the negative control of the tests.
    """
    v_sampler = (assumed_se_factor * SE) ** 2

    def replicate(rng: np.random.Generator, reps: int, settings: SBCSettings) -> Replicates:
        g_prior, g_data, g_fit = rng.spawn(3)
        mu = MU_PRIOR.mean + MU_PRIOR.sd * g_prior.standard_normal(reps)
        tau = _draw_tau(prior, g_prior, reps)
        theta = mu[:, None] + tau[:, None] * g_data.standard_normal((reps, SE.size))
        y = theta + SE * g_data.standard_normal((reps, SE.size))
        fit = gibbs_meta_batch(
            y,
            v_sampler,
            prior=prior,
            mu_prior=MU_PRIOR,
            chains=reps,
            warmup=settings.warmup,
            draws=settings.draws,
            thin=settings.thin,
            rng=g_fit,
            scheme=scheme,
        )
        truth = {
            NAMES["mu"]: mu,
            NAMES["tau"]: tau,
            NAMES["coef_first"]: theta[:, 0],
            NAMES["coef_last"]: theta[:, -1],
            NAMES["r_first"]: theta[:, 0] - mu,
            NAMES["r_last"]: theta[:, -1] - mu,
        }
        r = fit.r
        draws = {
            NAMES["mu"]: fit.mu,
            NAMES["tau"]: fit.tau,
            NAMES["coef_first"]: fit.theta[:, :, 0],
            NAMES["coef_last"]: fit.theta[:, :, -1],
            NAMES["r_first"]: r[:, :, 0],
            NAMES["r_last"]: r[:, :, -1],
        }
        return Replicates(truth=truth, draws=draws)

    return replicate


_DESIGN = "k = 8 studies, se 0.25 to 2.8 (known)"
for _name, _prior, _text in (
    ("meta_half_cauchy", TauPrior("half_cauchy", 1.0), "half-Cauchy(0, 1)"),
    ("meta_half_normal", TauPrior("half_normal", 1.0), "half-normal(0, 1)"),
    ("meta_uniform", TauPrior("uniform", 3.0), "uniform(0, 3)"),
):
    register(
        SBCCase(
            name=_name,
            structure="meta",
            description=(
                f"y_j ~ N(theta_j, se_j^2), theta_j ~ N(b_Intercept, sd^2); "
                f"b_Intercept ~ N(0, 2^2), sd ~ {_text}; {_DESIGN}; ASIS interweaving Gibbs"
            ),
            parameters=tuple(NAMES.values()),
            replicate=meta_replicator(_prior),
        )
    )
