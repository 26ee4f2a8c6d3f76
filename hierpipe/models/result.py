"""The result every fit method returns, and the summary table's contract.

``summary`` has one row a parameter with columns ``parameter, mean, sd, q5,
q50, q95`` (float64) and, for samplers, ``rhat, ess_bulk, ess_tail,
mcse_mean``. For point estimators ``mean`` is the estimate, ``sd`` its standard
error and ``q5``/``q95`` a 90% interval where one is defined (NaN otherwise).
Parameter names follow brms (see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = ["parameter", "mean", "sd", "q5", "q50", "q95"]
SAMPLER_COLUMNS = ["rhat", "ess_bulk", "ess_tail", "mcse_mean"]


@dataclass(frozen=True)
class FitResult:
    """One fit of one model by one method.

    Attributes
    ----------
    summary : one row a parameter (see module docstring).
    draws : samplers only; columns ``chain``, ``draw`` and one a parameter.
    info : JSON-able facts for ``fit.json``: settings, priors, warnings,
        boundary flags, log-likelihood. No timings (they go in by the CLI).
    """

    summary: pd.DataFrame
    draws: pd.DataFrame | None = None
    info: dict[str, Any] = field(default_factory=dict)


def point_row(
    parameter: str, estimate: float, se: float = np.nan, lo: float = np.nan, hi: float = np.nan
) -> dict[str, Any]:
    """One summary row for a point estimator: estimate, SE and a 90% interval."""
    return {
        "parameter": parameter,
        "mean": float(estimate),
        "sd": float(se),
        "q5": float(lo),
        "q50": float(estimate),
        "q95": float(hi),
    }


def normal_row(parameter: str, estimate: float, se: float) -> dict[str, Any]:
    """Point row with the normal-approximation 90% interval ``estimate ± 1.645 se``."""
    z = 1.6448536269514722
    return point_row(parameter, estimate, se, estimate - z * se, estimate + z * se)


def summary_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Build a summary table with the contract's column order and dtypes."""
    df = pd.DataFrame(rows)
    cols = SUMMARY_COLUMNS + [c for c in SAMPLER_COLUMNS if c in df.columns]
    df = df[cols].copy()
    df["parameter"] = df["parameter"].astype(str)
    for c in cols[1:]:
        df[c] = df[c].astype("float64")
    return df.reset_index(drop=True)
