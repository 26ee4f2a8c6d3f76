"""Effect sizes at ingest (metafor's escalc) and the meta-analysis checks at the door."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hierpipe.data.effect_sizes import add_effect_sizes, log_risk_ratio_table
from hierpipe.data.ingest import ingest
from hierpipe.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]
RR = {"measure": "log_risk_ratio", "ai": "tpos", "bi": "tneg", "ci": "cpos", "di": "cneg"}


@pytest.fixture(scope="module")
def bcg() -> pd.DataFrame:
    return pd.read_csv(REPO / "data" / "bcg.csv")


def test_shipped_bcg_file_holds_the_published_counts(bcg):
    # the tests' own copy (tests/data) is what test_meta checks against metafor's dat.bcg
    ref = pd.read_csv(REPO / "tests" / "data" / "bcg.csv")
    cols = ["trial", "author", "year", "tpos", "tneg", "cpos", "cneg", "ablat"]
    pd.testing.assert_frame_equal(bcg[cols], ref[cols])
    assert bcg["study"].is_unique


def test_bcg_log_risk_ratios_match_escalc(bcg):
    out = add_effect_sizes(bcg, RR, source="bcg.csv")
    # metafor escalc(measure = "RR", ai = tpos, bi = tneg, ci = cpos, di = cneg,
    # data = dat.bcg), printed to 4 decimals (Viechtbauer 2010, section 3.1)
    yi = [-0.8893, -1.5854, -1.3481, -1.4416, -0.2175, -0.7861, -1.6209,
          0.0120, -0.4694, -1.3713, -0.3394, 0.4459, -0.0173]  # fmt: skip
    vi = [0.3256, 0.1946, 0.4154, 0.0200, 0.0512, 0.0069, 0.2230,
          0.0040, 0.0564, 0.0730, 0.0124, 0.5325, 0.0714]  # fmt: skip
    # half a unit in the 4th printed decimal
    np.testing.assert_allclose(out["yi"], yi, atol=5e-5)
    np.testing.assert_allclose(out["vi"], vi, atol=5e-5)
    # the file's own columns are kept, the new ones appended
    assert list(out.columns) == [*bcg.columns, "yi", "vi"]


def test_arm_sizes_give_the_same_effect_sizes(bcg):
    df = bcg.assign(n1=bcg["tpos"] + bcg["tneg"], n2=bcg["cpos"] + bcg["cneg"])
    spec = {"measure": "log_risk_ratio", "ai": "tpos", "n1i": "n1", "ci": "cpos", "n2i": "n2",
            "yi": "lrr", "vi": "v_lrr"}  # fmt: skip
    a = add_effect_sizes(df, spec, source="x.csv")
    b = add_effect_sizes(df, RR, source="x.csv")
    np.testing.assert_array_equal(a["lrr"], b["yi"])
    np.testing.assert_array_equal(a["v_lrr"], b["vi"])


def _rr_by_hand(a, b, c, d):
    """The delta-method log risk ratio written from its definition (Rothman et al. 2008)."""
    n1, n2 = a + b, c + d
    return np.log(a / n1) - np.log(c / n2), 1 / a - 1 / n1 + 1 / c - 1 / n2


def test_zero_cells_get_escalcs_continuity_correction():
    a, b = np.array([0.0, 4.0]), np.array([20.0, 16.0])
    c, d = np.array([3.0, 5.0]), np.array([17.0, 15.0])
    # escalc's default (add = 1/2, to = "only0"): 1/2 to every cell of the table
    # with a zero cell, and only to it
    yi, vi, corrected = log_risk_ratio_table(a, b, c, d)
    ref0 = _rr_by_hand(0.5, 20.5, 3.5, 17.5)
    ref1 = _rr_by_hand(4.0, 16.0, 5.0, 15.0)
    np.testing.assert_allclose(yi, [ref0[0], ref1[0]], rtol=1e-14)
    np.testing.assert_allclose(vi, [ref0[1], ref1[1]], rtol=1e-14)
    assert corrected.tolist() == [True, False]
    # to = "all": every table; "if0all": every table when one has a zero cell
    for to in ("all", "if0all"):
        yi_all, _, corr = log_risk_ratio_table(a, b, c, d, add=0.5, to=to)
        assert corr.all()
        assert yi_all[1] == pytest.approx(_rr_by_hand(4.5, 16.5, 5.5, 15.5)[0], rel=1e-14)
    _, _, corr = log_risk_ratio_table(a[1:], b[1:], c[1:], d[1:], to="if0all")
    assert not corr.any()
    # to = "none": the first table has no estimate
    yi_none, _, _ = log_risk_ratio_table(a, b, c, d, to="none")
    assert np.isnan(yi_none[0]) and np.isfinite(yi_none[1])


def test_no_correction_with_a_zero_cell_names_the_row():
    df = pd.DataFrame({"s": ["a", "b"], "tpos": [2, 0], "tneg": [10, 12],
                       "cpos": [3, 4], "cneg": [9, 8]})  # fmt: skip
    with pytest.raises(InputError, match=r"x\.csv: row 2: the log risk ratio") as exc:
        add_effect_sizes(df, {**RR, "to": "none"}, source="x.csv")
    assert "\n" not in str(exc.value)
    out = add_effect_sizes(df, RR, source="x.csv")
    assert np.isfinite(out["yi"]).all()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tpos": ["1", "x"]}, r"column 'tpos' row 2: 'x' is not a count"),
        ({"cneg": [5, -1]}, r"column 'cneg' row 2: '-1' is not a count"),
        ({"cpos": [np.nan, 1.0]}, r"column 'cpos' row 1"),
        ({"yi": [0.0, 0.0]}, r"column 'yi' exists already"),
    ],
)
def test_bad_counts_are_one_line_naming_column_and_row(change, match):
    df = pd.DataFrame({"s": ["a", "b"], "tpos": [2, 3], "tneg": [10, 12],
                       "cpos": [3, 4], "cneg": [9, 8]})  # fmt: skip
    df = df.assign(**change)
    with pytest.raises(InputError, match=match) as exc:
        add_effect_sizes(df, RR, source="x.csv")
    assert str(exc.value).startswith("x.csv: ") and "\n" not in str(exc.value)


def test_arm_size_below_events_and_missing_column():
    df = pd.DataFrame({"tpos": [2, 9], "n1": [10, 8], "cpos": [3, 4], "n2": [9, 8]})
    spec = {"measure": "log_risk_ratio", "ai": "tpos", "n1i": "n1", "ci": "cpos", "n2i": "n2"}
    with pytest.raises(InputError, match=r"column 'n1' row 2: arm size 8 is below its 9 events"):
        add_effect_sizes(df, spec, source="x.csv")
    with pytest.raises(InputError, match=r"column 'nope' not found"):
        add_effect_sizes(df.assign(n1=[10, 10]), {**spec, "n2i": "nope"}, source="x.csv")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({**RR, "measure": "odds"}, "measure 'odds' is not available"),
        ({**RR, "colour": "red"}, "unknown key 'colour'"),
        ({k: v for k, v in RR.items() if k != "ci"}, "needs 'ci'"),
        ({**RR, "n1i": "n1"}, "exactly one of 'bi' and 'n1i'"),
        ({**RR, "to": "sometimes"}, "'to' must be one of"),
        ({**RR, "add": -1}, "'add' must be a number >= 0"),
    ],
)
def test_bad_specs_are_config_errors(spec, match):
    df = pd.DataFrame({"tpos": [2, 3], "tneg": [10, 12], "cpos": [3, 4], "cneg": [9, 8]})
    with pytest.raises(ConfigError, match=match):
        add_effect_sizes(df, spec, source="x.csv")


# ----------------------------------------------------------------------------
# ingest of a meta-analysis table
# ----------------------------------------------------------------------------

META = "yi | var(vi) ~ 1 + (1 | study)"


def test_ingest_computes_effect_sizes_and_keeps_the_formulas_columns(bcg):
    out = ingest(bcg, META, columns={}, source="bcg.csv", effect_size=RR)
    assert list(out.columns) == ["yi", "vi", "study"]
    assert out["study"].dtype == "string" and out["yi"].dtype == "float64"
    ref = add_effect_sizes(bcg, RR, source="bcg.csv")
    np.testing.assert_array_equal(out["yi"], ref["yi"])


def _table(**cols) -> pd.DataFrame:
    base = {"Trial": ["a", "b", "c"], "Effect": [0.1, 0.3, -0.2], "SE": [0.1, 0.2, 0.15]}
    return pd.DataFrame({**base, **cols})


@pytest.mark.parametrize(
    ("cols", "match"),
    [
        ({"SE": [0.1, 0.0, 0.15]}, r"column 'SE' row 2: standard error must be positive, got 0"),
        ({"SE": [0.1, -0.2, 0.15]}, r"column 'SE' row 2: standard error must be positive"),
        ({"SE": [0.1, np.nan, 0.15]}, r"column 'SE' row 2: missing value"),
        ({"SE": [0.1, np.inf, 0.15]}, r"column 'SE' row 2: inf is not finite"),
        ({"Trial": ["a", "b", "a"]}, r"column 'Trial': study 'a' is on rows 1 and 3"),
        ({"Trial": ["a", "b", "b"]}, r"column 'Trial': study 'b' is on rows 2 and 3"),
    ],
)
def test_bad_meta_tables_stop_at_ingest_with_one_line(cols, match):
    columns = {"study": "Trial", "y": "Effect", "s": "SE"}
    with pytest.raises(InputError, match=match) as exc:
        ingest(_table(**cols), "y | se(s) ~ 1 + (1 | study)", columns=columns, source="m.csv")
    assert str(exc.value).startswith("m.csv: ") and "\n" not in str(exc.value)


def test_one_study_is_too_few_but_duplicates_are_fine_outside_meta():
    one = pd.DataFrame({"study": ["a"], "y": [0.1], "s": [0.1]})
    # the design builder's message (a varying effect needs two groups) comes first
    with pytest.raises(InputError, match=r"one group|at least 2 studies"):
        ingest(one, "y | se(s) ~ 1 + (1 | study)", columns={}, source="m.csv")
    # a repeated group label is how a two-level table looks: only meta tables reject it
    two_level = pd.DataFrame({"g": ["a", "a", "b"], "y": [1.0, 2.0, 3.0]})
    assert len(ingest(two_level, "y ~ 1 + (1 | g)", columns={}, source="t.csv")) == 3
