"""What the meta-analysis sections share: the studies' data, the fits' facts, the headline fit.

Not a section itself (it is not in ``SECTIONS``). Every meta section returns None
for a study whose formula has no known standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.report.context import StudyContext

# The fit whose study effects, pooled estimate and prediction interval the forest
# plot and the influence plot show: the first of these the study has (REML is
# metafor's default and the least biased of the likelihood estimators).
HEADLINE = ("meta_reml", "meta_pm", "meta_ml", "meta_dl", "meta_sj", "meta_hs")
BAYESIAN = ("meta_bayes", "gibbs")


@dataclass(frozen=True)
class Studies:
    """The studies in file order: label, estimate, standard error; and the interval level."""

    labels: list[str]
    y: np.ndarray
    se: np.ndarray
    level: float

    @property
    def k(self) -> int:
        return len(self.labels)


def is_meta(ctx: StudyContext) -> bool:
    return ctx.structure.kind == "meta"


def studies(ctx: StudyContext) -> Studies:
    """The study-level data from ``data.parquet`` (one row a study, in file order)."""
    data = ctx.data
    col = ctx.structure.se_column
    se = data[col].to_numpy(dtype=np.float64)
    if ctx.structure.se_kind == "var":
        se = np.sqrt(se)
    level = float(ctx.config.get("meta", {}).get("level", 0.95))
    return Studies(
        labels=data[ctx.group].astype(str).tolist(),
        y=data[ctx.response].to_numpy(dtype=np.float64),
        se=se,
        level=level,
    )


def facts(ctx: StudyContext) -> dict[str, dict[str, Any]]:
    """Each fit's ``fit.json["meta"]``, for the fits that have one."""
    return {fit: f.info["meta"] for fit, f in ctx.fits.items() if "meta" in f.info}


def headline(ctx: StudyContext) -> str | None:
    """The random-effects fit the plots centre on (see ``HEADLINE``), or a Bayesian one."""
    for name in (*HEADLINE, *BAYESIAN):
        if name in ctx.fits and "meta" in ctx.fits[name].info:
            return name
    return None


def study_effects(meta: dict[str, Any]) -> pd.DataFrame | None:
    """A fit's study effects (estimate, se) indexed by study label."""
    eff = meta.get("study_effects")
    if not eff:
        return None
    return pd.DataFrame(
        {"estimate": eff["estimate"], "se": eff["se"]}, index=pd.Index(eff["study"], dtype=str)
    )


def pooled(meta: dict[str, Any]) -> tuple[float, float, float] | None:
    """``(mean, lower, upper)`` of the average effect at the fit's level, intercept-only fits."""
    if meta.get("p", 1) != 1:
        return None
    if "coefficients" in meta:
        c = meta["coefficients"][0]
        return c["estimate"], c["ci_lb"], c["ci_ub"]
    if "mu" in meta:
        return meta["mu"]["mean"], meta["mu"]["ci"][0], meta["mu"]["ci"][1]
    return None


def prediction_interval(meta: dict[str, Any]) -> tuple[float, float, str] | None:
    pi = meta.get("pi")
    if not pi or pi.get("lb") is None or pi.get("ub") is None:
        return None
    return pi["lb"], pi["ub"], pi["variant"]
