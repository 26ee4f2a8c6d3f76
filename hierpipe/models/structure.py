"""Which model structure a parsed formula describes.

Each structure kind has an engine (:mod:`hierpipe.models.engines`) that knows
its sufficient statistics, its fit methods and its leave-one-group-out score.
"""

from __future__ import annotations

from dataclasses import dataclass

from hierpipe.formula import Formula


@dataclass(frozen=True)
class Structure:
    """The kind of model and the names the fits need.

    kind
        ``"one_way"``: ``y ~ 1 + (1 | g)``;
        ``"meta"``: known standard errors, ``y | se(s) ~ ... + (1 | g)``;
        ``"lmm"``: one grouping factor with predictors or varying slopes;
        ``"multilevel"``: several grouping factors (nested or crossed).
    group
        The first grouping factor's name (the one folds leave out).
    """

    kind: str
    response: str
    group: str
    se_column: str | None = None
    se_kind: str | None = None


def classify(formula: Formula) -> Structure:
    """Map a parsed formula onto its structure kind."""
    random = formula.random
    group = random[0].name if random else ""
    if formula.se_column is not None:
        kind = "meta"
    elif len({t.name for t in random}) > 1:
        kind = "multilevel"
    elif (
        formula.intercept
        and not formula.fixed
        and len(random) == 1
        and random[0].intercept
        and not random[0].terms
    ):
        kind = "one_way"
    else:
        kind = "lmm"
    return Structure(kind, formula.response, group, formula.se_column, formula.se_kind)
