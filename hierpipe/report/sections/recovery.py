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

from hierpipe.names import POPULATION_PREFIXES
from hierpipe.report.context import StudyContext


def _kinds(names: np.ndarray) -> np.ndarray:
    """``population``, ``r_``, ``coef_`` or ``other`` for each parameter name."""
    text = pd.Series(names, dtype=object).astype(str)
    kinds = np.full(len(names), "other", dtype=object)
    kinds[text.str.startswith("coef_").to_numpy(dtype=bool)] = "coef_"
    kinds[text.str.startswith("r_").to_numpy(dtype=bool)] = "r_"
    kinds[text.str.startswith(POPULATION_PREFIXES).to_numpy(dtype=bool)] = "population"
    return kinds


# Above this many rows a (fit, kind) shows an evenly spaced sample in the page's
# group table (coverage still counts every row): at 10^5 groups the full table
# made the page 76 MB (issue 7, scale).
MAX_GROUP_ROWS = 200


def _table(ctx: StudyContext, tv: pd.Series) -> pd.DataFrame:
    """Every (fit, parameter with a true value): truth, estimate, interval, coverage.

    Built with arrays, not a dictionary a parameter: at 10^5 groups there are
    4 x 10^5 rows, and the row-by-row version took 15 s of the report's time.
    """
    names = np.asarray(tv.index, dtype=object)
    truth = tv.to_numpy(dtype=np.float64)
    kinds = _kinds(names)
    parts = []
    for fit, f in ctx.fits.items():
        est = f.estimates
        pos = est.index.get_indexer(names)
        keep = pos >= 0
        pos = pos[keep]
        mean, q5, q95 = (est[c].to_numpy(dtype=np.float64)[pos] for c in ("mean", "q5", "q95"))
        t = truth[keep]
        has = np.isfinite(q5) & np.isfinite(q95)
        parts.append(
            pd.DataFrame(
                {
                    "fit": fit,
                    "kind": kinds[keep],
                    "parameter": names[keep],
                    "truth": t,
                    "estimate": mean,
                    "q5": q5,
                    "q95": q95,
                    "has": has,
                    "covered": (q5 <= t) & (t <= q95),
                }
            )
        )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows for the template; ``covered`` is None where there is no interval."""
    out = []
    for r in table.itertuples(index=False):
        out.append(
            {
                "fit": r.fit,
                "kind": r.kind,
                "parameter": r.parameter,
                "truth": float(r.truth),
                "estimate": float(r.estimate),
                "q5": float(r.q5),
                "q95": float(r.q95),
                "covered": bool(r.covered) if r.has else None,
            }
        )
    return out


def _parts(table: pd.DataFrame) -> list[pd.DataFrame]:
    """Rows of each (fit, kind), in order of first appearance."""
    return [g for _, g in table.groupby(["fit", "kind"], sort=False)]


def _shown(groups: pd.DataFrame) -> list[dict[str, Any]]:
    """At most :data:`MAX_GROUP_ROWS` rows of each (fit, kind), evenly spaced."""
    out = []
    for part in _parts(groups):
        if len(part) > MAX_GROUP_ROWS:
            keep = np.unique(np.round(np.linspace(0, len(part) - 1, MAX_GROUP_ROWS)).astype(int))
            part = part.iloc[keep]
        out += _records(part)
    return out


def _coverage(table: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for g in _parts(table):
        has = g["has"].to_numpy(dtype=bool)
        assessed = int(has.sum())
        out.append(
            {
                "fit": g["fit"].iloc[0],
                "kind": g["kind"].iloc[0],
                "parameters": len(g),
                "assessed": assessed,
                "coverage": float(np.mean(g["covered"].to_numpy(dtype=bool)[has]))
                if assessed
                else None,
            }
        )
    return out


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if ctx.truth is None:
        return None
    tv = ctx.truth.set_index("parameter")["value"]
    table = _table(ctx, tv)
    if table.empty:
        return None
    prefix = f"coef_{ctx.group}["
    # intercepts only: a varying-slopes study also has coef_[., slope] rows
    index = pd.Series(np.asarray(tv.index, dtype=object), dtype=object).astype(str)
    true_coef = tv[
        (index.str.startswith(prefix) & index.str.endswith(",Intercept]")).to_numpy(dtype=bool)
    ]
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
    population = (table["kind"] == "population").to_numpy(dtype=bool)
    return {
        "hyper": _records(table[population]),
        "groups": _shown(table[~population]),
        "groups_total": int((~population).sum()),
        "coverage": _coverage(table),
        "realised": realised,
        "sd_name": f"sd_{ctx.group}__Intercept",
    }
