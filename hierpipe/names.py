"""Kinds of parameter, told apart by their brms names (DESIGN.md).

Population-level parameters are the fixed effects ``b_*``, the group-level SDs
``sd_*`` and correlations ``cor_*``, the residual SD ``sigma`` and the derived
intraclass correlations ``icc_*``; per-group rows are ``r_*`` and ``coef_*``.
One definition, used by the diagnose stage and by the report.
"""

from __future__ import annotations

import re

POPULATION_PREFIXES = ("b_", "sd_", "cor_", "sigma", "icc_")
"""Name prefixes of population-level parameters, in the order the report lists them."""

_SAMPLED_HYPER = re.compile(r"^(b_|sd_|sigma$|cor_)")


def is_population(name: str) -> bool:
    """A population-level parameter (not a per-group ``r_``/``coef_`` row)."""
    return name.startswith(POPULATION_PREFIXES)


def is_hyperparameter(name: str) -> bool:
    """A population-level parameter a sampler draws, whose convergence is flagged.

    ``icc_*`` is left out: it is a function of the ``sd_*`` and ``sigma`` draws,
    so a flag on it would repeat theirs.
    """
    return _SAMPLED_HYPER.match(name) is not None
