"""Bad input, one case a row, each with its exact expected outcome (issue 7).

Every user error must exit with status 2 and print one line on stderr that names
the file and the column and row (or group) at fault, with no traceback and
nothing written under ``results/``. Valid-but-awkward inputs (groups of one
observation, outcomes around 1e12 or 1e-12) must fit, and fit accurately.

Most rows run ``hierpipe.cli.main`` in-process (fast); a few run the installed
``hierpipe`` console script to prove the exit status and the absence of a
traceback; two workflow runs check the same through Snakemake, and that group
labels with HTML are escaped in the report.

Adding a structure: append rows to ``BAD`` (and to ``VALID``) with its formula.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hierpipe.cli import main
from hierpipe.models.fitting import fit_table
from hierpipe.seeds import derive_rng

REPO = Path(__file__).resolve().parents[1]
FORMULA = "score ~ 1 + (1 | school)"
ONE_WAY_METHODS = ("complete_pooling", "no_pooling", "eb_moments", "eb_ml", "eb_reml", "gibbs")
SMALL_GIBBS = '{"chains": 2, "warmup": 150, "draws": 150}'


def csv(rows: list[tuple], header: str = "school,score") -> str:
    return header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)


GOOD = [("A", 1.0), ("A", 2.5), ("B", 4.0), ("B", 3.0), ("C", 7.0), ("C", 6.0)]


def _zero_within() -> str:
    return csv([("A", 1.0), ("A", 1.0), ("B", 4.0), ("B", 4.0), ("C", 2.5), ("C", 2.5)])


@dataclass(frozen=True)
class Bad:
    """A user error: the file written (None: none), the command, the expected line.

    ``expect`` is a regular expression for the text after ``hierpipe CMD: error: ``;
    ``{file}`` stands for the data file's path.
    """

    id: str
    content: str | bytes | None
    expect: str
    name: str = "data.csv"
    formula: str = FORMULA
    method: str = "eb_reml"
    extra: tuple[str, ...] = ()
    command: str = "fit"


BAD = [
    Bad("missing_file", None, r"{file}: file not found"),
    Bad("folder_not_file", "DIR", r"{file}: is a folder, expected a CSV or parquet file"),
    Bad("not_parquet", "just text", r"{file}: cannot be read as parquet \(.*\)", name="d.parquet"),
    Bad(
        "unknown_extension",
        "a,b\n",
        r"{file}: unknown file type '\.xlsx', expected \.csv or \.parquet",
        name="d.xlsx",
    ),
    Bad("not_utf8", b"school,score\nA,1\n\xff\xfeB,2\n", r"{file}: cannot be read as csv \(.*"),
    Bad("empty_file", "", r"{file}: file is empty"),
    Bad("header_only", "school,score\n", r"{file}: file has no rows"),
    Bad(
        "missing_outcome_column",
        csv(GOOD, "school,y"),
        r"{file}: column 'score' not found \(columns: school, y\)",
    ),
    Bad(
        "missing_group_column",
        csv(GOOD, "grp,score"),
        r"{file}: column 'school' not found \(columns: grp, score\)",
    ),
    Bad(
        "formula_names_absent_column",
        csv(GOOD),
        r"{file}: column 'class' not found \(columns: school, score\)",
        formula="score ~ 1 + (1 | class)",
    ),
    Bad(
        "non_numeric",
        csv([*GOOD[:3], ("B", "abc"), *GOOD[4:]]),
        r"{file}: column 'score' row 4: 'abc' is not a number",
    ),
    Bad(
        "empty_cell",
        csv([*GOOD[:2], ("B", ""), *GOOD[3:]]),
        r"{file}: column 'score' row 3: missing value",
    ),
    Bad(
        "nan_written",
        csv([*GOOD[:4], ("C", "NaN"), GOOD[5]]),
        r"{file}: column 'score' row 5: missing value",
    ),
    Bad(
        "plus_infinity",
        csv([("A", "inf"), *GOOD[1:]]),
        r"{file}: column 'score' row 1: inf is not finite",
    ),
    Bad(
        "minus_infinity",
        csv([*GOOD[:5], ("C", "-inf")]),
        r"{file}: column 'score' row 6: -inf is not finite",
    ),
    Bad(
        "missing_group_label",
        csv([*GOOD[:1], ("", 2.0), *GOOD[2:]]),
        r"{file}: column 'school' row 2: missing group label",
    ),
    Bad(
        "single_group",
        csv([("A", 1.0), ("A", 2.0), ("A", 4.0)]),
        r"{file}: grouping factor 'school' has one group \('A'\); a varying effect needs "
        r"at least two",
    ),
    Bad(
        "constant_outcome",
        csv([(g, 3.0) for g, _ in GOOD]),
        r"{file}: column 'score' has the same value \(3\) in every row; there is no "
        r"variation to model",
        method="complete_pooling",
    ),
    *(
        Bad(
            f"zero_within_group_variance_{m}",
            _zero_within(),
            r"{file}: column 'score' does not vary within any group of 'school' \(group 'A' "
            rf"has 2 equal values\), so {m} cannot estimate sigma \(its likelihood is unbounded "
            r"at sigma = 0\)",
            method=m,
            extra=("--settings", SMALL_GIBBS) if m == "gibbs" else (),
        )
        for m in ("eb_moments", "eb_reml", "gibbs")
    ),
    *(
        Bad(
            f"all_groups_of_one_{m}",
            csv([("A", 1.0), ("B", 2.0), ("C", 4.0), ("D", 3.5)]),
            rf"{{file}}: column 'score': every group of 'school' has one observation, so {m} "
            r"cannot separate sigma from sd_school__Intercept \(fit gibbs or complete_pooling\)",
            method=m,
        )
        for m in ("eb_moments", "eb_ml", "eb_reml")
    ),
    Bad(
        "unparsable_formula",
        csv(GOOD),
        r"formula 'score ~ 1 \+ \(1 \| ': .*position 17",
        formula="score ~ 1 + (1 | ",
    ),
    Bad(
        "unknown_method",
        csv(GOOD),
        r"fit method 'eb_remll' does not apply to formula .*methods: complete_pooling, "
        r"no_pooling, eb_moments, eb_ml, eb_reml, gibbs\)",
        method="eb_remll",
    ),
    Bad(
        "unknown_setting",
        csv(GOOD),
        r"fit method 'gibbs': unknown setting 'chainz' \(known: chains, .*\)",
        method="gibbs",
        extra=("--settings", '{"chainz": 2}'),
    ),
    Bad(
        "setting_of_wrong_type",
        csv(GOOD),
        r"gibbs setting 'chains' must be an integer, got 'four'",
        method="gibbs",
        extra=("--settings", '{"chains": "four"}'),
    ),
    Bad(
        "settings_not_json",
        csv(GOOD),
        r"--settings is not valid JSON .*",
        method="gibbs",
        extra=("--settings", "{chains: 2"),
    ),
    Bad(
        "store_group_draws_of_wrong_type",
        csv(GOOD),
        r"gibbs setting store_group_draws must be 'all' or a count >= 0, got 'some'",
        method="gibbs",
        extra=("--settings", '{"store_group_draws": "some"}'),
    ),
    Bad(
        "mapped_column_absent",
        csv(GOOD, "School,Score"),
        r"{file}: column 'Marks' \(mapped to 'score'\) not found \(columns: School, Score\)",
        command="ingest",
        extra=("--column", "school=School", "--column", "score=Marks"),
    ),
    Bad(
        "mapped_column_bad_row_named_as_in_file",
        csv([("A", 1), ("A", "x"), ("B", 2), ("B", 3)], "School,Score"),
        r"{file}: column 'Score' row 2: 'x' is not a number",
        command="ingest",
        extra=("--column", "school=School", "--column", "score=Score"),
    ),
    Bad(
        "non_positive_standard_error",
        "study,yi,sei\nA,0.1,0.2\nB,0.3,0\nC,0.2,0.1\n",
        r"{file}: column 'sei' row 2: standard error must be positive, got 0",
        formula="yi | se(sei) ~ 1 + (1 | study)",
        command="ingest",
    ),
    Bad(
        "duplicate_study_labels",
        "study,yi,sei\nA,0.1,0.2\nB,0.3,0.1\nB,0.2,0.1\n",
        r"{file}: column 'study': study 'B' is on rows 2 and 3; .*",
        formula="yi | se(sei) ~ 1 + (1 | study)",
        command="ingest",
    ),
]


def _write(case: Bad, tmp: Path) -> Path:
    path = tmp / case.name
    if case.content == "DIR":
        path.mkdir()
    elif isinstance(case.content, bytes):
        path.write_bytes(case.content)
    elif case.content is not None:
        path.write_text(case.content, encoding="utf-8")
    return path


def _argv(case: Bad, data: Path, results: Path) -> list[str]:
    if case.command == "ingest":
        out = ["--out", str(results / "data.parquet")]
        return ["ingest", str(data), "--formula", case.formula, *case.extra, *out]
    return [
        "fit", str(data), "--formula", case.formula, "--fit", case.method,
        "--out", str(results / "fit"), *case.extra,
    ]  # fmt: skip


def _expected(case: Bad, data: Path) -> re.Pattern[str]:
    body = case.expect.replace("{file}", re.escape(str(data)))
    return re.compile(rf"hierpipe {case.command}: error: {body}")


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_user_error_is_one_line_status_2_and_writes_nothing(case, tmp_path, capsys):
    data = _write(case, tmp_path)
    results = tmp_path / "results"
    code = main(_argv(case, data, results))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert _expected(case, data).fullmatch(lines[0]), lines[0]
    assert _files_under(results) == []


SUBPROCESS_CASES = ["missing_file", "non_numeric", "constant_outcome", "unknown_setting"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_console_script_exits_2_without_traceback(case_id, tmp_path):
    exe = shutil.which("hierpipe")
    assert exe, "the hierpipe console script is not installed (pip install -e .)"
    case = next(c for c in BAD if c.id == case_id)
    data = _write(case, tmp_path)
    proc = subprocess.run(
        [exe, *_argv(case, data, tmp_path / "results")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and _expected(case, data).fullmatch(lines[0]), proc.stderr
    assert _files_under(tmp_path / "results") == []


# --------------------------------------------------------------------------- valid inputs


def _table(sizes: list[int], seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(len(sizes)), sizes)
    theta = 50.0 + 4.0 * rng.standard_normal(len(sizes))
    y = theta[codes] + 6.0 * rng.standard_normal(codes.size)
    return pd.DataFrame({"school": [f"S{c:02d}" for c in codes], "score": y})


# Groups of one observation among larger ones, and every group of one.
SOME_SINGLETONS = [1, 1, 5, 1, 8, 3, 1, 12, 2, 6]
ALL_SINGLETONS = [1] * 10
VALID = [(name, m) for name in ("some_singletons",) for m in ONE_WAY_METHODS] + [
    ("all_singletons", m) for m in ("complete_pooling", "no_pooling", "gibbs")
]


@pytest.mark.parametrize(("data", "method"), VALID, ids=[f"{d}-{m}" for d, m in VALID])
def test_groups_of_one_observation_fit(data, method, tmp_path, capsys):
    sizes = SOME_SINGLETONS if data == "some_singletons" else ALL_SINGLETONS
    path = tmp_path / "data.csv"
    _table(sizes).to_csv(path, index=False)
    out = tmp_path / "fit"
    argv = ["fit", str(path), "--formula", FORMULA, "--fit", method, "--out", str(out)]
    code = main([*argv, "--settings", SMALL_GIBBS] if method == "gibbs" else argv)
    _, err = capsys.readouterr()
    assert code == 0, err
    s = pd.read_parquet(out / "summary.parquet").set_index("parameter")
    coefs = s.loc[s.index.str.startswith("coef_school["), "mean"]
    assert len(coefs) == len(sizes) and np.isfinite(coefs).all()
    if method == "no_pooling":
        # The no-pooling estimate of a group is its mean, singleton or not.
        means = _table(sizes).groupby("school")["score"].mean()
        np.testing.assert_allclose(coefs.to_numpy(), means.to_numpy(), rtol=1e-12)
        sigma_defined = data == "some_singletons"
        assert np.isfinite(s.loc["sigma", "mean"]) == sigma_defined


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_singleton_groups_match_statsmodels(reml):
    """EB ML/REML with groups of one observation against statsmodels MixedLM (a peer)."""
    sm = pytest.importorskip("statsmodels.formula.api")
    df = _table(SOME_SINGLETONS)
    method = "eb_reml" if reml else "eb_ml"
    s = fit_table(df, FORMULA, method, settings={}, rng=derive_rng(1), source="t")
    s = s.summary.set_index("parameter")
    ref = sm.mixedlm("score ~ 1", df, groups=df["school"]).fit(reml=reml, method="lbfgs")
    # Both optimise the same criterion; 1e-4 relative is the optimisers' agreement
    # (statsmodels stops at gradient norm ~1e-5), far below any statistical effect.
    assert s.loc["b_Intercept", "mean"] == pytest.approx(ref.fe_params["Intercept"], rel=1e-4)
    assert s.loc["sigma", "mean"] ** 2 == pytest.approx(ref.scale, rel=1e-4)
    tau2 = float(ref.cov_re.iloc[0, 0])
    assert s.loc["sd_school__Intercept", "mean"] ** 2 == pytest.approx(tau2, rel=1e-3, abs=1e-6)


# --------------------------------------------------------------------------- extreme scales

# Outcomes of order 1e12 and 1e-12: (factor, offset) applied to order-one data.
TRANSFORMS = {"times_1e12": (1e12, 0.0), "times_1e-12": (1e-12, 0.0), "plus_1e12": (1.0, 1e12)}
LOCATION = ("b_Intercept", "coef_")


def _fit_summary(df: pd.DataFrame, method: str) -> pd.DataFrame:
    settings = {"chains": 2, "warmup": 150, "draws": 150} if method == "gibbs" else {}
    # The same seed for the transformed and the reference fit: a scale- and
    # shift-equivariant method then gives the transformed draws.
    res = fit_table(df, FORMULA, method, settings=settings, rng=derive_rng(5, method), source="t")
    return res.summary.set_index("parameter")[["mean", "sd", "q5", "q50", "q95"]]


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("method", ONE_WAY_METHODS)
def test_fits_are_accurate_at_extreme_scales(method, transform):
    """A fit of ``a*y + b`` equals ``a`` times the fit of order-one data, plus ``b``.

    For the offset the reference is the same stored values minus 1e12 (exact in
    floating point), so both fits see identical data.
    """
    factor, offset = TRANSFORMS[transform]
    base = _table([4, 7, 3, 9, 5, 6, 2, 8])
    big = base.assign(score=base["score"] * factor + offset)
    ref_data = big.assign(score=big["score"] - offset) if offset else base
    got, ref = _fit_summary(big, method), _fit_summary(ref_data, method)
    assert list(got.index) == list(ref.index)
    is_location = got.index.str.startswith(LOCATION)
    is_icc = got.index.str.startswith("icc_")
    want = ref * (1.0 if offset else factor)
    want.loc[is_icc] = ref.loc[is_icc]  # a ratio of variances: unchanged
    want.loc[is_location, ["mean", "q5", "q50", "q95"]] += offset
    spread = float(ref.loc["sigma", "mean"]) * (1.0 if offset else factor)
    if offset:
        # Values near 1e12 are stored to an ulp of 1.2e-4; a result is a few
        # roundings of such values, so allow 4 ulps (absolute) everywhere.
        tol = 4 * np.spacing(offset) * np.ones(len(got))
    else:
        # Scaling is exact up to rounding (~1e-15 relative, measured); 1e-10 of
        # the data's spread is far above that and far below anything that matters.
        tol = 1e-10 * np.where(is_icc, 1.0, spread)
    diff = (got - want).abs().max(axis=1).to_numpy()
    bad = diff > tol
    assert not bad.any(), got.index[bad].tolist()


# --------------------------------------------------------------------------- workflow

LABELS = [
    "École Nº 1",  # unicode
    "north campus",  # a space
    "north/south",  # a slash
    "<script>alert(1)</script>",  # HTML
    'A & B "quoted"',  # entities and quotes
    "cost $5",  # a dollar sign (matplotlib's mathtext marker)
]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """One workflow run: a study with awkward labels and a study with a bad file."""
    work = tmp_path_factory.mktemp("labels")
    rng = np.random.default_rng(11)
    rows = [
        (lab, 20.0 + 3 * k + rng.normal(0, 2)) for k, lab in enumerate(LABELS) for _ in range(4)
    ]
    pd.DataFrame(rows, columns=["Schule", "Punkte"]).to_csv(work / "labels.csv", index=False)
    (work / "broken.csv").write_text(csv([("A", 1.0), ("A", "abc"), ("B", 2.0), ("B", 3.0)]))
    cfg = {
        "seed": 5,
        "studies": {
            "labels": {
                "data": {"file": "labels.csv", "columns": {"school": "Schule", "score": "Punkte"}},
                "formula": FORMULA,
                "fits": ["eb_reml", "gibbs"],
                "gibbs": {"chains": 2, "warmup": 100, "draws": 100},
                "cv": {"fits": ["eb_reml"]},
            },
            "broken": {"data": {"file": "broken.csv"}, "formula": FORMULA, "fits": ["eb_reml"]},
        },
    }
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--directory", str(work), "--cores", "2", "--keep-going"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return work, proc


def test_html_in_group_labels_is_escaped_in_the_report(labelled_run):
    work, proc = labelled_run
    report = work / "results" / "labels" / "report.html"
    assert report.exists(), proc.stderr[-3000:]
    raw = report.read_text(encoding="utf-8")
    page = _Page()
    page.feed(raw)
    assert "script" not in page.tags  # the label never becomes markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    text = "".join(page.text)
    for label in LABELS:
        assert label in text, label
    # Labels survive the round trip into every table unchanged.
    shrink = pd.read_parquet(
        work / "results" / "labels" / "diagnostics" / "gibbs" / "shrinkage.parquet"
    )
    assert sorted(shrink["group"]) == sorted(LABELS)
    cv = pd.read_parquet(work / "results" / "labels" / "cv" / "eb_reml.parquet")
    assert sorted(cv["group"]) == sorted(LABELS)


def test_bad_file_in_workflow_fails_alone_with_one_line(labelled_run):
    work, proc = labelled_run
    assert proc.returncode != 0
    log = (work / "results" / "broken" / "logs" / "ingest.log").read_text()
    assert "Traceback" not in log
    lines = log.strip().splitlines()
    assert lines == [
        "hierpipe ingest: error: broken.csv: column 'score' row 2: 'abc' is not a number"
    ]
    written = [
        p.relative_to(work / "results" / "broken")
        for p in _files_under(work / "results" / "broken")
    ]
    assert all(p.parts[0] == "logs" for p in written), written
    # ...while the good study completed.
    assert (work / "results" / "labels" / "report.html").exists()


def test_config_errors_name_the_key(tmp_path):
    """Schema validation (what the Snakefile runs) names the key at fault; one dry run proves it."""
    from snakemake.utils import validate

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    study = {"data": {"simulate": {"design": "two_level"}}, "formula": FORMULA, "fits": ["gibbs"]}
    cases = {
        "drawz": {"gibbs": {"drawz": 5}},
        "'four' is not of type 'integer'": {"gibbs": {"chains": "four"}},
        "'gibbz' is not one of": {"fit_seeds": {"gibbz": 1}},
        "'some' is not valid": {"gibbs": {"store_group_draws": "some"}},
    }
    for needle, extra in cases.items():
        with pytest.raises(Exception, match=re.escape(needle)):
            validate({"studies": {"s": {**study, **extra}}}, schema)
    with pytest.raises(Exception, match="'replicatons' was unexpected"):
        validate({"studies": {"s": study}, "sbc": {"replicatons": 10}}, schema)
    with pytest.raises(Exception, match="'sbc' should not be valid"):
        validate({"studies": {"sbc": study}}, schema)
    (tmp_path / "config").mkdir()
    bad = {"studies": {"s": {**study, "gibbs": {"chains": "four"}}}}
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(bad))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "-n"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr  # Snakemake prints it on stdout
    assert "'four' is not of type 'integer'" in message
    assert "['gibbs']['chains']" in message
    assert not (tmp_path / "results").exists()
