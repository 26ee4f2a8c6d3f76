"""Standardised residuals of every fit: against fitted values, QQ plot, by group."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.report import checkplots
from hierpipe.report.context import StudyContext


def build(ctx: StudyContext) -> dict[str, Any] | None:
    fits = []
    for fit in ctx.fits:
        path = ctx.study_dir / "diagnostics" / fit / "residuals.parquet"
        if not path.exists():
            continue
        resid = pd.read_parquet(path)
        std = resid["standardised"].to_numpy()
        if not np.isfinite(std).any():
            continue
        finite = std[np.isfinite(std)]
        fits.append(
            {
                "fit": fit,
                "beyond3": int(np.sum(np.abs(finite) > 3)),
                "expected3": float(finite.size * 0.0026997960632601866),
                "n": int(finite.size),
                "figure": checkplots.residual_plot(fit, resid),
            }
        )
    return {"fits": fits, "meta": ctx.structure.kind == "meta"} if fits else None
