r"""Compare fits by their cross-validation scores, one block of rows a target.

Two prediction targets (column ``target``):

``new_group``
    leave-one-group-out (:mod:`hierpipe.cv.folds`): each group's observations
    predicted as a new group's;
``known_group``
    within-group K-fold (:mod:`hierpipe.cv.kfold`): held-out observations of
    groups the fit has seen; a group's score is the sum over its folds.

For fit :math:`m` with per-group log predictive densities :math:`\ell_{mj}`,
:math:`\mathrm{elpd}_m = \sum_j \ell_{mj}` with standard error
:math:`\sqrt{J \operatorname{var}_j(\ell_{mj})}`; differences to the best fit of
the same target use the paired per-group differences, as in Vehtari, Gelman &
Gabry (2017, sec. 5). ``rmse`` is the root mean squared error of the predicted
mean of the held-out observations (a group's, or a fold's block of a group's)
and ``coverage90`` the share of those means inside their 90% predictive
interval.

Vehtari, A., Gelman, A. & Gabry, J. (2017). Practical Bayesian model evaluation
using leave-one-out cross-validation and WAIC. *Statist. Comput.* 27, 1413-1432.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from hierpipe.errors import MethodError

COMPARISON_COLUMNS = [
    "target",
    "fit",
    "groups",
    "elpd",
    "se",
    "elpd_diff",
    "se_diff",
    "rmse",
    "coverage90",
]
TARGETS = ("new_group", "known_group")


def _fit_name(t: pd.DataFrame, path: str) -> str:
    return str(t["fit"].iloc[0]) if len(t) else str(path)


def _check_finite(table: pd.DataFrame, path: str) -> None:
    """Refuse a CV table with a non-finite elpd: a sum would skip it, as if it scored 0 (best)."""
    bad = ~np.isfinite(table["elpd"].to_numpy(dtype=np.float64))
    if bad.any():
        row = table.loc[bad].iloc[0]
        raise MethodError(
            f"{path}: column 'elpd' is not finite for group '{row['group']}' of fit "
            f"'{_fit_name(table, path)}' ({int(bad.sum())} rows); the fit could not score it"
        )


def _block(target: str, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows of one target; ``tables`` has one row a scored unit and a ``group`` column."""
    elpd = pd.DataFrame({f: t.groupby("group", sort=True)["elpd"].sum() for f, t in tables.items()})
    best = elpd.sum().idxmax()
    rows = []
    for f, t in tables.items():
        per_group = elpd[f].dropna()
        j = len(per_group)
        diff = (elpd[f] - elpd[best]).dropna()
        rows.append(
            {
                "target": target,
                "fit": f,
                "groups": float(j),
                "elpd": float(per_group.sum()),
                "se": float(np.sqrt(j * per_group.var(ddof=1))) if j > 1 else np.nan,
                "elpd_diff": float(diff.sum()),
                "se_diff": float(np.sqrt(len(diff) * diff.var(ddof=1)))
                if len(diff) > 1
                else np.nan,
                "rmse": float(np.sqrt(np.mean(t["error"] ** 2))),
                "coverage90": float(np.mean(t["covered"])),
            }
        )
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    return out.sort_values(["elpd", "fit"], ascending=[False, True], kind="stable")


def compare(paths: Sequence[str], kfold_paths: Sequence[str] = ()) -> pd.DataFrame:
    """One row a (target, fit): new-group rows first, then known-group; best elpd first."""
    blocks = []
    for target, files in zip(TARGETS, (paths, kfold_paths), strict=True):
        tables = {}
        for p in files:
            t = pd.read_parquet(p)
            _check_finite(t, p)
            tables[_fit_name(t, p)] = t
        if tables:
            blocks.append(_block(target, tables))
    if not blocks:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in COMPARISON_COLUMNS}).astype(
            {"target": str, "fit": str}
        )
    out = pd.concat(blocks, ignore_index=True)
    return out.reset_index(drop=True).astype({"target": str, "fit": str})


def per_group_elpd(table: pd.DataFrame) -> pd.Series:
    """A CV table's elpd summed by group (K-fold blocks add up to the group's)."""
    return table.groupby("group", sort=True)["elpd"].sum()
