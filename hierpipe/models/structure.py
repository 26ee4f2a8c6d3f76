"""Which model structure a parsed formula describes, and which methods fit it."""

from __future__ import annotations

from dataclasses import dataclass

from hierpipe.errors import MethodError

ONE_WAY_METHODS = ("complete_pooling", "no_pooling", "eb_moments", "eb_ml", "eb_reml", "gibbs")
META_METHODS = (
    "meta_dl",
    "meta_pm",
    "meta_ml",
    "meta_reml",
    "meta_hs",
    "meta_sj",
    "meta_bayes",
    "complete_pooling",
    "no_pooling",
)


@dataclass(frozen=True)
class Structure:
    """The kind of model and the names the fits need.

    kind : ``"one_way"`` (``y ~ 1 + (1 | g)``) or ``"meta"`` (``y | se(s) ~ 1 + (1 | g)``).
    """

    kind: str
    response: str
    group: str
    se_column: str | None = None
    se_kind: str | None = None


def classify(formula) -> Structure:
    """Map a :class:`hierpipe.formula.Formula` onto a structure this version fits."""
    text = formula.text
    random = formula.random
    simple = (
        formula.intercept
        and not formula.fixed
        and len(random) == 1
        and random[0].intercept
        and not random[0].terms
        and len(random[0].group) == 1
    )
    if not simple:
        raise MethodError(
            f"formula '{text}': only the varying-intercept model 'y ~ 1 + (1 | g)' "
            "(or its known-SE form 'y | se(s) ~ 1 + (1 | g)') is fitted by this version"
        )
    if formula.se_column is not None:
        return Structure(
            "meta", formula.response, random[0].name, formula.se_column, formula.se_kind
        )
    return Structure("one_way", formula.response, random[0].name)


def check_method(structure: Structure, method: str, text: str) -> None:
    """Fail with a clear message when ``method`` does not apply to ``structure``."""
    allowed = ONE_WAY_METHODS if structure.kind == "one_way" else META_METHODS
    if method not in allowed:
        raise MethodError(
            f"fit method '{method}' does not apply to formula '{text}' "
            f"({structure.kind.replace('_', '-')} model; methods: {', '.join(allowed)})"
        )
