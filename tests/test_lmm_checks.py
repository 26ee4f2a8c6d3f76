"""Model checks and within-group K-fold of the LMM engine (hierpipe.models.engines.lmm_checks).

References: statsmodels MixedLM's conditional residuals; the exact distribution
of PPC p-values when replicates are drawn at the data-generating parameters
(uniform); dense n x n Gaussian conditioning (universal kriging) for the K-fold
predictive density; dense conditioning for the group coefficients' full
conditional; closed-form marginals of the Huang-Wand and inverse-gamma priors.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from workflow_helpers import snakemake, workdir

from hierpipe.cv.kfold import assign_folds, run_kfold
from hierpipe.data.simulate import simulate
from hierpipe.diagnostics.ppc import observed_statistics, ppc_tables
from hierpipe.diagnostics.shrinkage import james_stein
from hierpipe.errors import InputError
from hierpipe.models.engines import lmm as E
from hierpipe.models.engines import lmm_checks as C
from hierpipe.models.fitting import fit_table, load_model
from hierpipe.seeds import derive_rng

SLOPES = "score ~ 1 + ses + (1 + ses | school)"


def slopes_frame(seed: int, **params) -> pd.DataFrame:
    params = {"groups": 30, "size": [4, 20], **params}
    return simulate("slopes", np.random.default_rng(seed), **params).data


def fit(df: pd.DataFrame, method: str, formula: str = SLOPES):
    return fit_table(df, formula, method, settings={}, rng=np.random.default_rng(0), source="t")


def model_of(df: pd.DataFrame, formula: str = SLOPES):
    from hierpipe.cv.kfold import model_and_design

    return model_and_design(df, formula, "t")


# --------------------------------------------------------------------------- residuals


def test_residuals_match_statsmodels_mixedlm():
    import statsmodels.formula.api as smf

    df = slopes_frame(5, groups=40, sd_slope=1.5)
    model, design = model_of(df)
    result = fit(df, "eb_reml")
    table = E.residuals(design, model.prepared, model.structure, result.summary)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = smf.mixedlm("score ~ ses", df.astype({"school": str}), groups="school",
                         re_formula="~ses").fit(reml=True, method="lbfgs")  # fmt: skip
    # The two optimisers agree on theta to ~1e-5 relative (tests/test_lmm_engine.py), and
    # the residuals (SD ~8) move with it: 1e-3 absolute is that agreement, not slack.
    np.testing.assert_allclose(table["residual"], sm.resid.to_numpy(), atol=1e-3)
    np.testing.assert_allclose(table["fitted"], sm.fittedvalues.to_numpy(), atol=1e-3)
    np.testing.assert_allclose(
        table["standardised"], sm.resid.to_numpy() / np.sqrt(sm.scale), atol=1e-4
    )
    assert list(table.columns) == ["group", "observed", "fitted", "residual", "standardised"]
    assert (table["group"] == df["school"].astype(str)).all()


# --------------------------------------------------------------------------- PPC


def _truth_summary(sim) -> pd.DataFrame:
    return sim.truth.rename(columns={"value": "mean"})


def _group_p_values(df, summary, draws=None, replicates=400):
    model, design = model_of(df)
    reps = E.ppc_replicates(
        model.prepared, model.structure, summary, draws, np.random.default_rng(4), replicates
    )
    term = design.random[0]
    table, overall = ppc_tables(
        observed_statistics(design.y, term.codes, len(term.labels)), reps, term.labels
    )
    return table[table["scope"] == "group"], overall, reps


def test_ppc_p_values_are_uniform_at_the_truth_and_detect_a_wrong_sigma():
    sim = simulate("slopes", np.random.default_rng(8), groups=150, size=8)
    summary = _truth_summary(sim)
    groups, overall, reps = _group_p_values(sim.data, summary)
    assert len(overall) == reps.count == 400
    # Replicates at the data-generating parameters: each group's p-value is uniform and the
    # groups are independent, so a KS test over 150 groups applies (fixed seed; the grid
    # 1/400 of the p-values is far below KS's resolution at n = 150).
    for stat in ("mean", "sd", "min", "max"):
        p = groups.loc[groups["statistic"] == stat, "p_value"].to_numpy()
        assert sps.kstest(p, "uniform").pvalue > 1e-3, stat
    # The same check with sigma twice the truth: the observed SDs sit below the replicated.
    wrong = summary.copy()
    wrong.loc[wrong["parameter"] == "sigma", "mean"] *= 2.0
    bad, _, _ = _group_p_values(sim.data, wrong)
    p = bad.loc[bad["statistic"] == "sd", "p_value"].to_numpy()
    assert np.median(p) > 0.95


def test_ppc_uses_stored_group_draws():
    sim = simulate("slopes", np.random.default_rng(2), groups=6, size=[3, 9])
    truth = sim.truth.set_index("parameter")["value"]
    names = [n for n in truth.index if not n.startswith("coef_")]
    draws = pd.DataFrame({n: np.full(5, truth[n]) for n in names})
    draws["sigma"] = 1e-9  # replicated rows are then the fitted values themselves
    draws.insert(0, "chain", 0)
    draws.insert(1, "draw", np.arange(5))
    groups, _, reps = _group_p_values(sim.data, None, draws, replicates=5)
    assert "draw's own" in reps.note
    rows = groups[groups["statistic"] == "mean"].set_index("group")["rep_mean"]
    df = sim.data
    r0 = df["school"].map(lambda s: truth[f"r_school[{s},Intercept]"])
    r1 = df["school"].map(lambda s: truth[f"r_school[{s},ses]"])
    fitted = truth["b_Intercept"] + r0 + (truth["b_ses"] + r1) * df["ses"]
    expected = fitted.groupby(df["school"].astype(str)).mean()
    np.testing.assert_allclose(rows.loc[expected.index], expected, rtol=1e-9)


def test_group_coefficients_drawn_from_their_full_conditional():
    df = slopes_frame(3, groups=2, size=6)
    data = load_model(df, SLOPES, "t").prepared
    beta = np.array([50.0, 4.0])
    big = np.array([[25.0, -4.0], [-4.0, 4.0]])
    s2 = 64.0
    s = 40000
    pop = E.Population(
        beta=np.tile(beta, (s, 1)),
        beta_cov=np.zeros((s, 2, 2)),
        Sigma=np.tile(big, (s, 1, 1)),
        sigma2=np.full(s, s2),
    )
    idx = data.rows(0)
    x, z, y = data.X[idx], data.Z[idx], data.y[idx]
    draws = C._conditional_b(
        pop, z, np.tile(y - x @ beta, (s, 1)), np.array([0]), np.random.default_rng(1)
    )[:, 0]
    # Dense conditioning: b | y ~ N(Sigma Z' V^-1 r, Sigma - Sigma Z' V^-1 Z Sigma).
    v = z @ big @ z.T + s2 * np.eye(len(y))
    mean = big @ z.T @ np.linalg.solve(v, y - x @ beta)
    cov = big - big @ z.T @ np.linalg.solve(v, z @ big)
    se = np.sqrt(np.diag(cov) / s)
    # 5 Monte Carlo SEs of the mean; the covariance to 3% (its MC error is ~1% at 40000)
    assert np.all(np.abs(draws.mean(axis=0) - mean) < 5 * se)
    np.testing.assert_allclose(np.cov(draws.T), cov, rtol=0.03, atol=0.03 * np.sqrt(cov[0, 0]))


# --------------------------------------------------------------------------- K-fold


def _dense_kfold_elpd(df: pd.DataFrame, held: np.ndarray) -> dict[str, float]:
    """log p(y_h | y_train) per group by dense conditioning at the training REML estimates."""
    est = fit(df[~held].reset_index(drop=True), "eb_reml").summary.set_index("parameter")["mean"]
    sd = np.array([est["sd_school__Intercept"], est["sd_school__ses"]])
    r = est["cor_school__Intercept__ses"]
    big = np.outer(sd, sd) * np.array([[1.0, r], [r, 1.0]])
    s2 = est["sigma"] ** 2
    xfull = np.column_stack([np.ones(len(df)), df["ses"].to_numpy()])
    y, school = df["score"].to_numpy(), df["school"].astype(str).to_numpy()
    same = school[:, None] == school[None, :]
    k_all = np.where(same, xfull @ big @ xfull.T, 0.0) + s2 * np.eye(len(df))
    t, h = ~held, held
    vt = k_all[np.ix_(t, t)]
    xt = xfull[t]
    vinv_x = np.linalg.solve(vt, xt)
    info = xt.T @ vinv_x
    beta = np.linalg.solve(info, vinv_x.T @ y[t])
    out = {}
    for g in np.unique(school[h]):
        rows = np.flatnonzero(h & (school == g))
        c = k_all[np.ix_(rows, np.flatnonzero(t))]
        a = np.linalg.solve(vt, c.T)  # V^-1 C'
        mean = xfull[rows] @ beta + a.T @ (y[t] - xt @ beta)
        u = xfull[rows] - a.T @ xt
        cov = k_all[np.ix_(rows, rows)] - c @ a + u @ np.linalg.solve(info, u.T)
        out[g] = float(sps.multivariate_normal(mean, cov).logpdf(y[rows]))
    return out


def test_kfold_elpd_of_eb_reml_equals_dense_conditioning():
    df = slopes_frame(7, groups=8, size=[6, 9])
    keys, folds, seed = ("tiny",), 3, 5
    table = run_kfold(df, SLOPES, "eb_reml", folds=folds, settings={}, seed=seed, keys=keys,
                      source="t")  # fmt: skip
    assert list(table.columns)[:4] == ["fit", "group", "fold", "n"]
    codes = pd.Categorical(df["school"].astype(str)).codes
    fold = assign_folds(codes, codes.max() + 1, folds, derive_rng(seed, *keys, "kfold"))
    for k in range(folds):
        dense = _dense_kfold_elpd(df, fold == k)
        got = table[table["fold"] == k].set_index("group")["elpd"]
        assert set(got.index) == set(dense)
        for g, v in dense.items():
            # the same REML fit of the same rows on both sides; only summation order differs
            assert got[g] == pytest.approx(v, rel=1e-7, abs=1e-7), (k, g)
    assert table["n"].sum() == (fold >= 0).sum()


@pytest.mark.parametrize("method", ["complete_pooling", "no_pooling", "eb_ml"])
def test_kfold_rows_follow_the_one_way_contract(method):
    df = slopes_frame(9, groups=12, size=[6, 12])
    table = run_kfold(df, SLOPES, method, folds=4, settings={}, seed=1, keys=("s",), source="t")
    assert np.isfinite(table[["elpd", "pred_mean", "pred_q5", "pred_q95"]]).all().all()
    assert (table["pred_q5"] < table["pred_mean"]).all()
    np.testing.assert_allclose(table["error"], table["observed_mean"] - table["pred_mean"])
    assert table.groupby("group")["fold"].nunique().min() >= 2


def _split_every_third(df: pd.DataFrame, formula: str):
    model = load_model(df, formula, "t")
    fold = np.zeros(model.prepared.n_obs, dtype=np.int64)
    fold[::3] = 1
    train, held = C.kfold_split(None, model.prepared, model.structure, fold, 1)
    return model, train, held


def test_kfold_no_pooling_equals_dense_least_squares_prediction():
    df = slopes_frame(3, groups=6, size=[5, 9])
    df["w"] = np.random.default_rng(4).standard_normal(len(df))
    model, train, held = _split_every_third(df, "score ~ 1 + ses + w + (1 + ses | school)")
    rows = C.score_kfold(train, held, model.structure, "no_pooling", {}, np.random.default_rng(0))
    data = model.prepared
    q, g_all = len(data.coef_names), data.n_groups

    def design(codes, z, x):  # one (Intercept, ses) block a school, then the shared w
        d = np.zeros((len(codes), g_all * q))
        for i, (c, row) in enumerate(zip(codes, z, strict=True)):
            d[i, c * q : (c + 1) * q] = row
        return np.hstack([d, x[:, [data.fixed_names.index("w")]]])

    dt, dh = design(train.codes, train.Z, train.X), design(held.codes, held.Z, held.X)
    coef = np.linalg.lstsq(dt, train.y, rcond=None)[0]
    s2 = float(np.sum((train.y - dt @ coef) ** 2)) / (len(train.y) - dt.shape[1])
    inv = np.linalg.inv(dt.T @ dt)
    assert len(rows) == g_all
    for row in rows:
        h = held.codes == data.labels.index(row["group"])
        cov = s2 * (np.eye(h.sum()) + dh[h] @ inv @ dh[h].T)
        want = sps.multivariate_normal(dh[h] @ coef, cov).logpdf(held.y[h])
        # the same OLS predictive (plug-in s^2) by two routes: rounding only
        assert row["elpd"] == pytest.approx(want, rel=1e-9, abs=1e-9), row["group"]


def test_kfold_gibbs_density_per_draw_equals_dense_conditioning():
    df = slopes_frame(3, groups=6, size=[5, 9])
    model, train, held = _split_every_third(df, SLOPES)
    settings = {"chains": 1, "warmup": 50, "draws": 20}
    g = 2
    pred = C.within_predictive(train, model.structure, "gibbs", settings, derive_rng(5, "k"))(g)
    # the same seed gives the same draws (derived seeds), so the draws can be read back
    pop = E._population_from_draws(train, E.run_gibbs(train, settings, derive_rng(5, "k")).draws)
    idx, h = train.rows(g), held.codes == g
    x, z, y = held.X[h], held.Z[h], held.y[h]
    got = E.group_log_density(y[None] - (pred.beta @ x.T + pred.coef @ z.T), z, pred.d, pred.sigma2)
    za, xa = np.vstack([train.Z[idx], z]), np.vstack([train.X[idx], x])
    n1 = idx.size
    for s in range(pop.beta.shape[0]):
        v = za @ pop.Sigma[s] @ za.T + pop.sigma2[s] * np.eye(len(za))
        r = np.concatenate([train.y[idx], y]) - xa @ pop.beta[s]
        k = v[n1:, :n1] @ np.linalg.inv(v[:n1, :n1])
        want = sps.multivariate_normal(k @ r[:n1], v[n1:, n1:] - k @ v[:n1, n1:]).logpdf(r[n1:])
        # y_h | draw, y_g by dense conditioning vs b_g integrated from its full conditional
        assert got[s] == pytest.approx(want, rel=1e-9, abs=1e-9), s


def test_kfold_no_pooling_without_residual_df_says_so():
    # Three rows a group and three folds: every training fold keeps two rows a group, as
    # many as its coefficients, so no pooling has no residual df and sigma is undefined.
    # Scoring anyway gave NaN elpds, which the comparison's group sums turn into 0.
    df = slopes_frame(1, groups=8, size=3)
    with pytest.raises(InputError, match="no residual degrees of freedom"):
        run_kfold(df, SLOPES, "no_pooling", folds=3, settings={}, seed=1, keys=("s",),
                  source="t")  # fmt: skip


# --------------------------------------------------------------------------- prior predictive


def test_prior_predictive_matches_the_priors_closed_forms():
    df = slopes_frame(1, groups=10)
    model = load_model(df, SLOPES, "t")
    info = {
        "priors": {
            "beta": {"family": "flat"},
            "blocks": [{"family": "huang_wand", "nu": 2.0, "scale": [3.0, 0.5]}],
            "sigma": {"family": "inv_gamma", "on": "variance", "shape": 3.0, "scale": 2.0},
        }
    }
    prior = E.prior_predictive(model.prepared, model.structure, info, np.random.default_rng(6))
    # Huang & Wand (2013): half-t_2(0, A_k) SDs and, at nu = 2, uniform correlations;
    # sigma^2 ~ IG(3, 2). KS on 4000 draws (fixed seed): a wrong scale or df gives p ~ 0.
    for col, a in (("sd_school__Intercept", 3.0), ("sd_school__ses", 0.5)):
        cdf = lambda x, a=a: 2.0 * sps.t.cdf(x / a, 2.0) - 1.0  # noqa: E731
        assert sps.kstest(prior[col], cdf).pvalue > 1e-3, col
    assert sps.kstest(prior["cor_school__Intercept__ses"], sps.uniform(-1, 2).cdf).pvalue > 1e-3
    assert sps.kstest(prior["sigma"] ** 2, sps.invgamma(3.0, scale=2.0).cdf).pvalue > 1e-3
    assert prior["new_observation"].isna().all() and prior["b_ses"].isna().all()
    assert "icc_school" not in prior.columns


def test_prior_predictive_inverse_wishart_and_normal_fixed_effects():
    df = slopes_frame(1, groups=10)
    model = load_model(df, SLOPES, "t")
    psi = [[4.0, 1.0], [1.0, 2.0]]
    info = {
        "priors": {
            "beta": {"family": "normal", "mean": [50.0, 4.0], "sd": [1.0, 1.0]},
            "blocks": [{"family": "inv_wishart", "df": 8.0, "scale": psi}],
            "sigma": {"family": "inv_gamma", "on": "variance", "shape": 4.0, "scale": 3.0},
        }
    }
    prior = E.prior_predictive(model.prepared, model.structure, info, np.random.default_rng(7),
                               size=20000)  # fmt: skip
    data = model.prepared
    # E[Sigma] = Psi/(df - q - 1) = Psi/5, E[sigma^2] = 3/3 = 1, so a new observation's
    # deviation has mean square mean_i z_i' E[Sigma] z_i + 1.
    expected = np.mean(np.einsum("nk,kl,nl->n", data.Z, np.array(psi) / 5.0, data.Z)) + 1.0
    ms = float(np.mean(prior["new_observation_deviation"] ** 2))
    se = float(np.std(prior["new_observation_deviation"] ** 2) / np.sqrt(len(prior)))
    assert abs(ms - expected) < 5 * se
    level = prior["new_observation"] - prior["new_observation_deviation"]
    # x_i'beta over random rows and beta draws has SD ~3.8, so its mean's SE is ~0.027: 0.1 is ~4 SE
    assert abs(level.mean() - (50.0 + 4.0 * data.Z[:, 1].mean())) < 0.1
    assert prior["b_Intercept"].std() == pytest.approx(1.0, rel=0.03)


# --------------------------------------------------------------------------- James-Stein


def test_james_stein_per_coefficient_on_no_pooling_estimates():
    df = slopes_frame(4, groups=25)
    model = load_model(df, SLOPES, "t")
    table, facts = E.james_stein_table(model.prepared, model.structure)
    est = fit(df, "no_pooling").summary.set_index("parameter")
    for c, suffix in (("Intercept", ""), ("ses", "__ses")):
        names = [f"coef_school[{lab},{c}]" for lab in table["group"]]
        ref = james_stein(est.loc[names, "mean"].to_numpy(), est.loc[names, "sd"].to_numpy() ** 2)
        np.testing.assert_allclose(table[f"james_stein{suffix}"], ref.estimate, rtol=1e-10)
        assert facts["coefficients"][c]["a_hat"] == pytest.approx(ref.a_hat, rel=1e-10)
    assert facts["form"] == "efron_morris" and facts["coefficient"] == "Intercept"


def test_james_stein_skipped_with_group_level_predictor():
    df = slopes_frame(4, groups=25)
    df["w"] = df["school"].map({s: i % 3 for i, s in enumerate(sorted(df["school"].unique()))})
    model = load_model(df, "score ~ 1 + ses + w + (1 | school)", "t")
    assert E.james_stein_table(model.prepared, model.structure) is None
    assert "group-level predictors (b_w)" in E.james_stein_unavailable(
        model.prepared, model.structure
    )


# --------------------------------------------------------------------------- workflow

TINY = {
    "seed": 3,
    "studies": {
        "slopes": {
            "data": {"simulate": {"design": "slopes", "params": {"groups": 10, "size": [5, 12]}}},
            "formula": SLOPES,
            # the closed-form point fits share their code paths, so one each of no pooling,
            # EB and the sampler; no leave-one-group-out jobs (K-fold alone feeds the table)
            "fits": ["no_pooling", "eb_reml", "gibbs"],
            "gibbs": {"chains": 2, "warmup": 200, "draws": 200},
            "cv": {"fits": [], "chunks": 1, "kfold": {"folds": 3}},
        }
    },
}


def test_slopes_workflow_has_every_check_and_kfold(tmp_path):
    from html.parser import HTMLParser

    work = workdir(tmp_path, TINY)
    snakemake(work, "--cores", "2")
    res = work / "results" / "slopes"
    fits = TINY["studies"]["slopes"]["fits"]
    for f in fits:
        checks = json.loads((res / "diagnostics" / f / "checks.json").read_text())
        assert checks["skipped"] == [], (f, checks["skipped"])
        assert len(pd.read_parquet(res / "diagnostics" / f / "residuals.parquet")) > 0
    assert len(pd.read_parquet(res / "diagnostics" / "gibbs" / "prior_predictive.parquet")) > 0
    comp = pd.read_parquet(res / "cv" / "comparison.parquet")
    assert set(comp.loc[comp["target"] == "known_group", "fit"]) == set(fits)

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.alts: list[str] = []
            self.text: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.alts.append(dict(attrs).get("alt", ""))

        def handle_data(self, data):
            self.text.append(data)

    page = Page()
    page.feed((res / "report.html").read_text())
    for f in fits:
        assert f"predictive checks of {f}" in page.alts
        assert f"residual plots of {f}" in page.alts
    assert "prior predictive check of gibbs" in page.alts
    assert "New observations of known groups: within-group K-fold" in "".join(page.text)
    assert "per-group elpd differences, known_group" in page.alts
