"""Convergence of every sampler fit: R-hat, ESS, MCSE, trace and rank plots."""

from __future__ import annotations

from typing import Any

import pandas as pd

from hierpipe.report import checkplots
from hierpipe.report.context import StudyContext

MCSE_COLUMNS = ("mcse_mean", "mcse_q5", "mcse_q95")


def build(ctx: StudyContext) -> dict[str, Any] | None:
    samplers = []
    for fit, f in ctx.fits.items():
        if f.convergence is None or f.draws_path is None:
            continue
        conv = f.convergence
        hyper = conv[conv["hyperparameter"]]
        draws = pd.read_parquet(f.draws_path, columns=["chain", "draw", *hyper["parameter"]])
        samplers.append(
            {
                "fit": fit,
                "rows": hyper.to_dict("records"),
                "mcse": [c for c in MCSE_COLUMNS if c in conv.columns],
                "worst_rhat": float(conv["rhat"].max()),
                "min_ess": float(conv[["ess_bulk", "ess_tail"]].min().min()),
                "settings": f.info.get("settings", {}),
                "priors": f.info.get("priors", {}),
                "flags": f.checks.get("convergence_flags", []),
                "figure": checkplots.trace_rank_plot(draws, list(hyper["parameter"])),
            }
        )
    return {"samplers": samplers} if samplers else None
