"""End to end: the shipped meta-analyses and a user's own CSV through the real workflow.

A tiny config in a temporary folder (as tests/test_workflow.py), with the
repository's data/eight_schools.csv and data/bcg.csv; the results are checked
against the published figures (metafor's BCG fits, BDA3's eight schools; see
tests/test_meta.py for the sources).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import REPO, ReportPage, snakemake

RR = {"measure": "log_risk_ratio", "ai": "tpos", "bi": "tneg", "ci": "cpos", "di": "cneg"}
MINE = """Trial,Year,log OR,Var
Smith 2001,2001,-0.31,0.042
Jones 2005,2005,-0.12,0.090
Lee 2010,2010,0.05,0.031
Khan 2015,2015,-0.45,0.120
"""
# formula name: the file's column (names with spaces are fine)
MINE_COLUMNS = {"trial": "Trial", "yi": "log OR", "vi": "Var", "year": "Year"}
CONFIG = {
    "seed": 3,
    "studies": {
        "schools8": {
            "data": {"file": "data/eight_schools.csv"},
            "formula": "y | se(sigma) ~ 1 + (1 | school)",
            "fits": ["complete_pooling", "meta_reml", "meta_bayes", "gibbs"],
            "meta": {"prior": {"family": "uniform"}},
            "gibbs": {"chains": 2, "warmup": 200, "draws": 500},
            "cv": {"fits": ["meta_reml", "meta_bayes"]},
        },
        "bcg": {
            "data": {"file": "data/bcg.csv", "effect_size": RR},
            "formula": "yi | var(vi) ~ 1 + (1 | study)",
            "fits": ["meta_dl", "meta_reml"],
            "cv": {"fits": ["meta_reml"]},
        },
        "mine": {
            "data": {"file": "mine.csv", "columns": MINE_COLUMNS},
            "formula": "yi | var(vi) ~ 1 + year + (1 | trial)",
            "fits": ["meta_reml"],
            "meta": {"knha": True},
        },
    },
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("meta")
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    shutil.copytree(REPO / "data", work / "data")
    (work / "mine.csv").write_text(MINE)
    snakemake(work, "--cores", "2")
    yield work
    shutil.rmtree(work / ".snakemake", ignore_errors=True)


def summary(run: Path, study: str, fit: str) -> pd.DataFrame:
    return pd.read_parquet(run / "results" / study / "fits" / fit / "summary.parquet").set_index(
        "parameter"
    )


def info(run: Path, study: str, fit: str) -> dict:
    return json.loads((run / "results" / study / "fits" / fit / "fit.json").read_text())


def test_bcg_matches_metafor(run):
    # REML: tau2 0.3132, mu -0.7145 (SE 0.1798), I2 92.22%; DL: tau2 0.3088.
    # 6e-5: half the 4th printed decimal plus metafor's 1e-5 convergence threshold
    reml = info(run, "bcg", "meta_reml")["meta"]
    s = summary(run, "bcg", "meta_reml")
    assert reml["tau2"] == pytest.approx(0.3132, abs=6e-5)
    assert s.loc["b_Intercept", "mean"] == pytest.approx(-0.7145, abs=6e-5)
    assert s.loc["b_Intercept", "sd"] == pytest.approx(0.1798, abs=6e-5)
    assert reml["I2"] == pytest.approx(92.22, abs=0.005)
    assert info(run, "bcg", "meta_dl")["meta"]["tau2"] == pytest.approx(0.3088, abs=5e-5)
    assert "sigma" not in s.index and "sd_study__Intercept" in s.index
    assert "r_study[Aronson 1948,Intercept]" in s.index
    assert "coef_study[TPT Madras 1980,Intercept]" in s.index
    data = pd.read_parquet(run / "results" / "bcg" / "data.parquet")
    assert list(data.columns) == ["yi", "vi", "study"] and len(data) == 13


def test_eight_schools_matches_bda3(run):
    cp = summary(run, "schools8", "complete_pooling").loc["b_Intercept"]
    assert (round(cp["mean"], 1), round(cp["sd"], 1)) == (7.7, 4.1)  # BDA3 5.5: 7.7 +- 4.1
    # every frequentist estimator gives tau2 = 0 here (tests/test_meta_engine.py); REML:
    m = info(run, "schools8", "meta_reml")["meta"]
    assert (round(m["Q"], 1), m["Q_df"]) == (4.7, 7)
    assert m["tau2"] == 0.0 and m["boundary"]
    # BDA3 5.5 (uniform prior on tau; summaries of 200 draws): mu about 8 (sd about 5),
    # tau's median about 5 (MC SE of a 200-draw median ~0.5: allow 1)
    bayes = info(run, "schools8", "meta_bayes")["meta"]
    assert bayes["mu"]["mean"] == pytest.approx(8.0, abs=0.5)
    assert bayes["mu"]["sd"] == pytest.approx(5.0, abs=0.5)
    assert bayes["tau"]["median"] == pytest.approx(5.0, abs=1.0)
    assert bayes["prior"] == {"family": "uniform"}
    gibbs = summary(run, "schools8", "gibbs")
    assert {"rhat", "ess_bulk"} <= set(gibbs.columns)
    # 1000 draws: mu's posterior SD is ~5, so its MC SE is ~0.2; 1.0 is 5 of those
    assert gibbs.loc["b_Intercept", "mean"] == pytest.approx(bayes["mu"]["mean"], abs=1.0)


def test_influence_rows_and_report(run):
    res = run / "results" / "schools8"
    cv = pd.read_parquet(res / "cv" / "meta_bayes.parquet")
    assert len(cv) == 8 and cv["group"].is_unique
    assert {"elpd", "mu", "mu_se", "tau", "pi_lb", "pi_ub", "std_residual"} <= set(cv.columns)
    assert pd.read_parquet(res / "cv" / "comparison.parquet")["fit"].tolist() != []
    page = ReportPage()
    page.feed((res / "report.html").read_text())
    assert {"forest", "meta_estimators", "meta_tau", "meta_funnel", "meta_influence"} <= page.ids
    assert page.external == [] and all(s.startswith("data:image/png") for s in page.img_src)
    text = " ".join(page.text)
    assert "Egger" in text and "Higgins, Thompson" in text
    assert "Knapp-Hartung" in text  # recommended: 8 studies, knha not used


def test_users_csv_runs_from_config_and_warns_about_few_studies(run):
    res = run / "results" / "mine"
    m = info(run, "mine", "meta_reml")
    assert m["meta"]["knha"] and m["meta"]["test"] == "t" and m["meta"]["df"] == 2
    assert any("only 4 studies" in w for w in m["warnings"])
    s = summary(run, "mine", "meta_reml")
    assert {"b_Intercept", "b_year", "sd_trial__Intercept"} <= set(s.index)
    text = (res / "report.html").read_text()
    assert "only 4 studies" in text and "Few studies" in text
    # the user's own column names are kept in the study labels
    assert "coef_trial[Smith 2001,Intercept]" in s.index


def test_duplicate_study_label_stops_ingest_with_one_line(tmp_path):
    bad = MINE.replace("Khan 2015", "Smith 2001")
    (tmp_path / "bad.csv").write_text(bad)
    cmd = [sys.executable, "-m", "hierpipe.cli", "ingest", str(tmp_path / "bad.csv"),
           "--formula", "yi | var(vi) ~ 1 + (1 | trial)", "--column", "trial=Trial",
           "--column", "yi=log OR", "--column", "vi=Var",
           "--out", str(tmp_path / "d.parquet")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "column 'Trial': study 'Smith 2001' is on rows 1 and 4" in lines[0]
    assert not (tmp_path / "d.parquet").exists()
