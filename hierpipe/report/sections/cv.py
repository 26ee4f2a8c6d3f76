"""Cross-validation: new groups (leave-one-group-out) and new observations (K-fold)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from hierpipe.cv.compare import per_group_elpd
from hierpipe.cv.psis import khat_threshold
from hierpipe.report import checkplots
from hierpipe.report.context import StudyContext

TITLES = {
    "new_group": "New groups: leave-one-group-out",
    "known_group": "New observations of known groups: within-group K-fold",
}


def _tables(ctx: StudyContext, folder: str, fits: list[str]) -> dict[str, pd.DataFrame]:
    out = {}
    for fit in fits:
        p = ctx.study_dir / "cv" / folder / f"{fit}.parquet"
        if p.exists():
            out[fit] = pd.read_parquet(p)
    return out


def _target(ctx: StudyContext, comp: pd.DataFrame, target: str) -> dict[str, Any] | None:
    rows = comp[comp["target"] == target]
    if rows.empty:
        return None
    folder = "." if target == "new_group" else "kfold"
    tables = _tables(ctx, folder, list(rows["fit"]))
    figure = None
    if len(tables) > 1:
        per_group = pd.DataFrame({f: per_group_elpd(t) for f, t in tables.items()})
        figure = checkplots.elpd_diff_plot(per_group, str(rows["fit"].iloc[0]), TITLES[target])
    return {
        "target": target,
        "title": TITLES[target],
        "rows": rows.to_dict("records"),
        "figure": figure,
        "tables": tables,
    }


def _draw_count(ctx: StudyContext, fit: str) -> int | None:
    settings = ctx.fits[fit].info.get("settings", {}) if fit in ctx.fits else {}
    try:
        return int(settings["chains"]) * int(settings["draws"])
    except (KeyError, TypeError, ValueError):
        return None


def _psis(ctx: StudyContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any] | None:
    used = {
        f: t
        for f, t in tables.items()
        if "cv_method" in t and t["cv_method"].isin(["psis", "exact_fallback"]).any()
    }
    if not used:
        return None
    rows = []
    limits = []
    for fit, t in used.items():
        fallback = t[t["cv_method"] == "exact_fallback"]
        count = _draw_count(ctx, fit)
        limits.append(khat_threshold(count) if count else 0.7)
        rows.append(
            {
                "fit": fit,
                "max_khat": float(t["khat"].max()),
                "groups": len(t),
                "fallback": list(fallback["group"]),
                "limit": limits[-1],
            }
        )
    return {"rows": rows, "figure": checkplots.khat_plot(used, min(limits))}


def build(ctx: StudyContext) -> dict[str, Any] | None:
    path = ctx.study_dir / "cv" / "comparison.parquet"
    if not path.exists():
        return None
    comp = pd.read_parquet(path)
    if "target" not in comp.columns:  # tables written before K-fold existed
        comp.insert(0, "target", "new_group")
    targets = [t for t in (_target(ctx, comp, k) for k in TITLES) if t is not None]
    if not targets:
        return None
    logo = next((t["tables"] for t in targets if t["target"] == "new_group"), {})
    for t in targets:
        t.pop("tables")
    # the reason the diagnose stage records when an engine has no within-group K-fold
    kfold_skipped = sorted(
        {
            s.removeprefix("kfold: ")
            for f in ctx.fits.values()
            for s in f.checks.get("skipped", [])
            if s.startswith("kfold: ")
        }
    )
    has_kfold = any(t["target"] == "known_group" for t in targets)
    return {
        "targets": targets,
        "psis": _psis(ctx, logo),
        "kfold_skipped": [] if has_kfold else kfold_skipped,
        "kfold_title": TITLES["known_group"],
    }
