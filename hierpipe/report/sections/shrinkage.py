"""How far each group's estimate moved from its own mean towards the population."""

from __future__ import annotations

from typing import Any

from hierpipe.report import checkplots, plots
from hierpipe.report.context import StudyContext

NOT_PARTIAL = ("no_pooling", "complete_pooling")
JS_FORMS = {
    "james_stein": "positive-part James–Stein towards the grand mean (equal group sizes)",
    "efron_morris": "Efron–Morris form for unequal group sizes (Morris 1983), shrinking "
    "towards the precision-weighted mean",
    "morris_regression": "Morris (1983) form with the moderators, shrinking towards the "
    "weighted regression line",
}
# one estimate a study: shrinkage is plotted against its standard error, not its size
META_SIZE = ("se", "standard error of the study's estimate")


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
    js = next(
        (f.checks["james_stein"] for f in ctx.fits.values() if f.checks.get("james_stein")), None
    )
    if not tables and not effective:
        return None
    meta = ctx.structure.kind == "meta"
    return {
        "figure": plots.shrinkage_plot(tables) if tables else None,
        "size_figure": checkplots.shrinkage_size_plot(
            tables, *(META_SIZE if meta else ("n", "group size n_j"))
        )
        if tables
        else None,
        "meta": meta,
        "effective": effective,
        "groups": next((f.checks.get("groups") for f in ctx.fits.values() if f.checks), None),
        "js": js,
        "js_form": JS_FORMS.get(js["form"], js["form"]) if js else None,
        # with predictors the no-pooling value is the group's own least-squares intercept
        "lmm": ctx.structure.kind == "lmm",
    }
