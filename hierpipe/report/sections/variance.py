"""Variance decomposition (ICC) and predictions for a new group."""

from __future__ import annotations

from typing import Any

from hierpipe.report.context import StudyContext


def build(ctx: StudyContext) -> dict[str, Any] | None:
    icc = [{"fit": fit, **f.checks["icc"]} for fit, f in ctx.fits.items() if f.checks.get("icc")]
    predictions = [
        {"fit": fit, **p} for fit, f in ctx.fits.items() for p in f.info.get("predictions", [])
    ]
    if not icc and not predictions:
        return None
    return {"icc": icc, "predictions": predictions}
