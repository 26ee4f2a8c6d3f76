"""Turn the two-level Gibbs sampler's arrays into hierpipe's fit outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.data.groups import GroupStats
from hierpipe.diagnostics.convergence import summarise_array, summarise_draws
from hierpipe.errors import ConfigError
from hierpipe.models.gibbs_twolevel import Flat, HalfCauchy, InvGamma, Normal, Priors
from hierpipe.models.oneway import Prediction, prediction_rows
from hierpipe.models.result import FitResult

# Groups whose full draws go into draws.parquet unless ``store_group_draws`` says
# otherwise: every group up to this many, else this many spread evenly over the
# sorted labels. Summaries always cover every group.
GROUP_DRAWS_DEFAULT = 1000
# Group parameters are summarised (and shrinkage weights averaged) in blocks of
# about this many (chain x draw x group) values, so memory stays bounded by the
# block, not by the (chains, draws, groups) array (8 GB at 4 x 1000 x 10^5 groups
# for one copy; the summary needs several).
_BLOCK_VALUES = 1 << 22


def default_priors(stats: GroupStats) -> dict[str, dict[str, Any]]:
    """Weakly informative priors scaled to the data.

    Half-Cauchy on both SDs with scale equal to the outcome's total SD, and a
    flat prior on ``b_Intercept``: the scale lets an SD range over the data's
    spread while the Cauchy tail admits larger values (Gelman 2006).
    """
    mu = stats.grand_mean
    total = stats.ssw + float(np.dot(stats.n, (stats.ybar - mu) ** 2))
    scale = float(np.sqrt(total / max(stats.n_obs - 1, 1)))
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    return {
        "b_Intercept": {"family": "flat"},
        "sd": {"family": "half_cauchy", "scale": scale},
        "sigma": {"family": "half_cauchy", "scale": scale},
    }


def resolve_priors(stats: GroupStats, given: dict[str, dict[str, Any]] | None) -> dict:
    """Config priors over the data-scaled defaults (a family without a scale keeps the default)."""
    priors = default_priors(stats)
    for name, spec in (given or {}).items():
        merged = dict(spec)
        if (
            "scale" not in merged
            and "scale" in priors[name]
            and merged["family"] in ("half_cauchy", "half_normal")
        ):
            merged["scale"] = priors[name]["scale"]
        priors[name] = merged
    return priors


def priors_from_config(priors: dict[str, dict[str, Any]], sampler: str = "two-level") -> Priors:
    """The sampler's prior objects from config dictionaries (see README for the keys).

    ``sampler`` names the sampler in error messages; the multilevel sampler takes
    the same families (:func:`hierpipe.models.engines.multilevel.priors_from_config`).
    """

    def scale_prior(name: str) -> HalfCauchy | InvGamma:
        spec = priors[name]
        if spec["family"] == "half_cauchy":
            return HalfCauchy(scale=float(spec["scale"]))
        if spec["family"] == "inv_gamma":
            if "shape" not in spec or "scale" not in spec:
                raise ConfigError(
                    f"prior '{name}': inv_gamma needs shape and scale (on the variance)"
                )
            return InvGamma(shape=float(spec["shape"]), scale=float(spec["scale"]))
        raise ConfigError(
            f"prior '{name}': family '{spec['family']}' is not available for the {sampler} "
            "sampler (use half_cauchy or inv_gamma)"
        )

    b = priors["b_Intercept"]
    if b["family"] == "flat":
        intercept: Flat | Normal = Flat()
    elif b["family"] == "normal":
        if "scale" not in b:
            raise ConfigError("prior 'b_Intercept': normal needs a scale (its SD)")
        intercept = Normal(mean=float(b.get("location", 0.0)), sd=float(b["scale"]))
    else:
        raise ConfigError(f"prior 'b_Intercept': family '{b['family']}' must be flat or normal")
    return Priors(sd=scale_prior("sd"), sigma=scale_prior("sigma"), b_Intercept=intercept)


def draws_frame(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """Long draws table: ``chain``, ``draw`` and one float64 column a parameter."""
    first = next(iter(arrays.values()))
    chains, draws = first.shape[:2]
    cols: dict[str, np.ndarray] = {
        "chain": np.repeat(np.arange(chains, dtype=np.int32), draws),
        "draw": np.tile(np.arange(draws, dtype=np.int32), chains),
    }
    for name, arr in arrays.items():
        cols[name] = np.ascontiguousarray(arr, dtype=np.float64).reshape(chains * draws)
    return pd.DataFrame(cols)


def stored_groups(n_groups: int, setting: Any = None) -> np.ndarray:
    """Indices of the groups whose full draws are stored in ``draws.parquet``.

    ``setting`` is ``"all"``, or a count ``N >= 0``: ``min(N, J)`` groups at
    evenly spaced positions of the sorted labels (the first and the last among
    them), a deterministic sample that needs no random numbers. ``None`` means
    :data:`GROUP_DRAWS_DEFAULT`.
    """
    if setting is None:
        setting = GROUP_DRAWS_DEFAULT
    if setting == "all":
        return np.arange(n_groups)
    if isinstance(setting, bool) or not isinstance(setting, int | np.integer) or setting < 0:
        raise ConfigError(
            f"gibbs setting store_group_draws must be 'all' or a count >= 0, got {setting!r}"
        )
    if setting >= n_groups:
        return np.arange(n_groups)
    if setting == 0:
        return np.arange(0)
    return np.unique(np.round(np.linspace(0, n_groups - 1, int(setting))).astype(np.int64))


def _group_blocks(n_groups: int, chains: int, draws: int) -> list[slice]:
    size = max(1, _BLOCK_VALUES // max(1, chains * draws))
    return [slice(a, min(a + size, n_groups)) for a in range(0, n_groups, size)]


def _group_summaries(
    stats: GroupStats, group: str, sample: Any, blocks: list[slice]
) -> list[pd.DataFrame]:
    """Summaries of every ``r_`` then every ``coef_`` parameter, a block of groups at a time."""
    mu = sample.b_Intercept[:, :, None]
    parts = []
    for prefix, shift in (("r", True), ("coef", False)):
        for b in blocks:
            theta = sample.theta[:, :, b]
            values = theta - mu if shift else theta
            names = [f"{prefix}_{group}[{lab},Intercept]" for lab in stats.labels[b]]
            parts.append(summarise_array(names, values))
    return parts


def _mean_weights(
    stats: GroupStats, tau: np.ndarray, sigma: np.ndarray, blocks: list[slice]
) -> np.ndarray:
    """Posterior mean of :math:`\\tau^2/(\\tau^2 + \\sigma^2/n_j)` per group, blockwise."""
    t2, s2 = tau[..., None] ** 2, sigma[..., None] ** 2
    out = np.empty(stats.n_groups)
    for b in blocks:
        out[b] = (t2 / (t2 + s2 / stats.n[b])).mean(axis=(0, 1))
    return out


def gibbs_result(
    stats: GroupStats,
    group: str,
    sample: Any,
    priors: dict[str, Any],
    rng: np.random.Generator,
    *,
    store_group_draws: Any = None,
) -> FitResult:
    """Summary, draws and fit.json facts of one two-level Gibbs run.

    Predictions for a new group are posterior predictive draws: one
    :math:`\\theta_{new} \\sim N(\\beta_0, \\tau^2)` and one new observation
    :math:`\\sim N(\\theta_{new}, \\sigma^2)` per posterior draw.

    The summary covers every group; ``draws.parquet`` keeps the hyperparameters
    and the ``r_``/``coef_`` draws of the groups :func:`stored_groups` picks
    (``store_group_draws``), and ``fit.json`` says which. Group parameters are
    handled a block of groups at a time, so memory beyond the sampler's own
    ``theta`` array stays bounded.
    """
    mu, tau, sigma = sample.b_Intercept, sample.sd, sample.sigma
    arrays: dict[str, np.ndarray] = {
        "b_Intercept": mu,
        f"sd_{group}__Intercept": tau,
        "sigma": sigma,
        f"icc_{group}": tau**2 / (tau**2 + sigma**2),
    }
    keep = stored_groups(stats.n_groups, store_group_draws)
    blocks = _group_blocks(stats.n_groups, *mu.shape)
    summary = pd.concat(
        [summarise_draws(arrays), *_group_summaries(stats, group, sample, blocks)],
        ignore_index=True,
    )
    stored = dict(arrays)
    for j in keep:
        stored[f"r_{group}[{stats.labels[j]},Intercept]"] = sample.theta[:, :, j] - mu
    for j in keep:
        stored[f"coef_{group}[{stats.labels[j]},Intercept]"] = sample.theta[:, :, j]
    theta_new = mu + tau * rng.standard_normal(mu.shape)
    y_new = theta_new + sigma * rng.standard_normal(mu.shape)
    preds = []
    for target, x in (("new_group_mean", theta_new), ("new_observation_new_group", y_new)):
        q5, q95 = np.quantile(x, [0.05, 0.95])
        preds.append(
            Prediction(
                target,
                float(x.mean()),
                float(x.std(ddof=1)),
                float(q5),
                float(q95),
                "posterior predictive draws",
            )
        )
    weight = _mean_weights(stats, tau, sigma, blocks)
    all_stored = len(keep) == stats.n_groups
    info = {
        **sample.info(),
        "priors_config": priors,
        "shrinkage": {lab: float(w) for lab, w in zip(stats.labels, weight, strict=True)},
        "group_draws": {
            "stored": "all" if all_stored else "sample",
            "groups": len(keep),
            "of": stats.n_groups,
            "rule": "every group" if all_stored else "evenly spaced in sorted label order",
            "labels": None if all_stored else [stats.labels[j] for j in keep],
        },
        "predictions": prediction_rows(preds),
        "warnings": [],
    }
    return FitResult(summary=summary, draws=draws_frame(stored), info=info)
