"""Forest plot: each study's estimate, the shrunken study effects, the pooled diamonds, the PI."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Polygon
from scipy import stats

from hierpipe.report import plots
from hierpipe.report.context import StudyContext
from hierpipe.report.sections import meta_common as mc

# fits whose pooled average is drawn as a diamond, in this order from the top
DIAMONDS = ("complete_pooling", *mc.HEADLINE, *mc.BAYESIAN)


def _diamond(ax: Any, row: float, centre: float, lo: float, hi: float, color: str) -> None:
    ax.add_patch(
        Polygon(
            [(lo, row), (centre, row + 0.32), (hi, row), (centre, row - 0.32)],
            closed=True,
            facecolor=color,
            edgecolor="k",
            lw=0.6,
        )
    )


def forest_plot(
    st: mc.Studies,
    effects: dict[str, Any],
    diamonds: list[tuple[str, tuple[float, float, float]]],
    pi: tuple[float, float, str, str] | None,
    z: float,
) -> str:
    """The forest plot as a base64 PNG (studies top-down in file order)."""
    k = st.k
    rows = len(diamonds) + (1 if pi else 0)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * (k + rows) + 1.6))
    ypos = np.arange(k)[::-1] + rows + 1.0
    ax.errorbar(st.y, ypos, xerr=z * st.se, fmt="s", color="k", ms=4, lw=1, capsize=0,
                label="observed estimate")  # fmt: skip
    for i, (fit, eff) in enumerate(effects.items()):
        est = eff.reindex(st.labels)
        off = -0.25 * (i + 1)
        ax.errorbar(est["estimate"], ypos + off, xerr=z * est["se"], fmt="o", mfc="white",
                    color=f"C{i}", ms=4, lw=0.8, capsize=0,
                    label=f"study effect ({fit})")  # fmt: skip
    labels = list(st.labels)
    ticks = list(ypos)
    for r, (fit, (m, lo, hi)) in enumerate(diamonds):
        row = rows - r
        color = {"complete_pooling": "C3", "meta_bayes": "C1", "gibbs": "C2"}.get(fit, "C0")
        _diamond(ax, row, m, lo, hi, color)
        ticks.append(row)
        labels.append(f"pooled: {fit}")
    if pi:
        ax.plot([pi[0], pi[1]], [0.7, 0.7], color="C0", lw=2.5, ls="-", alpha=0.6)
        ticks.append(0.7)
        labels.append(f"prediction interval ({pi[3]})")
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    if diamonds:
        ax.axvline(diamonds[-1][1][0], color="C0", lw=0.8, ls="--")
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_ylim(0.2, ypos.max() + 0.8)
    ax.set_xlabel(f"effect size, {100 * st.level:g}% intervals")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return plots.to_base64(fig)


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if not mc.is_meta(ctx):
        return None
    st = mc.studies(ctx)
    facts = mc.facts(ctx)
    z = float(stats.norm.ppf(0.5 + st.level / 2))
    head = mc.headline(ctx)
    shown = [f for f in (head, next((b for b in mc.BAYESIAN if b in facts), None)) if f]
    shown = list(dict.fromkeys(shown))
    effects = {f: e for f in shown if (e := mc.study_effects(facts[f])) is not None}
    diamonds = [
        (fit, d) for fit in DIAMONDS if fit in facts and (d := mc.pooled(facts[fit])) is not None
    ]
    # the headline diamond last, nearest its prediction interval
    diamonds.sort(key=lambda item: item[0] == head)
    pi = (*found, head) if head and (found := mc.prediction_interval(facts[head])) else None
    weights = None
    if head and "tau2" in facts[head]:
        w = 1.0 / (st.se**2 + facts[head]["tau2"])
        weights = 100.0 * w / w.sum()
    table = []
    for j, lab in enumerate(st.labels):
        row = {
            "study": lab,
            "estimate": st.y[j],
            "se": st.se[j],
            "lo": st.y[j] - z * st.se[j],
            "hi": st.y[j] + z * st.se[j],
            "weight": None if weights is None else weights[j],
        }
        for f, eff in effects.items():
            row[f] = eff.loc[lab, "estimate"] if lab in eff.index else None
        table.append(row)
    return {
        "figure": forest_plot(st, effects, diamonds, pi, z),
        "rows": table,
        "effect_fits": list(effects),
        "headline": head,
        "level": 100 * st.level,
        "pi_variant": pi[2] if pi else None,
        "weights": weights is not None,
        "regression": any(m.get("p", 1) > 1 for m in facts.values()),
    }
