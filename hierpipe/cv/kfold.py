r"""Within-group K-fold cross-validation: new observations of known groups.

Leave-one-group-out asks how well a fit predicts a *new group*; no pooling
cannot answer that. Within-group K-fold asks how well it predicts *new
observations of the groups it has seen*, which every fit can answer, so no
pooling, complete pooling and the hierarchical fits are compared on one scale.

Folds. In every group with at least two observations the rows are put in a
random order and dealt to folds :math:`0..K-1` in turn, starting at a random
fold; groups with one observation are never held out. A fold therefore holds
out at most :math:`\lceil n_j/K \rceil \le n_j - 1` rows of group :math:`j`, so
every group keeps training data in every fold. The assignment comes from a
generator derived from the study's seed, the study and ``"kfold"`` only, so
every fit is scored on the same folds and the comparison is paired.

Score. For fold :math:`k` the fit is refitted on the other folds, and each
group's held-out rows :math:`y_{jk}` are scored jointly by their log predictive
density :math:`\log p(y_{jk} \mid y_{-k})` (the engine's ``score_kfold``; for
the one-way model a closed form from the rows' count, mean and sum of squares,
:func:`hierpipe.cv.logo.group_log_density`), with the error of the predicted
mean of the held-out rows and whether its 90% interval covered the observed
mean. One row of ``cv/kfold/{fit}.parquet`` is a (group, fold) block.
:func:`hierpipe.cv.compare.compare` sums a group's blocks into its elpd, so
standard errors and paired differences are over groups, as for
leave-one-group-out.

Refits' generators are derived from the fit's seed, the study, the fit,
``"kfold"`` and the fold, so a fold's result does not depend on how folds are
chunked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.design import build_design
from hierpipe.errors import ConfigError, MethodError
from hierpipe.formula import parse_formula
from hierpipe.models.engines import engine_for
from hierpipe.models.fitting import ModelData
from hierpipe.models.structure import classify
from hierpipe.seeds import derive_rng

KFOLD_COLUMNS = [
    "fit",
    "group",
    "fold",
    "n",
    "elpd",
    "pred_mean",
    "pred_q5",
    "pred_q95",
    "observed_mean",
    "error",
    "covered",
]


def model_and_design(df: pd.DataFrame, formula: str, source: str) -> tuple[ModelData, Any]:
    """Like :func:`hierpipe.models.fitting.load_model`, keeping the design (row-level data)."""
    parsed = parse_formula(formula)
    structure = classify(parsed)
    engine = engine_for(structure, formula)
    design = build_design(parsed, df, source=source)
    return ModelData(structure, engine, engine.prepare(design, structure), formula), design


def assign_folds(
    codes: np.ndarray, n_groups: int, folds: int, rng: np.random.Generator
) -> np.ndarray:
    """Fold of every row, ``-1`` for rows never held out (see the module docstring)."""
    codes = np.asarray(codes, dtype=np.int64)
    n = np.bincount(codes, minlength=n_groups)
    order = np.lexsort((rng.random(codes.size), codes))  # by group, random within group
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    position = np.empty(codes.size, dtype=np.int64)
    position[order] = np.arange(codes.size) - start[codes[order]]
    offset = rng.integers(0, folds, n_groups)
    fold = (position + offset[codes]) % folds
    return np.where(n[codes] >= 2, fold, -1)


def check_folds(folds: int) -> None:
    if folds < 2:
        raise ConfigError(f"cv.kfold.folds must be at least 2, got {folds}")


def run_kfold(
    df: pd.DataFrame,
    formula: str,
    method: str,
    *,
    folds: int,
    fold_seed: int | None = None,
    chunk: int = 0,
    chunks: int = 1,
    settings: dict[str, Any],
    seed: int,
    keys: Sequence[str],
    source: str,
) -> pd.DataFrame:
    """Scores of the folds ``chunk, chunk + chunks, ...``: one row a (group, fold) block.

    The folds are dealt by a generator derived from ``fold_seed`` (the study's
    seed; default ``seed``) and ``keys``, the refits' from ``seed`` (the fit's).
    """
    check_folds(folds)
    model, design = model_and_design(df, formula, source)
    model.check(method)
    engine = model.engine
    if not hasattr(engine, "score_kfold"):
        kind = model.structure.kind.replace("_", "-")
        reason = getattr(engine, "KFOLD_UNAVAILABLE", f"not available for {kind} models yet")
        raise MethodError(f"formula '{formula}': within-group K-fold: {reason}")
    term = design.random[0]
    assign_rng = derive_rng(seed if fold_seed is None else fold_seed, *keys, "kfold")
    fold_of_row = assign_folds(term.codes, len(term.labels), folds, assign_rng)
    rows = []
    for k in range(chunk, folds, chunks):
        train, held = engine.kfold_split(design, model.prepared, model.structure, fold_of_row, k)
        rng = derive_rng(seed, *keys, method, "kfold", k)
        for row in engine.score_kfold(train, held, model.structure, method, settings, rng):
            rows.append({"fit": method, "fold": k, **row})
    out = pd.DataFrame(rows, columns=KFOLD_COLUMNS)
    out = out.astype({"fit": str, "group": str, "fold": np.int64, "covered": bool})
    for c in ("n", "elpd", "pred_mean", "pred_q5", "pred_q95", "observed_mean", "error"):
        out[c] = out[c].astype(np.float64)
    return out
