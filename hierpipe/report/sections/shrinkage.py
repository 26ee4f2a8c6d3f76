"""How far each group's estimate moved from its own mean towards the population."""

from __future__ import annotations

from typing import Any

from hierpipe.report import plots
from hierpipe.report.context import StudyContext

NOT_PARTIAL = ("no_pooling", "complete_pooling")


def build(ctx: StudyContext) -> dict[str, Any] | None:
    tables = {
        fit: f.shrinkage
        for fit, f in ctx.fits.items()
        if f.shrinkage is not None and fit not in NOT_PARTIAL
    }
    effective = [
        {"fit": fit, "value": f.checks.get("effective_parameters")}
        for fit, f in ctx.fits.items()
        if f.checks
    ]
    if not tables and not effective:
        return None
    return {"figure": plots.shrinkage_plot(tables) if tables else None, "effective": effective}
