"""Per-fit checks: shrinkage table, variance decomposition, predictions, flags.

``shrinkage.parquet`` has one row a group: ``n``, the no-pooling estimate
:math:`\\bar y_j`, the fit's estimate :math:`\\hat\\theta_j`, the population
estimate :math:`\\hat\\beta_0`, and :math:`\\lambda_j`, the weight the fit puts on
the group's own data in :math:`\\hat\\theta_j = \\lambda_j \\bar y_j + (1-\\lambda_j)
\\hat\\beta_0` (1: no pooling, 0: complete pooling); ``shrinkage`` is
:math:`1-\\lambda_j`. The sum of :math:`\\lambda_j` is the effective number of
group parameters (Hodges & Sargent 2001).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from hierpipe.diagnostics.convergence import (
    ess_bulk,
    ess_tail,
    flag_convergence,
    mcse_mean,
    split_rhat,
)
from hierpipe.io import read_json, read_table, write_json, write_parquet
from hierpipe.models.fitting import load_model

HYPER_PATTERN = re.compile(r"^(b_|sd_|sigma$|cor_)")
RHAT_MAX = 1.01
ESS_MIN = 400.0


def hyper_flags(summary: pd.DataFrame) -> list[str]:
    """Hyperparameters with R-hat above 1.01 or bulk/tail ESS below 400 (Vehtari et al. 2021)."""
    if "rhat" not in summary.columns:
        return []
    hyper = [p for p in summary["parameter"] if HYPER_PATTERN.match(p)]
    return flag_convergence(summary, hyper, rhat_max=RHAT_MAX, ess_min=ESS_MIN)


def diagnose_fit(data: str | Path, formula: str, fit_dir: Path, out_dir: Path) -> None:
    """Write ``shrinkage.parquet`` and ``checks.json`` for one fit."""
    model = load_model(read_table(data), formula, str(data))
    summary = pd.read_parquet(fit_dir / "summary.parquet")
    info = read_json(fit_dir / "fit.json")
    group = model.structure.group
    table = model.engine.shrinkage(model.prepared, model.structure, summary, info)
    est = summary.set_index("parameter")
    icc = est.loc[f"icc_{group}"].to_dict() if f"icc_{group}" in est.index else None
    checks = {
        "method": info.get("method"),
        "icc": icc,
        "effective_parameters": float(np.nansum(table["weight"])),
        "groups": len(table),
        "predictions": info.get("predictions", []),
        "warnings": info.get("warnings", []),
        "boundary": info.get("boundary", []),
        "convergence_flags": hyper_flags(summary),
    }
    write_parquet(table, out_dir / "shrinkage.parquet")
    write_json(checks, out_dir / "checks.json")


def convergence_table(draws_path: Path) -> pd.DataFrame:
    """R-hat, bulk/tail ESS and MCSE of every parameter in a draws table."""
    draws = pd.read_parquet(draws_path)
    params = [c for c in draws.columns if c not in ("chain", "draw")]
    chains = int(draws["chain"].max()) + 1
    x = draws[params].to_numpy(dtype=np.float64).reshape(chains, -1, len(params))
    return pd.DataFrame(
        {
            "parameter": pd.Series(params, dtype=str),
            "rhat": np.asarray(split_rhat(x), dtype=np.float64),
            "ess_bulk": np.asarray(ess_bulk(x), dtype=np.float64),
            "ess_tail": np.asarray(ess_tail(x), dtype=np.float64),
            "mcse_mean": np.asarray(mcse_mean(x), dtype=np.float64),
            "hyperparameter": [bool(HYPER_PATTERN.match(p)) for p in params],
        }
    )
