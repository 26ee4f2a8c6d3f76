r"""Engine of the two-level varying-intercept model ``y ~ 1 + (1 | g)``.

Everything works from per-group :math:`(n_j, \bar y_j, S_j)`
(:class:`~hierpipe.data.groups.GroupStats`), computed once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.cv.logo import Predictive, score_group
from hierpipe.data.groups import GroupStats, group_stats
from hierpipe.errors import ConfigError, InputError
from hierpipe.models import oneway
from hierpipe.models.result import FitResult
from hierpipe.models.structure import Structure

METHODS = ("complete_pooling", "no_pooling", "eb_moments", "eb_ml", "eb_reml", "gibbs")


def prepare(design: Any, structure: Structure) -> GroupStats:
    """Group statistics, named for messages; a constant outcome fails here.

    A constant outcome leaves nothing to model: every variance is zero, the
    likelihood of any method with a residual term is unbounded and leave-one-
    group-out densities are infinite, so it is refused for every method.
    """
    y = design.y
    if y.size and y.min() == y.max():
        raise InputError(
            f"{design.source}: column '{structure.response}' has the same value ({y[0]:.17g}) "
            "in every row; there is no variation to model"
        )
    term = design.random[0]
    stats = group_stats(y, term.codes, term.labels)
    return replace(stats, source=design.source, response=structure.response, group=term.name)


def group_labels(stats: GroupStats) -> tuple[str, ...]:
    return stats.labels


GIBBS_KEYS = ("chains", "warmup", "draws", "priors", "store_group_draws", "scheme", "backend")


def _check_settings(method: str, settings: dict[str, Any]) -> None:
    """A misspelt setting is an error, not silently ignored.

    Point fits ignore the sampler's settings (the CLI may pass them to any method).
    """
    unknown = sorted(set(settings) - set(GIBBS_KEYS))
    if unknown:
        raise ConfigError(
            f"fit method '{method}': unknown setting '{unknown[0]}' "
            f"(known: {', '.join(GIBBS_KEYS)})"
        )


def _check_hierarchical(stats: GroupStats, method: str) -> None:
    r"""Refuse data on which ``method``'s variance components are not defined.

    With no within-group variation but replicated groups (:math:`SSW = 0 < N - J`)
    the likelihood grows without bound as :math:`\sigma \to 0`, so ML/REML have
    no maximum, the moment estimate is :math:`\hat\sigma = 0` where the
    leave-one-group-out density is infinite, and the Gibbs posterior under a
    half-Cauchy prior on :math:`\sigma` is improper (its marginal behaves like
    :math:`\sigma^{-(N-J)}` near 0). With every group of size one,
    :math:`\tau^2` and :math:`\sigma^2` enter the likelihood only through their
    sum, so the EB methods cannot separate them (the Gibbs sampler can: its
    proper priors do).
    """
    where = f"{stats.source}: column '{stats.response}'"
    if stats.n_obs > stats.n_groups and stats.ssw == 0.0:
        j = int(np.argmax(stats.n))
        raise InputError(
            f"{where} does not vary within any group of '{stats.group}' (group "
            f"'{stats.labels[j]}' has {int(stats.n[j])} equal values), so {method} cannot "
            "estimate sigma (its likelihood is unbounded at sigma = 0)"
        )
    if method != "gibbs" and stats.n_obs == stats.n_groups:
        raise InputError(
            f"{where}: every group of '{stats.group}' has one observation, so {method} cannot "
            f"separate sigma from sd_{stats.group}__Intercept (fit gibbs or complete_pooling)"
        )


def _gibbs_settings(settings: dict[str, Any]) -> tuple[int, int, int]:
    values = []
    for key, default, low in (("chains", 4, 1), ("warmup", 1000, 0), ("draws", 1000, 10)):
        v = settings.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ConfigError(f"gibbs setting '{key}' must be an integer, got {v!r}")
        if v < low:
            raise ConfigError(f"gibbs setting '{key}' must be >= {low}, got {v}")
        values.append(int(v))
    chains, warmup, draws = values
    from hierpipe.models.gibbs_fit import stored_groups

    stored_groups(1, settings.get("store_group_draws"))  # fail before sampling, not after
    return chains, warmup, draws


def run_gibbs(stats: GroupStats, settings: dict[str, Any], rng: np.random.Generator):
    """Run the two-level sampler; returns (draws, priors as resolved from config)."""
    from hierpipe.models.gibbs_fit import priors_from_config, resolve_priors
    from hierpipe.models.gibbs_twolevel import gibbs_two_level

    _check_hierarchical(stats, "gibbs")
    chains, warmup, draws = _gibbs_settings(settings)
    priors = resolve_priors(stats, settings.get("priors"))
    sample = gibbs_two_level(
        stats.n,
        stats.ybar,
        stats.ssw,
        chains=chains,
        warmup=warmup,
        draws=draws,
        priors=priors_from_config(priors),
        rng=rng,
        scheme=settings.get("scheme", "collapsed"),
        backend=settings.get("backend", "numpy"),
    )
    return sample, priors


def eb_variances(stats: GroupStats, method: str) -> tuple[float, float, dict[str, Any]]:
    """Plug-in :math:`(\\tau^2, \\sigma^2)` and fit.json facts of an EB method."""
    _check_hierarchical(stats, method)
    if method == "eb_moments":
        tau2_raw, sigma2, n0 = oneway.moments_variances(stats)
        return max(tau2_raw, 0.0), sigma2, {"tau2_moments_raw": float(tau2_raw), "n0": n0}
    from hierpipe.models.lmm import one_way_reml

    fit = one_way_reml(stats.n, stats.ybar, stats.ss, "REML" if method == "eb_reml" else "ML")
    facts: dict[str, Any] = {
        "criterion": fit.method,
        "loglik": float(fit.loglik),
        "reml_criterion": float(fit.reml_criterion),
        "converged": bool(fit.converged),
        "optimizer_evaluations": int(fit.n_evaluations),
    }
    if not fit.converged:
        facts["warnings"] = [f"{fit.method} optimiser convergence checks did not pass"]
    return float(fit.sds[0]) ** 2, float(fit.sigma) ** 2, facts


def fit(
    stats: GroupStats,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> FitResult:
    """Fit ``y ~ 1 + (1 | group)`` by ``method`` from the group statistics."""
    group = structure.group
    _check_settings(method, settings)
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
        return gibbs_result(
            stats, group, sample, priors, rng, store_group_draws=settings.get("store_group_draws")
        )
    raise ConfigError(f"unknown fit method '{method}'")


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


def score_held_out(
    stats: GroupStats, j: int, method: str, settings: dict[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    """Refit without group ``j`` and score its observations as a new group's."""
    pred = new_group_predictive(stats.without(j), method, settings, rng)
    s = score_group(pred, stats.n[j], stats.ybar[j], stats.ss[j], rng)
    return {
        "group": stats.labels[j],
        "n": float(stats.n[j]),
        "elpd": s.elpd,
        "pred_mean": s.pred_mean,
        "pred_q5": s.pred_q5,
        "pred_q95": s.pred_q95,
        "observed_mean": float(stats.ybar[j]),
        "error": s.error,
        "covered": s.covered,
    }


def shrinkage(
    stats: GroupStats, structure: Structure, summary: pd.DataFrame, info: dict[str, Any]
) -> pd.DataFrame:
    """Per group: no-pooling mean, the fit's estimate and the weight on own data.

    The weight :math:`\\lambda_j` solves :math:`\\hat\\theta_j = \\lambda_j \\bar y_j
    + (1-\\lambda_j)\\hat\\beta_0`; fits that know it exactly (EB: :math:`B_j`;
    Gibbs: its posterior mean) report it in ``info["shrinkage"]``.
    """
    group = structure.group
    est = summary.set_index("parameter")["mean"]
    pop = float(est["b_Intercept"]) if "b_Intercept" in est.index else stats.grand_mean
    theta = np.array([est.get(f"coef_{group}[{lab},Intercept]", np.nan) for lab in stats.labels])
    known = info.get("shrinkage")
    if known:
        lam = np.array([known[lab] for lab in stats.labels], dtype=float)
    else:
        dev = stats.ybar - pop
        # A weight is undefined where a group's mean equals the population's to
        # within rounding of the values' magnitude (scale-free: data around 1e-12
        # must not all fall below an absolute threshold).
        scale = max(abs(pop), float(np.max(np.abs(stats.ybar))))
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.where(np.abs(dev) > 1e-12 * scale, (theta - pop) / dev, np.nan)
    return pd.DataFrame(
        {
            "group": pd.Series(stats.labels, dtype=str),
            "n": stats.n.astype(np.float64),
            "no_pooling": stats.ybar.astype(np.float64),
            "estimate": theta.astype(np.float64),
            "population": np.full(stats.n_groups, pop, dtype=np.float64),
            "weight": lam.astype(np.float64),
            "shrinkage": (1.0 - lam).astype(np.float64),
        }
    )


# Optional engine functions (model checks, PSIS-LOGO, within-group K-fold); see
# hierpipe.models.engines for the interface. Kept in their own module.
from hierpipe.models.engines.one_way_checks import (  # noqa: E402, F401
    james_stein_table,
    kfold_split,
    logo_log_lik,
    ppc_replicates,
    prior_predictive,
    residuals,
    score_held_out_weighted,
    score_kfold,
)
