"""Within-group K-fold CV, the comparison table, and hierarchy against pooling.

References: row-level refits of the training rows and a dense multivariate
normal density of the held-out rows (K-fold scores); Gibbs draws of the group
means (the Rao–Blackwellised predictive); and, on schools-like data, the
expected ordering of the fits (hierarchical beats complete pooling for new
groups and no pooling for new observations of known groups).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.special import logsumexp

from hierpipe.cv.compare import compare
from hierpipe.cv.folds import run_chunk
from hierpipe.cv.kfold import assign_folds, model_and_design, run_kfold
from hierpipe.data.simulate import simulate
from hierpipe.errors import MethodError
from hierpipe.io import write_parquet
from hierpipe.models.engines.one_way import run_gibbs
from hierpipe.models.engines.one_way_checks import within_predictive
from hierpipe.models.fitting import fit_table
from hierpipe.models.structure import Structure
from hierpipe.seeds import derive_rng

FORMULA = "score ~ 1 + (1 | school)"
GIBBS = {"chains": 2, "warmup": 300, "draws": 500}


def _schools_like(seed: int, groups: int = 12, size=(4, 20)) -> pd.DataFrame:
    # The schools design (mu 70, tau 5, sigma 10: ICC 0.2), with fewer, smaller groups.
    rng = derive_rng(seed, "schools-like")
    return simulate(
        "two_level", rng, groups=groups, size=list(size), mu=70.0, tau=5.0, sigma=10.0
    ).data


def test_fold_assignment_keeps_training_data_in_every_group() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([1, 2, 3, 5, 7, 12, 40])
    codes = np.repeat(np.arange(sizes.size), sizes)
    folds = assign_folds(codes, sizes.size, 5, rng)
    assert (folds[codes == 0] == -1).all()  # a single observation is never held out
    for j, n in enumerate(sizes[1:], start=1):
        f = folds[codes == j]
        counts = np.bincount(f, minlength=5)
        assert counts.max() - counts.min() <= 1  # dealt in turn
        assert counts.max() <= n - 1  # every fold leaves training rows
    again = assign_folds(codes, sizes.size, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(folds, again)


def test_point_fit_scores_match_row_level_refits_and_dense_densities() -> None:
    df = _schools_like(1, groups=6, size=(3, 9))
    kw = dict(folds=3, settings={}, seed=5, keys=["s"], source="t")
    table = run_kfold(df, FORMULA, "eb_reml", **kw).set_index(["group", "fold"])
    _, design = model_and_design(df, FORMULA, "t")
    term = design.random[0]
    fold = assign_folds(term.codes, len(term.labels), 3, derive_rng(5, "s", "kfold"))
    for k in range(3):
        train = df[fold != k]
        res = fit_table(train, FORMULA, "eb_reml", settings={}, rng=derive_rng(0, "x"),
                        source="t").summary.set_index("parameter")  # fmt: skip
        sigma2 = res.loc["sigma", "mean"] ** 2
        for j, lab in enumerate(term.labels):
            y = df["score"].to_numpy()[(fold == k) & (term.codes == j)]
            if y.size == 0:
                continue
            coef = res.loc[f"coef_school[{lab},Intercept]"]
            cov = sigma2 * np.eye(y.size) + coef["sd"] ** 2
            want = stats.multivariate_normal(np.full(y.size, coef["mean"]), cov).logpdf(y)
            # Same model, two computations (sufficient statistics vs dense algebra).
            assert table.loc[(lab, k), "elpd"] == pytest.approx(want, rel=1e-9)
            assert table.loc[(lab, k), "n"] == y.size


def test_gibbs_rao_blackwell_predictive_matches_the_group_mean_draws() -> None:
    df = _schools_like(2, groups=8, size=(5, 15))
    model, design = model_and_design(df, FORMULA, "t")
    train, held = model.engine.kfold_split(
        design, model.prepared, model.structure, np.arange(len(df)) % 4, 0
    )
    structure = Structure("one_way", "score", "school")
    predictive = within_predictive(train, structure, "gibbs", GIBBS, derive_rng(3, "rb"))
    sample, _ = run_gibbs(train, GIBBS, derive_rng(3, "rb"))  # the same draws
    theta = sample.theta.reshape(-1, train.n_groups)
    sigma = sample.sigma.reshape(-1, 1)
    y, codes = design.y, design.random[0].codes
    held_rows = np.arange(len(df)) % 4 == 0
    for j in range(train.n_groups):
        yj = y[held_rows & (codes == j)]
        direct = stats.norm.logpdf(yj[None, :], theta[:, [j]], sigma).sum(axis=1)
        want = logsumexp(direct) - np.log(direct.size)
        pred = predictive(j)
        rb = stats.multivariate_normal  # closed form per draw, then log-mean
        got = logsumexp(
            [
                rb(np.full(yj.size, m), s2 * np.eye(yj.size) + a).logpdf(yj)
                for m, a, s2 in zip(pred.mu, pred.a, pred.sigma2, strict=True)
            ]
        ) - np.log(pred.mu.size)
        # Both average the same conditional density over the same 1000 draws, one
        # integrating theta_j exactly and one by its draws: they differ by Monte Carlo
        # error (observed |difference| <= 0.06 on the log scale here); a wrong
        # conditional variance or mean moves it by 0.3 or more.
        assert got == pytest.approx(want, abs=0.15)
    assert held.n.sum() == held_rows.sum()


def _write(tmp, name: str, table: pd.DataFrame) -> str:
    path = tmp / f"{name}.parquet"
    write_parquet(table, path)
    return str(path)


def _comparison(tmp, seed: int) -> pd.DataFrame:
    df = _schools_like(seed)
    draws = fit_table(df, FORMULA, "gibbs", settings=GIBBS, rng=derive_rng(seed, "g"),
                      source="t").draws  # fmt: skip
    common = dict(settings=GIBBS, seed=seed, keys=["s"], source="t")
    logo = [
        _write(tmp, f"logo_{fit}_{seed}", run_chunk(
            df, FORMULA, fit, chunk=0, chunks=1, draws=draws,
            cv_method="psis" if fit == "gibbs" else "exact", **common,
        ))
        for fit in ("complete_pooling", "eb_reml", "gibbs")
    ]  # fmt: skip
    kfold = [
        _write(tmp, f"kfold_{fit}_{seed}", run_kfold(df, FORMULA, fit, folds=5, **common))
        for fit in ("no_pooling", "complete_pooling", "eb_reml", "gibbs")
    ]
    return compare(logo, kfold).set_index(["target", "fit"])


def test_hierarchy_beats_pooling_on_schools_like_data(tmp_path) -> None:
    """New groups: hierarchical fits beat complete pooling; new observations: no pooling.

    Four independent schools-like data sets (12 schools of 4-20 pupils, ICC 0.2),
    summed: on one small data set the known-group ordering can reverse by chance
    (the expected gain over no pooling is about 1-2 elpd with an SE of about 1; one
    data set in ten or so reverses it), so the test asserts the sum, which the
    theory predicts clearly. It could fail: complete pooling treats a new group's
    observations as independent around the grand mean, no pooling predicts each
    group from its own few observations, and an error in either score or in the
    partial pooling reverses or removes the ordering.
    """
    tables = [_comparison(tmp_path, seed) for seed in range(4)]
    elpd = sum(t["elpd"] for t in tables)
    for hier in ("eb_reml", "gibbs"):
        assert elpd["new_group", hier] > elpd["new_group", "complete_pooling"]
        assert elpd["known_group", hier] > elpd["known_group", "no_pooling"]
        assert elpd["known_group", hier] > elpd["known_group", "complete_pooling"]
    for t in tables:
        assert (t.groupby(level="target")["elpd_diff"].max() == 0).all()
        assert list(t.index.get_level_values("target").unique()) == ["new_group", "known_group"]


def test_compare_pairs_kfold_blocks_by_group(tmp_path) -> None:
    a = pd.DataFrame({"fit": "a", "group": ["g1", "g1", "g2"], "fold": [0, 1, 0],
                      "elpd": [-1.0, -2.0, -4.0], "error": [1.0, -1.0, 2.0],
                      "covered": [True, True, False]})  # fmt: skip
    b = a.assign(fit="b", elpd=[-1.5, -2.0, -3.0])
    table = compare([], [_write(tmp_path, "a", a), _write(tmp_path, "b", b)])
    row_a = table.set_index("fit").loc["a"]
    # Per group: a = (-3, -4), b = (-3.5, -3); sums -7 and -6.5; diff (0.5, -1).
    assert row_a["elpd"] == -7.0 and row_a["groups"] == 2
    assert row_a["elpd_diff"] == pytest.approx(-0.5)
    assert row_a["se_diff"] == pytest.approx(np.sqrt(2 * np.var([0.5, -1.0], ddof=1)))
    assert row_a["rmse"] == pytest.approx(np.sqrt(2.0))
    assert row_a["coverage90"] == pytest.approx(2 / 3)
    assert set(table["target"]) == {"known_group"}


def test_compare_refuses_a_non_finite_elpd(tmp_path) -> None:
    """A NaN elpd must stop the comparison: pandas' sum would skip it, scoring the group 0."""
    a = pd.DataFrame({"fit": "a", "group": ["g1", "g2"], "fold": [0, 0],
                      "elpd": [-1.0, np.nan], "error": [1.0, 1.0],
                      "covered": [True, True]})  # fmt: skip
    b = a.assign(fit="b", elpd=[-1.5, -2.0])
    with pytest.raises(MethodError, match=r"column 'elpd' is not finite for group 'g2' of fit 'a'"):
        compare([], [_write(tmp_path, "a", a), _write(tmp_path, "b", b)])
