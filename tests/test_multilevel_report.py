"""Report sections of multilevel studies, and the omitted-level targets they print."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hierpipe.data.simulate import simulate
from hierpipe.io import write_json, write_parquet
from hierpipe.models.fitting import fit_table
from hierpipe.models.variance_components import cell_stats, fit_components, make_evaluator
from hierpipe.report.context import load_context
from hierpipe.report.render import render_study
from hierpipe.report.sections import omitted_level, variance_decomposition

FULL = "score ~ 1 + (1 | school/classroom)"
OMIT = "score ~ 1 + (1 | school)"
GIBBS = {"chains": 2, "warmup": 150, "draws": 200}


def write_study(root, name, sim, formula, fits, extra=None):
    d = root / name
    write_parquet(sim.data, d / "data.parquet")
    write_parquet(sim.truth, d / "truth.parquet")
    for fit in fits:
        res = fit_table(
            sim.data,
            formula,
            fit,
            settings=GIBBS if fit == "gibbs" else {},
            rng=np.random.default_rng(1),
            source="sim",
        )
        write_parquet(res.summary, d / "fits" / fit / "summary.parquet")
        if res.draws is not None:
            write_parquet(res.draws, d / "fits" / fit / "draws.parquet")
        write_json({"method": fit, "formula": formula, **res.info}, d / "fits" / fit / "fit.json")
    return d, {"formula": formula, "fits": fits, **(extra or {})}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    sim = simulate("three_level", np.random.default_rng(4), schools=8, classrooms=3, students=5)
    full = write_study(root, "full", sim, FULL, ["eb_reml", "gibbs"], {"compare_with": "omit"})
    omit = write_study(root, "omit", sim, OMIT, ["eb_reml", "gibbs"])
    return full, omit


def text_of(page: str, section: str) -> str:
    m = re.search(rf'<section id="{section}">(.*?)</section>', page, re.S)
    assert m, section
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", m.group(1)))


def test_sections_render_for_the_three_level_study(studies, tmp_path):
    (d, config), _ = studies
    out = tmp_path / "report.html"
    render_study(d, "full", config, 42, out)
    page = out.read_text()
    vd = text_of(page, "variance_decomposition")
    assert (
        "icc_school:classroom" in vd
        and "var(school:classroom) / (var(school:classroom) + sigma^2)" in vd
    )
    assert "not applied" in vd
    om = text_of(page, "omitted_level")
    assert "score ~ 1 + (1 | school)" in om and "sd_school__Intercept" in om
    ctx = load_context(d, "full", config, 42)
    s = omitted_level.build(ctx)
    # the width ratio is the companion's mean coef_ interval width over this study's
    eff = next(e for e in s["effects"] if e["fit"] == "eb_reml")
    a = ctx.fits["eb_reml"].summary
    a = a[a.parameter.str.startswith("coef_school[")]
    assert eff["full"]["width"] == pytest.approx(float((a.q95 - a.q5).mean()), rel=1e-12)
    assert s["targets"]["balanced"] and s["targets"]["m"] == 3 and s["targets"]["n"] == 5


def test_sections_leave_out_studies_they_do_not_concern(studies):
    _, (d, config) = studies
    ctx = load_context(d, "omit", config, 42)
    assert variance_decomposition.build(ctx) is None
    assert omitted_level.build(ctx) is None


def test_omitted_level_targets_match_simulation():
    """Two-level estimates on balanced three-level data: means at the EMS targets.

    Balanced two-level REML equals the one-way ANOVA estimators when those are
    positive (checked on one replicate), so 4,000 replicates are summarised by
    the ANOVA estimators, vectorised.
    """
    a, m, n, reps = 30, 4, 5, 4000
    sd_s, sd_c, sigma = 3.0, 2.0, 2.5
    rng = np.random.default_rng(8)
    y = (
        sd_s * rng.standard_normal((reps, a, 1, 1))
        + sd_c * rng.standard_normal((reps, a, m, 1))
        + sigma * rng.standard_normal((reps, a, m, n))
    ).reshape(reps, a, m * n)
    school_mean = y.mean(axis=2)
    msw = ((y - school_mean[..., None]) ** 2).sum(axis=(1, 2)) / (a * (m * n - 1))
    msb = m * n * ((school_mean - school_mean.mean(axis=1, keepdims=True)) ** 2).sum(1) / (a - 1)
    tau2 = (msb - msw) / (m * n)
    school = np.repeat(np.arange(a), m * n)
    st = cell_stats(
        ["school"],
        [list(map(str, range(a)))],
        school[:, None],
        np.ones((a * m * n, 1)),
        y[0].ravel(),
        ("Intercept",),
    )
    f = fit_components(make_evaluator(st), "REML")
    assert tau2[0] > 0
    # optimiser tolerance
    assert f.sds[0] ** 2 == pytest.approx(tau2[0], rel=1e-6)
    assert f.sigma**2 == pytest.approx(msw[0], rel=1e-6)
    t = omitted_level.omitted_targets(sd_s, sd_c, sigma, m, n)
    # unbiased estimators of the targets: means within 4 Monte Carlo SEs
    for est, target in ((tau2, t["sd"] ** 2), (msw, t["sigma"] ** 2)):
        assert abs(est.mean() - target) < 4 * est.std(ddof=1) / np.sqrt(reps)
    # the omitted model's sigma^2 is biased: ~9.3 against the true 6.25
    assert msw.mean() > sigma**2 + 2.5
