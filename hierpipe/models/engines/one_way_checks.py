r"""Optional engine functions of the one-way engine: model checks and cross-validation.

The model is :math:`y_{ij} = \beta_0 + r_j + e_{ij}`, :math:`r_j \sim N(0, \tau^2)`,
:math:`e_{ij} \sim N(0, \sigma^2)` (:mod:`hierpipe.models.oneway`); brms names
``b_Intercept``, ``sd_<g>__Intercept``, ``sigma``, ``coef_<g>[j,Intercept]``.
:mod:`hierpipe.models.engines.one_way` re-exports everything here; the
interface is described in :mod:`hierpipe.models.engines`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.cv.logo import Predictive, group_log_density, score_group
from hierpipe.data.groups import GroupStats, group_stats
from hierpipe.diagnostics.ppc import (
    Replicates,
    block_size,
    normal_group_statistics,
    thin_indices,
)
from hierpipe.diagnostics.residuals import residual_table
from hierpipe.diagnostics.shrinkage import james_stein
from hierpipe.models.structure import Structure

PPC_REPLICATES = 400
PRIOR_DRAWS = 4000


def _coef_names(structure: Structure, labels: tuple[str, ...]) -> list[str]:
    return [f"coef_{structure.group}[{lab},Intercept]" for lab in labels]


def _sd_name(structure: Structure) -> str:
    return f"sd_{structure.group}__Intercept"


# --------------------------------------------------------------------------- checks


def ppc_replicates(
    stats: GroupStats,
    structure: Structure,
    summary: pd.DataFrame,
    draws: pd.DataFrame | None,
    rng: np.random.Generator,
    replicates: int = PPC_REPLICATES,
) -> Replicates:
    """Test statistics of replicated data sets (:mod:`hierpipe.diagnostics.ppc`).

    Samplers: one replicate per posterior draw, thinned evenly to
    ``replicates``. The statistics come a block of groups at a time
    (:func:`hierpipe.diagnostics.ppc.block_size`), so memory stays bounded
    whatever the number of groups (the block size is a constant, so the
    random numbers used depend on the inputs alone).
    Each replicate's group means are drawn from their full conditional given
    the draw's hyperparameters,
    :math:`\\theta_j \\mid \\beta_0, \\tau, \\sigma, y \\sim N(m_j, v_j)` with
    :math:`v_j = (n_j/\\sigma^2 + 1/\\tau^2)^{-1}`,
    :math:`m_j = v_j(n_j \\bar y_j/\\sigma^2 + \\beta_0/\\tau^2)`, so
    :math:`(\\beta_0, \\tau, \\sigma, \\theta)` is a draw from the joint posterior
    whether or not ``draws.parquet`` stores every group's draws.
    Point estimators: ``replicates`` data sets simulated at the estimates
    :math:`(\\hat\\theta_j, \\hat\\sigma)` (a parametric bootstrap; the
    estimates' own uncertainty is not propagated).
    """
    j = stats.n_groups
    if draws is not None:
        idx = thin_indices(len(draws), replicates)
        h = _hyper_draws(draws.iloc[idx], structure)
        s2, tau2, mu = h.sigma2[:, None], h.a[:, None], h.mu[:, None]
        sigma = np.sqrt(h.sigma2)
        note = (
            f"one replicate per posterior draw, {idx.size} of {len(draws)} draws taken evenly; "
            "group means drawn from their full conditional given the draw's hyperparameters"
        )

        def theta_of(sl: slice, rng: np.random.Generator) -> np.ndarray:
            n, ybar = stats.n[sl], stats.ybar[sl]
            v = 1.0 / (n / s2 + 1.0 / tau2)
            m = v * (n * ybar / s2 + mu / tau2)
            return m + np.sqrt(v) * rng.standard_normal(m.shape)

    else:
        est = summary.set_index("parameter")["mean"]
        coef = est.reindex(_coef_names(structure, stats.labels)).to_numpy(dtype=np.float64)
        sigma = np.full(replicates, float(est.get("sigma", np.nan)))
        note = (
            f"parametric simulation at the estimates: {replicates} data sets drawn from "
            "N(coef estimate, sigma estimate^2); the estimates' uncertainty is not propagated"
        )

        def theta_of(sl: slice, rng: np.random.Generator) -> np.ndarray:
            return np.broadcast_to(coef[sl], (sigma.size, coef[sl].size))

    def blocks():
        size = block_size(sigma.size)
        for start in range(0, j, size):
            sl = slice(start, min(start + size, j))
            theta = theta_of(sl, rng)
            yield sl.start, sl.stop, normal_group_statistics(theta, sigma, stats.n[sl], rng)

    return Replicates(count=sigma.size, blocks=blocks(), note=note)


def draw_scale(spec: dict[str, Any], rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws of an SD from a prior as fit.json records it (every sampler's one-coefficient SDs).

    Half-Cauchy is on the SD; inverse-gamma on the variance.
    """
    if spec["family"] == "half_cauchy":
        return float(spec["scale"]) * np.abs(rng.standard_cauchy(size))
    if spec["family"] == "inv_gamma":
        return np.sqrt(float(spec["scale"]) / rng.gamma(float(spec["shape"]), 1.0, size))
    raise ValueError(f"prior family '{spec['family']}' is not a scale prior")


def prior_predictive(
    stats: GroupStats,
    structure: Structure,
    info: dict[str, Any],
    rng: np.random.Generator,
    size: int = PRIOR_DRAWS,
) -> pd.DataFrame | None:
    """Draws from the priors and what they imply on the outcome's scale (samplers only).

    Per draw: :math:`\\tau`, :math:`\\sigma`, the ICC, the outcome's SD about
    the intercept :math:`\\sqrt{\\tau^2 + \\sigma^2}`, a new group's deviation
    :math:`\\tau z_1` and a new observation's deviation :math:`\\tau z_1 + \\sigma
    z_2` from :math:`\\beta_0`; with a proper (normal) prior on
    ``b_Intercept`` also :math:`\\beta_0` and the new observation itself (NaN
    under the flat prior, which implies no distribution for the outcome's level).
    """
    priors = info.get("priors")
    if not priors or "sd" not in priors or "sigma" not in priors:
        return None
    tau = draw_scale(priors["sd"], rng, size)
    sigma = draw_scale(priors["sigma"], rng, size)
    b = priors.get("b_Intercept", {"family": "flat"})
    if b.get("family") == "normal":
        mu = float(b["mean"]) + float(b["sd"]) * rng.standard_normal(size)
    else:
        mu = np.full(size, np.nan)
    group_dev = tau * rng.standard_normal(size)
    obs_dev = group_dev + sigma * rng.standard_normal(size)
    return pd.DataFrame(
        {
            "draw": np.arange(size, dtype=np.int64),
            "b_Intercept": mu,
            _sd_name(structure): tau,
            "sigma": sigma,
            f"icc_{structure.group}": tau**2 / (tau**2 + sigma**2),
            "outcome_sd": np.hypot(tau, sigma),
            "new_group_deviation": group_dev,
            "new_observation_deviation": obs_dev,
            "new_observation": mu + obs_dev,
        }
    )


def residuals(
    design: Any, stats: GroupStats, structure: Structure, summary: pd.DataFrame
) -> pd.DataFrame:
    """Pearson residuals (:mod:`hierpipe.diagnostics.residuals`): fitted = the group's coef."""
    term = design.random[0]
    est = summary.set_index("parameter")["mean"]
    coef = est.reindex(_coef_names(structure, stats.labels)).to_numpy(dtype=np.float64)
    sigma = float(est.get("sigma", np.nan))
    return residual_table(design.y, coef[term.codes], sigma, term.codes, term.labels)


def james_stein_table(
    stats: GroupStats, structure: Structure
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """James–Stein (balanced) or Efron–Morris (unbalanced) estimates of the group means.

    The sampling variance of :math:`\\bar y_j` is :math:`s^2/n_j` with the pooled
    within-group variance :math:`s^2 = \\sum_j S_j/(N-J)` treated as known; None
    when no group has two observations (no :math:`s^2`) or every mean is equal.
    """
    df = stats.n_obs - stats.n_groups
    if df <= 0 or stats.ssw <= 0:
        return None
    s2 = stats.ssw / df
    js = james_stein(stats.ybar, s2 / stats.n)
    table = pd.DataFrame(
        {
            "group": pd.Series(stats.labels, dtype=str),
            "james_stein": js.estimate,
            "js_shrinkage": js.shrinkage,
        }
    )
    facts = {
        "form": js.form,
        "sigma2": float(s2),
        "a_hat": float(js.a_hat),
        "centre": float(js.centre),
        "effective_parameters": js.effective_parameters,
    }
    return table, facts


# --------------------------------------------------------------------------- PSIS-LOGO


def _hyper_draws(draws: pd.DataFrame, structure: Structure) -> Predictive:
    return Predictive(
        draws["b_Intercept"].to_numpy(dtype=np.float64),
        draws[_sd_name(structure)].to_numpy(dtype=np.float64) ** 2,
        draws["sigma"].to_numpy(dtype=np.float64) ** 2,
    )


def logo_log_lik(
    stats: GroupStats,
    structure: Structure,
    draws: pd.DataFrame,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """:math:`\\log p(y_j \\mid \\beta_0, \\tau, \\sigma)` per draw and group, shape (S, G).

    The group's effect is integrated out (:func:`hierpipe.cv.logo.group_log_density`),
    so leaving group :math:`j` out reweights the draws of the hyperparameters by
    :math:`1 / p(y_j \\mid \\phi)` exactly. ``groups`` (indices; default all)
    lets callers work a block of groups at a time.
    """
    h = _hyper_draws(draws, structure)
    g = np.arange(stats.n_groups) if groups is None else np.asarray(groups)
    return group_log_density(
        stats.n[None, g],
        stats.ybar[None, g],
        stats.ss[None, g],
        h.mu[:, None],
        h.a[:, None],
        h.sigma2[:, None],
    )


def score_held_out_weighted(
    stats: GroupStats,
    j: int,
    structure: Structure,
    draws: pd.DataFrame,
    log_weights: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Group ``j``'s CV row from full-data draws reweighted to leave it out."""
    s = score_group(
        _hyper_draws(draws, structure), stats.n[j], stats.ybar[j], stats.ss[j], rng, log_weights
    )
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


# --------------------------------------------------------------------------- within-group K-fold


def kfold_split(
    design: Any, stats: GroupStats, structure: Structure, fold: np.ndarray, k: int
) -> tuple[GroupStats, GroupStats]:
    """Training and held-out statistics of fold ``k`` (rows with ``fold == k`` held out)."""
    term = design.random[0]
    held = fold == k
    keep = ~held
    g = len(term.labels)
    train = _masked_stats(design.y, term.codes, keep, g, term.labels)
    test = _masked_stats(design.y, term.codes, held, g, term.labels)
    return train, test


def _masked_stats(
    y: np.ndarray, codes: np.ndarray, mask: np.ndarray, g: int, labels: tuple[str, ...]
) -> GroupStats:
    n = np.bincount(codes[mask], minlength=g).astype(np.float64)
    if np.all(n > 0):
        return group_stats(y[mask], codes[mask], labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar = np.bincount(codes[mask], weights=y[mask], minlength=g) / n
    dev = y[mask] - ybar[codes[mask]]
    ss = np.bincount(codes[mask], weights=dev**2, minlength=g)
    return GroupStats(labels=tuple(labels), n=n, ybar=np.nan_to_num(ybar), ss=ss)


def within_predictive(
    train: GroupStats,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> Callable[[int], Predictive]:
    """Predictive of new observations of training group ``j``, as a function of ``j``.

    A new observation of group :math:`j` is :math:`N(\\theta_j, \\sigma^2)` with
    :math:`\\theta_j \\sim N(m_j, a_j)`, so a block of them has the density of
    :func:`hierpipe.cv.logo.group_log_density` with ``mu = m``, ``a = a``.
    Point estimators plug in: :math:`m_j` the fit's ``coef`` estimate,
    :math:`a_j` its squared SE, :math:`\\sigma` the fit's. Gibbs integrates
    :math:`\\theta_j` out given each draw (Rao–Blackwell):
    :math:`a_j = (n_j/\\sigma^2 + 1/\\tau^2)^{-1}`,
    :math:`m_j = a_j(n_j \\bar y_j/\\sigma^2 + \\beta_0/\\tau^2)`, one value a
    draw, computed when asked for so memory holds no (draws x groups) array.
    """
    from hierpipe.models.engines.one_way import fit, run_gibbs

    if method == "gibbs":
        sample, _ = run_gibbs(train, settings, rng)
        mu = sample.b_Intercept.ravel()
        tau2 = sample.sd.ravel() ** 2
        s2 = sample.sigma.ravel() ** 2

        def gibbs_group(j: int) -> Predictive:
            a = 1.0 / (train.n[j] / s2 + 1.0 / tau2)
            m = a * (train.n[j] * train.ybar[j] / s2 + mu / tau2)
            return Predictive(m, a, s2)

        return gibbs_group
    result = fit(train, structure, method, settings, rng)
    rows = result.summary.set_index("parameter")
    names = _coef_names(structure, train.labels)
    m = rows["mean"].reindex(names).to_numpy(dtype=np.float64)
    a = rows["sd"].reindex(names).to_numpy(dtype=np.float64) ** 2
    s2 = float(rows["mean"].get("sigma", np.nan)) ** 2
    return lambda j: Predictive(np.array(m[j]), np.array(a[j]), np.array(s2))


def score_kfold(
    train: GroupStats,
    held: GroupStats,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Score each group's held-out observations of one fold (one row a group with some)."""
    predictive = within_predictive(train, structure, method, settings, rng)
    rows = []
    for j in np.flatnonzero(held.n > 0):
        s = score_group(predictive(int(j)), held.n[j], held.ybar[j], held.ss[j], rng)
        rows.append(
            {
                "group": held.labels[j],
                "n": float(held.n[j]),
                "elpd": s.elpd,
                "pred_mean": s.pred_mean,
                "pred_q5": s.pred_q5,
                "pred_q95": s.pred_q95,
                "observed_mean": float(held.ybar[j]),
                "error": s.error,
                "covered": s.covered,
            }
        )
    return rows
