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

Optional functions. The diagnose, cv and report stages call them when an engine
has them and otherwise skip the check (``checks.json`` lists what was skipped;
the declared output files are then written with no rows). The one-way engine
implements all of them (:mod:`hierpipe.models.engines.one_way_checks`), the LMM
engine all of them too (:mod:`hierpipe.models.engines.lmm_checks`), and so does
the multilevel engine (:mod:`hierpipe.models.engines.multilevel_checks`).

``ppc_replicates(prepared, structure, summary, draws, rng, replicates) -> Replicates``
    test statistics of replicated data sets: per group and overall mean, SD,
    min and max (:mod:`hierpipe.diagnostics.ppc`); ``draws`` is the draws table
    of a sampler fit, None for point estimators;
``prior_predictive(prepared, structure, info, rng, size) -> DataFrame | None``
    draws from a sampler fit's priors and what they imply on the outcome's
    scale; None when the fit has no priors;
``residuals(design, prepared, structure, summary) -> DataFrame``
    observation-level Pearson residuals (:mod:`hierpipe.diagnostics.residuals`);
``james_stein_table(prepared, structure) -> (DataFrame, dict) | None``
    James–Stein / Efron–Morris estimates of the group means beside the fits'
    (:mod:`hierpipe.diagnostics.shrinkage`);
``james_stein_unavailable(prepared, structure) -> str``
    why ``james_stein_table`` returned None, for ``checks.json`` (default: no
    within-group replication);
``logo_log_lik(prepared, structure, draws[, groups]) -> ndarray (S, J)``
    log density of each group's observations given each draw with the group's
    own effect integrated out, for PSIS leave-one-group-out (:mod:`hierpipe.cv.psis`);
    an engine that accepts ``groups`` (indices) is asked a block of groups at a
    time, so no (draws x groups) array of all groups is held;
``score_held_out_weighted(prepared, j, structure, draws, log_weights, rng) -> dict``
    group ``j``'s CV row from full-data draws reweighted by PSIS;
``kfold_split(design, prepared, structure, fold, k) -> (train, held)``
    the statistics of the training rows and of the rows with ``fold == k``;
``score_kfold(train, held, structure, method, settings, rng) -> list[dict]``
    refit on ``train`` and score each group's held-out observations
    (within-group K-fold, :mod:`hierpipe.cv.kfold`).
``PPC_NEEDS_INFO``
    when true, ``ppc_replicates`` also receives ``info=`` (fit.json), e.g. to
    recompute an exact posterior (:mod:`hierpipe.models.engines.meta_checks`);
``KFOLD_UNAVAILABLE``
    an engine without ``score_kfold`` may say why (a string); ``checks.json``
    lists it under ``skipped`` and ``cv-kfold`` fails with it.

Engines are imported on demand so a one-way study never loads the others.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hierpipe.errors import MethodError
from hierpipe.models.structure import Structure

ENGINES = {
    "one_way": "hierpipe.models.engines.one_way",
    "lmm": "hierpipe.models.engines.lmm",
    "meta": "hierpipe.models.engines.meta",
    "multilevel": "hierpipe.models.engines.multilevel",
}


def engine_for(structure: Structure, formula_text: str) -> ModuleType:
    """The engine module of ``structure``; a clear error when none fits it yet."""
    if structure.kind == "multilevel" and _has_slopes(formula_text):
        # Nested factors with varying slopes (crossed ones are refused in its prepare).
        return importlib.import_module("hierpipe.models.engines.nested_slopes")
    try:
        return importlib.import_module(ENGINES[structure.kind])
    except KeyError:
        raise MethodError(
            f"formula '{formula_text}': {structure.kind.replace('_', '-')} models are not "
            "fitted by this version (supported: 'y ~ 1 + (1 | g)')"
        ) from None


def _has_slopes(formula_text: str) -> bool:
    from hierpipe.formula import parse_formula

    return any(t.terms or not t.intercept for t in parse_formula(formula_text).random)


def check_method(engine: ModuleType, structure: Structure, method: str, formula_text: str) -> None:
    """Fail with a clear message when ``method`` does not apply to ``structure``."""
    if method not in engine.METHODS:
        raise MethodError(
            f"fit method '{method}' does not apply to formula '{formula_text}' "
            f"({structure.kind.replace('_', '-')} model; methods: {', '.join(engine.METHODS)})"
        )
