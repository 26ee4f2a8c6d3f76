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


# Above this many rows a (fit, kind) shows an evenly spaced sample in the page's
# group table (coverage still counts every row): at 10^5 groups the full table
# made the page 76 MB (issue 7, scale).
MAX_GROUP_ROWS = 200


def _rows(ctx: StudyContext, tv: pd.Series) -> list[dict[str, Any]]:
    rows = []
    for fit, f in ctx.fits.items():
        est = f.estimates
        # One vectorised lookup a fit (a .loc per parameter took 20 s at 10^5 groups).
        names = tv.index[tv.index.isin(est.index)]
        truth = tv.loc[names].to_numpy(dtype=np.float64)
        e = est.loc[names]
        mean, q5, q95 = (e[c].to_numpy(dtype=np.float64) for c in ("mean", "q5", "q95"))
        has = np.isfinite(q5) & np.isfinite(q95)
        covered = (q5 <= truth) & (truth <= q95)
        for k, name in enumerate(names):
            rows.append(
                {
                    "fit": fit,
                    "kind": _kind(name),
                    "parameter": name,
                    "truth": float(truth[k]),
                    "estimate": float(mean[k]),
                    "q5": float(q5[k]),
                    "q95": float(q95[k]),
                    "covered": bool(covered[k]) if has[k] else None,
                }
            )
    return rows


def _shown(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most :data:`MAX_GROUP_ROWS` rows of each (fit, kind), evenly spaced."""
    parts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in groups:
        parts.setdefault((r["fit"], r["kind"]), []).append(r)
    out = []
    for part in parts.values():
        if len(part) > MAX_GROUP_ROWS:
            keep = np.unique(np.round(np.linspace(0, len(part) - 1, MAX_GROUP_ROWS)).astype(int))
            part = [part[k] for k in keep]
        out += part
    return out


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
    groups = [r for r in rows if r["kind"] != "population"]
    return {
        "hyper": [r for r in rows if r["kind"] == "population"],
        "groups": _shown(groups),
        "groups_total": len(groups),
        "coverage": _coverage(rows),
        "realised": realised,
        "sd_name": f"sd_{ctx.group}__Intercept",
    }
