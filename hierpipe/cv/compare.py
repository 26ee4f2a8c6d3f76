r"""Compare fits by their leave-one-group-out scores.

For fit :math:`m` with per-group log predictive densities :math:`\ell_{mj}`,
:math:`\mathrm{elpd}_m = \sum_j \ell_{mj}` with standard error
:math:`\sqrt{J \operatorname{var}_j(\ell_{mj})}`; differences to the best fit use
the paired per-group differences, as in Vehtari, Gelman & Gabry (2017, §5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

COMPARISON_COLUMNS = ["fit", "groups", "elpd", "se", "elpd_diff", "se_diff", "rmse", "coverage90"]


def compare(paths: Sequence[str]) -> pd.DataFrame:
    """One row a fit, best elpd first."""
    tables = {}
    for p in paths:
        t = pd.read_parquet(p)
        tables[str(t["fit"].iloc[0]) if len(t) else p] = t.set_index("group")
    elpd = pd.DataFrame({f: t["elpd"] for f, t in tables.items()})
    best = elpd.sum().idxmax()
    rows = []
    for f, t in tables.items():
        j = len(t)
        diff = elpd[f] - elpd[best]
        rows.append(
            {
                "fit": f,
                "groups": float(j),
                "elpd": float(t["elpd"].sum()),
                "se": float(np.sqrt(j * t["elpd"].var(ddof=1))) if j > 1 else np.nan,
                "elpd_diff": float(diff.sum()),
                "se_diff": float(np.sqrt(j * diff.var(ddof=1))) if j > 1 else np.nan,
                "rmse": float(np.sqrt(np.mean(t["error"] ** 2))),
                "coverage90": float(np.mean(t["covered"])),
            }
        )
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    out = out.sort_values(["elpd", "fit"], ascending=[False, True], kind="stable")
    return out.reset_index(drop=True).astype({"fit": str})
