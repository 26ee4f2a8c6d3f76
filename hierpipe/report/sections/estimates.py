"""Population-level estimates side by side, and every group's estimate under every fit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.names import POPULATION_PREFIXES
from hierpipe.report import plots
from hierpipe.report.context import StudyContext
from hierpipe.report.format import hyper_rank, interval

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
        wanted = [f"{prefix}{g},Intercept]" for g in table.index]
        table.insert(1, "truth", tv.reindex(wanted).to_numpy(dtype=np.float64))
    return table


def build(ctx: StudyContext) -> dict[str, Any]:
    # Population-level names of every fit, in first-seen order: selected with
    # vectorised string tests, since a summary has a row a group (10^5 at scale).
    names: list[str] = []
    for f in ctx.fits.values():
        params = f.summary["parameter"].astype(object).astype(str)
        hyper = params[params.str.startswith(POPULATION_PREFIXES).to_numpy(dtype=bool)]
        names += [p for p in hyper if p not in names]
    names.sort(key=hyper_rank)
    rows = [{"parameter": name} for name in names]
    for fit, f in ctx.fits.items():
        est = f.estimates
        pos = est.index.get_indexer(names) if names else np.zeros(0, dtype=np.intp)
        for row, k in zip(rows, pos, strict=True):
            row[fit] = interval(est.iloc[k]) if k >= 0 else "–"
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
