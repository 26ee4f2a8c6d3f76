"""End to end: diagnostics and both cross-validations through the real workflow.

A tiny schools-like study (12 schools of 4-20 pupils; ICC 0.2) with every kind
of fit, within-group K-fold, and exact leave-one-group-out Gibbs refits split
over two jobs. The ordering of the fits is asserted in test_cv_kfold over
several data sets: on one small data set it can reverse by chance.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import snakemake

GIBBS = {"chains": 2, "warmup": 300, "draws": 500}
CONFIG = {
    "seed": 3,
    "studies": {
        "schools_like": {
            "data": {
                "simulate": {
                    "design": "two_level",
                    "params": {"groups": 12, "size": [4, 20], "mu": 70.0, "tau": 5.0,
                               "sigma": 10.0},
                }
            },
            "formula": "score ~ 1 + (1 | school)",
            "fits": ["complete_pooling", "no_pooling", "eb_reml", "gibbs"],
            "gibbs": GIBBS,
            # Exact Gibbs refits split over two jobs here; test_workflow runs the
            # default (PSIS) end to end.
            "cv": {"fits": ["complete_pooling", "eb_reml", "gibbs"], "chunks": 2,
                   "method": {"gibbs": "exact"}, "kfold": {"folds": 3}},
        },
    },
}  # fmt: skip
FITS = CONFIG["studies"]["schools_like"]["fits"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("diag")
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    snakemake(work, "--cores", "2")
    return work


def test_every_fit_has_its_diagnostics(run) -> None:
    res = run / "results" / "schools_like"
    for fit in FITS:
        d = res / "diagnostics" / fit
        ppc = pd.read_parquet(d / "ppc.parquet")
        assert len(ppc) == 4 + 4 * 12
        assert ppc["p_value"].between(0, 1).all()
        assert len(pd.read_parquet(d / "residuals.parquet")) == len(
            pd.read_parquet(res / "data.parquet")
        )
        assert "james_stein" in pd.read_parquet(d / "shrinkage.parquet").columns
    conv = pd.read_parquet(res / "diagnostics" / "gibbs" / "convergence.parquet")
    assert {"mcse_q5", "mcse_q95"} <= set(conv.columns)
    prior = pd.read_parquet(res / "diagnostics" / "gibbs" / "prior_predictive.parquet")
    assert len(prior) == 4000
    assert not (res / "diagnostics" / "eb_reml" / "convergence.parquet").exists()


def test_cross_validation_both_targets(run) -> None:
    res = run / "results" / "schools_like"
    logo = pd.read_parquet(res / "cv" / "gibbs.parquet")  # gathered from 2 jobs
    assert len(logo) == 12 and set(logo["cv_method"]) == {"exact"}
    assert (res / "cv" / "chunks" / "gibbs" / "1.parquet").exists()
    kfold = pd.read_parquet(res / "cv" / "kfold" / "gibbs.parquet")  # gathered from 2 jobs
    assert sorted(kfold["fold"].unique()) == [0, 1, 2]
    assert kfold.groupby("group")["n"].sum().sum() == len(pd.read_parquet(res / "data.parquet"))
    table = pd.read_parquet(res / "cv" / "comparison.parquet").set_index(["target", "fit"])
    assert set(table.loc["new_group"].index) == {"complete_pooling", "eb_reml", "gibbs"}
    assert set(table.loc["known_group"].index) == set(FITS)
    assert (table.groupby(level="target")["elpd_diff"].max() == 0).all()


def test_report_shows_every_check(run) -> None:
    page = (run / "results" / "schools_like" / "report.html").read_text()
    for section in ("convergence", "ppc", "residuals", "shrinkage", "cv", "recovery"):
        assert f'<section id="{section}">' in page, section
    texts = ("trace and rank plots", "Prior predictive check", "New observations of known groups",
             "James–Stein", "group coefficients coef_", "MCSE of 5% quantile")  # fmt: skip
    for text in texts:
        assert text in page or text in _alts(page), text
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    for fit in FITS:
        assert f"predictive checks of {fit}" in images
        assert f"residual plots of {fit}" in images
    assert "PSIS diagnostics" not in page  # exact refits: no k-hat to show


def _alts(page: str) -> str:
    return " ".join(re.findall(r'alt="([^"]+)"', page))
