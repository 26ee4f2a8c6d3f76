"""Influence: how the average effect, tau and the prediction interval move without each study."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from hierpipe.report import plots
from hierpipe.report.context import StudyContext
from hierpipe.report.sections import meta_common as mc

# |externally standardised residual| above this is flagged (Viechtbauer & Cheung 2010)
RESIDUAL_FLAG = 1.96
INFLUENCE_COLUMNS = ("mu", "mu_se", "tau", "pi_lb", "pi_ub", "std_residual")


def influence_plot(
    tables: dict[str, pd.DataFrame],
    order: list[str],
    full: dict[str, tuple[float, float]],
    z: float,
) -> str:
    """Left: mu (with its interval and the PI) without each study; right: tau without it."""
    k = len(order)
    fig, (ax_mu, ax_tau) = plt.subplots(
        1, 2, figsize=(9, 0.3 * k + 1.6), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    ypos = np.arange(k)[::-1].astype(float)
    for i, (fit, t) in enumerate(tables.items()):
        t = t.set_index("group").reindex(order)
        off = 0.18 * (i - (len(tables) - 1) / 2)
        ax_mu.plot([t["pi_lb"], t["pi_ub"]], [ypos + off, ypos + off], color=f"C{i}", lw=0.6,
                   alpha=0.5)  # fmt: skip
        ax_mu.errorbar(t["mu"], ypos + off, xerr=z * t["mu_se"], fmt="o", color=f"C{i}", ms=3.5,
                       lw=1.2, capsize=0, label=fit)  # fmt: skip
        ax_tau.plot(t["tau"], ypos + off, "o", color=f"C{i}", ms=3.5)
        if fit in full:
            ax_mu.axvline(full[fit][0], color=f"C{i}", lw=0.8, ls="--")
            ax_tau.axvline(full[fit][1], color=f"C{i}", lw=0.8, ls="--")
    ax_mu.set_yticks(ypos, order, fontsize=7)
    ax_mu.set_xlabel("average effect without the study (thin: prediction interval)")
    ax_tau.set_xlabel("tau without the study")
    ax_tau.set_xlim(left=0.0)
    ax_mu.legend(fontsize=7, loc="best")
    return plots.to_base64(fig)


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if not mc.is_meta(ctx):
        return None
    facts = mc.facts(ctx)
    st = mc.studies(ctx)
    head = mc.headline(ctx)
    candidates = [f for f in (head, "meta_bayes") if f]
    tables = {}
    for fit in dict.fromkeys(candidates):
        path = ctx.study_dir / "cv" / f"{fit}.parquet"
        if path.exists():
            t = pd.read_parquet(path)
            if set(INFLUENCE_COLUMNS) <= set(t.columns):
                tables[fit] = t
    if not tables:
        return None
    full = {}
    for fit in tables:
        m = facts.get(fit, {})
        pooled = mc.pooled(m)
        if pooled is not None:
            tau = m["tau"]["mean"] if isinstance(m.get("tau"), dict) else m.get("tau", 0.0)
            full[fit] = (pooled[0], float(tau))
    z = float(stats.norm.ppf(0.5 + st.level / 2))
    main_fit = next(iter(tables))
    main = tables[main_fit].set_index("group").reindex(st.labels)
    rows = [
        {
            "study": lab,
            "estimate": st.y[j],
            "std_residual": main.loc[lab, "std_residual"],
            "flag": bool(abs(main.loc[lab, "std_residual"]) > RESIDUAL_FLAG),
            "mu": main.loc[lab, "mu"],
            "delta_mu": main.loc[lab, "mu"] - full[main_fit][0] if main_fit in full else None,
            "tau": main.loc[lab, "tau"],
            "pi_lb": main.loc[lab, "pi_lb"],
            "pi_ub": main.loc[lab, "pi_ub"],
        }
        for j, lab in enumerate(st.labels)
    ]
    return {
        "figure": influence_plot(tables, st.labels, full, z),
        "fit": main_fit,
        "fits": list(tables),
        "rows": rows,
        "flag": RESIDUAL_FLAG,
        "level": 100 * st.level,
    }
