"""End to end: a varying-slopes study through the real Snakemake workflow.

A tiny config in a temporary folder: the ``slopes`` design fitted as
``score ~ 1 + ses + (1 + ses | school)`` by complete pooling, no pooling, ML and
REML with leave-one-school-out CV, and a second study on the same data with
uncorrelated coefficients ``(1 + ses || school)``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 11,
    "studies": {
        "slopes": {
            "data": {"simulate": {"design": "slopes", "params": {"groups": 10, "size": [4, 12]}}},
            "formula": "score ~ 1 + ses + (1 + ses | school)",
            "fits": ["complete_pooling", "no_pooling", "eb_ml", "eb_reml"],
            "cv": {"fits": ["complete_pooling", "eb_reml"], "chunks": 2},
        },
        "slopes_diag": {
            "data": {"study": "slopes"},
            "formula": "score ~ 1 + ses + (1 + ses || school)",
            "fits": ["eb_reml"],
            "cv": {"fits": []},
        },
    },
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("lmm")
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(TINY))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(work),
        "--cores",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return work / "results"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.img_alt: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            assert a.get("src", "").startswith("data:image/png;base64,")
            self.img_alt.append(a.get("alt", ""))

    def handle_data(self, data):
        self.text.append(data)


def test_slopes_study_outputs_follow_the_contract(run):
    res = run / "slopes"
    data = pd.read_parquet(res / "data.parquet")
    assert list(data.columns) == ["school", "ses", "score"]
    truth = pd.read_parquet(res / "truth.parquet").set_index("parameter")["value"]
    assert truth["cor_school__Intercept__ses"] == -0.4
    for fit in TINY["studies"]["slopes"]["fits"]:
        s = pd.read_parquet(res / "fits" / fit / "summary.parquet")
        assert list(s.columns) == ["parameter", "mean", "sd", "q5", "q50", "q95"]
    reml = pd.read_parquet(res / "fits" / "eb_reml" / "summary.parquet").set_index("parameter")
    for name in (
        "b_Intercept",
        "b_ses",
        "sd_school__Intercept",
        "sd_school__ses",
        "cor_school__Intercept__ses",
        "sigma",
        "r_school[S01,ses]",
        "coef_school[S10,Intercept]",
    ):
        assert name in reml.index, name
    assert "icc_school" not in reml.index
    info = json.loads((res / "fits" / "eb_reml" / "fit.json").read_text())
    for key in ("loglik", "reml_criterion", "convergence", "boundary", "predictions"):
        assert key in info, key
    assert info["convergence"]["converged"] is True
    assert all(w.startswith("boundary fit: ") for w in info["boundary"])
    assert set(info["boundary"]) <= set(info["warnings"])
    checks = json.loads((res / "diagnostics" / "eb_reml" / "checks.json").read_text())
    # the trace of the hat matrix's group part, not the sum of descriptive weights
    assert checks["effective_parameters"] == pytest.approx(info["effective_parameters"])
    shrink = pd.read_parquet(res / "diagnostics" / "eb_reml" / "shrinkage.parquet")
    assert {"no_pooling", "estimate", "no_pooling__ses", "estimate__ses"} <= set(shrink.columns)
    cv = pd.read_parquet(res / "cv" / "comparison.parquet")
    assert set(cv["fit"]) == {"complete_pooling", "eb_reml"}
    folds = pd.read_parquet(res / "cv" / "eb_reml.parquet")
    assert len(folds) == 10 and folds["group"].is_unique and np.isfinite(folds["elpd"]).all()
    diag = pd.read_parquet(run / "slopes_diag" / "fits" / "eb_reml" / "summary.parquet")
    assert "sd_school__ses" in set(diag["parameter"])
    assert "cor_school__Intercept__ses" not in set(diag["parameter"])


def test_slopes_report_has_fixed_effects_and_varying_slopes(run):
    page = _Page()
    page.feed((run / "slopes" / "report.html").read_text())
    assert {
        "overview",
        "estimates",
        "fixed_effects",
        "varying_slopes",
        "shrinkage",
        "variance",
        "cv",
        "recovery",
        "provenance",
    } <= page.ids
    assert any("covariance ellipse" in alt for alt in page.img_alt)
    text = " ".join(page.text)
    assert "b_ses" in text and "cor_school__Intercept__ses" in text
    boundary = json.loads((run / "slopes" / "fits" / "eb_reml" / "fit.json").read_text())[
        "boundary"
    ]
    assert ("Boundary fit." in text) == bool(boundary)
    # the uncorrelated model: same sections, its covariance structure named
    diag = _Page()
    diag.feed((run / "slopes_diag" / "report.html").read_text())
    assert "varying_slopes" in diag.ids and "block diagonal" in " ".join(diag.text)


def test_ellipse_holds_its_level_and_labels_round_trip():
    from hierpipe.report.sections.varying_slopes import _group_values, ellipse

    cov = np.array([[4.0, -1.2], [-1.2, 1.0]])
    pts = ellipse(np.array([1.0, 2.0]), cov, 0.9)
    d = pts - np.array([1.0, 2.0])
    # on the contour the Mahalanobis distance is the chi-square(2) 90% quantile
    np.testing.assert_allclose(
        np.einsum("ki,ij,kj->k", d, np.linalg.inv(cov), d), -2 * np.log(0.1), rtol=1e-12
    )
    s = pd.DataFrame({"parameter": ["coef_g[S10,Intercept]", "coef_g[S10,x]"], "mean": [1.0, 2.0]})
    assert _group_values(s, "coef_g", "x").to_dict() == {"S10": 2.0}
