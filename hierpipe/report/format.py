"""Small formatting helpers shared by the report sections."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.names import POPULATION_PREFIXES


def num(x: Any, digits: int = 3) -> str:
    """A number for people: fixed digits, trailing zeros cut, '–' for missing."""
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not np.isfinite(v):
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.{digits}g}"
    if digits == 0:
        return f"{v:.0f}"
    text = f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-") else "0"


def hyper_rank(name: str) -> int:
    return next(i for i, pre in enumerate(POPULATION_PREFIXES) if name.startswith(pre))


def interval(row: pd.Series) -> str:
    """``mean [q5, q95]``, or the mean alone where no interval is defined."""
    if np.isfinite(row["q5"]) and np.isfinite(row["q95"]):
        return f"{num(row['mean'])} [{num(row['q5'])}, {num(row['q95'])}]"
    return num(row["mean"])
