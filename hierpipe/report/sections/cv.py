"""Leave-one-group-out comparison of the fits."""

from __future__ import annotations

from typing import Any

import pandas as pd

from hierpipe.report import plots
from hierpipe.report.context import StudyContext


def build(ctx: StudyContext) -> dict[str, Any] | None:
    path = ctx.study_dir / "cv" / "comparison.parquet"
    if not path.exists():
        return None
    comp = pd.read_parquet(path)
    per_fit = {}
    for fit in comp["fit"]:
        p = ctx.study_dir / "cv" / f"{fit}.parquet"
        if p.exists():
            per_fit[fit] = pd.read_parquet(p)
    return {
        "rows": comp.to_dict("records"),
        "figure": plots.cv_plot(per_fit) if len(per_fit) > 1 else None,
    }
