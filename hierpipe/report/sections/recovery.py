"""Simulated studies: true values against estimates and interval coverage."""

from __future__ import annotations

from typing import Any

import numpy as np

from hierpipe.report.context import StudyContext
from hierpipe.report.format import is_hyper


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if ctx.truth is None:
        return None
    tv = ctx.truth.set_index("parameter")["value"]
    prefix = f"coef_{ctx.group}["
    true_coef = tv[[n for n in tv.index if n.startswith(prefix)]]
    hyper, coverage = [], []
    for fit, f in ctx.fits.items():
        est = f.estimates
        for name, value in tv.items():
            if name not in est.index or not is_hyper(name):
                continue
            r = est.loc[name]
            covered = bool(r["q5"] <= value <= r["q95"]) if np.isfinite(r["q5"]) else None
            hyper.append(
                {
                    "fit": fit,
                    "parameter": name,
                    "truth": value,
                    "estimate": r["mean"],
                    "q5": r["q5"],
                    "q95": r["q95"],
                    "covered": covered,
                }
            )
        hits = [
            bool(est.loc[n, "q5"] <= v <= est.loc[n, "q95"])
            for n, v in true_coef.items()
            if n in est.index and np.isfinite(est.loc[n, "q5"])
        ]
        if hits:
            coverage.append({"fit": fit, "groups": len(hits), "coverage": float(np.mean(hits))})
    # The estimates target the spread of the group means that were actually drawn;
    # with few groups it can sit well away from the generating SD.
    realised = float(true_coef.std(ddof=1)) if len(true_coef) > 1 else None
    return {
        "hyper": hyper,
        "coverage": coverage,
        "realised_sd": realised,
        "sd_name": f"sd_{ctx.group}__Intercept",
    }
