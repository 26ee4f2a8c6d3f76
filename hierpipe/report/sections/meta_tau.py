"""Posterior of tau (exact, and Gibbs draws) with the frequentist estimates of tau marked."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hierpipe.report import plots
from hierpipe.report.context import StudyContext
from hierpipe.report.sections import meta_common as mc


def tau_plot(
    density: dict[str, list[float]] | None,
    draws: np.ndarray | None,
    estimates: dict[str, float],
    sd_name: str,
) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    top = 0.0
    if density is not None:
        tau = np.asarray(density["tau"])
        ax.plot(tau, density["density"], color="k", lw=1.5, label="exact posterior (meta_bayes)")
        top = float(tau[-1])
    if draws is not None:
        hi = top if top > 0 else float(np.quantile(draws, 0.999))
        ax.hist(draws[draws <= hi], bins=60, range=(0.0, hi), density=True, color="C7",
                alpha=0.5, label="Gibbs draws")  # fmt: skip
        top = max(top, hi)
    for i, (fit, value) in enumerate(sorted(estimates.items(), key=lambda kv: kv[1])):
        ax.axvline(value, color=f"C{i}", lw=1.2, ls="--", label=f"{fit}: {value:.3g}")
    ax.set_xlim(0.0, top if top > 0 else None)
    ax.set_xlabel(f"tau ({sd_name})")
    ax.set_ylabel("posterior density")
    ax.legend(fontsize=7, loc="upper right")
    return plots.to_base64(fig)


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if not mc.is_meta(ctx):
        return None
    facts = mc.facts(ctx)
    density = facts.get("meta_bayes", {}).get("tau_posterior")
    sd_name = f"sd_{ctx.group}__Intercept"
    draws = None
    gibbs = ctx.fits.get("gibbs")
    if gibbs is not None and gibbs.draws_path is not None:
        draws = pd.read_parquet(gibbs.draws_path, columns=[sd_name])[sd_name].to_numpy()
    if density is None and draws is None:
        return None
    estimates = {
        fit: float(m["tau"])
        for fit, m in facts.items()
        if "coefficients" in m and m["estimator"] != "FE"
    }
    rows = [
        {"fit": fit, "tau": m["tau"], "lo": m["tau_ci"][0], "hi": m["tau_ci"][1]}
        for fit, m in facts.items()
        if fit in estimates
    ]
    bayes = [
        {"fit": fit, "mean": m["tau"]["mean"], "median": m["tau"]["median"],
         "lo": m["tau"]["ci"][0], "hi": m["tau"]["ci"][1], "prior": m["prior"]}
        for fit, m in facts.items()
        if "mu" in m
    ]  # fmt: skip
    return {
        "figure": tau_plot(density, draws, estimates, sd_name),
        "rows": rows,
        "bayes": bayes,
        "level": 100 * mc.studies(ctx).level,
    }
