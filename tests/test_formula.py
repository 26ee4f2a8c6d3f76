"""The lme4/brms formula parser: every grammar form, its expansion, and its errors."""

import dataclasses

import pytest

from hierpipe.errors import FormulaError, HierpipeError
from hierpipe.formula import Formula, RandomTerm, parse_formula, term_label


def rt(group, intercept=True, terms=(), correlated=True):
    """A RandomTerm with the lme4 name of ``group`` (a string like "a:b")."""
    parts = tuple(group.split(":"))
    return RandomTerm(
        group=parts, name=group, intercept=intercept, terms=terms, correlated=correlated
    )


# --------------------------------------------------------------------------- responses


def test_plain_response_and_defaults():
    f = parse_formula("score ~ ses")
    assert f == Formula(
        response="score",
        se_column=None,
        se_kind=None,
        intercept=True,
        fixed=(("ses",),),
        random=(),
        text="score ~ ses",
    )


@pytest.mark.parametrize(
    ("text", "column", "kind"),
    [
        ("yi | se(sei) ~ 1 + (1 | study)", "sei", "se"),
        ("yi|var(vi)~1+(1|study)", "vi", "var"),
        ("yi | se( sei ) ~ (1 | study)", "sei", "se"),
    ],
)
def test_known_se_response(text, column, kind):
    f = parse_formula(text)
    assert (f.response, f.se_column, f.se_kind) == ("yi", column, kind)
    assert f.intercept and f.fixed == ()
    assert f.random == (rt("study"),)
    assert f.variables() == ("yi", column, "study")


# --------------------------------------------------------------------------- fixed part


@pytest.mark.parametrize(
    ("text", "intercept"),
    [
        ("y ~ x", True),
        ("y ~ 1 + x", True),
        ("y ~ 0 + x", False),
        ("y ~ x - 1", False),
        ("y ~ -1 + x", False),
        ("y ~ x + 0", False),
        ("y ~ 0 + x + 1", True),  # as in R, the last one written wins
    ],
)
def test_intercept_switches(text, intercept):
    f = parse_formula(text)
    assert f.intercept is intercept
    assert f.fixed == (("x",),)


def test_intercept_only_and_no_fixed_terms():
    assert parse_formula("y ~ 1").fixed == ()
    f = parse_formula("y ~ 0 + (1 | g)")
    assert not f.intercept and f.fixed == () and f.random == (rt("g"),)


def test_star_expands_to_main_effects_and_interaction():
    assert parse_formula("y ~ a*b").fixed == (("a",), ("b",), ("a", "b"))


def test_three_way_star_in_r_order():
    f = parse_formula("y ~ a * b * c")
    assert f.fixed == (
        ("a",),
        ("b",),
        ("c",),
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
        ("a", "b", "c"),
    )


def test_terms_sorted_by_degree_and_variables_by_first_appearance():
    assert parse_formula("y ~ a:b + c").fixed == (("c",), ("a", "b"))
    # R labels b:a + a as "a" and "b:a": variable order is order of first appearance.
    assert parse_formula("y ~ b:a + a").fixed == (("a",), ("b", "a"))
    assert parse_formula("y ~ a + b + b:a").fixed == (("a",), ("b",), ("a", "b"))


def test_duplicates_dropped():
    assert parse_formula("y ~ x + x + a:b + b:a + a:a").fixed == (("x",), ("a",), ("a", "b"))


def test_colon_binds_tighter_than_star():
    # a*b:c = a + b:c + a:b:c
    assert parse_formula("y ~ a*b:c").fixed == (("a",), ("b", "c"), ("a", "b", "c"))


def test_backtick_names_and_whitespace():
    f = parse_formula("  y~`my col`:x2+ x.1 \n")
    assert f.fixed == (("x.1",), ("my col", "x2"))
    assert f.variables() == ("y", "x.1", "my col", "x2")


def test_names_in_any_script_and_with_dots():
    f = parse_formula("größe ~ .alter + x_1.b + (1 | schüler)")
    assert f.variables() == ("größe", ".alter", "x_1.b", "schüler")


def test_term_label():
    assert term_label(("x", "g")) == "x:g"


# --------------------------------------------------------------------------- varying part


def test_varying_intercept():
    f = parse_formula("score ~ 1 + (1 | school)")
    assert f.random == (rt("school"),)
    assert f.grouping_factors() == ("school",)


@pytest.mark.parametrize("text", ["y ~ x + (1 + x | g)", "y ~ x + (x | g)"])
def test_correlated_slope_with_explicit_or_implicit_intercept(text):
    f = parse_formula(text)
    assert f.random == (rt("g", terms=(("x",),)),)
    assert f.random[0].coef_labels() == ("Intercept", "x")


def test_slope_without_intercept():
    assert parse_formula("y ~ (0 + x | g)").random == (rt("g", intercept=False, terms=(("x",),)),)
    assert parse_formula("y ~ (-1 + x | g)").random == parse_formula("y ~ (0 + x | g)").random


def test_double_bar_splits_into_uncorrelated_terms():
    f = parse_formula("y ~ (1 + x + z || g)")
    assert f.random == (
        rt("g", correlated=False),
        rt("g", intercept=False, terms=(("x",),), correlated=False),
        rt("g", intercept=False, terms=(("z",),), correlated=False),
    )


def test_double_bar_without_intercept():
    f = parse_formula("y ~ (0 + x + z || g)")
    assert [r.coef_labels() for r in f.random] == [("x",), ("z",)]


def test_nested_expands_like_lme4():
    f = parse_formula("y ~ 1 + (1 | school/classroom)")
    assert f.random == (rt("school"), rt("school:classroom"))
    assert f.random[1].group == ("school", "classroom")
    assert f.grouping_factors() == ("school", "school:classroom")


def test_three_level_nesting():
    f = parse_formula("y ~ (1 + x | a/b/c)")
    assert [r.name for r in f.random] == ["a", "a:b", "a:b:c"]
    assert [r.group for r in f.random] == [("a",), ("a", "b"), ("a", "b", "c")]
    assert all(r.terms == (("x",),) and r.intercept and r.correlated for r in f.random)


def test_interaction_factor_and_mixed_nesting():
    assert parse_formula("y ~ (1 | a:b)").random == (rt("a:b"),)
    # ':' binds tighter than '/', as in R: a:b/c = a:b + a:b:c
    assert [r.name for r in parse_formula("y ~ (1 | a:b/c)").random] == ["a:b", "a:b:c"]


def test_double_bar_with_nesting_orders_terms_like_lme4():
    # lme4 expands || first, then the nesting of each piece.
    f = parse_formula("y ~ (1 + x || a/b)")
    assert [(r.name, r.coef_labels()) for r in f.random] == [
        ("a", ("Intercept",)),
        ("a:b", ("Intercept",)),
        ("a", ("x",)),
        ("a:b", ("x",)),
    ]


def test_crossed_factors():
    f = parse_formula("y ~ 1 + (1 | student) + (1 | teacher)")
    assert f.random == (rt("student"), rt("teacher"))
    assert f.variables() == ("y", "student", "teacher")


def test_slope_interactions_inside_varying_term():
    f = parse_formula("y ~ (1 + a*b | g)")
    assert f.random[0].terms == (("a",), ("b",), ("a", "b"))


def test_intercept_and_slope_in_separate_terms_are_allowed():
    f = parse_formula("y ~ (1 | g) + (0 + x | g)")
    assert [r.coef_labels() for r in f.random] == [("Intercept",), ("x",)]


def test_variables_lists_everything_once_in_order():
    f = parse_formula("yi | var(vi) ~ x*z + (1 + w | s/c) + (1 | x)")
    assert f.variables() == ("yi", "vi", "x", "z", "w", "s", "c")


def test_dataclasses_are_frozen():
    f = parse_formula("y ~ x + (1 | g)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.response = "z"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.random[0].name = "h"  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


def test_error_message_format_is_exact():
    with pytest.raises(FormulaError) as exc:
        parse_formula("y ~ log(x) + (1|g)")
    message = str(exc.value)
    assert message.startswith(
        "formula 'y ~ log(x) + (1|g)': unsupported token 'log(' at position 4"
    )
    assert "\n" not in message
    assert isinstance(exc.value, HierpipeError)


@pytest.mark.parametrize(
    ("text", "token", "position"),
    [
        ("y ~ I(x^2)", "'I('", 4),
        ("y ~ x + offset(o)", "'offset('", 8),
        ("y ~ x^2", "'^'", 5),
        ("y ~ a %in% b", "'%in%'", 6),
        ("y ~ (1 | g", "unmatched '('", 4),
        ("y ~ (1 + x", "unmatched '('", 4),
        ("y ~ x)", "unmatched ')'", 5),
        ("y ~ x + + z", "empty term, found '+'", 8),
        ("y ~ x +", "empty term, found end of formula", 7),
        ("y ~", "empty right-hand side", 3),
        ("y x", "expected '~', found 'x'", 2),
        ("y + x", "expected '~', found '+'", 2),
        ("y", "expected '~', found end of formula", 1),
        ("~ x", "missing response before '~'", 0),
        ("", "expected a response column", 0),
        ("y ~ a/b", "'/'", 5),
        ("y ~ x - z", "'-'", 6),
        ("y ~ 2 + x", "'2'", 4),
        ("y ~ x - 0", "'0'", 8),
        ("y ~ 1:x", "':'", 5),
        ("y ~ (x)", "'('", 4),
        ("y ~ (0 | g)", "empty varying term '(0 | g)'", 4),
        ("y ~ (1 | g + h)", "'+'", 11),
        ("y ~ (1 | )", "expected a grouping factor, found ')'", 9),
        ("y ~ (1 | 2)", "'2'", 9),
        ("y ~ x:(1|g)", "'('", 6),
        ("y ~ (1|g):x", "':'", 9),
        ("y ~ ((1|g))", "'('", 5),
        ("y ~ 1 | g", "'|'", 6),
        ("y ~ x ~ z", "'~'", 6),
        ("y ~ .", "'.'", 4),
        ("y ~ `a", "unmatched '`'", 4),
        ("yi | weights(w) ~ 1", "'weights('", 5),
        ("yi | se(s, sigma = TRUE) ~ 1", "','", 9),
        ("yi | se ~ 1", "expected se(column) or var(column), found 'se'", 5),
        ("y | se(y) ~ 1", "'y' is both response and se", 7),
        ("y ~ y + x", "'y' is on both sides of '~'", 4),
        ("y ~ (1 | g) + (1 + x | g)", "'Intercept' already varies by 'g'", 14),
        ("y ~ (x || g) + (0 + x | g)", "'x' already varies by 'g'", 15),
        ("y ~ Intercept", "'Intercept' is a reserved name", 4),
    ],
)
def test_unsupported_forms_name_token_and_position(text, token, position):
    with pytest.raises(FormulaError) as exc:
        parse_formula(text)
    message = str(exc.value)
    assert message.startswith(f"formula '{text}': ")
    assert token in message
    assert f"at position {position}" in message
    assert "\n" not in message


def test_leftmost_error_is_reported():
    # 'I(' comes before '^': the lexer is lazy so the parser meets 'I(' first.
    with pytest.raises(FormulaError, match="'I\\(' at position 4"):
        parse_formula("y ~ I(x^2) + z^2")


def test_multiline_formula_is_quoted_on_one_line():
    with pytest.raises(FormulaError) as exc:
        parse_formula("y ~ x\n  + log(z)")
    assert "formula 'y ~ x   + log(z)'" in str(exc.value)
    assert "at position 10" in str(exc.value)


def test_non_text_formula():
    with pytest.raises(FormulaError, match="must be text"):
        parse_formula(None)  # type: ignore[arg-type]
