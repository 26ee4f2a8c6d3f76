"""Render a study's self-contained HTML report and the index of all studies.

Everything the page shows is read from the study's result files; images are
inline base64 PNGs and the style sheet is embedded, so the page opens offline.
Jinja2 autoescaping is on: group labels such as ``<script>`` appear as text.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from hierpipe.io import read_json, write_text
from hierpipe.provenance import git_commit, versions
from hierpipe.report import plots

HYPER_ORDER = ("b_", "sd_", "cor_", "sigma", "icc_")


def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("hierpipe", "report/templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    return env


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not np.isfinite(v):
        return "–"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{digits}g}"
    if digits == 0:
        return f"{v:.0f}"
    text = f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-") else "0"


def _is_hyper(name: str) -> bool:
    return name.startswith(HYPER_ORDER[:3]) or name == "sigma" or name.startswith("icc_")


def _interval(row: pd.Series) -> str:
    if np.isfinite(row["q5"]) and np.isfinite(row["q95"]):
        return f"{_num(row['mean'])} [{_num(row['q5'])}, {_num(row['q95'])}]"
    return _num(row["mean"])


def _load_fits(study_dir: Path, fits: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for fit in fits:
        fdir = study_dir / "fits" / fit
        entry: dict[str, Any] = {
            "summary": pd.read_parquet(fdir / "summary.parquet"),
            "info": read_json(fdir / "fit.json"),
        }
        ddir = study_dir / "diagnostics" / fit
        entry["checks"] = read_json(ddir / "checks.json") if (ddir / "checks.json").exists() else {}
        for name in ("shrinkage", "convergence"):
            p = ddir / f"{name}.parquet"
            entry[name] = pd.read_parquet(p) if p.exists() else None
        p = fdir / "draws.parquet"
        entry["draws_path"] = p if p.exists() else None
        out[fit] = entry
    return out


def _hyper_table(fits: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, str]]]:
    names: list[str] = []
    for entry in fits.values():
        for p in entry["summary"]["parameter"]:
            if _is_hyper(p) and p not in names:
                names.append(p)
    names.sort(key=lambda n: next(i for i, pre in enumerate(HYPER_ORDER) if n.startswith(pre)))
    rows = []
    for name in names:
        row = {"parameter": name}
        for fit, entry in fits.items():
            s = entry["summary"].set_index("parameter")
            row[fit] = _interval(s.loc[name]) if name in s.index else "–"
        rows.append(row)
    return list(fits), rows


def _per_group(fits: dict[str, dict[str, Any]], group: str) -> pd.DataFrame:
    cols = {}
    prefix = f"coef_{group}["
    for fit, entry in fits.items():
        s = entry["summary"]
        sel = s[s["parameter"].str.startswith(prefix)]
        labels = sel["parameter"].str.slice(len(prefix)).str.rsplit(",", n=1).str[0]
        cols[fit] = pd.Series(sel["mean"].to_numpy(), index=labels.to_numpy())
    return pd.DataFrame(cols)


def _recovery(fits: dict[str, dict[str, Any]], truth: pd.DataFrame, group: str) -> dict[str, Any]:
    tv = truth.set_index("parameter")["value"]
    hyper_rows = []
    coverage = []
    for fit, entry in fits.items():
        s = entry["summary"].set_index("parameter")
        for name, value in tv.items():
            if name not in s.index or not _is_hyper(name):
                continue
            r = s.loc[name]
            covered = bool(r["q5"] <= value <= r["q95"]) if np.isfinite(r["q5"]) else None
            hyper_rows.append(
                {
                    "fit": fit,
                    "parameter": name,
                    "truth": value,
                    "estimate": r["mean"],
                    "q5": r["q5"],
                    "q95": r["q95"],
                    "covered": covered,
                }
            )
        coef = [n for n in tv.index if n.startswith(f"coef_{group}[") and n in s.index]
        ok = [
            (s.loc[n, "q5"] <= tv[n] <= s.loc[n, "q95"])
            for n in coef
            if np.isfinite(s.loc[n, "q5"])
        ]
        if ok:
            coverage.append({"fit": fit, "groups": len(ok), "coverage": float(np.mean(ok))})
    return {"hyper": hyper_rows, "coverage": coverage}


def _data_summary(data: pd.DataFrame, response: str, group: str) -> dict[str, Any]:
    sizes = data.groupby(group, observed=True).size()
    y = data[response].to_numpy(dtype=float)
    return {
        "rows": len(data),
        "groups": int(sizes.size),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "mean": float(y.mean()),
        "sd": float(y.std(ddof=1)) if y.size > 1 else float("nan"),
    }


def render_study(study_dir: Path, study: str, config: dict[str, Any], seed: int, out: Path) -> None:
    """Write the study's ``report.html`` from its result files."""
    from hierpipe.formula import parse_formula
    from hierpipe.models.structure import classify

    structure = classify(parse_formula(config["formula"]))
    group, response = structure.group, structure.response
    data = pd.read_parquet(study_dir / "data.parquet")
    fits = _load_fits(study_dir, list(config["fits"]))
    truth_path = study_dir / "truth.parquet"
    truth = pd.read_parquet(truth_path) if truth_path.exists() else None

    fit_names, hyper_rows = _hyper_table(fits)
    per_group = _per_group(fits, group)
    sizes = data.groupby(group, observed=True).size()
    per_group.insert(0, "n", sizes.reindex(per_group.index).to_numpy())
    if truth is not None:
        tv = truth.set_index("parameter")["value"]
        per_group.insert(
            1, "truth", [tv.get(f"coef_{group}[{g},Intercept]", np.nan) for g in per_group.index]
        )

    shrink_tables = {
        f: e["shrinkage"]
        for f, e in fits.items()
        if e["shrinkage"] is not None and f not in ("no_pooling", "complete_pooling")
    }
    figures = {}
    if shrink_tables:
        figures["shrinkage"] = plots.shrinkage_plot(shrink_tables)
    coef_fits = [f for f in fits if f in per_group.columns]
    if coef_fits:
        figures["estimates"] = plots.estimates_plot(
            per_group, coef_fits, per_group["truth"] if "truth" in per_group else None
        )

    notices = []
    for fit, e in fits.items():
        for w in e["info"].get("warnings", []):
            notices.append(f"{fit}: {w}")
        for w in e["checks"].get("convergence_flags", []):
            notices.append(f"{fit}: convergence: {w}")

    samplers = []
    for fit, e in fits.items():
        if e["convergence"] is None:
            continue
        conv = e["convergence"]
        hyper = conv[conv["hyperparameter"]]
        draws = pd.read_parquet(e["draws_path"], columns=["chain", "draw", *hyper["parameter"]])
        samplers.append(
            {
                "fit": fit,
                "rows": hyper.to_dict("records"),
                "worst_rhat": float(conv["rhat"].max()),
                "min_ess": float(conv[["ess_bulk", "ess_tail"]].min().min()),
                "settings": e["info"].get("settings", {}),
                "priors": e["info"].get("priors", {}),
                "trace": plots.trace_plot(draws, list(hyper["parameter"])),
            }
        )

    predictions = []
    for fit, e in fits.items():
        for p in e["info"].get("predictions", []):
            predictions.append({"fit": fit, **p})

    cv_path = study_dir / "cv" / "comparison.parquet"
    cv = None
    if cv_path.exists():
        comp = pd.read_parquet(cv_path)
        per_fit = {
            f: pd.read_parquet(study_dir / "cv" / f"{f}.parquet")
            for f in comp["fit"]
            if (study_dir / "cv" / f"{f}.parquet").exists()
        }
        cv = {
            "rows": comp.to_dict("records"),
            "plot": plots.cv_plot(per_fit) if len(per_fit) > 1 else None,
        }

    page = (
        _env()
        .get_template("report.html.j2")
        .render(
            study=study,
            title=config.get("title", study),
            formula=config["formula"],
            group=group,
            response=response,
            data=_data_summary(data, response, group),
            notices=notices,
            fit_names=fit_names,
            hyper_rows=hyper_rows,
            per_group=per_group.reset_index(names="group").to_dict("records"),
            per_group_cols=[c for c in per_group.columns],
            figures=figures,
            predictions=predictions,
            icc=[
                {"fit": f, **e["checks"]["icc"]} for f, e in fits.items() if e["checks"].get("icc")
            ],
            effective=[
                {"fit": f, "value": e["checks"].get("effective_parameters")}
                for f, e in fits.items()
                if e["checks"]
            ],
            samplers=samplers,
            cv=cv,
            recovery=_recovery(fits, truth, group) if truth is not None else None,
            provenance={
                "config": json.dumps(config, indent=2, sort_keys=True),
                "seed": seed,
                "versions": versions(),
                "commit": git_commit(),
                "fit_seconds": {f: e["info"].get("seconds") for f, e in fits.items()},
            },
            css=_css(),
        )
    )
    write_text(page, out)


def _css() -> str:
    from importlib.resources import files

    return files("hierpipe.report").joinpath("templates/style.css").read_text(encoding="utf-8")


def render_index(reports: list[Path], out: Path) -> None:
    """Write ``index.html`` linking every study's report (paths relative to ``out``)."""
    items = []
    for r in sorted(reports):
        rel = Path(r).resolve().relative_to(out.resolve().parent)
        items.append(
            f'<li><a href="{html.escape(rel.as_posix())}">'
            f"{html.escape(rel.parent.as_posix())}</a></li>"
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>hierpipe studies</title></head><body><h1>hierpipe studies</h1><ul>\n"
        + "\n".join(items)
        + "\n</ul></body></html>\n"
    )
    write_text(page, out)
