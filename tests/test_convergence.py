"""Tests of hierpipe.diagnostics.convergence.

References: ArviZ (run here on the same draws), closed forms for AR(1) chains
and iid quantiles, simulation over many replicate chains, and a hand-built
split R-hat for a single chain (where ArviZ gives NaN).
"""

from __future__ import annotations

import dataclasses
import logging

import arviz as az
import numpy as np
import pandas as pd
import pytest
from scipy import signal, stats

from hierpipe.diagnostics import convergence as cv
from hierpipe.errors import InputError
from hierpipe.models.result import SAMPLER_COLUMNS, SUMMARY_COLUMNS, normal_row, summary_frame

# Same formulas in float64 on both sides; the only differences are FFT length
# and summation order (observed < 1e-12). 1e-6 is the contract; any logic slip
# (a Geyer boundary, a tie rank, an off-by-one order statistic) moves a value
# by far more.
RTOL_ARVIZ = 1e-6


@pytest.fixture(autouse=True)
def _quiet_arviz(caplog):
    # ArviZ logs a warning for every short or NaN array it is given on purpose.
    caplog.set_level(logging.ERROR, logger="arviz")


def ar1(rng: np.random.Generator, shape: tuple[int, ...], phi: float) -> np.ndarray:
    """Stationary AR(1) draws with unit innovations along axis 1 (the draws axis)."""
    e = rng.standard_normal(shape)
    e[:, 0] /= np.sqrt(1.0 - phi**2)  # start in the stationary distribution
    return signal.lfilter([1.0], [1.0, -phi], e, axis=1)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240611)
    shifted = rng.standard_normal((4, 500)) + np.arange(4.0)[:, None]
    copy = rng.standard_normal(300)
    return {
        "iid 4x1000": rng.standard_normal((4, 1000)),
        "iid 1x1000": rng.standard_normal((1, 1000)),
        "ar0.9 4x1000": ar1(rng, (4, 1000), 0.9),
        "ar0.9 1x999": ar1(rng, (1, 999), 0.9),
        "antithetic 2x400": ar1(rng, (2, 400), -0.6),
        "odd 4x1001": rng.standard_normal((4, 1001)),
        "short 2x7": rng.standard_normal((2, 7)),
        "short 3x5": rng.standard_normal((3, 5)),
        "minimal 4x4": rng.standard_normal((4, 4)),
        "ties poisson 4x200": rng.poisson(1.0, (4, 200)).astype(float),
        "ties binary 4x200": rng.integers(0, 2, (4, 200)).astype(float),
        "heavy cauchy 4x300": rng.standard_cauchy((4, 300)),
        "shifted 4x500": shifted,
        "identical copies 3x300": np.tile(copy, (3, 1)),
        "many chains 16x50": rng.standard_normal((16, 50)),
    }


CASES = _cases()


def _rel_close(ours: float, ref: float) -> None:
    ref = float(np.asarray(ref).ravel()[0])
    if np.isnan(ref):
        assert np.isnan(ours)
    else:
        np.testing.assert_allclose(ours, ref, rtol=RTOL_ARVIZ, atol=0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_arviz(name: str) -> None:
    x = CASES[name]
    if x.shape[0] > 1:  # ArviZ returns NaN for one chain; see the dedicated test
        _rel_close(cv.split_rhat(x), az.rhat(x, method="rank"))
    _rel_close(cv.ess_bulk(x), az.ess(x, method="bulk"))
    _rel_close(cv.ess_tail(x), az.ess(x, method="tail"))
    _rel_close(cv.ess_mean(x), az.ess(x, method="mean"))
    _rel_close(cv.mcse_mean(x), az.mcse(x, method="mean"))
    for prob in (0.05, 0.5, 0.95):
        _rel_close(cv.mcse_quantile(x, prob), az.mcse(x, method="quantile", prob=prob))


def test_bulk_and_tail_rhat_match_arviz_parts() -> None:
    # ArviZ has no public bulk/tail split; rebuild each with its "identity" R-hat
    # on the z-scaled split chains, z-scaling done here with scipy.
    x = CASES["ar0.9 4x1000"]
    z_bulk, z_tail = _reference_z(x)
    _rel_close(cv.rhat_bulk(x), az.rhat(z_bulk, method="identity"))
    _rel_close(cv.rhat_tail(x), az.rhat(z_tail, method="identity"))
    assert cv.split_rhat(x) == max(cv.rhat_bulk(x), cv.rhat_tail(x))


def _reference_z(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised split chains and folded split chains, from the paper's formulas."""
    half = x.shape[1] // 2
    split = np.vstack([x[:, :half], x[:, x.shape[1] - half :]])

    def z(a: np.ndarray) -> np.ndarray:
        ranks = stats.rankdata(a, method="average").reshape(a.shape)
        return stats.norm.ppf((ranks - 3 / 8) / (a.size - 2 * 3 / 8 + 1))

    return z(split), z(np.abs(split - np.median(split)))


def test_single_chain_rhat_compares_its_halves() -> None:
    x = CASES["ar0.9 1x999"]
    z_bulk, z_tail = _reference_z(x)
    expected = max(az.rhat(z_bulk, method="identity"), az.rhat(z_tail, method="identity"))
    _rel_close(cv.split_rhat(x), expected)
    # A chain whose second half drifted by one SD is caught on its own.
    drift = np.random.default_rng(1).standard_normal((1, 1000))
    drift[:, 500:] += 1.0
    assert cv.split_rhat(drift) > 1.1


def test_ar1_ess_matches_closed_form() -> None:
    # Stationary AR(1): integrated autocorrelation time (1 + phi) / (1 - phi), so
    # ESS / N -> (1 - phi) / (1 + phi). 200 replicate columns in one batch.
    # Per replicate the relative SD of the estimate is about sqrt(2 (2M + 1) / N)
    # (Sokal 1997; M the truncation lag): measured 0.03 (phi 0) to 0.13 (phi 0.9)
    # at N = 8000, so the mean of 200 has SE <= 0.01. Geyer's truncation adds a
    # bias of 1-2% (the tail of the autocorrelations it drops), hence 5%.
    rng = np.random.default_rng(11)
    chains, draws, reps = 4, 2000, 200
    for phi in (0.0, 0.5, 0.9, -0.3):
        x = ar1(rng, (chains, draws, reps), phi)
        theory = (1.0 - phi) / (1.0 + phi)
        for ess in (cv.ess_mean(x), cv.ess_bulk(x)):
            ratio = ess / (chains * draws)
            assert abs(ratio.mean() / theory - 1.0) < 0.05, (phi, ratio.mean(), theory)


def test_mcse_mean_matches_closed_form_and_simulation() -> None:
    # Var(mean) of AR(1) with unit innovations: sigma^2 tau / N with
    # sigma^2 = 1 / (1 - phi^2) and tau = (1 + phi) / (1 - phi).
    rng = np.random.default_rng(12)
    chains, draws, reps, phi = 4, 2000, 200, 0.7
    x = ar1(rng, (chains, draws, reps), phi)
    theory = np.sqrt((1 + phi) / (1 - phi) / (1 - phi**2) / (chains * draws))
    rms_mcse = np.sqrt(np.mean(cv.mcse_mean(x) ** 2))
    # rms over 200 replicates of an estimate with ~10% relative SD: SE < 1%; 5% allows bias.
    assert abs(rms_mcse / theory - 1.0) < 0.05
    # Simulation: the spread of the 200 replicate means is what MCSE estimates.
    # The SD of 200 values has relative SE 1/sqrt(2 * 199) = 5%; 4 SE = 20%.
    sd_of_means = x.mean(axis=(0, 1)).std(ddof=1)
    assert abs(sd_of_means / rms_mcse - 1.0) < 0.20


def test_mcse_quantile_matches_asymptotic_standard_error() -> None:
    # iid draws: SE of the p quantile = sqrt(p (1 - p) / N) / f(q_p).
    # Per replicate the estimate picks two order statistics, relative SD
    # 0.11-0.16 (measured), so the mean of 200 has SE ~0.01; rounding the
    # order statistics outward (floor/ceil) biases it up by 2-5%, hence 10%.
    rng = np.random.default_rng(13)
    chains, draws, reps = 4, 2000, 200
    x = rng.standard_normal((chains, draws, reps))
    for prob in (0.05, 0.5, 0.95):
        theory = np.sqrt(prob * (1 - prob) / (chains * draws)) / stats.norm.pdf(
            stats.norm.ppf(prob)
        )
        assert abs(cv.mcse_quantile(x, prob).mean() / theory - 1.0) < 0.10, prob


def test_iid_draws_rhat_one_and_ess_near_n() -> None:
    rng = np.random.default_rng(14)
    chains, draws, reps = 4, 1000, 100
    x = rng.standard_normal((chains, draws, reps))
    # R-hat ~ 1 + (B/W - 1) / (2n) with B/W ~ F(7, 3992): SD ~ 0.53 / 1000 = 5e-4;
    # 0.005 is ten SDs, so an iid column never fails but a 1% drift would.
    assert np.all(np.abs(cv.split_rhat(x) - 1.0) < 0.005)
    # ESS/N per column has relative SD ~0.03 (measured), mean of 100 has SE 0.003;
    # Geyer's truncation pulls iid ESS ~1% below N, hence 3%.
    for ess in (cv.ess_bulk(x), cv.ess_mean(x)):
        assert abs(ess.mean() / (chains * draws) - 1.0) < 0.03
    # Tail ESS is the smaller of two indicator ESS, each with relative SD ~0.04
    # (measured): the minimum of two independent normals sits SD/sqrt(pi) = 2.3%
    # below their mean; with the 1% truncation bias and SE, 6%.
    assert abs(cv.ess_tail(x).mean() / (chains * draws) - 1.0) < 0.06


def test_shifted_chain_gives_rhat_of_closed_form() -> None:
    # One chain of four shifted by 0.5 SD. For split chains (8 of n = 500), with
    # true split means s: E[B] = n var(s) + 1, W = 1, so R ~ sqrt(1 + var(s)),
    # var(s) with ddof 1 = 0.0536, R ~ 1.0264. Rank normalisation is nearly
    # linear for this mild mixture. Replicate SD is 0.004 (measured); the mean
    # of 200 has SE 3e-4, and the O(1/n) terms dropped are ~1e-3, hence 0.004.
    rng = np.random.default_rng(15)
    x = rng.standard_normal((4, 1000, 200))
    x[3] += 0.5
    split_means = np.array([0.0, 0.0, 0.0, 0.5] * 2)
    expected = np.sqrt(1.0 + np.var(split_means, ddof=1))
    rhat = cv.split_rhat(x)
    assert abs(rhat.mean() - expected) < 0.004
    assert np.mean(rhat > 1.01) > 0.95
    # Far-apart chains: R-hat far above the 1.01 threshold.
    assert cv.split_rhat(CASES["shifted 4x500"]) > 1.3


def test_scale_difference_is_caught_by_tail_rhat_only() -> None:
    # Vehtari et al. (2021, sec. 4.2): chains with equal means but one twice as
    # wide pass bulk R-hat; folding turns the width into a location difference.
    rng = np.random.default_rng(16)
    x = rng.standard_normal((4, 1000, 50))
    x[3] *= 2.0
    assert np.all(cv.rhat_bulk(x) < 1.005)  # iid-like, as in the iid test
    assert np.all(cv.rhat_tail(x) > 1.03)  # measured 1.05-1.09 over replicates
    np.testing.assert_array_equal(cv.split_rhat(x), cv.rhat_tail(x))


@pytest.mark.filterwarnings("ignore::RuntimeWarning:arviz.*")  # ArviZ's own 0/0
def test_constant_chains_match_arviz() -> None:
    x = np.full((4, 100), 2.5)
    assert np.isnan(cv.split_rhat(x)) and np.isnan(az.rhat(x, method="rank"))
    for ours, method in ((cv.ess_bulk, "bulk"), (cv.ess_tail, "tail"), (cv.ess_mean, "mean")):
        assert ours(x) == az.ess(x, method=method) == x.size
    assert cv.mcse_mean(x) == 0.0
    assert cv.mcse_quantile(x, 0.3) == 0.0


def test_chains_stuck_at_different_values() -> None:
    # Each chain constant, chains apart: within-chain variance 0, so R-hat is
    # infinite in exact arithmetic (rounding leaves it finite but huge).
    x = np.repeat(np.arange(4.0)[:, None], 100, axis=1)
    assert cv.split_rhat(x) > 1e6
    _rel_close(cv.ess_bulk(x), az.ess(x, method="bulk"))


def test_too_short_nan_and_bad_input() -> None:
    x = np.random.default_rng(17).standard_normal((4, 3))
    for f in (cv.split_rhat, cv.ess_bulk, cv.ess_tail, cv.ess_mean, cv.mcse_mean):
        assert np.isnan(f(x))
    assert np.isnan(cv.mcse_quantile(x, 0.5))
    with pytest.raises(ValueError, match="shape"):
        cv.ess_bulk(np.zeros(10))
    with pytest.raises(ValueError, match="prob"):
        cv.mcse_quantile(np.zeros((2, 10)), 1.0)


def test_batch_equals_per_column() -> None:
    rng = np.random.default_rng(18)
    chains, draws = 4, 301  # odd, so the split drops a middle draw
    columns = [
        rng.standard_normal((chains, draws)),
        ar1(rng, (chains, draws), 0.8),
        rng.poisson(2.0, (chains, draws)).astype(float),
        np.full((chains, draws), -1.0),
        rng.standard_normal((chains, draws)) + np.arange(chains)[:, None],
        rng.standard_normal((chains, draws)),
    ]
    columns[5][2, 10] = np.nan  # a NaN must spoil only its own column
    x = np.stack(columns, axis=2)
    functions = {
        "split_rhat": cv.split_rhat,
        "rhat_bulk": cv.rhat_bulk,
        "rhat_tail": cv.rhat_tail,
        "ess_bulk": cv.ess_bulk,
        "ess_tail": cv.ess_tail,
        "ess_mean": cv.ess_mean,
        "mcse_mean": cv.mcse_mean,
        "mcse_q05": lambda a: cv.mcse_quantile(a, 0.05),
    }
    for name, f in functions.items():
        batched = f(x)
        assert batched.shape == (len(columns),), name
        single = np.array([f(c) for c in columns])
        # Same kernels row by row; only reduction order could differ (1e-12 is
        # a thousand times the rounding seen, far below any real difference).
        np.testing.assert_allclose(batched, single, rtol=1e-12, equal_nan=True, err_msg=name)
        assert np.isnan(batched[5]) and np.all(np.isfinite(batched[[0, 1, 2, 4]])), name


def _draws_for_summary() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(19)
    return {
        "sigma": np.exp(rng.standard_normal((4, 500)) * 0.1),
        "b_Intercept": ar1(rng, (4, 500), 0.95) + np.arange(4.0)[:, None],
        "r_school[S07,Intercept]": rng.standard_normal((4, 500)),
        "sd_school__Intercept": ar1(rng, (4, 500), 0.99) * 0.1 + 1.0,
        "icc_school": np.full((4, 500), 0.25),
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning:arviz.*")  # ArviZ's 0/0 on icc_school
def test_summarise_draws_contract_and_values() -> None:
    draws = _draws_for_summary()
    table = cv.summarise_draws(draws)
    assert list(table.columns) == SUMMARY_COLUMNS + SAMPLER_COLUMNS
    assert list(table["parameter"]) == list(draws)  # insertion order, not sorted
    assert all(table[c].dtype == np.float64 for c in table.columns[1:])

    # Peer: ArviZ's own summary table (unrounded) on the same draws.
    ref = az.summary(draws, round_to="none")
    for ours, theirs in (
        ("mean", "mean"),
        ("sd", "sd"),
        ("rhat", "r_hat"),
        ("ess_bulk", "ess_bulk"),
        ("ess_tail", "ess_tail"),
        ("mcse_mean", "mcse_mean"),
    ):
        np.testing.assert_allclose(
            table[ours].to_numpy(),
            ref.loc[list(draws), theirs].to_numpy(dtype=float),
            rtol=RTOL_ARVIZ,
            equal_nan=True,
            err_msg=ours,
        )
    # Quantiles: pandas' linear interpolation over all chains pooled, an
    # implementation independent of numpy.quantile; identical up to rounding.
    for name, row in zip(draws, table.itertuples(index=False), strict=True):
        pooled = pd.Series(draws[name].ravel())
        np.testing.assert_allclose(
            [row.q5, row.q50, row.q95], pooled.quantile([0.05, 0.5, 0.95]), rtol=1e-12
        )
    # The summary equals the per-quantity functions.
    for name, row in zip(draws, table.itertuples(index=False), strict=True):
        assert row.ess_bulk == pytest.approx(cv.ess_bulk(draws[name]), rel=1e-12, nan_ok=True)


def test_summarise_draws_edge_cases() -> None:
    empty = cv.summarise_draws({})
    assert list(empty.columns) == SUMMARY_COLUMNS + SAMPLER_COLUMNS and len(empty) == 0
    with pytest.raises(ValueError, match="same"):
        cv.summarise_draws({"a": np.zeros((4, 10)), "b": np.zeros((4, 11))})
    short = cv.summarise_draws({"a": np.arange(6.0).reshape(2, 3)})
    assert short.loc[0, "mean"] == 2.5
    assert short[SAMPLER_COLUMNS].isna().all(axis=None)


def test_flag_convergence_messages_and_thresholds() -> None:
    table = cv.summarise_draws(_draws_for_summary())
    by_name = table.set_index("parameter")
    flags = cv.convergence_flags(table)
    flagged = {(f.parameter, f.quantity) for f in flags}
    # b_Intercept: chains at 0..3 with AR(0.95) noise; sd_school: AR(0.99).
    assert ("b_Intercept", "rhat") in flagged
    assert ("sd_school__Intercept", "ess_bulk") in flagged
    assert ("icc_school", "rhat") in flagged  # constant: R-hat NaN, cannot be checked
    assert not any(p in {"sigma", "r_school[S07,Intercept]"} for p, _ in flagged)
    # Each flag is exactly a threshold violation of the table's numbers.
    for f in flags:
        value = by_name.loc[f.parameter, f.quantity]
        assert f.value == value or (np.isnan(f.value) and np.isnan(value))
        if f.quantity == "rhat" and not np.isnan(value):
            assert value > 1.01
        elif not np.isnan(value):
            assert value < 400

    lines = cv.flag_convergence(table, ["b_Intercept"])
    rhat = by_name.loc["b_Intercept", "rhat"]
    assert f"b_Intercept: R-hat {rhat:.3f} > 1.01" in lines
    assert all(line.startswith("b_Intercept: ") for line in lines)
    ess = by_name.loc["sd_school__Intercept", "ess_bulk"]
    assert f"sd_school__Intercept: bulk ESS {ess:.0f} < 400" in cv.flag_convergence(table)
    assert any("icc_school: R-hat could not be computed" in s for s in cv.flag_convergence(table))

    # Thresholds move the verdict: loosened past the worst values, nothing is flagged.
    relaxed = cv.flag_convergence(
        table, ["b_Intercept", "sigma"], rhat_max=float(rhat) + 0.01, ess_min=1.0
    )
    assert relaxed == []

    with pytest.raises(InputError, match="b_Slope"):
        cv.flag_convergence(table, ["b_Slope"])
    point = summary_frame([normal_row("b_Intercept", 1.0, 0.1)])
    with pytest.raises(InputError, match="rhat"):
        cv.flag_convergence(point)
    with pytest.raises(dataclasses.FrozenInstanceError):
        flags[0].value = 1.0  # type: ignore[misc]


def test_diagnose_draws_equals_per_parameter_functions() -> None:
    # The batched summary (one sort shared by quantiles, ranks and quantile
    # MCSEs; direct lag sums with an FFT fallback; chunks of parameters) must
    # equal the per-quantity functions called on one (chains, draws) column at
    # a time, which test_matches_arviz ties to ArviZ. More columns than one
    # chunk, so the chunking is crossed; AR(0.995) columns outlast the direct
    # lags and take the FFT path; the others end within them.
    rng = np.random.default_rng(21)
    for chains, draws in ((4, 500), (3, 301), (1, 64), (2, 20)):
        k = cv._CHUNK + 37
        x = rng.standard_normal((chains, draws, k))
        x[:, :, :20] = ar1(rng, (chains, draws, 20), 0.995)
        x[:, :, 20:30] = ar1(rng, (chains, draws, 10), -0.7)
        x[:, :, 30:40] = rng.poisson(1.5, (chains, draws, 10))  # many ties
        x[:, :, 40:44] = rng.integers(0, 2, (chains, draws, 4))  # two values
        x[:, :, 44] = 7.0  # constant
        x[:, :, 45] = np.arange(chains)[:, None]  # each chain constant
        x[:, :, 46] *= 1e12  # scale
        got = cv.diagnose_draws(x)
        per_column = {
            "rhat": cv.split_rhat,
            "ess_bulk": cv.ess_bulk,
            "ess_tail": cv.ess_tail,
            "mcse_mean": cv.mcse_mean,
            "mcse_q5": lambda a: cv.mcse_quantile(a, 0.05),
            "mcse_q95": lambda a: cv.mcse_quantile(a, 0.95),
            "mean": lambda a: a.mean(),
            "sd": lambda a: a.std(ddof=1),
            "q5": lambda a: np.quantile(a, 0.05),
            "q50": lambda a: np.quantile(a, 0.5),
            "q95": lambda a: np.quantile(a, 0.95),
        }
        assert set(per_column) == set(cv.DIAGNOSTIC_COLUMNS)
        for name, f in per_column.items():
            single = np.array([f(x[:, :, j]) for j in range(k)])
            # Both sides are float64 with the same formulas; the direct lag sums
            # and the FFT differ only in summation order (observed < 1e-13).
            np.testing.assert_allclose(
                got[name], single, rtol=1e-12, atol=0.0, equal_nan=True, err_msg=name
            )
        # The quantiles come from the shared sort and must be numpy's, bit for bit.
        np.testing.assert_array_equal(got["q5"], np.quantile(x, 0.05, axis=(0, 1)))
        # Direct lags and the FFT fallback both take part in this test.
        assert np.isfinite(got["ess_bulk"][:20]).all() and np.isfinite(got["ess_bulk"]).all()


def test_direct_lags_equal_fft_autocovariance() -> None:
    # The lag sums that replace the FFT for the leading lags are the same
    # quantity: chain-averaged biased autocovariance (rounding only).
    rng = np.random.default_rng(22)
    x = ar1(rng, (5, 3, 200), 0.8)  # (k, chains, n) internal layout
    centred = x - x.mean(axis=-1, keepdims=True)
    np.testing.assert_allclose(
        cv._autocovariance_lags(centred, 0, 40),
        cv._mean_autocovariance(x)[:, :40],
        rtol=1e-10,
        atol=1e-12,
    )


def test_summarise_array_equals_summarise_draws() -> None:
    rng = np.random.default_rng(23)
    x = rng.standard_normal((4, 100, 6))
    x[:, :, 2] = 1.5
    names = [f"r_g[G{j},Intercept]" for j in range(6)]
    from_array = cv.summarise_array(names, x)
    from_dict = cv.summarise_draws({n: x[:, :, j] for j, n in enumerate(names)})
    pd.testing.assert_frame_equal(from_array, from_dict, check_exact=True)
    with pytest.raises(ValueError, match="shape"):
        cv.summarise_array(names[:5], x)
