"""Leave-one-group-out folds as chunks, so Snakemake can run them in parallel.

Chunk ``k`` of ``K`` holds the groups whose position in sorted label order is
``k`` modulo ``K``; each fold refits the method without its group and scores the
group as a new one (:mod:`hierpipe.cv.logo`). A fold's generator is derived from
the seed, the study, the fit and the held-out group's label, so a fold's result
does not depend on how the folds are chunked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.models.fitting import load_model
from hierpipe.seeds import derive_rng

CV_COLUMNS = [
    "group",
    "n",
    "elpd",
    "pred_mean",
    "pred_q5",
    "pred_q95",
    "observed_mean",
    "error",
    "covered",
]


def run_chunk(
    df: pd.DataFrame,
    formula: str,
    method: str,
    *,
    chunk: int,
    chunks: int,
    settings: dict[str, Any],
    seed: int,
    keys: Sequence[str],
    source: str,
) -> pd.DataFrame:
    """Scores of the held-out groups of one chunk: one row a group."""
    model = load_model(df, formula, source)
    model.check(method)
    labels = model.engine.group_labels(model.prepared)
    rows = []
    for j in fold_groups(len(labels), chunk, chunks):
        rng = derive_rng(seed, *keys, method, "logo", labels[j])
        rows.append(model.engine.score_held_out(model.prepared, int(j), method, settings, rng))
    out = pd.DataFrame(rows, columns=CV_COLUMNS)
    out.insert(0, "fit", method)
    return out.astype({"fit": str, "group": str, "covered": bool})


def gather(paths: Sequence[str]) -> pd.DataFrame:
    """Join chunk tables into one, ordered by group label."""
    parts = [pd.read_parquet(p) for p in paths]
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values("group", kind="stable").reset_index(drop=True)


def fold_groups(n_groups: int, chunk: int, chunks: int) -> np.ndarray:
    """Indices of the groups that chunk ``chunk`` of ``chunks`` holds out."""
    return np.arange(chunk, n_groups, chunks)
