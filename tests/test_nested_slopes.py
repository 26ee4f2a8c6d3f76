"""Nested models with varying slopes (hierpipe.models.nested_lmm and its engine).

References: the intercept-only nested REML/ML recursion (same model, must agree to
1e-8), the one-factor LMM (hierpipe.models.lmm) when there is one level,
statsmodels MixedLM (re_formula + vc_formula), and a dense multivariate normal
density for the closed-form leave-one-group-out score.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hierpipe.design import build_design
from hierpipe.errors import InputError, MethodError
from hierpipe.formula import parse_formula
from hierpipe.models.engines import engine_for, multilevel, nested_slopes
from hierpipe.models.engines import lmm as lmm_engine
from hierpipe.models.fitting import fit_table
from hierpipe.models.nested_lmm import fit_nested, nested_stats
from hierpipe.models.structure import classify
from hierpipe.models.variance_components import fit_components, make_evaluator

SLOPES = "score ~ 1 + ses + (1 + ses | school) + (1 | school:classroom)"


def simulate(seed: int, schools: int = 24, classes: int = 4) -> pd.DataFrame:
    """Unbalanced three-level data with a correlated school slope."""
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(np.array([[1.0, 0.3], [0.3, 0.25]]))
    rows = []
    for s in range(schools):
        b = chol @ rng.standard_normal(2)
        for c in range(classes):
            bc = 0.6 * rng.standard_normal()
            k = int(rng.integers(3, 9))
            x = rng.standard_normal(k)
            y = 2.0 + 0.5 * x + b[0] + b[1] * x + bc + rng.standard_normal(k)
            rows += [(f"S{s:02d}", f"C{c}", xi, yi) for xi, yi in zip(x, y, strict=True)]
    return pd.DataFrame(rows, columns=["school", "classroom", "ses", "score"])


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return simulate(1)


def _prep(df: pd.DataFrame, formula: str):
    parsed = parse_formula(formula)
    design = build_design(parsed, df)
    return design, nested_slopes.prepare(design, classify(parsed))


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_intercepts_only_equals_nested_recursion(data, method):
    formula = "score ~ 1 + ses + (1 | school/classroom)"
    design, st = _prep(data, formula)
    ours = fit_nested(st, method)
    ref = fit_components(
        make_evaluator(multilevel.prepare(design, classify(parse_formula(formula))).stats), method
    )
    assert ours.converged
    # Same model and criterion; both optimisers polish with Newton steps, so the
    # estimates agree to ~1e-9 (measured 2e-9 on the SDs); 1e-8 is the brief's bar.
    np.testing.assert_allclose(np.concatenate(ours.sds), ref.sds, rtol=0, atol=1e-8)
    assert abs(ours.sigma - ref.sigma) < 1e-8
    np.testing.assert_allclose(ours.beta, ref.beta, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.beta_cov, ref.beta_cov, rtol=0, atol=1e-8)


def test_one_level_equals_one_factor_lmm(data):
    formula = "score ~ 1 + ses + (1 + ses | school)"
    parsed = parse_formula(formula)
    design = build_design(parsed, data)
    ref = lmm_engine.eb_lmm(lmm_engine.prepare(design, classify(parsed)), "eb_reml")
    rd = design.random[0]
    st = nested_stats(
        [("school", rd.z_names, (2,), rd.labels)],
        rd.codes[:, None],
        [rd.Z],
        design.X,
        design.y,
        design.fixed_names,
    )
    ours = fit_nested(st, "REML")
    # Two optimisers of one criterion (lmm.py with its exact gradient); measured
    # differences ~1e-8 in the SDs, so 1e-6 leaves room without hiding a wrong model.
    np.testing.assert_allclose(ours.sds[0], ref.sds, rtol=1e-6)
    np.testing.assert_allclose(ours.sigma, ref.sigma, rtol=1e-6)
    np.testing.assert_allclose(ours.cors[0][0, 1], ref.cor[0, 1], atol=1e-6)
    np.testing.assert_allclose(ours.beta, ref.beta, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ours.criterion, ref.reml_criterion, rtol=1e-10)


@pytest.mark.parametrize("reml", [True, False])
def test_agrees_with_statsmodels(data, reml):
    smf = pytest.importorskip("statsmodels.formula.api")
    import warnings

    _, st = _prep(data, SLOPES)
    ours = fit_nested(st, "REML" if reml else "ML")
    model = smf.mixedlm(
        "score ~ ses",
        data,
        groups="school",
        re_formula="~ses",
        vc_formula={"classroom": "0 + C(classroom)"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.fit(reml=reml, method=["lbfgs"])
    # Same constants in both log-likelihoods (measured: they agree to 7e-9 REML,
    # 2e-8 ML, statsmodels' optimum the lower); 1e-6 bounds its stopping error.
    assert -0.5 * ours.criterion >= ref.llf - 1e-9
    assert -0.5 * ours.criterion - ref.llf < 1e-6
    cov = ref.cov_re.to_numpy()
    # statsmodels' stopping rule leaves the SDs good to ~2e-5 (measured 1.5e-5).
    np.testing.assert_allclose(ours.sds[0], np.sqrt(np.diag(cov)), atol=1e-4)
    np.testing.assert_allclose(ours.sds[1], np.sqrt(ref.vcomp), atol=1e-4)
    np.testing.assert_allclose(
        ours.cors[0][0, 1], cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), atol=1e-4
    )
    np.testing.assert_allclose(ours.sigma, np.sqrt(ref.scale), atol=1e-4)
    np.testing.assert_allclose(ours.beta, ref.fe_params.to_numpy(), atol=1e-5)


def test_engine_outputs_and_refusals(data):
    rng = np.random.default_rng(0)
    for formula in (SLOPES, "score ~ 1 + ses + (1 + ses | school/classroom)"):
        assert engine_for(classify(parse_formula(formula)), formula) is nested_slopes
    res = fit_table(data, SLOPES, "eb_reml", settings={}, rng=rng, source="d.csv")
    names = set(res.summary["parameter"])
    for p in (
        "b_Intercept",
        "b_ses",
        "sd_school__Intercept",
        "sd_school__ses",
        "cor_school__Intercept__ses",
        "sd_school:classroom__Intercept",
        "sigma",
        "r_school[S03,ses]",
        "coef_school[S03,Intercept]",
    ):
        assert p in names
    # The classroom ICC given the school's effects does not depend on ses; the
    # school's share does (varying slope), so it is not reported.
    assert "icc_school" not in names
    sd_c, sig = (
        res.summary.set_index("parameter")["mean"][k]
        for k in ("sd_school:classroom__Intercept", "sigma")
    )
    icc = res.summary.set_index("parameter")["mean"]["icc_school:classroom"]
    assert icc == pytest.approx(sd_c**2 / (sd_c**2 + sig**2), rel=1e-12)
    assert res.info["converged"] and res.info["boundary"] == []
    est = res.summary.set_index("parameter")["mean"]
    r = est[[f"r_school[S{s:02d},Intercept]" for s in range(24)]]
    coef = est[[f"coef_school[S{s:02d},Intercept]" for s in range(24)]]
    np.testing.assert_allclose(coef.to_numpy(), r.to_numpy() + est["b_Intercept"], atol=1e-12)
    unc = fit_table(
        data,
        "score ~ 1 + ses + (1 + ses || school) + (1 | school:classroom)",
        "eb_ml",
        settings={},
        rng=rng,
        source="d.csv",
    )
    assert "cor_school__Intercept__ses" not in set(unc.summary["parameter"])
    with pytest.raises(MethodError, match="gibbs"):
        fit_table(data, SLOPES, "gibbs", settings={}, rng=rng, source="d.csv")
    crossed = data.assign(teacher=[f"T{i % 7}" for i in range(len(data))])
    with pytest.raises(MethodError, match="varying intercept only"):
        fit_table(
            crossed,
            "score ~ 1 + ses + (1 + ses | school) + (1 | teacher)",
            "eb_reml",
            settings={},
            rng=rng,
            source="d.csv",
        )


def test_logo_closed_form_equals_dense_density(data):
    design, st = _prep(data, SLOPES)
    j = 5
    row = nested_slopes.score_held_out(st, j, "eb_reml", {}, np.random.default_rng(0))
    refit = fit_nested(st.without_top(j), "REML")
    rows = np.flatnonzero(design.random[0].codes == j)
    X, y = design.X[rows], design.y[rows]
    school_z = design.random[0].Z[rows]
    cls = design.random[1].codes[rows]
    sig0 = refit.sigma**2 * refit.lams[0] @ refit.lams[0].T
    s1 = refit.sds[1][0] ** 2
    cov = (
        school_z @ sig0 @ school_z.T
        + s1 * (cls[:, None] == cls[None, :])
        + refit.sigma**2 * np.eye(rows.size)
        + X @ refit.beta_cov @ X.T
    )
    resid = y - X @ refit.beta
    _, logdet = np.linalg.slogdet(cov)
    dense = -0.5 * (rows.size * np.log(2 * np.pi) + logdet + resid @ np.linalg.solve(cov, resid))
    # Two exact routes to one number (Woodbury blocks vs a dense determinant).
    assert row["elpd"] == pytest.approx(dense, abs=1e-8)
    assert row["group"] == "S05"


def test_three_levels_of_intercepts_equal_nested_recursion(data):
    """L = 3 exercises the Schur complements passed up two levels."""
    rng = np.random.default_rng(4)
    df = data.assign(desk=[f"D{k}" for k in rng.integers(0, 2, len(data))])
    df["score"] += 0.5 * rng.standard_normal(len(df))
    formula = "score ~ 1 + ses + (1 | school/classroom/desk)"
    design, st = _prep(df, formula)
    ours = fit_nested(st, "REML")
    cells = multilevel.prepare(design, classify(parse_formula(formula))).stats
    ref = fit_components(make_evaluator(cells), "REML")
    ref_sds = dict(zip(cells.factors, ref.sds, strict=True))
    names = [lv.name for lv in st.levels]
    # Same model; measured agreement ~1e-9 in the SDs (flatter optimum than two levels).
    np.testing.assert_allclose(
        np.concatenate(ours.sds), [ref_sds[n] for n in names], rtol=0, atol=1e-7
    )
    assert abs(ours.sigma - ref.sigma) < 1e-8


def test_recovers_simulated_slopes():
    from hierpipe.data.simulate import simulate as sim

    s = sim(
        "three_level",
        np.random.default_rng(11),
        schools=60,
        classrooms=[3, 5],
        students=[6, 12],
        sd_slope=2.0,
        b_slope=1.5,
        cor=0.4,
    )
    res = fit_table(
        s.data, SLOPES, "eb_reml", settings={}, rng=np.random.default_rng(0), source="sim"
    )
    est = res.summary.set_index("parameter")["mean"]
    truth = s.truth.set_index("parameter")["value"]
    # 60 schools: the SDs' sampling SDs are ~10% (sd/sqrt(2G)); 3 of them is 30%.
    for p in ("sd_school__Intercept", "sd_school__ses", "sd_school:classroom__Intercept", "sigma"):
        assert abs(est[p] / truth[p] - 1.0) < 0.3, p
    assert abs(est["cor_school__Intercept__ses"] - truth["cor_school__Intercept__ses"]) < 0.4
    assert abs(est["b_ses"] - 1.5) < 3 * res.summary.set_index("parameter").loc["b_ses", "sd"]


def test_classroom_slopes_agree_with_statsmodels():
    """Slopes at the lower level: ``||`` there is statsmodels' two independent vc terms."""
    smf = pytest.importorskip("statsmodels.formula.api")
    import warnings

    df = simulate(3, schools=30)
    rng = np.random.default_rng(9)
    key = df["school"] + ":" + df["classroom"]
    slope = dict(zip(sorted(set(key)), 0.5 * rng.standard_normal(key.nunique()), strict=True))
    df["score"] += key.map(slope).to_numpy() * df["ses"]
    _, st = _prep(df, "score ~ 1 + ses + (1 + ses | school) + (1 + ses || school:classroom)")
    ours = fit_nested(st, "REML")
    model = smf.mixedlm(
        "score ~ ses",
        df,
        groups="school",
        re_formula="~ses",
        vc_formula={"classroom": "0 + C(classroom)", "slope": "0 + C(classroom):ses"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.fit(reml=True, method=["lbfgs"])
    # Measured: log-likelihoods 7e-10 apart (ours the higher), SDs 8e-5 apart
    # (statsmodels' stopping rule); the bounds leave a little room above that.
    assert -0.5 * ours.criterion >= ref.llf - 1e-9
    assert -0.5 * ours.criterion - ref.llf < 1e-6
    vc = dict(zip(ref.model.exog_vc.names, np.sqrt(ref.vcomp), strict=True))
    np.testing.assert_allclose(ours.sds[0], np.sqrt(np.diag(ref.cov_re.to_numpy())), atol=3e-4)
    np.testing.assert_allclose(ours.sds[1], [vc["classroom"], vc["slope"]], atol=3e-4)
    np.testing.assert_allclose(ours.sigma, np.sqrt(ref.scale), atol=3e-4)


def test_residuals_fitted_values_match_statsmodels(data):
    """Every level's conditional modes, through the diagnose hook, against statsmodels."""
    smf = pytest.importorskip("statsmodels.formula.api")
    import warnings

    design, st = _prep(data, SLOPES)
    res = fit_table(data, SLOPES, "eb_reml", settings={}, rng=np.random.default_rng(0), source="d")
    table = nested_slopes.residuals(design, st, classify(parse_formula(SLOPES)), res.summary)
    model = smf.mixedlm(
        "score ~ ses",
        data,
        groups="school",
        re_formula="~ses",
        vc_formula={"classroom": "0 + C(classroom)"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.fit(reml=True, method=["lbfgs"])
    # statsmodels' estimates are good to ~2e-5 (see above); fitted values
    # inherit that (measured 3.6e-5 on a response of SD 1.5).
    np.testing.assert_allclose(table["fitted"], ref.fittedvalues.to_numpy(), atol=2e-4)
    assert list(table["group"][:3]) == list(data["school"][:3])
    cp = fit_table(data, SLOPES, "complete_pooling", settings={}, rng=None, source="d")
    flat = nested_slopes.residuals(design, st, classify(parse_formula(SLOPES)), cp.summary)
    np.testing.assert_allclose(flat["fitted"], design.X @ np.linalg.lstsq(design.X, design.y)[0])


def test_boundary_fit_is_flagged_and_optimal():
    """No classroom variance and no slope variance in the truth: a singular fit.

    statsmodels stops 1-2 log-likelihood units short on such data (measured on six
    seeds), so the reference is the minimum of our criterion over random
    Nelder-Mead starts.
    """
    from scipy import optimize

    from hierpipe.data.simulate import simulate as sim
    from hierpipe.models.nested_lmm import _Objective

    s = sim(
        "three_level",
        np.random.default_rng(1),
        schools=15,
        classrooms=3,
        students=5,
        b_slope=1.0,
        sd_classroom=0.0,
    )
    res = fit_table(s.data, SLOPES, "eb_reml", settings={}, rng=None, source="sim")
    assert res.info["converged"]
    assert "sd_school:classroom__Intercept estimated at 0" in res.info["boundary"]
    assert res.summary.set_index("parameter").loc["sd_school:classroom__Intercept", "mean"] == 0.0
    _, st = _prep(s.data, SLOPES)
    obj = _Objective(st, reml=True)
    rng = np.random.default_rng(0)
    best = min(
        optimize.minimize(
            obj.value,
            rng.uniform(-2.0, 2.0, 4),
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "adaptive": True},
        ).fun
        for _ in range(5)
    )
    # The snap to the boundary may raise the criterion by at most lmm.SNAP_TOL (1e-8).
    assert res.info["reml_criterion"] <= best + 1e-8


def _dense_pieces(design, st, lams):
    """Dense Z (level by level, group-major) and the block-diagonal relative factor."""
    zs, factors = [], []
    for lv, lam in zip(st.levels, lams, strict=True):
        rds = [rd for rd in design.random if rd.name == lv.name]
        zl, codes = np.column_stack([rd.Z for rd in rds]), rds[0].codes
        dense = np.zeros((design.n_obs, len(lv.labels) * lv.q))
        for a in range(lv.q):
            dense[np.arange(design.n_obs), codes * lv.q + a] = zl[:, a]
        zs.append(dense)
        factors.append(np.kron(np.eye(len(lv.labels)), lam))
    from scipy.linalg import block_diag

    return np.hstack(zs), block_diag(*factors)


@pytest.mark.parametrize(
    "formula",
    [
        "score ~ 1 + ses + (1 + ses | school) + (1 | school:classroom)",
        "score ~ 1 + ses + (1 | school) + (1 + ses || school:classroom)",
        "score ~ 1 + ses + (1 + ses || school) + (1 | school:classroom)",
        # Its school SDs are estimated at 0 (r_, coef_ then trivial): here for the criterion.
        "score ~ 1 + ses + (1 + ses || school) + (1 + ses | school:classroom)",
    ],
)
def test_criterion_modes_and_sds_equal_dense(formula):
    """Criterion, b_ SEs, r_ modes/SDs and coef_ SDs against dense matrix formulas.

    Dense references: :math:`V = I + Z\\Lambda\\Lambda^\\top Z^\\top`, the profiled
    -2 log-likelihoods written out, :math:`\\hat b = \\Lambda\\Lambda^\\top Z^\\top
    V^{-1}(y - X\\hat\\beta)`, lme4's condVar :math:`\\sigma^2\\Lambda(\\Lambda^\\top
    Z^\\top Z\\Lambda + I)^{-1}\\Lambda^\\top`, and for ``coef_`` the inverse of
    Henderson's mixed-model matrix (flat prior on beta).
    """
    rng = np.random.default_rng(5)
    df = simulate(2, schools=6, classes=3)
    key = df["school"] + ":" + df["classroom"]
    slope = dict(zip(sorted(set(key)), 0.5 * rng.standard_normal(key.nunique()), strict=True))
    df["score"] += key.map(slope).to_numpy() * df["ses"]
    design, st = _prep(df, formula)
    X, y, n, p = design.X, design.y, design.n_obs, design.X.shape[1]
    from hierpipe.models.nested_lmm import profiled

    # The criterion at an arbitrary factor respecting the blocks (not an optimum).
    lam = np.tril(rng.normal(size=(st.q_total, st.q_total))) * 0.7
    mask = np.zeros_like(lam, dtype=bool)
    start = 0
    for size in st.block_sizes:
        mask[start : start + size, start : start + size] = True
        start += size
    lam = np.where(mask, lam, 0.0)
    off = st.offsets
    lams = [lam[off[i] : off[i + 1], off[i] : off[i + 1]] for i in range(len(st.levels))]
    Z, big = _dense_pieces(design, st, lams)
    V = np.eye(n) + Z @ big @ big.T @ Z.T
    xvx = X.T @ np.linalg.solve(V, X)
    beta = np.linalg.solve(xvx, X.T @ np.linalg.solve(V, y))
    r2 = (y - X @ beta) @ np.linalg.solve(V, y - X @ beta)
    for reml in (False, True):
        d = n - p if reml else n
        dense = np.linalg.slogdet(V)[1] + d * (1 + np.log(2 * np.pi * r2 / d))
        dense += np.linalg.slogdet(xvx)[1] if reml else 0.0
        # Two exact routes (block elimination vs dense determinants): rounding only.
        assert profiled(st, lam, reml).criterion[0] == pytest.approx(dense, abs=1e-9)

    res = nested_slopes.eb_result(st, "eb_reml")
    est = res.summary.set_index("parameter")
    fit = fit_nested(st, "REML")
    Z, big = _dense_pieces(design, st, fit.lams)
    s2 = fit.sigma**2
    V = np.eye(n) + Z @ big @ big.T @ Z.T
    xvx = X.T @ np.linalg.solve(V, X)
    beta = np.linalg.solve(xvx, X.T @ np.linalg.solve(V, y))
    b_se = np.sqrt(np.diag(s2 * np.linalg.inv(xvx)))
    b_hat = big @ big.T @ Z.T @ np.linalg.solve(V, y - X @ beta)
    m = big.T @ Z.T @ Z @ big + np.eye(Z.shape[1])
    cond = s2 * big @ np.linalg.solve(m, big.T)
    a = np.hstack([X, Z @ big])
    hend = a.T @ a + np.diag(np.r_[np.zeros(p), np.ones(Z.shape[1])])
    to_b = np.zeros((p + Z.shape[1], p + Z.shape[1]))
    to_b[:p, :p] = np.eye(p)
    to_b[p:, p:] = big
    joint = s2 * to_b @ np.linalg.pinv(hend) @ to_b.T
    for k, name in enumerate(st.fixed_names):
        # Same estimates fed to both: rounding only.
        assert est.loc[f"b_{name}", "sd"] == pytest.approx(b_se[k], rel=1e-10)
    top = st.levels[0]
    for g, lab in enumerate(top.labels):
        for c_i, c in enumerate(top.coef_names):
            i = g * top.q + c_i
            assert est.loc[f"r_{top.name}[{lab},{c}]", "mean"] == pytest.approx(b_hat[i], abs=1e-10)
            assert est.loc[f"r_{top.name}[{lab},{c}]", "sd"] == pytest.approx(
                np.sqrt(cond[i, i]), rel=1e-10
            )
            vec = np.zeros(p + Z.shape[1])
            vec[p + i] = 1.0
            vec[list(st.fixed_names).index(c)] = 1.0
            assert est.loc[f"coef_{top.name}[{lab},{c}]", "sd"] == pytest.approx(
                np.sqrt(vec @ joint @ vec), rel=1e-8
            )


def test_too_many_random_effects_refused():
    """As lme4's check.nobs.vs.nRE: 40 classrooms x 2 coefficients for 80 rows."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "school": np.repeat([f"S{s}" for s in range(10)], 8),
            "classroom": np.tile(np.repeat([f"C{c}" for c in range(4)], 2), 10),
            "ses": rng.standard_normal(80),
            "score": rng.standard_normal(80),
        }
    )
    with pytest.raises(InputError, match="'school:classroom' has 40 groups x 2"):
        _prep(df, "score ~ 1 + ses + (1 | school) + (1 + ses | school:classroom)")


def test_simulated_slope_sd_without_school_intercepts():
    from hierpipe.data.simulate import simulate as sim

    s = sim(
        "three_level",
        np.random.default_rng(3),
        schools=4000,
        classrooms=1,
        students=1,
        sd_school=0.0,
        sd_slope=1.0,
        cor=0.6,
    )
    truth = s.truth.set_index("parameter")["value"]
    slopes = truth[truth.index.str.startswith("r_school[") & truth.index.str.endswith(",ses]")]
    # 4000 draws of N(0, 1): the sample SD has SD 1/sqrt(8000) ~ 0.011; 0.05 is 4.5 of
    # those, and the bug this guards against gave sqrt(1 - 0.6^2) = 0.8.
    assert abs(slopes.std() - 1.0) < 0.05
