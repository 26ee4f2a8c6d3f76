"""Design matrices, brms names, group coding and validation at the door."""

import io

import numpy as np
import pandas as pd
import pytest

from hierpipe.design import Design, brms_name, build_design
from hierpipe.errors import FormulaError, InputError
from hierpipe.formula import parse_formula


@pytest.fixture
def small():
    """Eight pupils in three schools; hand-checkable."""
    return pd.DataFrame(
        {
            "score": [10.0, 12.0, 9.0, 15.0, 11.0, 14.0, 13.0, 8.0],
            "x": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
            "sex": ["male", "female", "female", "male", "male", "female", "male", "female"],
            "school": ["S2", "S1", "S1", "S3", "S2", "S3", "S1", "S2"],
        }
    )


# --------------------------------------------------------------------------- hand example


def test_hand_computed_design(small):
    d = build_design("score ~ x + sex + (1 + x | school)", small, source="pupils.csv")
    assert isinstance(d, Design)
    assert d.fixed_names == ("Intercept", "x", "sexmale")
    assert d.ref_levels == {"sex": "female"}
    assert d.levels == {"sex": ("female", "male")}
    male = [1, 0, 0, 1, 1, 0, 1, 0]
    expected_x = np.column_stack([np.ones(8), small["x"], male])
    np.testing.assert_array_equal(d.X, expected_x)
    np.testing.assert_array_equal(d.y, small["score"])
    assert d.se is None
    assert d.n_obs == 8 and d.source == "pupils.csv"

    (r,) = d.random
    assert (r.name, r.group, r.correlated) == ("school", ("school",), True)
    assert r.labels == ("S1", "S2", "S3") and r.n_groups == 3
    np.testing.assert_array_equal(r.codes, [1, 0, 0, 2, 1, 2, 0, 1])
    assert r.z_names == ("Intercept", "x")
    np.testing.assert_array_equal(r.Z, np.column_stack([np.ones(8), small["x"]]))


def test_dtypes_shapes_and_read_only(small):
    d = build_design("score ~ x + (1 | school)", small)
    assert d.X.dtype == np.float64 and d.X.shape == (8, 2) and d.X.flags.c_contiguous
    assert d.y.dtype == np.float64
    assert d.random[0].codes.dtype == np.int64
    for a in (d.X, d.y, d.random[0].codes, d.random[0].Z):
        with pytest.raises(ValueError):
            a[0] = 0


def test_accepts_parsed_formula_and_text(small):
    text = "score ~ sex + (1 | school)"
    a = build_design(text, small)
    b = build_design(parse_formula(text), small)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.formula == b.formula


def test_no_intercept_and_no_fixed_terms(small):
    d = build_design("score ~ 0 + (1 | school)", small)
    assert d.X.shape == (8, 0) and d.fixed_names == ()


# --------------------------------------------------------------------------- coding and names

CAT = pd.DataFrame(
    {
        "y": [1.0, 2.0, 3.0, 4.0, 5.0, 7.0],
        "x": [1.0, 2.0, 4.0, 3.0, 6.0, 5.0],
        "g": ["A", "B", "C", "A", "B", "C"],
        "h": ["U", "U", "U", "V", "V", "V"],
    }
)


def test_numeric_by_categorical_interaction_brms_names():
    d = build_design("y ~ x * g", CAT)
    assert d.fixed_names == ("Intercept", "x", "gB", "gC", "x:gB", "x:gC")
    gb = np.array([0, 1, 0, 0, 1, 0.0])
    gc = np.array([0, 0, 1, 0, 0, 1.0])
    x = CAT["x"].to_numpy()
    np.testing.assert_array_equal(d.X, np.column_stack([np.ones(6), x, gb, gc, x * gb, x * gc]))
    assert d.ref_levels == {"g": "A"}


def test_interaction_without_main_effect_codes_all_levels():
    # As R: with no 'g' margin, x:g is a slope for every level.
    d = build_design("y ~ x:g", CAT)
    assert d.fixed_names == ("Intercept", "x:gA", "x:gB", "x:gC")
    np.testing.assert_array_equal(d.X[:, 1], [1, 0, 0, 3, 0, 0])
    assert d.ref_levels == {}


def test_no_intercept_codes_first_factor_fully():
    assert build_design("y ~ 0 + g", CAT).fixed_names == ("gA", "gB", "gC")
    assert build_design("y ~ 0 + g + h", CAT).fixed_names == ("gA", "gB", "gC", "hV")
    assert build_design("y ~ 0 + g + h", CAT).ref_levels == {"h": "U"}


def test_first_variable_varies_fastest_in_interactions():
    d = build_design("y ~ 0 + g:h", CAT)
    assert d.fixed_names == ("gA:hU", "gB:hU", "gC:hU", "gA:hV", "gB:hV", "gC:hV")
    np.testing.assert_array_equal(d.X, np.eye(6))


def test_brms_name_substitutions():
    assert brms_name("dose-1 mg") == "doseM1mg"
    assert brms_name("grp(a+b)*c/d^e=f") == "grpaPbMUcDdEeEQf"
    assert brms_name("x_1.2") == "x_1.2"


def test_level_names_are_cleaned_like_brms():
    df = pd.DataFrame({"y": [1.0, 2.0, 4.0, 3.0], "dose": ["0", "high dose", "-1", "a+b"]})
    d = build_design("y ~ dose", df)
    # sorted as strings: "-1" < "0" < "a+b" < "high dose"; "-1" is the reference
    assert d.fixed_names == ("Intercept", "dose0", "doseaPb", "dosehighdose")
    assert d.ref_levels == {"dose": "-1"}


def test_levels_that_clash_after_cleaning_fail():
    df = pd.DataFrame({"y": [1.0, 2.0, 4.0], "g": ["a", "a b", "ab"]})
    with pytest.raises(InputError, match="both named 'gab'"):
        build_design("y ~ g", df)


def test_category_dtype_keeps_its_order_and_drops_unused_levels():
    df = CAT.assign(g=pd.Categorical(CAT["g"], categories=["Z", "C", "B", "A"]))
    d = build_design("y ~ g", df)
    assert d.fixed_names == ("Intercept", "gB", "gA")
    assert d.ref_levels == {"g": "C"} and d.levels == {"g": ("C", "B", "A")}


def test_bool_and_integer_category_predictors():
    df = CAT.assign(flag=[True, False, True, False, False, True])
    assert build_design("y ~ flag", df).fixed_names == ("Intercept", "flagTrue")
    df = CAT.assign(arm=pd.Categorical([1, 2, 1, 2, 1, 2]))
    assert build_design("y ~ arm", df).fixed_names == ("Intercept", "arm2")


def test_matches_an_independent_model_matrix_builder():
    # patsy is an oracle here only (hierpipe never imports it). Columns are matched
    # by name, as patsy orders terms and spells levels its own way.
    patsy = pytest.importorskip("patsy")
    rng = np.random.default_rng(4)
    n = 300
    df = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.normal(size=n),
            "z": rng.normal(size=n),
            "a": rng.choice(list("PQR"), n),
            "b": rng.choice(list("UV"), n),
            "c": rng.choice(list("KLM"), n),
        }
    )
    for rhs in ["x*a", "x:a", "x + x:a", "0 + a + b", "a*b*c", "x*a*b", "0 + x:a", "b:a + a"]:
        d = build_design(f"y ~ {rhs}", df)
        info = patsy.dmatrix(rhs, df)
        theirs = np.asarray(info)
        names = [
            ":".join(sorted(p.replace("[T.", "").replace("[", "").replace("]", "") for p in nm))
            for nm in (c.split(":") for c in info.design_info.column_names)
        ]
        assert theirs.shape == d.X.shape, rhs
        for j, name in enumerate(d.fixed_names):
            key = ":".join(sorted(name.split(":")))
            np.testing.assert_allclose(d.X[:, j], theirs[:, names.index(key)], err_msg=rhs)


# --------------------------------------------------------------------------- varying terms


def test_varying_categorical_slope_coding():
    df = pd.concat([CAT, CAT.assign(y=CAT["y"] + 1, h=["W", "W", "W", "Z", "Z", "Z"])])
    d = build_design("y ~ 1 + (1 + g | h)", df)
    assert d.random[0].z_names == ("Intercept", "gB", "gC")
    assert d.ref_levels == {"g": "A"}
    d = build_design("y ~ 1 + (0 + g | h)", df)
    assert d.random[0].z_names == ("gA", "gB", "gC")
    np.testing.assert_array_equal(d.random[0].Z.sum(axis=1), 1.0)


def test_uncorrelated_terms_get_one_design_each():
    d = build_design("y ~ x + (1 + x || h)", CAT)
    assert [(r.name, r.z_names, r.correlated) for r in d.random] == [
        ("h", ("Intercept",), False),
        ("h", ("x",), False),
    ]
    np.testing.assert_array_equal(d.random[0].codes, d.random[1].codes)


def test_nested_labels_distinguish_equal_inner_labels():
    df = pd.DataFrame(
        {
            "y": np.arange(8.0),
            "school": ["S01", "S01", "S01", "S02", "S02", "S02", "S01", "S02"],
            "classroom": ["A", "B", "A", "A", "C", "C", "B", "A"],
        }
    )
    d = build_design("y ~ 1 + (1 | school/classroom)", df)
    school, nested = d.random
    assert school.labels == ("S01", "S02")
    assert nested.name == "school:classroom" and nested.group == ("school", "classroom")
    assert nested.labels == ("S01:A", "S01:B", "S02:A", "S02:C")
    np.testing.assert_array_equal(nested.codes, [0, 1, 0, 2, 3, 3, 1, 2])
    # classroom A of S01 and classroom A of S02 are different groups
    assert nested.codes[0] != nested.codes[3]


def test_three_level_labels_and_numeric_components():
    df = pd.DataFrame(
        {
            "y": np.arange(6.0),
            "a": [1, 1, 1, 2, 2, 2],
            "b": [1.0, 1.0, 2.0, 1.0, 1.0, 1.0],
            "c": ["x", "y", "x", "x", "x", "y"],
        }
    )
    d = build_design("y ~ (1 | a/b/c)", df)
    assert [r.labels for r in d.random] == [
        ("1", "2"),
        ("1:1", "1:2", "2:1"),
        ("1:1:x", "1:1:y", "1:2:x", "2:1:x", "2:1:y"),
    ]
    np.testing.assert_array_equal(d.random[2].codes, [0, 1, 2, 3, 3, 4])


def test_crossed_factors_are_coded_independently():
    df = pd.DataFrame(
        {"y": np.arange(6.0), "s": list("ppqqrr"), "t": ["k", "m", "k", "m", "k", "m"]}
    )
    d = build_design("y ~ 1 + (1 | s) + (1 | t)", df)
    assert [r.labels for r in d.random] == [("p", "q", "r"), ("k", "m")]
    np.testing.assert_array_equal(d.random[1].codes, [0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize(
    ("values", "labels"),
    [
        ([10, 9, 10, 9], ("10", "9")),  # sorted as strings
        ([1.0, 2.0, 1.0, 2.0], ("1", "2")),  # whole floats lose '.0'
        ([2.5, 1.0, 2.5, 1.0], ("1", "2.5")),
        (pd.array([3, 4, 3, 4], dtype="Int64"), ("3", "4")),
        ([True, False, True, False], ("False", "True")),
        (["b", "a", "b", "a"], ("a", "b")),
    ],
)
def test_group_labels_are_strings(values, labels):
    df = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0], "g": values})
    assert build_design("y ~ 1 + (1 | g)", df).random[0].labels == labels


def test_text_and_number_spelling_one_label_are_one_group():
    df = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0], "g": pd.Series([1, "1", 2, "2"], dtype=object)})
    r = build_design("y ~ 1 + (1 | g)", df).random[0]
    assert r.labels == ("1", "2")
    np.testing.assert_array_equal(r.codes, [0, 0, 1, 1])


# --------------------------------------------------------------------------- known SE


def test_known_se_and_variance():
    df = pd.DataFrame({"yi": [0.1, 0.3, -0.2], "sei": [0.5, 0.2, 1.0], "study": list("abc")})
    d = build_design("yi | se(sei) ~ 1 + (1 | study)", df)
    np.testing.assert_array_equal(d.se, [0.5, 0.2, 1.0])
    df = df.rename(columns={"sei": "vi"}).assign(vi=[0.25, 0.04, 1.0])
    d = build_design("yi | var(vi) ~ 1 + (1 | study)", df)
    np.testing.assert_allclose(d.se, [0.5, 0.2, 1.0])


def test_numbers_stored_as_text_are_accepted_as_response():
    df = pd.DataFrame({"y": ["1.5", "2", " 3e1"], "g": list("aab")})
    np.testing.assert_array_equal(build_design("y ~ (1 | g)", df).y, [1.5, 2.0, 30.0])


# --------------------------------------------------------------------------- validation


def test_missing_column_message_is_exact():
    df = pd.DataFrame({"a": [1.0], "b": [2.0], "c": ["x"]})
    with pytest.raises(InputError) as exc:
        build_design("score ~ a + (1 | c)", df, source="data.csv")
    assert str(exc.value) == "data.csv: column 'score' not found (columns: a, b, c)"


def test_non_number_from_csv_names_the_data_row():
    rows = [f"{i},{i % 3}" for i in range(20)]
    rows[16] = "abc,1"  # data row 17 (the header is not counted)
    df = pd.read_csv(io.StringIO("score,g\n" + "\n".join(rows)))
    with pytest.raises(InputError) as exc:
        build_design("score ~ 1 + (1 | g)", df, source="data.csv")
    assert str(exc.value) == "data.csv: column 'score' row 17: 'abc' is not a number"


def _frame(**changes):
    base = {
        "y": [1.0, 2.0, 3.0, 4.0, 5.0],
        "x": [0.1, 0.4, 0.2, 0.9, 0.5],
        "g": ["a", "a", "b", "b", "c"],
        "s": [0.1, 0.2, 0.3, 0.4, 0.5],
    }
    base.update(changes)
    return pd.DataFrame(base)


@pytest.mark.parametrize(
    ("formula", "changes", "message"),
    [
        ("y ~ x + (1 | g)", {"x": [0.1, 0.2, np.nan, 0.3, 0.4]}, "column 'x' row 3: missing value"),
        ("y ~ x + (1 | g)", {"y": [1.0, np.inf, 3, 4, 5]}, "column 'y' row 2: inf is not finite"),
        (
            "y ~ x + (1 | g)",
            {"y": ["1", "2", "3", "-inf", "5"]},
            "column 'y' row 4: '-inf' is not finite",
        ),
        ("y ~ x + (1 | g)", {"y": ["1", "2", "", "4", "5"]}, "column 'y' row 3: missing value"),
        (
            "y ~ x + (1 | g)",
            {"g": ["a", "a", "b", None, "c"]},
            "column 'g' row 4: missing group label",
        ),
        ("y ~ x + (1 | g)", {"g": ["a", " ", "b", "b", "c"]}, "column 'g' row 2: missing group"),
        (
            "y ~ x + (1 | g)",
            {"g": [1.0, 2.0, np.nan, 1.0, 2.0]},
            "column 'g' row 3: missing group label",
        ),
        (
            "y ~ x + (1 | g)",
            {"g": ["a"] * 5},
            "grouping factor 'g' has one group ('a'); a varying effect needs at least two",
        ),
        ("y ~ x + (1 | g/x)", {"x": ["k", "k", "k", None, "k"]}, "column 'x' row 4: missing value"),
        (
            "y | se(s) ~ 1 + (1 | g)",
            {"s": [0.1, 0.0, 0.3, 0.4, 0.5]},
            "column 's' row 2: standard error must be positive, got 0",
        ),
        (
            "y | var(s) ~ 1 + (1 | g)",
            {"s": [0.1, 0.2, 0.3, -1.0, 0.5]},
            "column 's' row 4: variance must be positive, got -1",
        ),
        (
            "y | se(s) ~ 1 + (1 | g)",
            {"s": [0.1, 0.2, np.nan, 0.4, 0.5]},
            "column 's' row 3: missing value",
        ),
        (
            "y ~ x + (1 | g)",
            {"x": ["u"] * 5},
            "column 'x' has one value ('u'); a categorical predictor needs at least two",
        ),
        ("y ~ x + (1 | g)", {"y": [True, False, True, True, False]}, "holds true/false values"),
        (
            "y ~ x + z + (1 | g)",
            {"z": [0.2, 0.8, 0.4, 1.8, 1.0]},
            "fixed-effect column 'z' is a linear combination of Intercept, x",
        ),
        ("y ~ x + z", {"z": [0.0] * 5}, "fixed-effect column 'z' is zero in every row"),
        (
            "y ~ x + z",
            {"z": pd.to_datetime(["2020-01-01"] * 5)},
            "column 'z' has type datetime64",
        ),
    ],
)
def test_bad_input_messages(formula, changes, message):
    df = _frame(**changes)
    with pytest.raises(InputError) as exc:
        build_design(formula, df, source="data.csv")
    text = str(exc.value)
    assert text.startswith("data.csv: ")
    assert message in text
    assert "\n" not in text


def test_rows_are_counted_by_position_not_index():
    df = _frame(x=[0.1, 0.2, 0.3, np.nan, 0.5])
    df.index = [100, 7, 3, 55, 2]
    with pytest.raises(InputError, match="row 4: missing value"):
        build_design("y ~ x", df)


def test_empty_table_and_duplicate_columns():
    with pytest.raises(InputError, match=r"data\.csv: no rows"):
        build_design("y ~ x", _frame().iloc[:0], source="data.csv")
    dup = pd.DataFrame([[1.0, 2.0, 3.0]], columns=["y", "x", "x"])
    with pytest.raises(InputError, match="column 'x' appears 2 times"):
        build_design("y ~ x", dup)


def test_more_columns_than_rows():
    df = _frame().iloc[:2]
    with pytest.raises(InputError, match="3 fixed-effect columns but only 2 rows"):
        build_design("y ~ x + s", df)


def test_rank_deficient_interaction_is_reported():
    # R codes a:b with an intercept by all level pairs; the result is rank-deficient.
    with pytest.raises(InputError, match="'gC:hV' is a linear combination"):
        build_design("y ~ g:h", pd.concat([CAT, CAT.assign(y=CAT["y"] * 2)]))


def test_formula_errors_pass_through():
    with pytest.raises(FormulaError, match="'log\\('"):
        build_design("y ~ log(x)", _frame())
