r"""SBC cases of the nested and crossed Gibbs samplers (:mod:`hierpipe.models.gibbs_multilevel`).

Model, varying intercepts on :math:`K = 2` grouping factors, with the proper
priors SBC needs (the sampler's default flat prior on ``b_Intercept`` cannot
be drawn from, so the cases use its normal option):

.. math::

    \beta_0 \sim \mathcal N(0, 2^2), \quad \sigma_1, \sigma_2, \sigma \sim C^+(0, 1),
    \quad b_{k,g} \sim \mathcal N(0, \sigma_k^2), \quad
    y_i \sim \mathcal N\big(\beta_0 + b_{1,g_1(i)} + b_{2,g_2(i)},\ \sigma^2\big).

Designs (small, so that a CI-sized run takes seconds; unequal group sizes, so
that weakly and strongly informed groups are calibrated at once):

nested, ``y ~ 1 + (1 | school/class)``
    4 schools of 3 classes each; class sizes 1, 2, 3 | 2, 4, 6 | 1, 3, 5 | 4, 8, 12
    (:math:`N = 51`); factors ``school`` and ``school:class``.
crossed, ``y ~ 1 + (1 | a) + (1 | b)``
    5 levels of ``a`` by 4 of ``b``, 16 of the 20 cells observed with 1 to 4
    observations each (:math:`N = 37`; the pattern is fixed in :data:`CROSSED_CELLS`).

Each data set is drawn row by row from the model and reduced to cell
statistics (:func:`~hierpipe.models.variance_components.cell_stats`, with one
data set a batch row); :func:`~hierpipe.models.gibbs_multilevel.gibbs_multilevel`
samples them, one data set a chain, with the default partially collapsed
scheme (random-walk Metropolis on the log-SDs, :math:`\beta` and the effects
drawn exactly given them).

Cases
-----
``nested_collapsed``, ``crossed_collapsed``
    the default scheme, 5 Metropolis steps an iteration. The ``"slice"``
    scheme has no case: with one chain a data set its stepping out waits for
    the slowest of hundreds of chains, about ten times the collapsed scheme's
    time at CI size (11 s against 1 s for 300 replications), too slow for CI.

Ranked: ``b_Intercept``, ``sd_<factor>__Intercept`` of both factors,
``sigma``, and ``r_<factor>[label,Intercept]`` of the smallest and the
largest group (by observations) of each factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hierpipe.models.gibbs_multilevel import MultilevelPriors, MultilevelSettings, gibbs_multilevel
from hierpipe.models.gibbs_twolevel import HalfCauchy, Normal
from hierpipe.models.variance_components import cell_stats, make_evaluator
from hierpipe.sbc.core import Replicates, SBCCase, SBCSettings, register

__all__ = ["CROSSED_CELLS", "NESTED_CLASS_SIZES", "PRIORS", "Design", "crossed", "nested"]

PRIORS = MultilevelPriors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=Normal(0.0, 2.0))
NESTED_CLASS_SIZES = ((1, 2, 3), (2, 4, 6), (1, 3, 5), (4, 8, 12))
# (level of a, level of b, observations): 16 of the 5 x 4 cells.
CROSSED_CELLS = (
    (0, 0, 1), (0, 1, 2), (0, 3, 1),
    (1, 0, 2), (1, 1, 1), (1, 2, 3),
    (2, 1, 2), (2, 2, 2), (2, 3, 4),
    (3, 0, 3), (3, 2, 1), (3, 3, 2),
    (4, 0, 4), (4, 1, 3), (4, 2, 4), (4, 3, 2),
)  # fmt: skip


@dataclass(frozen=True)
class Design:
    """Rows of a two-factor design: factor names, labels and each row's group codes (N, 2)."""

    factors: tuple[str, str]
    labels: tuple[tuple[str, ...], tuple[str, ...]]
    codes: np.ndarray

    def extremes(self, k: int) -> tuple[int, int]:
        """Codes of the smallest and the largest group of factor ``k`` (first on ties)."""
        sizes = np.bincount(self.codes[:, k], minlength=len(self.labels[k]))
        return int(np.argmin(sizes)), int(np.argmax(sizes))


def nested() -> Design:
    """The nested design: schools and their classes (:data:`NESTED_CLASS_SIZES`)."""
    rows, schools, classes = [], [], []
    for s, sizes in enumerate(NESTED_CLASS_SIZES):
        schools.append(f"S{s + 1}")
        for c, n in enumerate(sizes):
            rows += [(s, len(classes))] * n
            classes.append(f"S{s + 1}:C{c + 1}")
    return Design(("school", "school:class"), (tuple(schools), tuple(classes)), np.array(rows))


def crossed() -> Design:
    """The crossed design: factors ``a`` and ``b`` (:data:`CROSSED_CELLS`)."""
    rows = [(a, b) for a, b, n in CROSSED_CELLS for _ in range(n)]
    labels = (tuple(f"A{j + 1}" for j in range(5)), tuple(f"B{j + 1}" for j in range(4)))
    return Design(("a", "b"), labels, np.array(rows))


def _names(design: Design) -> dict[str, tuple[str, int | None, int | None]]:
    """brms name -> (kind, factor, group code) of every ranked parameter."""
    out: dict[str, tuple[str, int | None, int | None]] = {"b_Intercept": ("b", None, None)}
    for k, f in enumerate(design.factors):
        out[f"sd_{f}__Intercept"] = ("sd", k, None)
    out["sigma"] = ("sigma", None, None)
    for k, f in enumerate(design.factors):
        for g in design.extremes(k):
            out[f"r_{f}[{design.labels[k][g]},Intercept]"] = ("r", k, g)
    return out


def _draw_half_cauchy(prior: HalfCauchy, rng: np.random.Generator, size) -> np.ndarray:
    return prior.scale * np.abs(rng.standard_cauchy(size))


def _replicator(
    design: Design, scheme: str
) -> Callable[[np.random.Generator, int, SBCSettings], Replicates]:
    names = _names(design)
    codes = design.codes
    n_rows = codes.shape[0]
    groups = [len(lab) for lab in design.labels]

    def replicate(rng: np.random.Generator, reps: int, settings: SBCSettings) -> Replicates:
        g_prior, g_data, g_fit = rng.spawn(3)
        b0 = PRIORS.b_Intercept.mean + PRIORS.b_Intercept.sd * g_prior.standard_normal(reps)
        sd = _draw_half_cauchy(PRIORS.sd, g_prior, (reps, 2))
        sigma = _draw_half_cauchy(PRIORS.sigma, g_prior, reps)
        effects = [sd[:, k, None] * g_data.standard_normal((reps, groups[k])) for k in range(2)]
        mean = b0[:, None] + effects[0][:, codes[:, 0]] + effects[1][:, codes[:, 1]]
        y = mean + sigma[:, None] * g_data.standard_normal((reps, n_rows))
        stats = cell_stats(
            design.factors, design.labels, codes, np.ones((n_rows, 1)), y, ("Intercept",)
        )
        fit = gibbs_multilevel(
            make_evaluator(stats),
            PRIORS,
            MultilevelSettings(
                chains=reps,
                warmup=settings.warmup,
                draws=settings.draws,
                thin=settings.thin,
                scheme=scheme,  # type: ignore[arg-type]
            ),
            g_fit,
        )
        truth, draws = {}, {}
        for name, (kind, k, g) in names.items():
            if kind == "b":
                truth[name], draws[name] = b0, fit.beta[:, :, 0]
            elif kind == "sd":
                truth[name], draws[name] = sd[:, k], fit.sd[:, :, k]
            elif kind == "sigma":
                truth[name], draws[name] = sigma, fit.sigma
            else:
                truth[name], draws[name] = effects[k][:, g], fit.r[k][:, :, g]
        return Replicates(truth=truth, draws=draws)

    return replicate


_PRIOR_TEXT = "b_Intercept ~ N(0, 2^2), every sd and sigma ~ half-Cauchy(0, 1)"
_NESTED = "y ~ 1 + (1 | school/class); 4 schools x 3 classes of 1 to 12 (N = 51)"
_CROSSED = "y ~ 1 + (1 | a) + (1 | b); 5 x 4 levels, 16 cells of 1 to 4 (N = 37)"
_COLLAPSED = "partially collapsed Gibbs, random-walk Metropolis on the log-SDs"
for _name, _design, _scheme, _text in (
    ("nested_collapsed", nested(), "collapsed", f"{_NESTED}; {_PRIOR_TEXT}; {_COLLAPSED}"),
    ("crossed_collapsed", crossed(), "collapsed", f"{_CROSSED}; {_PRIOR_TEXT}; {_COLLAPSED}"),
):
    register(
        SBCCase(
            name=_name,
            structure="nested" if _design.factors[0] == "school" else "crossed",
            description=_text,
            parameters=tuple(_names(_design)),
            replicate=_replicator(_design, _scheme),
        )
    )
