"""Simulated studies: every true value against its estimate and 90% interval, and coverage.

Coverage is reported per fit and per kind of parameter: population-level
(``b_``, ``sd_``, ``sigma``, ``icc_``), group deviations (``r_``) and group
coefficients (``coef_``). Point estimators without an interval (e.g. the EB
variance components) count as not assessable, not as misses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.report.context import StudyContext
from hierpipe.report.format import is_hyper


def _kind(name: str) -> str:
    if is_hyper(name):
        return "population"
    return "r_" if name.startswith("r_") else "coef_" if name.startswith("coef_") else "other"


def _rows(ctx: StudyContext, tv: pd.Series) -> list[dict[str, Any]]:
    rows = []
    for fit, f in ctx.fits.items():
        est = f.estimates
        for name, value in tv.items():
            if name not in est.index:
                continue
            r = est.loc[name]
            has = bool(np.isfinite(r["q5"]) and np.isfinite(r["q95"]))
            rows.append(
                {
                    "fit": fit,
                    "kind": _kind(name),
                    "parameter": name,
                    "truth": float(value),
                    "estimate": float(r["mean"]),
                    "q5": float(r["q5"]),
                    "q95": float(r["q95"]),
                    "covered": bool(r["q5"] <= value <= r["q95"]) if has else None,
                }
            )
    return rows


def _coverage(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = pd.DataFrame(rows)
    out = []
    for (fit, kind), g in table.groupby(["fit", "kind"], sort=False):
        assessed = g["covered"].dropna()
        out.append(
            {
                "fit": fit,
                "kind": kind,
                "parameters": len(g),
                "assessed": len(assessed),
                "coverage": float(np.mean(assessed.astype(bool))) if len(assessed) else None,
            }
        )
    return out


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if ctx.truth is None:
        return None
    tv = ctx.truth.set_index("parameter")["value"]
    rows = _rows(ctx, tv)
    if not rows:
        return None
    prefix = f"coef_{ctx.group}["
    # intercepts only: a varying-slopes study also has coef_[., slope] rows
    true_coef = tv[[n for n in tv.index if n.startswith(prefix) and n.endswith(",Intercept]")]]
    # The estimates target the group means that were actually drawn: their mean and
    # SD, which with few groups can sit well away from the generating values.
    realised = None
    if len(true_coef) > 1:
        realised = {
            "mean": float(true_coef.mean()),
            "sd": float(true_coef.std(ddof=1)),
            "mu": float(tv.get("b_Intercept", np.nan)),
            "tau": float(tv.get(f"sd_{ctx.group}__Intercept", np.nan)),
        }
    return {
        "hyper": [r for r in rows if r["kind"] == "population"],
        "groups": [r for r in rows if r["kind"] != "population"],
        "coverage": _coverage(rows),
        "realised": realised,
        "sd_name": f"sd_{ctx.group}__Intercept",
    }
