"""Fixed-effects table of a model with predictors: every fit side by side.

Only for one-factor linear mixed models (structure kind ``"lmm"``); other
studies return None. Each cell is the estimate, its standard error and the 90%
interval the fit reports (t for the pooling fits, Wald for ML/REML, posterior
quantiles for samplers); the reference level of each treatment-coded
categorical predictor is named.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hierpipe.report.context import StudyContext

INTERVALS = {
    "complete_pooling": "t interval on n - p df (OLS)",
    "no_pooling": "t interval on the residual df (shared effects only; the varying ones are "
    "each group's own)",
    "eb_ml": "Wald, normal: estimate ± 1.645 SE, SE from σ²(X'V⁻¹X)⁻¹ (lme4's vcov)",
    "eb_reml": "Wald, normal: estimate ± 1.645 SE, SE from σ²(X'V⁻¹X)⁻¹ (lme4's vcov)",
    "gibbs": "posterior mean, SD and 5%/95% quantiles",
}


def _names(ctx: StudyContext) -> list[str]:
    """``b_`` parameters in the order the fits report them (design order)."""
    names: list[str] = []
    for f in ctx.fits.values():
        names += [p for p in f.summary["parameter"] if p.startswith("b_") and p not in names]
    return names


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if ctx.structure.kind != "lmm":
        return None
    names = _names(ctx)
    if not names:
        return None
    rows = []
    for name in names:
        row: dict[str, Any] = {"parameter": name}
        for fit, f in ctx.fits.items():
            est = f.estimates
            if name in est.index:
                r = est.loc[name]
                row[fit] = {
                    "mean": float(r["mean"]),
                    "sd": float(r["sd"]),
                    "q5": float(r["q5"]),
                    "q95": float(r["q95"]),
                    "has_interval": bool(np.isfinite(r["q5"]) and np.isfinite(r["q95"])),
                }
            else:
                row[fit] = None
        rows.append(row)
    refs: dict[str, str] = {}
    for f in ctx.fits.values():
        refs.update(f.info.get("reference_levels", {}) or {})
    methods = [{"fit": fit, "how": INTERVALS.get(fit, "as the fit reports it")} for fit in ctx.fits]
    return {"fits": list(ctx.fits), "rows": rows, "reference_levels": refs, "methods": methods}
