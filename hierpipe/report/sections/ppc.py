"""Posterior (and parametric) predictive checks per fit, and the prior predictive check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.report import checkplots
from hierpipe.report.context import StudyContext

PRIOR_ROWS = (
    ("outcome_sd", "SD of the outcome about the intercept, sqrt(tau^2 + sigma^2)"),
    ("new_group_deviation", "a new group's mean minus the intercept"),
    ("new_observation_deviation", "a new observation minus the intercept"),
    ("new_observation", "a new observation"),
)
# a meta-analysis: one estimate a study with known variance v_j (models.engines.meta_checks)
META_PRIOR_ROWS = (
    ("outcome_sd", "SD of a new study's estimate about mu, sqrt(tau^2 + median v_j)"),
    ("new_group_deviation", "a new study's true effect minus mu"),
    ("new_observation_deviation", "a new study's estimate (median v_j) minus mu"),
    ("new_observation", "a new study's estimate"),
)


def _table(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    t = pd.read_parquet(path)
    return t if len(t) else None


def _fit_check(ctx: StudyContext, fit: str) -> dict[str, Any] | None:
    ddir = ctx.study_dir / "diagnostics" / fit
    table, overall = _table(ddir / "ppc.parquet"), _table(ddir / "ppc_overall.parquet")
    if table is None or overall is None:
        return None
    facts = ctx.fits[fit].checks.get("ppc") or {}
    groups = table[table["scope"] == "group"]
    extreme = groups[groups["extreme"]].sort_values(["statistic", "group"])
    return {
        "fit": fit,
        "note": facts.get("note", ""),
        "overall": table[table["scope"] == "overall"].to_dict("records"),
        "extreme": extreme.to_dict("records"),
        "p_values": int(groups["p_value"].notna().sum()),
        "figure": checkplots.ppc_plot(fit, table, overall),
    }


def _prior_check(ctx: StudyContext, fit: str) -> dict[str, Any] | None:
    prior = _table(ctx.study_dir / "diagnostics" / fit / "prior_predictive.parquet")
    if prior is None:
        return None
    y = ctx.data[ctx.response].to_numpy(dtype=float)
    observed_sd = float(y.std(ddof=1))
    dev = y - y.mean()
    data_range = {
        "outcome_sd": (observed_sd, observed_sd),
        "new_observation_deviation": tuple(np.quantile(dev, [0.05, 0.95])),
        "new_observation": tuple(np.quantile(y, [0.05, 0.95])),
    }
    rows = []
    for column, label in META_PRIOR_ROWS if ctx.structure.kind == "meta" else PRIOR_ROWS:
        x = prior[column].to_numpy() if column in prior else np.array([np.nan])
        if not np.isfinite(x).any():
            continue
        q = np.quantile(x[np.isfinite(x)], [0.05, 0.25, 0.5, 0.75, 0.95])
        lo, hi = data_range.get(column, (np.nan, np.nan))
        rows.append({"quantity": label, "q": q.tolist(), "data_lo": lo, "data_hi": hi})
    sd = prior["outcome_sd"].to_numpy()
    return {
        "fit": fit,
        "rows": rows,
        "draws": len(prior),
        "flat_intercept": not np.isfinite(prior["new_observation"].to_numpy()).any(),
        "share_wide": float(np.mean(sd > 10 * observed_sd)),
        "share_narrow": float(np.mean(sd < observed_sd / 10)),
        "figure": checkplots.prior_plot(prior, observed_sd, dev),
    }


def build(ctx: StudyContext) -> dict[str, Any] | None:
    fits = [c for c in (_fit_check(ctx, f) for f in ctx.fits) if c is not None]
    priors = [c for c in (_prior_check(ctx, f) for f in ctx.fits) if c is not None]
    if not fits and not priors:
        return None
    skipped = sorted(
        {s for f in ctx.fits.values() for s in f.checks.get("skipped", []) if "prior" in s}
    )
    return {"fits": fits, "priors": priors, "meta": ctx.structure.kind == "meta",
            "prior_skipped": skipped}  # fmt: skip
