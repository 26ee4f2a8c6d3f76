"""Funnel plot with Egger's regression test for small-study effects."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from hierpipe.errors import InputError
from hierpipe.models.meta import EggerTest, egger_test
from hierpipe.report import plots
from hierpipe.report.context import StudyContext
from hierpipe.report.sections import meta_common as mc

# Sterne et al. (2011): below this many studies the test's power is too low to use
EGGER_MIN_STUDIES = 10


def funnel_plot(st: mc.Studies, centre: float, fit: str, egger: EggerTest | None) -> str:
    """Estimates against their SE (inverted axis), pseudo 95% limits and Egger's line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    top = 1.05 * float(st.se.max())
    se = np.linspace(0.0, top, 50)
    z = float(stats.norm.ppf(0.975))
    ax.fill_betweenx(se, centre - z * se, centre + z * se, color="0.92", label="pseudo 95% limits")
    ax.axvline(centre, color="C0", lw=1, label=f"average effect ({fit})")
    ax.scatter(st.y, st.se, color="k", s=18, zorder=3, label="studies")
    if egger is not None:
        ax.plot(egger.slope + egger.intercept * se, se, color="C3", lw=1, ls="--",
                label="Egger regression line")  # fmt: skip
    ax.set_ylim(top, 0.0)
    ax.set_xlabel("effect size")
    ax.set_ylabel("standard error")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return plots.to_base64(fig)


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if not mc.is_meta(ctx):
        return None
    st = mc.studies(ctx)
    facts = mc.facts(ctx)
    fit = next(
        (f for f in ("complete_pooling", *mc.HEADLINE, *mc.BAYESIAN)
         if f in facts and mc.pooled(facts[f]) is not None),
        None,
    )  # fmt: skip
    if fit is not None:
        centre = mc.pooled(facts[fit])[0]
    else:  # meta-regression: the funnel is drawn about the inverse-variance mean
        w = 1.0 / st.se**2
        centre, fit = float(np.dot(w, st.y) / w.sum()), "inverse-variance mean"
    egger, why = None, None
    try:
        egger = egger_test(st.y, st.se**2)
    except InputError as exc:
        why = str(exc)
    return {
        "figure": funnel_plot(st, centre, fit, egger),
        "egger": egger,
        "why": why,
        "k": st.k,
        "low_power": st.k < EGGER_MIN_STUDIES,
        "min_k": EGGER_MIN_STUDIES,
    }
