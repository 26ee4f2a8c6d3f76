"""Engines: one module a structure kind, each with the same small interface.

An engine module provides

``METHODS``
    the fit methods it implements (a tuple of names);
``prepare(design, structure)``
    the sufficient statistics of the data, computed once;
``fit(prepared, structure, method, settings, rng) -> FitResult``;
``group_labels(prepared)``
    the labels of the groups that leave-one-group-out folds hold out;
``score_held_out(prepared, j, method, settings, rng) -> dict``
    one held-out group's row of the CV table (see :mod:`hierpipe.cv.folds`);
``shrinkage(prepared, structure, summary, info) -> DataFrame``
    the per-group shrinkage table (see :mod:`hierpipe.diagnostics.checks`).

Engines are imported on demand so a one-way study never loads the others.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hierpipe.errors import MethodError
from hierpipe.models.structure import Structure

ENGINES = {
    "one_way": "hierpipe.models.engines.one_way",
}


def engine_for(structure: Structure, formula_text: str) -> ModuleType:
    """The engine module of ``structure``; a clear error when none fits it yet."""
    try:
        return importlib.import_module(ENGINES[structure.kind])
    except KeyError:
        raise MethodError(
            f"formula '{formula_text}': {structure.kind.replace('_', '-')} models are not "
            "fitted by this version (supported: 'y ~ 1 + (1 | g)')"
        ) from None


def check_method(engine: ModuleType, structure: Structure, method: str, formula_text: str) -> None:
    """Fail with a clear message when ``method`` does not apply to ``structure``."""
    if method not in engine.METHODS:
        raise MethodError(
            f"fit method '{method}' does not apply to formula '{formula_text}' "
            f"({structure.kind.replace('_', '-')} model; methods: {', '.join(engine.METHODS)})"
        )
