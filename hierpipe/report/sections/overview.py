"""Data summary and the notices a reader must see first."""

from __future__ import annotations

from typing import Any

import numpy as np

from hierpipe.report.context import StudyContext


def build(ctx: StudyContext) -> dict[str, Any]:
    data = ctx.data
    sizes = data.groupby(ctx.group, observed=True).size()
    y = data[ctx.response].to_numpy(dtype=float)
    notices = []
    for fit, f in ctx.fits.items():
        notices += [f"{fit}: {w}" for w in f.info.get("warnings", [])]
        notices += [f"{fit}: convergence: {w}" for w in f.checks.get("convergence_flags", [])]
    meta = None
    if ctx.structure.kind == "meta" and ctx.structure.se_column in data:
        # one estimate a study: describe the studies' standard errors, not "group size 1"
        se = data[ctx.structure.se_column].to_numpy(dtype=float)
        se = np.sqrt(se) if ctx.structure.se_kind == "var" else se
        meta = {"se_min": float(se.min()), "se_median": float(np.median(se)),
                "se_max": float(se.max())}  # fmt: skip
    return {
        "meta": meta,
        "rows": len(data),
        "groups": int(sizes.size),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "mean": float(y.mean()),
        "sd": float(y.std(ddof=1)) if y.size > 1 else float("nan"),
        "notices": notices,
    }
