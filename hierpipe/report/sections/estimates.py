"""Population-level estimates side by side, and every group's estimate under every fit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.report import plots
from hierpipe.report.context import StudyContext
from hierpipe.report.format import hyper_rank, interval, is_hyper

# Above this many groups the figure and the table show an evenly spaced sample of
# the groups (in label order): a tick and a row a group stop being readable long
# before, and at 10^5 groups the figure alone took minutes (issue 7, scale).
# Every group's estimates stay in fits/FIT/summary.parquet.
MAX_GROUPS_SHOWN = 200


def group_estimates(ctx: StudyContext) -> pd.DataFrame:
    """One row a group: size, truth when simulated, and each fit's ``coef_`` mean."""
    prefix = f"coef_{ctx.group}["
    cols = {}
    for fit, f in ctx.fits.items():
        s = f.summary
        sel = s[s["parameter"].str.startswith(prefix) & s["parameter"].str.endswith(",Intercept]")]
        labels = sel["parameter"].str.slice(len(prefix), -len(",Intercept]"))
        cols[fit] = pd.Series(sel["mean"].to_numpy(), index=labels.to_numpy())
    table = pd.DataFrame(cols)
    sizes = ctx.data.groupby(ctx.group, observed=True).size()
    table.insert(0, "n", sizes.reindex(table.index.astype(str)).to_numpy())
    if ctx.truth is not None:
        tv = ctx.truth.set_index("parameter")["value"]
        table.insert(1, "truth", [tv.get(f"{prefix}{g},Intercept]", np.nan) for g in table.index])
    return table


def build(ctx: StudyContext) -> dict[str, Any]:
    names: list[str] = []
    for f in ctx.fits.values():
        names += [p for p in f.summary["parameter"] if is_hyper(p) and p not in names]
    names.sort(key=hyper_rank)
    rows = []
    for name in names:
        row = {"parameter": name}
        for fit, f in ctx.fits.items():
            est = f.estimates
            row[fit] = interval(est.loc[name]) if name in est.index else "–"
        rows.append(row)
    per_group = group_estimates(ctx)
    total = len(per_group)
    if total > MAX_GROUPS_SHOWN:
        keep = np.unique(np.round(np.linspace(0, total - 1, MAX_GROUPS_SHOWN)).astype(np.int64))
        per_group = per_group.iloc[keep]
    fits = [f for f in ctx.fits if f in per_group.columns]
    figure = None
    if fits:
        truth = per_group["truth"] if "truth" in per_group else None
        figure = plots.estimates_plot(per_group, fits, truth)
    return {
        "fits": list(ctx.fits),
        "rows": rows,
        "groups": per_group.reset_index(names="group").to_dict("records"),
        "group_cols": list(per_group.columns),
        "figure": figure,
        "shown": len(per_group),
        "total": total,
    }
