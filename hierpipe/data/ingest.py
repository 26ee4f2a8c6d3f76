"""Ingest a user's table: rename, validate at the door, write the canonical form.

The canonical table keeps the columns the formula uses, under the formula's
names: grouping factors as strings, numeric variables as float64. Validation
is the design builder's (:func:`hierpipe.design.build_design`), so a file that
ingests cleanly also fits.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from hierpipe.data.effect_sizes import add_effect_sizes
from hierpipe.data.meta_input import study_order
from hierpipe.design import build_design
from hierpipe.errors import InputError
from hierpipe.formula import parse_formula


def ingest(
    df: pd.DataFrame,
    formula: str,
    *,
    columns: dict[str, str],
    source: str,
    effect_size: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Canonical table of ``df`` for ``formula``.

    Parameters
    ----------
    columns : mapping from a formula name to the file's column holding it
        (names not mapped are looked up as they are).
    source : the file's name, for error messages.
    effect_size : optional ``data.effect_size`` of a meta-analysis: effect sizes
        computed from the file's columns first
        (:func:`hierpipe.data.effect_sizes.add_effect_sizes`).
    """
    if effect_size:
        df = add_effect_sizes(df, effect_size, source=source)
    for name, col in columns.items():
        if col not in df.columns:
            listed = ", ".join(map(str, df.columns))
            raise InputError(
                f"{source}: column '{col}' (mapped to '{name}') not found (columns: {listed})"
            )
    renamed = df.rename(columns={v: k for k, v in columns.items()})
    parsed = parse_formula(formula)
    try:
        design = build_design(parsed, renamed, source=source)
        if parsed.se_column is not None:
            study_order(design)  # a meta-analysis: one row a study, at least two
    except InputError as exc:
        # The user knows their file's column names, not the formula's.
        message = str(exc)
        for name, col in columns.items():
            message = message.replace(f"column '{name}'", f"column '{col}'")
        raise InputError(message) from None
    groups = {c for term in parsed.random for c in term.group}
    out = {}
    for name in parsed.variables():
        col = renamed[name]
        if name in groups or not pd.api.types.is_numeric_dtype(col):
            out[name] = col.astype(str).astype("string")
        else:
            out[name] = col.astype("float64")
    return pd.DataFrame(out)
