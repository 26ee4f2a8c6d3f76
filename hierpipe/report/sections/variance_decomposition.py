r"""Variance decomposition of models with several grouping factors (nested or crossed).

For each fit: the share of the total variance at each level (a stacked bar),
the ICCs with their intervals and definitions, and shrinkage per level. Only
for structure kind ``"multilevel"``; other studies get None.

Shares are :math:`\sigma_k^2/(\sum_j \sigma_j^2 + \sigma^2)` from the fit's
variance components (posterior means of the variances for Gibbs). Per level,
a group's fitted mean is ``b_Intercept`` plus its own and (nested) its
ancestors' ``r_``; it is pulled from its raw mean towards its parent's fitted
mean (the population mean for the top level and for crossed factors). The
weight on its own data is :math:`(\text{fitted} - \text{parent})/(\text{raw} -
\text{parent})`; its median is reported per level.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.report.context import StudyContext
from hierpipe.report.plots import to_base64

PARTIAL = ("eb_ml", "eb_reml", "gibbs")
#: The concept notes' rule of thumb, shown beside the ICCs and never applied.
RULE_OF_THUMB = 0.05


def _factors(ctx: StudyContext) -> list[tuple[str, tuple[str, ...]]]:
    """(factor name, component columns) in formula order."""
    return [(rt.name, rt.group) for rt in ctx.formula.random]


def _labels(data: pd.DataFrame, columns: tuple[str, ...]) -> pd.Series:
    out = data[columns[0]].astype(str)
    for c in columns[1:]:
        out = out + ":" + data[c].astype(str)
    return out


def _bar(rows: list[dict[str, Any]], names: list[str]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        left = 0.0
        for k, name in enumerate(names):
            share = r["shares"][name]
            ax.barh(i, share, left=left, color=f"C{k}", label=name if i == 0 else None)
            if share > 0.06:
                ax.text(left + share / 2, i, f"{share:.2f}", ha="center", va="center", fontsize=8)
            left += share
    ax.set_yticks(range(len(rows)), [r["fit"] for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the total variance")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(names), fontsize=8)
    return to_base64(fig)


def _levels(ctx: StudyContext, fit: str) -> list[dict[str, Any]]:
    """Per factor: raw and fitted group means, the parent's fitted mean and the weights."""
    est = ctx.fits[fit].estimates["mean"]
    b0 = float(est.get("b_Intercept", 0.0))
    y = ctx.data[ctx.response].astype(float)
    factors = _factors(ctx)
    nested = _is_chain(factors)
    fitted_of: dict[str, pd.Series] = {}
    out = []
    for name, cols in sorted(factors, key=lambda f: len(f[1])) if nested else factors:
        labels = _labels(ctx.data, cols)
        raw = y.groupby(labels).mean()
        n = labels.value_counts().reindex(raw.index)
        r = pd.Series(
            [est.get(f"r_{name}[{g},Intercept]", np.nan) for g in raw.index], index=raw.index
        )
        parent = pd.Series(b0, index=raw.index)
        if nested and len(cols) > 1:
            pname = ":".join(cols[:-1])
            parent = fitted_of[pname].reindex([g.rsplit(":", 1)[0] for g in raw.index])
            parent.index = raw.index
        fitted = parent + r
        fitted_of[name] = fitted
        dev = raw - parent
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = np.where(
                np.abs(dev) > 1e-9 * (1 + np.abs(raw)), (fitted - parent) / dev, np.nan
            )
        out.append(
            {
                "factor": name,
                "raw": raw,
                "fitted": fitted,
                "n": n,
                "median_weight": float(np.nanmedian(weight)),
                "groups": int(raw.size),
            }
        )
    return out


def _is_chain(factors: list[tuple[str, tuple[str, ...]]]) -> bool:
    """True for one nested chain a, a:b, a:b:c (as ``(1 | a/b/c)`` expands)."""
    cols = sorted((c for _, c in factors), key=len)
    return (
        all(len(c) == i + 1 and c[:i] == cols[i - 1] for i, c in enumerate(cols) if i)
        and len(cols[0]) == 1
    )


def _shrinkage_plot(levels: list[dict[str, Any]], fit: str) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(levels), figsize=(4.4 * len(levels), 3.8), squeeze=False, layout="constrained"
    )
    for ax, lv in zip(axes[0], levels, strict=True):
        raw, fitted = lv["raw"], lv["fitted"]
        lo = float(np.nanmin([raw.min(), fitted.min()]))
        hi = float(np.nanmax([raw.max(), fitted.max()]))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
        sc = ax.scatter(raw, fitted, c=lv["n"], cmap="viridis", s=14, zorder=3)
        ax.set_title(f"{lv['factor']} ({fit})", fontsize=9)
        ax.set_xlabel("raw group mean")
        ax.set_ylabel("fitted group mean")
        fig.colorbar(sc, ax=ax, label="observations")
    return to_base64(fig)


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if ctx.structure.kind != "multilevel":
        return None
    names = [f for f, _ in _factors(ctx)]
    bars, iccs = [], []
    for fit, f in ctx.fits.items():
        comps = f.info.get("variance_components")
        if fit not in PARTIAL or not comps:
            continue
        total = sum(comps.values())
        bars.append(
            {"fit": fit, "shares": {k: v / total for k, v in comps.items()}, "variances": comps}
        )
        est = f.estimates
        defs = f.info.get("icc_definitions", {})
        for name in names:
            p = f"icc_{name}"
            if p in est.index:
                r = est.loc[p]
                iccs.append(
                    {
                        "fit": fit,
                        "parameter": p,
                        "mean": r["mean"],
                        "q5": r["q5"],
                        "q95": r["q95"],
                        "definition": defs.get(p, ""),
                        "below": bool(r["mean"] < RULE_OF_THUMB),
                        "intervals": f.info.get("intervals", ""),
                    }
                )
    if not bars:
        return None
    levels, shrink_fit = [], None
    for fit in ("eb_reml", "gibbs", "eb_ml"):
        if fit in ctx.fits and fit in PARTIAL:
            shrink_fit = fit
            levels = _levels(ctx, fit)
            break
    return {
        "bar": _bar(bars, [*names, "residual"]),
        "bars": bars,
        "components": [*names, "residual"],
        "iccs": iccs,
        "threshold": RULE_OF_THUMB,
        "shrink_fit": shrink_fit,
        "levels": [
            {k: v for k, v in lv.items() if k in ("factor", "median_weight", "groups")}
            for lv in levels
        ],
        "shrinkage_plot": _shrinkage_plot(levels, shrink_fit) if levels else None,
    }
