"""Model checks and cross-validation of the multilevel engine (nested and crossed).

References: statsmodels MixedLM with variance components (conditional residuals),
dense multivariate normal densities on the n x n covariance (group densities,
K-fold predictive), numerical integration over the log-SDs on a grid (the exact
leave-one-group-out predictive density of a Gibbs fit), the engine's own exact
refits, the balanced nested ANOVA (Henderson's method I equals REML there), and
the uniformity of predictive p-values at the true parameters.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.special import logsumexp

from hierpipe.cv.folds import run_chunk
from hierpipe.cv.kfold import model_and_design
from hierpipe.data.simulate import simulate
from hierpipe.diagnostics.ppc import observed_statistics, ppc_tables
from hierpipe.models.engines import multilevel_checks as mc
from hierpipe.models.fitting import fit_table
from hierpipe.models.gibbs_multilevel import _Marginal
from hierpipe.models.variance_components import fit_components, make_evaluator

NESTED = "score ~ 1 + (1 | school/classroom)"
CROSSED = "y ~ 1 + (1 | student) + (1 | teacher)"
# explicit priors, so a refit without a group uses the same prior as the full fit
PRIORS = {
    "sd": {"family": "half_cauchy", "scale": 10.0},
    "sigma": {"family": "half_cauchy", "scale": 10.0},
}


def _nested(seed: int, schools: int = 8, classrooms=(1, 4), students=(2, 6)) -> pd.DataFrame:
    sim = simulate(
        "three_level",
        np.random.default_rng(seed),
        schools=schools,
        classrooms=list(classrooms),
        students=list(students),
        sd_school=5.0,
        sd_classroom=4.0,
        sigma=8.0,
    )
    return sim.data.astype({"school": str, "classroom": str})


def _dense_cov(df: pd.DataFrame, factors: dict[str, float], sigma2: float) -> np.ndarray:
    v = sigma2 * np.eye(len(df))
    for col, var in factors.items():
        c = df[col].to_numpy()
        v = v + var * (c[:, None] == c[None, :])
    return v


def _mvn_logpdf(d: np.ndarray, cov: np.ndarray) -> float:
    return float(
        -0.5
        * (d.size * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1] + d @ np.linalg.solve(cov, d))
    )


# --------------------------------------------------------------------------- residuals


def test_conditional_residuals_match_statsmodels_mixedlm():
    sm = pytest.importorskip("statsmodels.formula.api")
    df = _nested(11, schools=12, classrooms=(2, 4), students=(2, 9))
    df["classroom"] = df["school"] + ":" + df["classroom"]
    model, design = model_and_design(df, NESTED, "sim")
    res = fit_table(df, NESTED, "eb_reml", settings={}, rng=np.random.default_rng(0), source="s")
    mine = mc.residuals(design, model.prepared, model.structure, res.summary)
    mixed = sm.mixedlm(
        "score ~ 1",
        df,
        groups="school",
        re_formula="1",
        vc_formula={"classroom": "0 + C(classroom)"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = [mixed.fit(reml=True, method=m) for m in ("lbfgs", "nm")]
    ref = max(fits, key=lambda r: r.llf)
    scale = float(np.sqrt(ref.scale))
    # statsmodels' optimiser gives about 4 significant digits of the variances,
    # so the predicted effects agree to ~1e-4 of the outcome's SD, not to rounding
    np.testing.assert_allclose(mine["fitted"], ref.fittedvalues, atol=2e-3 * scale)
    np.testing.assert_allclose(
        mine["standardised"], (df["score"] - ref.fittedvalues) / scale, atol=2e-3
    )
    assert list(mine["group"]) == list(df["school"])


# --------------------------------------------------------------------------- group densities


def _draws_table(st, rng: np.random.Generator, size: int = 5) -> pd.DataFrame:
    out = {"chain": np.zeros(size, dtype=np.int64), "draw": np.arange(size)}
    for name in st.fixed_names:
        out[f"b_{name}"] = rng.normal(0.5, 1.0, size)
    for f in st.factors:
        out[f"sd_{f}__Intercept"] = rng.uniform(0.5, 6.0, size)
    out["sigma"] = rng.uniform(2.0, 9.0, size)
    return pd.DataFrame(out)


def test_nested_group_density_matches_dense_normal():
    df = _nested(3)
    df["x"] = np.random.default_rng(4).standard_normal(len(df))
    formula = "score ~ 1 + x + (1 | school/classroom)"
    model, _ = model_and_design(df, formula, "sim")
    st = model.prepared.stats
    draws = _draws_table(st, np.random.default_rng(5))
    ll = mc.logo_log_lik(model.prepared, model.structure, draws)
    groups = np.array([4, 1])
    block = mc.logo_log_lik(model.prepared, model.structure, draws, groups=groups)
    np.testing.assert_array_equal(block, ll[:, groups])
    key = df["school"] + ":" + df["classroom"]
    for s, row in draws.iterrows():
        for j, lab in enumerate(st.labels[0]):
            rows = (df["school"] == lab).to_numpy()
            sub = df[rows].assign(cls=key[rows])
            cov = _dense_cov(
                sub,
                {
                    "school": row["sd_school__Intercept"] ** 2,
                    "cls": row["sd_school:classroom__Intercept"] ** 2,
                },
                row["sigma"] ** 2,
            )
            mean = row["b_Intercept"] + row["b_x"] * sub["x"].to_numpy()
            want = _mvn_logpdf(sub["score"].to_numpy() - mean, cov)
            # the same Gaussian by Woodbury and the determinant lemma: rounding only
            assert ll[s, j] == pytest.approx(want, abs=1e-8)


def test_crossed_conditional_density_matches_dense_conditioning():
    sim = simulate(
        "crossed", np.random.default_rng(2), students=10, teachers=4, per_student=2, size=[1, 3]
    )
    df = sim.data.astype({"student": str, "teacher": str})
    model, _ = model_and_design(df, CROSSED, "sim")
    st = model.prepared.stats
    draws = _draws_table(st, np.random.default_rng(6), size=3)
    ll = mc.logo_log_lik(model.prepared, model.structure, draws, groups=np.array([0, 7]))
    y = df["y"].to_numpy()
    for s, row in draws.iterrows():
        cov = _dense_cov(
            df,
            {
                "student": row["sd_student__Intercept"] ** 2,
                "teacher": row["sd_teacher__Intercept"] ** 2,
            },
            row["sigma"] ** 2,
        )
        d = y - row["b_Intercept"]
        for col, j in enumerate([0, 7]):
            h = (df["student"] == st.labels[0][j]).to_numpy()
            k = cov[h][:, ~h] @ np.linalg.inv(cov[~h][:, ~h])
            want = _mvn_logpdf(d[h] - k @ d[~h], cov[h][:, h] - k @ cov[~h][:, h])
            assert ll[s, col] == pytest.approx(want, abs=1e-8)


# --------------------------------------------------------------------------- PSIS-LOGO


class _Quadrature:
    """log p(y_j | y_-j) by a Riemann sum over the log-SDs (beta integrated exactly).

    The grid spans the full-data draws' log-SDs, widened by 3 below for the factor
    SDs (their posterior has a long left tail towards 0) and by 0.5-1 elsewhere;
    the integrand is smooth and negligible at the edges and the spacing is below
    its scale in every direction, so the sum's error (checked against a grid five
    times denser and wider: 2e-5 nats) is far below the Monte Carlo error compared with.
    """

    def __init__(self, st, priors, draws: pd.DataFrame) -> None:
        from hierpipe.models.engines.multilevel import priors_from_config, resolve_priors

        self.st = st
        self.prior = priors_from_config(resolve_priors(st, priors))
        axes = []
        for f in st.factors:
            u = np.log(draws[f"sd_{f}__Intercept"].to_numpy())
            axes.append(np.linspace(u.min() - 3.0, u.max() + 1.0, 40))
        u = np.log(draws["sigma"].to_numpy())
        axes.append(np.linspace(u.min() - 0.5, u.max() + 0.5, 24))
        self.grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
        self.full = logsumexp(_Marginal(make_evaluator(st), self.prior).logp(self.grid))

    def elpd(self, sub) -> float:
        rest = logsumexp(_Marginal(make_evaluator(sub), self.prior).logp(self.grid))
        return float(self.full - rest - 0.5 * (self.st.n_obs - sub.n_obs) * np.log(2 * np.pi))


def test_psis_logo_agrees_with_quadrature_and_exact_refits():
    df = _nested(7, schools=10, classrooms=(2, 3), students=(3, 5))
    settings = {"chains": 4, "warmup": 300, "draws": 1000, "priors": PRIORS}
    res = fit_table(
        df, NESTED, "gibbs", settings=settings, rng=np.random.default_rng(1), source="s"
    )
    psis = run_chunk(
        df, NESTED, "gibbs", chunk=0, chunks=1, settings=settings, seed=3, keys=("t",),
        source="s", cv_method="psis", draws=res.draws,
    )  # fmt: skip
    model, _ = model_and_design(df, NESTED, "s")
    st = model.prepared.stats
    ok = psis["khat"] < 0.7
    assert (psis.loc[ok, "cv_method"] == "psis").all() and ok.sum() >= 8
    quad = _Quadrature(st, PRIORS, res.draws)
    for j, row in psis[ok].iloc[::2].iterrows():
        _, sub = mc._held_out_stats(model.prepared, j)
        want = quad.elpd(sub)
        # importance sampling over 2,000 autocorrelated draws: Monte Carlo error of
        # a few hundredths of a nat at k-hat < 0.7 (at most 0.015 seen)
        assert row["elpd"] == pytest.approx(want, abs=0.08), row["group"]
    # the engine's exact refit of one group (chunk 0 of 10: group 0)
    exact = run_chunk(
        df, NESTED, "gibbs", chunk=0, chunks=10, settings=settings, seed=3, keys=("t",),
        source="s", cv_method="exact",
    )  # fmt: skip
    both = exact.merge(psis[ok], on="group", suffixes=("_exact", "_psis"))
    assert len(both) == 1
    # two independent Monte Carlo estimates of the same density: twice the tolerance above
    np.testing.assert_allclose(both["elpd_exact"], both["elpd_psis"], atol=0.15)
    np.testing.assert_allclose(both["pred_mean_exact"], both["pred_mean_psis"], atol=0.5)


# --------------------------------------------------------------------------- K-fold


def test_kfold_scores_match_dense_conditional_predictive():
    df = _nested(5, schools=5, classrooms=(2, 3), students=(2, 5))
    df["x"] = np.random.default_rng(8).standard_normal(len(df))
    formula = "score ~ 1 + x + (1 | school/classroom)"
    model, design = model_and_design(df, formula, "sim")
    fold = np.zeros(len(df), dtype=np.int64)
    fold[::3] = 1
    # every row of one classroom held out: its effect must be predicted as a new group's
    first = (df["school"] == df["school"].iloc[0]) & (df["classroom"] == df["classroom"].iloc[0])
    fold[first.to_numpy()] = 1
    train, held = mc.kfold_split(design, model.prepared, model.structure, fold, 1)
    rows = mc.score_kfold(train, held, model.structure, "eb_reml", {}, np.random.default_rng(0))
    assert {r["group"] for r in rows} == set(df.loc[fold == 1, "school"])
    cf = fit_components(make_evaluator(mc._rows_stats(train)), "REML")
    key = (df["school"] + ":" + df["classroom"]).to_numpy()
    cov = _dense_cov(
        df.assign(cls=key), {"school": cf.sds[0] ** 2, "cls": cf.sds[1] ** 2}, cf.sigma**2
    )
    X = np.column_stack([np.ones(len(df)), df["x"]])
    y = df["score"].to_numpy()
    t = fold == 0
    Vi = np.linalg.inv(cov[t][:, t])
    info = X[t].T @ Vi @ X[t]
    beta = np.linalg.solve(info, X[t].T @ Vi @ y[t])
    for row in rows:
        h = (fold == 1) & (df["school"] == row["group"]).to_numpy()
        k = cov[h][:, t] @ Vi
        mean = X[h] @ beta + k @ (y[t] - X[t] @ beta)
        a = X[h] - k @ X[t]
        c = cov[h][:, h] - k @ cov[t][:, h] + a @ np.linalg.solve(info, a.T)
        # the same Gaussian (beta integrated under its flat prior): rounding only
        assert row["elpd"] == pytest.approx(_mvn_logpdf(y[h] - mean, c), abs=1e-8)
        assert row["pred_mean"] == pytest.approx(mean.mean(), abs=1e-6)
        assert row["n"] == h.sum()


# --------------------------------------------------------------------------- PPC


@pytest.mark.parametrize("which", ["nested", "crossed"])
def test_ppc_p_values_are_uniform_at_the_truth(which):
    rng = np.random.default_rng(21)
    if which == "nested":
        sim = simulate("three_level", rng, schools=150, classrooms=[1, 4], students=[1, 6])
        formula = NESTED
    else:
        sim = simulate("crossed", rng, students=150, teachers=10, per_student=[1, 4], size=[1, 3])
        formula = CROSSED
    model, design = model_and_design(sim.data, formula, "sim")
    summary = sim.truth.rename(columns={"value": "mean"})
    reps = mc.ppc_replicates(
        model.prepared, model.structure, summary, None, np.random.default_rng(2), 400
    )
    term = design.random[0]
    obs = observed_statistics(design.y, term.codes, len(term.labels))
    table, _ = ppc_tables(obs, reps, term.labels)
    groups = table[(table["scope"] == "group") & table["p_value"].notna()]
    for stat, part in groups.groupby("statistic"):
        # At the true effects and sigma each group's statistic is a draw from the
        # replicates' distribution, so its p-value is uniform up to the 1/400 grid;
        # 150 groups, and the KS cut-off 1e-3 keeps the false-alarm rate negligible
        # over the four statistics and both structures.
        assert stats.kstest(part["p_value"], "uniform").pvalue > 1e-3, stat
    assert len(groups) > 3 * 150


# --------------------------------------------------------------------------- James-Stein, priors


def test_henderson_components_equal_reml_on_balanced_nested_data():
    df = _nested(9, schools=10, classrooms=(3, 3), students=(4, 4))
    model, _ = model_and_design(df, NESTED, "sim")
    var, sigma2 = mc.lower_components(model.prepared)
    cf = fit_components(make_evaluator(model.prepared.stats), "REML")
    assert not cf.boundary
    # balanced nested data: REML equals the ANOVA (Henderson I) estimates when positive
    np.testing.assert_allclose([var[0], sigma2], [cf.sds[1] ** 2, cf.sigma**2], rtol=1e-6)
    table, facts = mc.james_stein_table(model.prepared, model.structure)
    assert facts["form"] == "james_stein"  # equal sampling variances in balanced data
    assert len(table) == 10 and table["js_shrinkage"].between(0, 1).all()


def test_james_stein_reasons_and_prior_predictive():
    sim = simulate("crossed", np.random.default_rng(2), students=20, teachers=4, per_student=2)
    model, _ = model_and_design(sim.data, CROSSED, "sim")
    assert mc.james_stein_table(model.prepared, model.structure) is None
    assert "crossed" in mc.james_stein_unavailable(model.prepared, model.structure)
    info = {"priors": {"b_Intercept": {"family": "flat"}, **PRIORS}}
    prior = mc.prior_predictive(model.prepared, model.structure, info, np.random.default_rng(0))
    for col in ("sd_student__Intercept", "sd_teacher__Intercept", "sigma"):
        # half-Cauchy(10): median 10; 4,000 draws put the sample median within ~5%
        assert prior[col].median() == pytest.approx(10.0, rel=0.1)
    total = prior["sd_student__Intercept"] ** 2 + prior["sd_teacher__Intercept"] ** 2
    total = total + prior["sigma"] ** 2
    np.testing.assert_allclose(prior["icc_student"], prior["sd_student__Intercept"] ** 2 / total)
    assert prior["new_observation"].isna().all()  # flat prior on the intercept


@pytest.mark.parametrize("which", ["nested", "crossed"])
def test_sampler_replicates_draw_effects_from_their_conditional(which):
    """Replicated group means given fixed hyperparameters, against dense algebra."""
    if which == "nested":
        df, formula = _nested(13, schools=6), NESTED
    else:
        sim = simulate("crossed", np.random.default_rng(3), students=12, teachers=4, per_student=2)
        df, formula = sim.data, CROSSED
    model, design = model_and_design(df, formula, "sim")
    st = model.prepared.stats
    var, sigma2, b0, reps = np.array([9.0, 4.0]), 25.0, float(design.y.mean()), 4000
    draws = pd.DataFrame({"chain": np.zeros(reps, dtype=np.int64), "draw": np.arange(reps),
                          "b_Intercept": b0, "sigma": np.sqrt(sigma2)})  # fmt: skip
    for f, v in zip(st.factors, var, strict=True):
        draws[f"sd_{f}__Intercept"] = np.sqrt(v)
    out = mc.ppc_replicates(
        model.prepared, model.structure, None, draws, np.random.default_rng(0), reps
    )
    means = np.concatenate([b[2]["mean"] for b in out.blocks], axis=1)
    # dense reference: effects | y ~ N(C Z'(y - b0)/sigma^2, C), C = (Z'Z/sigma^2 + D^-1)^-1,
    # and a group's replicated mean adds sigma^2/n_j
    Z = np.hstack([np.eye(len(st.labels[k]))[design.random[k].codes] for k in range(2)])
    d = np.concatenate([np.full(len(st.labels[k]), var[k]) for k in range(2)])
    C = np.linalg.inv(Z.T @ Z / sigma2 + np.diag(1.0 / d))
    m = C @ Z.T @ (design.y - b0) / sigma2
    codes = design.random[0].codes
    for j in range(len(st.labels[0])):
        a = Z[codes == j].mean(axis=0)
        n_j = (codes == j).sum()
        mean, sd = b0 + a @ m, np.sqrt(a @ C @ a + sigma2 / n_j)
        # 4,000 independent replicates: the sample mean within 4.5 standard errors
        # and the sample variance within 15% (its SE is sqrt(2/4000) = 2.2%)
        assert means[:, j].mean() == pytest.approx(mean, abs=4.5 * sd / np.sqrt(reps))
        assert means[:, j].std() == pytest.approx(sd, rel=0.15)


def test_ppc_with_a_within_cell_predictor_keeps_mean_and_sd_exact():
    sim = simulate(
        "three_level", np.random.default_rng(8), schools=150, classrooms=[1, 3], students=[2, 6]
    )
    df = sim.data.copy()
    df["x"] = np.random.default_rng(9).standard_normal(len(df))
    df["score"] = df["score"] + 10.0 * df["x"]
    model, design = model_and_design(df, "score ~ 1 + x + (1 | school/classroom)", "sim")
    truth = pd.concat([sim.truth, pd.DataFrame({"parameter": ["b_x"], "value": [10.0]})])
    reps = mc.ppc_replicates(
        model.prepared,
        model.structure,
        truth.rename(columns={"value": "mean"}),
        None,
        np.random.default_rng(2),
        400,
    )
    assert "NaN" in reps.note
    term = design.random[0]
    obs = observed_statistics(design.y, term.codes, len(term.labels))
    table, _ = ppc_tables(obs, reps, term.labels)
    groups = table[table["scope"] == "group"].set_index("statistic")
    assert groups.loc[["min", "max"], "p_value"].isna().all()
    for stat in ("mean", "sd"):
        # the within-cell spread of 10x (as large as sigma) enters the SD through the noncentral
        # chi-square; uniform p-values as in test_ppc_p_values_are_uniform_at_the_truth
        p = groups.loc[stat, "p_value"].dropna()
        assert stats.kstest(p, "uniform").pvalue > 1e-3, stat
