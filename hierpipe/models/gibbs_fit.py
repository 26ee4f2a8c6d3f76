"""Turn the two-level Gibbs sampler's arrays into hierpipe's fit outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.data.groups import GroupStats
from hierpipe.diagnostics.convergence import summarise_draws
from hierpipe.models.oneway import Prediction, prediction_rows
from hierpipe.errors import ConfigError
from hierpipe.models.gibbs_twolevel import Flat, HalfCauchy, InvGamma, Normal, Priors
from hierpipe.models.result import FitResult


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


def priors_from_config(priors: dict[str, dict[str, Any]]) -> Priors:
    """The sampler's prior objects from config dictionaries (see README for the keys)."""

    def scale_prior(name: str) -> HalfCauchy | InvGamma:
        spec = priors[name]
        if spec["family"] == "half_cauchy":
            return HalfCauchy(scale=float(spec["scale"]))
        if spec["family"] == "inv_gamma":
            if "shape" not in spec or "scale" not in spec:
                raise ConfigError(f"prior '{name}': inv_gamma needs shape and scale (on the variance)")
            return InvGamma(shape=float(spec["shape"]), scale=float(spec["scale"]))
        raise ConfigError(
            f"prior '{name}': family '{spec['family']}' is not available for the two-level "
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


def gibbs_result(
    stats: GroupStats,
    group: str,
    sample: Any,
    priors: dict[str, Any],
    rng: np.random.Generator,
) -> FitResult:
    """Summary, draws and fit.json facts of one two-level Gibbs run.

    Predictions for a new group are posterior predictive draws: one
    :math:`\\theta_{new} \\sim N(\\beta_0, \\tau^2)` and one new observation
    :math:`\\sim N(\\theta_{new}, \\sigma^2)` per posterior draw.
    """
    mu, tau, sigma = sample.b_Intercept, sample.sd, sample.sigma
    arrays: dict[str, np.ndarray] = {
        "b_Intercept": mu,
        f"sd_{group}__Intercept": tau,
        "sigma": sigma,
        f"icc_{group}": tau**2 / (tau**2 + sigma**2),
    }
    for j, lab in enumerate(stats.labels):
        arrays[f"r_{group}[{lab},Intercept]"] = sample.r[:, :, j]
    for j, lab in enumerate(stats.labels):
        arrays[f"coef_{group}[{lab},Intercept]"] = sample.theta[:, :, j]
    summary = summarise_draws(arrays)
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
    weight = tau[..., None] ** 2 / (tau[..., None] ** 2 + sigma[..., None] ** 2 / stats.n)
    info = {
        **sample.info(),
        "priors_config": priors,
        "shrinkage": {
            lab: float(w) for lab, w in zip(stats.labels, weight.mean(axis=(0, 1)), strict=True)
        },
        "predictions": prediction_rows(preds),
        "warnings": [],
    }
    return FitResult(summary=summary, draws=draws_frame(arrays), info=info)
