"""From a table and a formula to a fit: the one entry point the CLI calls.

``load_model`` parses the formula, validates the data at the door and reduces
them to sufficient statistics; ``fit_table`` dispatches to the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.cv.logo import Predictive
from hierpipe.data.groups import GroupStats, group_stats
from hierpipe.design import build_design
from hierpipe.errors import ConfigError, InputError
from hierpipe.formula import parse_formula
from hierpipe.models import oneway
from hierpipe.models.result import FitResult
from hierpipe.models.structure import Structure, check_method, classify


@dataclass(frozen=True)
class ModelData:
    """A classified model and its data reduced to what the fits need."""

    structure: Structure
    stats: GroupStats
    design: Any


def load_model(df: pd.DataFrame, formula: str, source: str) -> ModelData:
    """Parse, classify, validate and reduce ``df`` for ``formula``."""
    parsed = parse_formula(formula)
    structure = classify(parsed)
    design = build_design(parsed, df, source=source)
    term = design.random[0]
    stats = group_stats(design.y, term.codes, term.labels)
    return ModelData(structure=structure, stats=stats, design=design)


def _gibbs_settings(settings: dict[str, Any]) -> tuple[int, int, int]:
    try:
        chains = int(settings.get("chains", 4))
        warmup = int(settings.get("warmup", 1000))
        draws = int(settings.get("draws", 1000))
    except (TypeError, ValueError):
        raise ConfigError("gibbs settings chains, warmup and draws must be integers") from None
    if chains < 1 or warmup < 0 or draws < 10:
        raise ConfigError("gibbs needs chains >= 1, warmup >= 0 and draws >= 10")
    return chains, warmup, draws


def run_gibbs(stats: GroupStats, settings: dict[str, Any], rng: np.random.Generator):
    """Run the two-level sampler; returns (draws, priors as resolved from config)."""
    from hierpipe.models.gibbs_fit import priors_from_config, resolve_priors
    from hierpipe.models.gibbs_twolevel import gibbs_two_level

    chains, warmup, draws = _gibbs_settings(settings)
    priors = resolve_priors(stats, settings.get("priors"))
    sample = gibbs_two_level(stats.n, stats.ybar, stats.ssw, chains=chains, warmup=warmup,
                             draws=draws, priors=priors_from_config(priors), rng=rng)
    return sample, priors


def eb_variances(stats: GroupStats, method: str) -> tuple[float, float, dict[str, Any]]:
    """Plug-in :math:`(\\tau^2, \\sigma^2)` and fit.json facts of an EB method."""
    if method == "eb_moments":
        tau2_raw, sigma2, n0 = oneway.moments_variances(stats)
        if not np.isfinite(sigma2):
            raise InputError(
                "eb_moments: no group has two or more observations, so the "
                "within-group variance cannot be estimated"
            )
        return max(tau2_raw, 0.0), sigma2, {"tau2_moments_raw": float(tau2_raw), "n0": n0}
    from hierpipe.models.lmm import one_way_reml

    fit = one_way_reml(stats.n, stats.ybar, stats.ss, "REML" if method == "eb_reml" else "ML")
    tau2 = float(fit.sds[0]) ** 2
    sigma2 = float(fit.sigma) ** 2
    facts = {
        "loglik": float(fit.loglik),
        "converged": bool(fit.converged),
        "criterion": "REML" if method == "eb_reml" else "ML",
    }
    return tau2, sigma2, facts


def fit_one_way(
    stats: GroupStats,
    group: str,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> FitResult:
    """Fit ``y ~ 1 + (1 | group)`` by ``method`` from the group statistics."""
    if method == "complete_pooling":
        return oneway.complete_pooling(stats, group)
    if method == "no_pooling":
        return oneway.no_pooling(stats, group)
    if method in ("eb_moments", "eb_ml", "eb_reml"):
        tau2, sigma2, facts = eb_variances(stats, method)
        boundary = []
        if tau2 <= 0.0:
            raw = facts.get("tau2_moments_raw")
            detail = f" (moment estimate of its variance was {raw:.4g})" if raw is not None else ""
            boundary.append(f"boundary fit: sd_{group}__Intercept estimated at 0{detail}")
        warnings = [*boundary, *facts.pop("warnings", [])]
        info = {**facts, "boundary": boundary, "warnings": warnings}
        return oneway.eb_fit(stats, group, tau2, sigma2, info=info)
    if method == "gibbs":
        from hierpipe.models.gibbs_fit import gibbs_result

        sample, priors = run_gibbs(stats, settings, rng)
        return gibbs_result(stats, group, sample, priors, rng)
    raise ConfigError(f"unknown fit method '{method}'")


def fit_table(
    df: pd.DataFrame,
    formula: str,
    method: str,
    *,
    settings: dict[str, Any],
    rng: np.random.Generator,
    source: str,
) -> FitResult:
    """Fit ``formula`` to ``df`` by ``method``; ``source`` names the file in errors."""
    model = load_model(df, formula, source)
    check_method(model.structure, method, formula)
    if model.structure.kind == "one_way":
        return fit_one_way(model.stats, model.structure.group, method, settings, rng)
    raise ConfigError(f"structure '{model.structure.kind}' is not fitted yet")


def new_group_predictive(
    stats: GroupStats, method: str, settings: dict[str, Any], rng: np.random.Generator
) -> Predictive:
    """Hyperparameters of a new group's predictive after fitting ``stats`` by ``method``.

    Plug-in fits add the squared SE of :math:`\\hat\\beta_0` to :math:`\\tau^2`;
    Gibbs returns one triple per posterior draw.
    """
    if method == "complete_pooling":
        mu = stats.grand_mean
        total = stats.ssw + float(np.dot(stats.n, (stats.ybar - mu) ** 2))
        s2 = total / (stats.n_obs - 1)
        return Predictive(np.array(mu), np.array(s2 / stats.n_obs), np.array(s2))
    if method in ("eb_moments", "eb_ml", "eb_reml"):
        tau2, sigma2, _ = eb_variances(stats, method)
        w = 1.0 / (tau2 + sigma2 / stats.n)
        mu = float(np.dot(w, stats.ybar) / w.sum())
        return Predictive(np.array(mu), np.array(tau2 + 1.0 / w.sum()), np.array(sigma2))
    if method == "gibbs":
        sample, _ = run_gibbs(stats, settings, rng)
        return Predictive(
            sample.b_Intercept.ravel(), sample.sd.ravel() ** 2, sample.sigma.ravel() ** 2
        )
    raise ConfigError(
        f"fit method '{method}' cannot predict a new group, so it has no leave-one-group-out "
        "score (no pooling has no population of groups)"
    )
