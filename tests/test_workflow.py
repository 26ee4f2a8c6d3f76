"""End to end: the real Snakemake workflow on a tiny config in a temporary folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import ReportPage, snakemake, workdir

TINY = {
    "seed": 7,
    "studies": {
        "tiny": {
            "data": {
                "simulate": {
                    "design": "two_level",
                    "params": {"groups": 8, "size": [3, 12], "mu": 50.0, "tau": 4.0, "sigma": 6.0},
                }
            },
            "formula": "score ~ 1 + (1 | school)",
            "fits": ["complete_pooling", "no_pooling", "eb_moments", "eb_reml", "gibbs"],
            "gibbs": {"chains": 2, "warmup": 200, "draws": 300},
            "cv": {"fits": ["complete_pooling", "eb_reml", "gibbs"], "chunks": 2},
        }
    },
}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    work = workdir(tmp_path_factory.mktemp("a"), TINY)
    snakemake(work, "--cores", "2")
    return work


def test_outputs_follow_the_contract(run_a):
    res = run_a / "results" / "tiny"
    data = pd.read_parquet(res / "data.parquet")
    assert list(data.columns) == ["school", "score"]
    assert data["school"].dtype == "string" or data["school"].dtype == object
    assert data["score"].dtype == "float64"
    for fit in TINY["studies"]["tiny"]["fits"]:
        s = pd.read_parquet(res / "fits" / fit / "summary.parquet")
        assert list(s.columns[:6]) == ["parameter", "mean", "sd", "q5", "q50", "q95"]
        assert (s.dtypes.iloc[1:] == "float64").all()
    gibbs = pd.read_parquet(res / "fits" / "gibbs" / "summary.parquet").set_index("parameter")
    for name in (
        "b_Intercept",
        "sd_school__Intercept",
        "sigma",
        "icc_school",
        "r_school[S01,Intercept]",
        "coef_school[S08,Intercept]",
    ):
        assert name in gibbs.index, name
    assert {"rhat", "ess_bulk", "ess_tail", "mcse_mean"} <= set(gibbs.columns)
    draws = pd.read_parquet(res / "fits" / "gibbs" / "draws.parquet")
    assert len(draws) == 2 * 300 and {"chain", "draw", "b_Intercept"} <= set(draws.columns)
    cv = pd.read_parquet(res / "cv" / "comparison.parquet")
    assert set(cv["fit"]) == {"complete_pooling", "eb_reml", "gibbs"}
    assert cv["elpd_diff"].max() == 0.0
    folds = pd.read_parquet(res / "cv" / "gibbs.parquet")
    assert len(folds) == 8 and folds["group"].is_unique
    for log in ("simulate.log", "fit_gibbs.log", "report.log"):
        assert (res / "logs" / log).exists()


def test_report_is_self_contained_and_complete(run_a):
    page = ReportPage()
    page.feed((run_a / "results" / "tiny" / "report.html").read_text())
    assert {
        "overview",
        "estimates",
        "groups",
        "shrinkage",
        "variance",
        "convergence",
        "cv",
        "recovery",
        "provenance",
    } <= page.ids
    assert page.img_src and all(s.startswith("data:image/png;base64,") for s in page.img_src)
    assert page.external == []
    text = " ".join(page.text)
    for fit in TINY["studies"]["tiny"]["fits"]:
        assert fit in text
    assert "new observation new group" in text
    index = (run_a / "results" / "index.html").read_text()
    assert 'href="tiny/report.html"' in index


def test_rerun_has_nothing_to_do(run_a):
    proc = snakemake(run_a, "-n", "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_gibbs_draws_reruns_only_gibbs(run_a, tmp_path):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["studies"]["tiny"]["gibbs"]["draws"] = 301
    alt = tmp_path / "alt.yaml"
    alt.write_text(yaml.safe_dump(cfg))
    proc = snakemake(run_a, "-n", "--cores", "2", "--configfile", str(alt))
    out = proc.stdout + proc.stderr
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert jobs.get("fit_sampler") == "1", out
    assert "fit_point" not in jobs and "simulate" not in jobs, out
    assert "report" in jobs


def test_parquet_bytes_identical_across_runs_and_cores(run_a, tmp_path):
    other = workdir(tmp_path / "b", TINY)
    snakemake(other, "--cores", "1")
    files = sorted(p.relative_to(run_a) for p in (run_a / "results").rglob("*.parquet"))
    assert len(files) >= 15
    for rel in files:
        assert (run_a / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_unknown_config_key_names_the_key(tmp_path):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["studies"]["tiny"]["gibbs"]["drawz"] = 5
    work = workdir(tmp_path, cfg)
    proc = snakemake(work, "-n", "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "drawz" in proc.stdout + proc.stderr


def test_bad_user_file_fails_with_one_line(tmp_path):
    (tmp_path / "pupils.csv").write_text("School,Score\nA,1\nA,2\nB,x\nB,4\n")
    cfg = {
        "studies": {
            "mine": {
                "data": {"file": "pupils.csv", "columns": {"school": "School", "score": "Score"}},
                "formula": "score ~ 1 + (1 | school)",
                "fits": ["eb_reml"],
            }
        }
    }
    work = workdir(tmp_path, cfg)
    proc = snakemake(work, "--cores", "1", check=False)
    assert proc.returncode != 0
    log = (work / "results" / "mine" / "logs" / "ingest.log").read_text()
    assert "Traceback" not in log
    assert re.search(r"pupils\.csv.*Score.*row 3", log), log
    assert not (work / "results" / "mine" / "data.parquet").exists()
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
