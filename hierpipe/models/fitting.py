"""From a table and a formula to a fit: the entry point the CLI and CV call.

``load_model`` parses the formula, validates the data at the door (the design
builder) and reduces them to the engine's sufficient statistics;
``fit_table`` dispatches to the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.design import build_design
from hierpipe.formula import parse_formula
from hierpipe.models.engines import check_method, engine_for
from hierpipe.models.result import FitResult
from hierpipe.models.structure import Structure, classify


@dataclass(frozen=True)
class ModelData:
    """A classified model, its engine and its data reduced to what the fits need."""

    structure: Structure
    engine: ModuleType
    prepared: Any
    formula: str

    def check(self, method: str) -> None:
        check_method(self.engine, self.structure, method, self.formula)


def load_model(df: pd.DataFrame, formula: str, source: str) -> ModelData:
    """Parse, classify, validate and reduce ``df`` for ``formula``."""
    parsed = parse_formula(formula)
    structure = classify(parsed)
    engine = engine_for(structure, formula)
    design = build_design(parsed, df, source=source)
    return ModelData(structure, engine, engine.prepare(design, structure), formula)


def fit_table(
    df: pd.DataFrame,
    formula: str,
    method: str,
    *,
    settings: dict[str, Any],
    rng: np.random.Generator,
    source: str,
) -> FitResult:
    """Fit ``formula`` to ``df`` by ``method``; ``source`` names the file in errors."""
    model = load_model(df, formula, source)
    model.check(method)
    return model.engine.fit(model.prepared, model.structure, method, settings, rng)
