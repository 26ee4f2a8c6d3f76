"""Nested and crossed variance components: evaluators, ML/REML, engine outputs, CV.

References: dense linear algebra on the full n x n covariance (exact to rounding),
the balanced nested ANOVA's expected mean squares (closed forms), statsmodels
MixedLM with variance components (best likelihood over its optimisers), and
simulation.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from hierpipe.data.simulate import simulate
from hierpipe.errors import ConfigError, InputError, MethodError
from hierpipe.models.crossed_reml import CrossedEvaluator
from hierpipe.models.fitting import fit_table, load_model
from hierpipe.models.nested_reml import NestedEvaluator
from hierpipe.models.variance_components import (
    CHI2_90,
    absolute_criterion,
    cell_stats,
    fit_components,
    icc_denominators,
    make_evaluator,
    nesting_order,
    profile_intervals,
)

NESTED = "score ~ 1 + (1 | school/classroom)"
CROSSED = "y ~ 1 + (1 | student) + (1 | teacher)"


# --------------------------------------------------------------------------- data


def nested3(seed: int = 0, x: bool = True):
    """Unbalanced a/b/c data (3 nested factors) with a predictor; codes, X, y."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in range(4):
        for b in range(rng.integers(1, 4)):
            for c in range(rng.integers(1, 3)):
                rows += [(a, b, c)] * int(rng.integers(1, 5))
    rows = np.array(rows)
    n = len(rows)
    ab = np.unique(rows[:, :2], axis=0, return_inverse=True)[1].ravel()
    abc = np.unique(rows, axis=0, return_inverse=True)[1].ravel()
    codes = np.column_stack([rows[:, 0], ab, abc])
    xcol = rng.standard_normal(n)
    X = np.column_stack([np.ones(n), xcol]) if x else np.ones((n, 1))
    y = 1.0 + 0.5 * xcol + rng.standard_normal(4)[rows[:, 0]] + rng.standard_normal(n)
    labels = [[str(i) for i in range(codes[:, k].max() + 1)] for k in range(3)]
    names = ("Intercept", "x") if x else ("Intercept",)
    return cell_stats(["a", "a:b", "a:b:c"], labels, codes, X, y, names), codes, X, y


def crossed3(seed: int = 1):
    """Sparse crossed data with three factors (none nested) and a predictor."""
    rng = np.random.default_rng(seed)
    n = 60
    codes = np.column_stack([rng.integers(0, 12, n), rng.integers(0, 5, n), rng.integers(0, 3, n)])
    codes = np.column_stack([np.unique(c, return_inverse=True)[1] for c in codes.T])
    xcol = rng.standard_normal(n)
    X = np.column_stack([np.ones(n), xcol])
    y = (
        2.0
        + xcol
        + rng.standard_normal(codes[:, 0].max() + 1)[codes[:, 0]]
        + rng.standard_normal(n)
    )
    labels = [[str(i) for i in range(codes[:, k].max() + 1)] for k in range(3)]
    return cell_stats(["s", "t", "u"], labels, codes, X, y, ("Intercept", "x")), codes, X, y


def dense_parts(codes, X, y, theta2):
    """V_theta, log|V_theta| and z' V^-1 z by dense algebra (y shifted as the stats do)."""
    n = len(y)
    V = np.eye(n)
    for k, t2 in enumerate(theta2):
        Zk = np.eye(codes[:, k].max() + 1)[codes[:, k]]
        V += t2 * Zk @ Zk.T
    z = np.column_stack([X, y - y.mean()])
    return V, np.linalg.slogdet(V)[1], z.T @ np.linalg.solve(V, z)


def dense_minus2ll(codes, X, y, var, sigma2, reml):
    """-2 log-likelihood (or restricted) at absolute variances, from the n x n covariance."""
    n, p = X.shape
    V = sigma2 * np.eye(n)
    for k, v in enumerate(var):
        Zk = np.eye(codes[:, k].max() + 1)[codes[:, k]]
        V += v * Zk @ Zk.T
    Vi = np.linalg.inv(V)
    beta = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
    r = y - X @ beta
    out = np.linalg.slogdet(V)[1] + r @ Vi @ r
    if reml:
        return out + np.linalg.slogdet(X.T @ Vi @ X)[1] + (n - p) * np.log(2 * np.pi)
    return out + n * np.log(2 * np.pi)


# --------------------------------------------------------------------------- evaluators


@pytest.mark.parametrize("which", ["nested", "crossed"])
def test_evaluators_match_dense_algebra(which):
    st, codes, X, y = nested3() if which == "nested" else crossed3()
    if which == "nested":
        assert nesting_order(st) == (0, 1, 2)
    else:
        assert nesting_order(st) is None
    evs = [CrossedEvaluator(st)]
    if which == "nested":
        evs.append(NestedEvaluator(st, nesting_order(st)))
    th = np.array([[0.7, 1.3, 0.2], [2.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    for ev in evs:
        logdet, Q = ev.terms(th)
        modes = ev.modes(th, st.sums)
        cvar = ev.cond_var(th)
        for i, t2 in enumerate(th):
            V, ld, Qd = dense_parts(codes, X, y, t2)
            # Rounding only: relative 1e-12 on quantities of size ~1e2.
            assert logdet[i] == pytest.approx(ld, rel=1e-12, abs=1e-12)
            np.testing.assert_allclose(Q[i], Qd, rtol=1e-11, atol=1e-11)
            z = np.column_stack([X, y - y.mean()])
            Vz = np.linalg.solve(V, z)
            Zs = [np.eye(codes[:, k].max() + 1)[codes[:, k]] for k in range(3)]
            Z = np.column_stack([np.sqrt(t) * Zk for t, Zk in zip(t2, Zs, strict=True)])
            M = Z.T @ Z + np.eye(Z.shape[1])
            diag = np.diag(np.linalg.inv(M))
            start = 0
            for k in range(3):
                np.testing.assert_allclose(modes[k][i], t2[k] * Zs[k].T @ Vz, atol=1e-11)
                g = Zs[k].shape[1]
                np.testing.assert_allclose(cvar[k][i], t2[k] * diag[start : start + g], atol=1e-12)
                start += g


@pytest.mark.parametrize("which", ["nested", "crossed"])
def test_criterion_matches_dense_likelihood(which):
    st, codes, X, y = nested3(3) if which == "nested" else crossed3(4)
    ev = make_evaluator(st)
    rng = np.random.default_rng(0)
    for _ in range(4):
        var = rng.uniform(0.0, 3.0, 3)
        s2 = rng.uniform(0.5, 2.0)
        logdet, Q = ev.terms((var / s2)[None, :])
        for reml in (True, False):
            mine = absolute_criterion(logdet, Q, np.array([s2]), st.n_obs, st.p, reml)[0]
            # The brute-force criterion to 1e-8 absolute (-2 log-lik units; both exact).
            assert mine == pytest.approx(dense_minus2ll(codes, X, y, var, s2, reml), abs=1e-8)


@pytest.mark.parametrize("which", ["nested", "crossed"])
def test_effect_draws_have_the_conditional_mean_and_variance(which):
    st, *_ = nested3(5) if which == "nested" else crossed3(6)
    ev = make_evaluator(st)
    C = 20000
    theta2 = np.tile([[0.8, 1.5, 0.3]], (C, 1))
    sigma = np.full(C, 1.3)
    resid = st.sums[0, :, st.p][None, :] - st.sums[0, :, 0][None, :] * 0.7
    draws = ev.draw(
        theta2, sigma, np.broadcast_to(resid, (C, st.n_cells)).copy(), np.random.default_rng(1)
    )
    sums = np.zeros((1, st.n_cells, 1))
    sums[0, :, 0] = resid[0]
    modes = ev.modes(theta2[:1], sums)
    cvar = ev.cond_var(theta2[:1])
    for k in range(3):
        m, v = modes[k][0, :, 0], 1.3**2 * cvar[k][0]
        # 20,000 draws: the mean within 5 MC standard errors, the variance within
        # 5 SEs of a sample variance (sqrt(2/C) relative).
        np.testing.assert_array_less(np.abs(draws[k].mean(0) - m), 5 * np.sqrt(v / C) + 1e-12)
        np.testing.assert_allclose(draws[k].var(0), v, rtol=5 * np.sqrt(2 / C))


# --------------------------------------------------------------------------- ML/REML


def balanced_nested(seed=2, a=6, b=3, n=4, sd=(2.0, 1.0), sigma=1.5):
    rng = np.random.default_rng(seed)
    s = np.repeat(np.arange(a), b * n)
    c = np.repeat(np.arange(a * b), n)
    y = 10 + sd[0] * rng.standard_normal(a)[s] + sd[1] * rng.standard_normal(a * b)[c]
    y = y + sigma * rng.standard_normal(a * b * n)
    return s, c, y


def test_balanced_nested_reml_and_ml_equal_the_anova_closed_forms():
    a, b, n = 6, 3, 4
    s, c, y = balanced_nested(a=a, b=b, n=n)
    st = cell_stats(
        ["s", "s:c"],
        [list(map(str, range(a))), list(map(str, range(a * b)))],
        np.column_stack([s, c]),
        np.ones((y.size, 1)),
        y,
        ("Intercept",),
    )
    grand = y.mean()
    ms = pd.Series(y).groupby(s).mean().to_numpy()
    mc = pd.Series(y).groupby(c).mean().to_numpy()
    msa = b * n * np.sum((ms - grand) ** 2) / (a - 1)
    msb = n * np.sum((mc - ms[np.arange(a * b) // b]) ** 2) / (a * (b - 1))
    msw = np.sum((y - mc[c]) ** 2) / (a * b * (n - 1))
    # Expected mean squares (Searle, Casella & McCulloch 1992, sec. 4.7):
    # E MSW = s2, E MSB = s2 + n sc2, E MSA = s2 + n sc2 + b n ss2.
    reml = fit_components(make_evaluator(st), "REML")
    want = [(msa - msb) / (b * n), (msb - msw) / n]
    assert min(want) > 0  # interior, where REML equals ANOVA
    # Optimiser tolerance: relative 1e-7 on the variances.
    np.testing.assert_allclose(reml.sds**2, want, rtol=1e-7)
    assert reml.sigma**2 == pytest.approx(msw, rel=1e-7)
    # ML replaces MSA's a - 1 degrees of freedom by a (ibid.).
    ml = fit_components(make_evaluator(st), "ML")
    want_ml = [((1 - 1 / a) * msa - msb) / (b * n), (msb - msw) / n]
    np.testing.assert_allclose(ml.sds**2, want_ml, rtol=1e-7)
    assert ml.sigma**2 == pytest.approx(msw, rel=1e-7)
    # the same optimum from the block-elimination evaluator
    other = fit_components(CrossedEvaluator(st), "REML")
    np.testing.assert_allclose(other.sds, reml.sds, rtol=1e-7)


def statsmodels_best(df: pd.DataFrame, reml: bool):
    """Best fit over statsmodels' optimisers (its default one can stop short)."""
    sm = pytest.importorskip("statsmodels.formula.api")
    model = sm.mixedlm(
        "score ~ 1",
        df,
        groups="school",
        re_formula="1",
        vc_formula={"classroom": "0 + C(classroom)"},
    )
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("lbfgs", "bfgs", "cg", "nm", "powell"):
            try:
                r = model.fit(reml=reml, method=method)
            except Exception:
                continue
            if np.isfinite(r.llf) and (best is None or r.llf > best.llf):
                best = r
    return best


@pytest.mark.parametrize("method", ["eb_reml", "eb_ml"])
def test_nested_fit_matches_or_beats_statsmodels(method):
    sim = simulate(
        "three_level", np.random.default_rng(11), schools=12, classrooms=[2, 4], students=[2, 9]
    )
    df = sim.data.astype({"school": str, "classroom": str})
    res = fit_table(df, NESTED, method, settings={}, rng=np.random.default_rng(0), source="sim")
    est = res.summary.set_index("parameter")["mean"]
    sm = statsmodels_best(df, reml=method == "eb_reml")
    mine = -0.5 * res.info["reml_criterion"] if method == "eb_reml" else res.info["loglik"]
    # statsmodels' llf is the same (restricted) log-likelihood with the same
    # constants; ours must be at least as high, up to rounding of the criterion.
    assert mine >= sm.llf - 1e-7
    # and the estimates agree where statsmodels' best optimiser converged
    # (its tolerances give about 4 significant digits)
    assert est["sd_school__Intercept"] == pytest.approx(np.sqrt(sm.cov_re.iloc[0, 0]), rel=2e-3)
    assert est["sd_school:classroom__Intercept"] == pytest.approx(np.sqrt(sm.vcomp[0]), rel=2e-3)
    assert est["sigma"] == pytest.approx(np.sqrt(sm.scale), rel=1e-3)
    assert est["b_Intercept"] == pytest.approx(sm.fe_params.iloc[0], rel=1e-5)


def test_variance_at_zero_is_a_boundary_fit():
    rng = np.random.default_rng(4)
    s = np.repeat(np.arange(8), 12)
    c = np.repeat(np.arange(24), 4)
    y = 3 * rng.standard_normal(8)[s] + rng.standard_normal(96)  # no classroom effect
    # pick a data set whose classroom MS is below the residual MS (REML at 0)
    df = pd.DataFrame(
        {"score": y, "school": [f"S{i}" for i in s], "classroom": [f"C{i % 3}" for i in c]}
    )
    res = fit_table(df, NESTED, "eb_reml", settings={}, rng=rng, source="d")
    est = res.summary.set_index("parameter")
    mc = pd.Series(y).groupby(c).mean().to_numpy()
    ms = pd.Series(y).groupby(s).mean().to_numpy()
    msb = 4 * np.sum((mc - ms[np.arange(24) // 3]) ** 2) / 16
    msw = np.sum((y - mc[c]) ** 2) / 72
    assert msb < msw  # the data set is one where the ANOVA estimate is negative
    assert est.loc["sd_school:classroom__Intercept", "mean"] == 0.0
    assert est.loc["sd_school:classroom__Intercept", "q5"] == 0.0
    assert "boundary fit: sd_school:classroom__Intercept estimated at 0" in res.info["warnings"]
    assert res.info["converged"]


def test_profile_limits_sit_where_the_criterion_rises_by_the_cutoff():
    """At each reported limit the constrained minimum is the cut-off above the optimum.

    The constrained minima are found by Nelder-Mead from two starts (a
    different optimiser from the code's), over the other log variances.
    """
    from scipy.optimize import minimize

    st, *_ = nested3(8, x=False)
    ev = make_evaluator(st)
    fit = fit_components(ev, "REML")
    pi = profile_intervals(fit, ev, icc_denominators(st, nesting_order(st)))

    def crit(phi):  # phi: log variances of a, a:b, a:b:c, then log sigma^2
        phi = np.asarray(phi, dtype=float)
        s2 = np.exp(phi[3])
        logdet, Q = ev.terms((np.exp(phi[:3]) / s2)[None, :])
        return absolute_criterion(logdet, Q, np.array([s2]), st.n_obs, st.p, True)[0]

    def constrained_min(phi_of):
        best = np.inf
        for start in (np.zeros(3), np.array([0.0, -20.0, -1.0])):
            res = minimize(
                lambda nu: crit(phi_of(nu)),
                start,
                method="Nelder-Mead",
                options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 20000},
            )
            best = min(best, res.fun)
        return best - fit.objective

    checks = {
        "sigma": lambda c: lambda nu: np.r_[nu, 2 * np.log(c)],
        "sd_a__Intercept": lambda c: lambda nu: np.r_[2 * np.log(c), nu],
        # icc_a = v_a / (v_a + v_ab + v_abc + s2): v_a determined by the others
        "icc_a": lambda c: lambda nu: np.r_[np.log(c / (1 - c) * (np.exp(nu).sum())), nu],
    }
    for name, phi_for in checks.items():
        lo, hi = pi[name]
        for c in (lo, hi):
            if c == 0.0 or not np.isfinite(c):
                continue
            # limits are found to 1e-4 on the log or logit scale: the rise to ~1e-3
            assert constrained_min(phi_for(c)) == pytest.approx(CHI2_90, abs=2e-3), (name, c)
    # the boundary estimates have their lower limit at 0, and the intervals hold the estimate
    assert fit.boundary == (1, 2)
    assert pi["sd_a:b__Intercept"][0] == 0.0
    assert pi["sigma"][0] < fit.sigma < pi["sigma"][1]


def test_engine_outputs_names_iccs_and_coef():
    sim = simulate("three_level", np.random.default_rng(3), schools=6, classrooms=3, students=4)
    res = fit_table(
        sim.data, NESTED, "eb_reml", settings={}, rng=np.random.default_rng(0), source="sim"
    )
    s = res.summary.set_index("parameter")
    for name in (
        "b_Intercept",
        "sd_school__Intercept",
        "sd_school:classroom__Intercept",
        "sigma",
        "icc_school",
        "icc_school:classroom",
        "r_school[S01,Intercept]",
        "r_school:classroom[S01:C02,Intercept]",
        "coef_school[S06,Intercept]",
        "coef_school:classroom[S06:C03,Intercept]",
    ):
        assert name in s.index, name
    vs, vc, s2 = (
        s.loc["sd_school__Intercept", "mean"] ** 2,
        s.loc["sd_school:classroom__Intercept", "mean"] ** 2,
        s.loc["sigma", "mean"] ** 2,
    )
    assert s.loc["icc_school", "mean"] == pytest.approx(vs / (vs + vc + s2), rel=1e-12)
    assert s.loc["icc_school:classroom", "mean"] == pytest.approx(vc / (vc + s2), rel=1e-12)
    assert s.loc["coef_school:classroom[S02:C01,Intercept]", "mean"] == pytest.approx(
        s.loc["b_Intercept", "mean"] + s.loc["r_school:classroom[S02:C01,Intercept]", "mean"],
        rel=1e-12,
    )
    for name in ("sd_school__Intercept", "sigma", "icc_school"):
        assert s.loc[name, "q5"] < s.loc[name, "mean"] < s.loc[name, "q95"]
    assert "profile likelihood" in res.info["intervals"]


def test_coef_standard_errors_are_henderson_prediction_errors():
    """coef_ SDs against the inverse of the dense mixed-model equations."""
    sim = simulate(
        "three_level", np.random.default_rng(9), schools=5, classrooms=[1, 3], students=[1, 5]
    )
    df = sim.data
    res = fit_table(df, NESTED, "eb_reml", settings={}, rng=np.random.default_rng(0), source="s")
    s = res.summary.set_index("parameter")
    model = load_model(df, NESTED, "s")
    st = model.prepared.stats
    v = [
        s.loc["sd_school__Intercept", "mean"] ** 2,
        s.loc["sd_school:classroom__Intercept", "mean"] ** 2,
    ]
    s2 = s.loc["sigma", "mean"] ** 2
    codes = np.column_stack(
        [
            np.unique(df.school, return_inverse=True)[1],
            np.unique(df.school + ":" + df.classroom, return_inverse=True)[1],
        ]
    )
    Z = np.column_stack([np.eye(codes[:, k].max() + 1)[codes[:, k]] for k in range(2)])
    X = np.ones((len(df), 1))
    G = np.diag(np.r_[np.full(st.group_counts[0], v[0]), np.full(st.group_counts[1], v[1])])
    C = np.block([[X.T @ X, X.T @ Z], [Z.T @ X, Z.T @ Z + s2 * np.linalg.inv(G)]]) / s2
    Ci = np.linalg.inv(C)
    # Var(coef - coef_hat) = Var(beta0_hat - beta0 + b_hat - b): the MME inverse's blocks.
    for j, lab in enumerate(st.labels[0]):
        var = Ci[0, 0] + Ci[1 + j, 1 + j] + 2 * Ci[0, 1 + j]
        assert s.loc[f"coef_school[{lab},Intercept]", "sd"] == pytest.approx(np.sqrt(var), rel=1e-6)
        assert s.loc[f"r_school[{lab},Intercept]", "sd"] == pytest.approx(
            np.sqrt(np.linalg.inv(C[1:, 1:])[j, j]), rel=1e-6
        )


def test_reml_recovers_parameters_in_simulation():
    """Mean of 25 REML fits within 4 Monte Carlo SEs of the truth (REML is nearly unbiased)."""
    est = []
    for rep in range(25):
        sim = simulate(
            "three_level",
            np.random.default_rng(100 + rep),
            schools=15,
            classrooms=3,
            students=6,
            sd_school=4.0,
            sd_classroom=3.0,
            sigma=5.0,
        )
        model = load_model(sim.data, NESTED, "sim")
        f = fit_components(make_evaluator(model.prepared.stats), "REML")
        est.append([*f.sds**2, f.sigma**2])
    est = np.array(est)
    mc_se = est.std(axis=0, ddof=1) / np.sqrt(len(est))
    # variances (unbiased for balanced REML in the interior); truth 16, 9, 25
    assert np.all(np.abs(est.mean(axis=0) - [16.0, 9.0, 25.0]) < 4 * mc_se)


def test_crossed_fit_and_cv_against_dense_conditional_predictive():
    sim = simulate(
        "crossed", np.random.default_rng(2), students=14, teachers=4, per_student=2, size=[1, 3]
    )
    df = sim.data
    model = load_model(df, CROSSED, "sim")
    assert model.prepared.structure_kind == "crossed"
    j = 3
    row = model.engine.score_held_out(model.prepared, j, "eb_reml", {}, np.random.default_rng(0))
    # refit without student j by the engine, then the dense conditional predictive
    lab = model.prepared.stats.labels[0][j]
    train = df[df.student != lab]
    res = fit_table(
        train, CROSSED, "eb_reml", settings={}, rng=np.random.default_rng(0), source="t"
    )
    s = res.summary.set_index("parameter")["mean"]
    vs, vt, s2 = s["sd_student__Intercept"] ** 2, s["sd_teacher__Intercept"] ** 2, s["sigma"] ** 2
    st_ = np.unique(df.student, return_inverse=True)[1]
    te = np.unique(df.teacher, return_inverse=True)[1]
    V = (
        s2 * np.eye(len(df))
        + vs * (st_[:, None] == st_[None, :])
        + vt * (te[:, None] == te[None, :])
    )
    h = (df.student == lab).to_numpy()
    y = df.y.to_numpy()
    X = np.ones((len(df), 1))
    Vi = np.linalg.inv(V[~h][:, ~h])
    beta = np.linalg.solve(X[~h].T @ Vi @ X[~h], X[~h].T @ Vi @ y[~h])
    K = V[h][:, ~h] @ Vi
    mean = X[h] @ beta + K @ (y[~h] - X[~h] @ beta)
    A = X[h] - K @ X[~h]
    cov = V[h][:, h] - K @ V[~h][:, h] + A @ np.linalg.inv(X[~h].T @ Vi @ X[~h]) @ A.T
    d = y[h] - mean
    want = -0.5 * (
        h.sum() * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1] + d @ np.linalg.solve(cov, d)
    )
    # exact identity, so rounding only
    assert row["elpd"] == pytest.approx(want, abs=1e-8)
    assert row["pred_mean"] == pytest.approx(mean.mean(), abs=1e-6)


def test_unsupported_models_and_bad_data_fail_clearly():
    sim = simulate("three_level", np.random.default_rng(1), schools=4, classrooms=2, students=3)
    df = sim.data.assign(x=np.arange(len(sim.data), dtype=float))
    with pytest.raises(MethodError, match="varying intercept only"):
        fit_table(
            df,
            "score ~ 1 + (1 + x | school) + (1 | classroom)",
            "eb_reml",
            settings={},
            rng=np.random.default_rng(0),
            source="d",
        )
    df2 = df.assign(obs=[f"o{i}" for i in range(len(df))])
    with pytest.raises(InputError, match="grouping factor 'obs' has"):
        fit_table(
            df2,
            "score ~ 1 + (1 | school) + (1 | obs)",
            "eb_reml",
            settings={},
            rng=np.random.default_rng(0),
            source="d",
        )
    with pytest.raises(ConfigError, match="not available for the multilevel"):
        fit_table(
            df,
            NESTED,
            "gibbs",
            settings={"priors": {"sd": {"family": "flat"}}},
            rng=np.random.default_rng(0),
            source="d",
        )
    with pytest.raises(MethodError, match="does not apply"):
        load_model(df, NESTED, "d").check("no_pooling")


def test_cv_density_with_a_normal_intercept_prior_matches_dense_conditioning():
    """beta ~ N(m, s^2): y ~ N(X m, V + s^2 X X'); condition the held-out rows on the rest."""
    from hierpipe.models.engines.multilevel import cv_log_density
    from hierpipe.models.gibbs_multilevel import MultilevelPriors
    from hierpipe.models.gibbs_twolevel import HalfCauchy, Normal

    sim = simulate(
        "three_level", np.random.default_rng(6), schools=5, classrooms=[1, 3], students=[1, 4]
    )
    df = sim.data
    model = load_model(df, NESTED, "s")
    st = model.prepared.stats
    keep = st.codes[:, 0] != 2
    sub = st.subset(keep)
    sds, sigma, m, s0 = np.array([4.0, 2.5]), 9.0, 65.0, 3.0
    priors = MultilevelPriors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0), b_Intercept=Normal(m, s0))
    got = cv_log_density(st, sub, sds[None, :], np.array([sigma]), priors)[0]
    school = np.unique(df.school, return_inverse=True)[1]
    room = np.unique(df.school + ":" + df.classroom, return_inverse=True)[1]
    V = (
        sigma**2 * np.eye(len(df))
        + sds[0] ** 2 * (school[:, None] == school[None, :])
        + sds[1] ** 2 * (room[:, None] == room[None, :])
        + s0**2
    )
    y = df.score.to_numpy()
    h = school == 2
    K = V[h][:, ~h] @ np.linalg.inv(V[~h][:, ~h])
    mean = m + K @ (y[~h] - m)
    cov = V[h][:, h] - K @ V[~h][:, h]
    d = y[h] - mean
    want = -0.5 * (
        h.sum() * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1] + d @ np.linalg.solve(cov, d)
    )
    assert got == pytest.approx(want, abs=1e-8)  # exact identity: rounding only
    row = model.engine.score_held_out(
        model.prepared,
        2,
        "gibbs",
        {"chains": 2, "warmup": 100, "draws": 100},
        np.random.default_rng(0),
    )
    assert np.isfinite(row["elpd"]) and row["pred_q5"] < row["pred_mean"] < row["pred_q95"]
