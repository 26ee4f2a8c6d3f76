r"""The cost of leaving a level out: this study's fits beside its companion's.

Shown only when the study's config names a companion (``compare_with``), a
study fitted to the same data with another structure (say
``score ~ 1 + (1 | school)`` on three-level data); other studies get None.

Side by side for each fit method both studies ran: the common factor's SD,
sigma and ICC (estimate, interval, error against the truth when simulated),
and the 90% intervals of the common factor's group effects (mean width and
coverage of the true values).

For balanced nested data (:math:`m` classrooms of :math:`n` students per
school) the two-level model's REML estimates equal the one-way ANOVA ones,
whose expectations follow from the nested ANOVA's expected mean squares
(Searle, Casella & McCulloch 1992, sec. 4.7):

.. math::
    E\hat\sigma^2_{omit} = \sigma^2 + \sigma^2_{c}\,\frac{n(m-1)}{mn-1},\qquad
    E\hat\tau^2_{omit} = \sigma^2_{s} + \sigma^2_{c}\,\frac{n-1}{mn-1},

so the classroom variance is split between sigma and the school SD. The
report prints these targets (with :math:`m, n` the mean sizes when the data
are unbalanced, where they are approximate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.io import read_json
from hierpipe.report.context import StudyContext
from hierpipe.report.plots import to_base64

# complete pooling ignores every level, so it is the same under both models
ORDER = ("eb_reml", "eb_ml", "gibbs")


def _companion_fits(path: Path) -> dict[str, tuple[pd.DataFrame, dict[str, Any]]]:
    out = {}
    for d in sorted((path / "fits").glob("*")):
        if (d / "summary.parquet").exists() and (d / "fit.json").exists():
            out[d.name] = (pd.read_parquet(d / "summary.parquet"), read_json(d / "fit.json"))
    return out


def omitted_targets(sd_top: float, sd_mid: float, sigma: float, m: float, n: float) -> dict:
    """Expected two-level estimates on balanced three-level data (module docstring)."""
    tau2 = sd_top**2 + sd_mid**2 * (n - 1) / (m * n - 1)
    s2 = sigma**2 + sd_mid**2 * n * (m - 1) / (m * n - 1)
    return {"sd": float(np.sqrt(tau2)), "sigma": float(np.sqrt(s2))}


def _coef_rows(summary: pd.DataFrame, group: str) -> pd.DataFrame:
    s = summary[summary["parameter"].str.startswith(f"coef_{group}[")]
    s = s[s["parameter"].str.endswith(",Intercept]")]
    return s.set_index("parameter")


def _effects(full: pd.DataFrame, omit: pd.DataFrame, group: str, truth: pd.Series | None):
    a, b = _coef_rows(full, group), _coef_rows(omit, group)
    common = a.index.intersection(b.index)
    if common.empty or not np.isfinite(a.loc[common, "q5"]).all():
        return None
    out = {}
    for key, t in (("full", a.loc[common]), ("omitted", b.loc[common])):
        width = (t["q95"] - t["q5"]).to_numpy()
        row = {"width": float(width.mean())}
        if truth is not None:
            tv = truth.reindex(common).to_numpy()
            row["coverage"] = float(
                np.mean((t["q5"].to_numpy() <= tv) & (tv <= t["q95"].to_numpy()))
            )
        out[key] = row
    out["ratio"] = out["omitted"]["width"] / out["full"]["width"]
    out["groups"] = int(common.size)
    return out, a.loc[common], b.loc[common]


def _plot(a: pd.DataFrame, b: pd.DataFrame, truth: pd.Series | None, fit: str, other: str) -> str:
    import matplotlib.pyplot as plt

    order = a["mean"].sort_values().index
    y = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(order) + 1.2))
    for off, t, label in ((-0.15, a, "this study"), (0.15, b, other)):
        t = t.loc[order]
        ax.errorbar(
            t["mean"],
            y + off,
            xerr=[t["mean"] - t["q5"], t["q95"] - t["mean"]],
            fmt="o",
            ms=3,
            lw=1,
            label=f"{label} ({fit})",
        )
    if truth is not None:
        ax.scatter(truth.reindex(order), y, marker="x", color="k", s=18, label="truth", zorder=4)
    ax.set_yticks(y, [o.split("[", 1)[1].split(",", 1)[0] for o in order], fontsize=6)
    ax.set_xlabel("group mean (coef_), 90% interval")
    ax.legend(fontsize=7)
    return to_base64(fig)


def build(ctx: StudyContext) -> dict[str, Any] | None:
    other = ctx.config.get("compare_with")
    if not other:
        return None
    companion = _companion_fits(ctx.study_dir.parent / other)
    if not companion:
        return None
    group = ctx.group
    truth = ctx.truth.set_index("parameter")["value"] if ctx.truth is not None else None
    formula_other = next(iter(companion.values()))[1].get("formula", "")
    names = [f"sd_{group}__Intercept", "sigma", f"icc_{group}"]
    rows, effects, figure = [], [], None
    for fit in [f for f in ORDER if f in ctx.fits and f in companion]:
        full = ctx.fits[fit].estimates
        omit = companion[fit][0].set_index("parameter")
        for name in names:
            if name not in full.index or name not in omit.index:
                continue
            tv = float(truth[name]) if truth is not None and name in truth.index else np.nan
            rows.append(
                {
                    "fit": fit,
                    "parameter": name,
                    "truth": tv,
                    "full": full.loc[name].to_dict(),
                    "omitted": omit.loc[name].to_dict(),
                    "error_full": float(full.loc[name, "mean"] - tv),
                    "error_omitted": float(omit.loc[name, "mean"] - tv),
                }
            )
        coef_truth = None
        if truth is not None:
            coef_truth = truth[truth.index.str.startswith(f"coef_{group}[")]
        got = _effects(ctx.fits[fit].summary, companion[fit][0], group, coef_truth)
        if got is not None:
            eff, a, b = got
            effects.append({"fit": fit, **eff})
            if figure is None:
                figure = _plot(a, b, coef_truth, fit, other)
    return {
        "other": other,
        "formula_other": formula_other,
        "rows": rows,
        "effects": effects,
        "targets": _targets(ctx, truth),
        "figure": figure,
    }


def _targets(ctx: StudyContext, truth: pd.Series | None) -> dict[str, Any] | None:
    """Expected two-level estimates when this study is a two-factor nested chain."""
    random = ctx.formula.random
    if truth is None or len(random) != 2 or len(random[1].group) != 2:
        return None
    top, mid = random[0].name, random[1].name
    keys = [f"sd_{top}__Intercept", f"sd_{mid}__Intercept", "sigma"]
    if not all(k in truth.index for k in keys):
        return None
    cols = random[1].group
    data = ctx.data
    per_top = data.groupby(cols[0], observed=True)[cols[1]].nunique()
    per_mid = data.groupby(list(cols), observed=True).size()
    m, n = float(per_top.mean()), float(per_mid.mean())
    balanced = per_top.nunique() == 1 and per_mid.nunique() == 1
    t = omitted_targets(*(float(truth[k]) for k in keys), m, n)
    return {
        "sd_name": keys[0],
        "sd": t["sd"],
        "sigma": t["sigma"],
        "m": m,
        "n": n,
        "balanced": bool(balanced),
        "mid": mid,
    }
