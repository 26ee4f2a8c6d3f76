"""Simulation-based calibration: CI-sized runs of every registered case (issue 7).

Every registered case (:func:`hierpipe.sbc.core.cases`: two-level, slopes,
nested, crossed and known-SE meta-analysis; new structures register theirs and
are covered here at once) is run with a fixed seed at CI size: ``REPLICATIONS``
= 300 replications, ``L`` = 39 draws kept (thinning 2 after 200 warm-up
iterations), ranks in ``BINS`` = 10 bins of 30 expected. The ranks of each
parameter are tested for uniformity by a chi-square test at level
``FAMILY_ALPHA / m``, ``m`` the number of ranked parameters of *all*
registered cases together (85 today).

False-alarm rate: for correct samplers with independent draws, the whole CI
run flags any parameter of any case with probability at most ``FAMILY_ALPHA``
= 1% (Bonferroni over all parameters of all cases). The seeds are fixed, so
the outcome is deterministic: a failure after a change to a sampler means
either that change is wrong or its new draws landed in that 1% tail; run the
full target (``snakemake --cores 8 sbc``, 1000 replications) to tell.
Residual autocorrelation of the thinned draws makes ranks slightly
non-uniform even for a correct sampler; thinning by 2 keeps that far below
what these sizes can detect (the full run uses thinning 3).

The tests can fail: ``test_sbc_detects_miscalibrated_posteriors`` distorts a
correct sampler's draws by amounts a practitioner would care about and
checks that the same test rejects them, with the histogram shape theory
predicts (Talts et al. 2018, fig. 3-5); ``test_sbc_detects_a_wrong_sampler``
runs a sampler that is told standard errors 30% too small (data drawn with
the right ones) through the whole SBC path and checks that the family-wise
test flags it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from hierpipe.cli import main
from hierpipe.errors import ConfigError, InputError
from hierpipe.models.gibbs_meta import TauPrior, gibbs_meta, gibbs_meta_batch
from hierpipe.models.gibbs_twolevel import (
    GibbsSettings,
    HalfCauchy,
    Priors,
    gibbs_two_level,
    gibbs_two_level_batch,
)
from hierpipe.sbc import meta as sbc_meta
from hierpipe.sbc.core import (
    Replicates,
    SBCCase,
    SBCSettings,
    cases,
    chunk_bounds,
    get_case,
    ranks_of,
    register,
    run_case,
)
from hierpipe.sbc.uniformity import (
    bin_counts,
    chi_square_uniformity,
    ecdf_band,
    ecdf_counts,
)
from hierpipe.seeds import derive_rng

REPO = Path(__file__).resolve().parents[1]
CI = SBCSettings(draws=39, thin=2, warmup=200)  # ranks 0..39: 10 bins of 4 ranks
REPLICATIONS = 300  # 30 expected a bin: the chi-square approximation is good
BINS = 10
FAMILY_ALPHA = 0.01
# Bonferroni over every ranked parameter of every registered case.
LEVEL = FAMILY_ALPHA / sum(len(c.parameters) for c in cases().values())


@pytest.mark.parametrize("name", list(cases()))
def test_registered_case_is_calibrated(name):
    case = cases()[name]
    table = run_case(case, REPLICATIONS, CI, derive_rng(2024, "sbc-ci", name))
    level = LEVEL
    p_values = {
        p: chi_square_uniformity(g["rank"].to_numpy(), CI.draws, BINS)[1]
        for p, g in table.groupby("parameter", sort=False)
    }
    assert set(p_values) == set(case.parameters)
    failed = {p: v for p, v in p_values.items() if v < level}
    assert not failed, f"{name}: ranks not uniform (p < {level:.2g}): {failed}"


def _shifted_ranks(truth: np.ndarray, draws: np.ndarray, shrink: float, bias: float):
    """Ranks after rescaling each replication's draws about their mean and shifting them."""
    centre = draws.mean(axis=1, keepdims=True)
    spread = draws.std(axis=1, keepdims=True)
    return ranks_of(truth, centre + shrink * (draws - centre) + bias * spread)


def test_sbc_detects_miscalibrated_posteriors():
    """Too narrow, too wide and biased posteriors fail; the correct one passes."""
    case = get_case("two_level_asis")
    rep = case.replicate(derive_rng(7, "sbc-negative"), REPLICATIONS, CI)
    level = FAMILY_ALPHA / len(case.parameters)
    truth, draws = rep.truth["b_Intercept"], rep.draws["b_Intercept"]

    correct = chi_square_uniformity(ranks_of(truth, draws), CI.draws, BINS)[1]
    assert correct >= level

    # 40% too narrow: truths fall outside the draws too often, a U shape.
    narrow = _shifted_ranks(truth, draws, 0.6, 0.0)
    counts = bin_counts(narrow, CI.draws, BINS)
    assert chi_square_uniformity(narrow, CI.draws, BINS)[1] < level
    assert min(counts[0], counts[-1]) > counts[1:-1].max()

    # 60% too wide: truths crowd the middle ranks, a hump.
    wide = _shifted_ranks(truth, draws, 1.6, 0.0)
    counts = bin_counts(wide, CI.draws, BINS)
    assert chi_square_uniformity(wide, CI.draws, BINS)[1] < level
    assert counts[BINS // 2 - 1 : BINS // 2 + 1].min() > max(counts[0], counts[-1])

    # Biased up by half a posterior SD: the truth is low among the draws, a slope.
    biased = _shifted_ranks(truth, draws, 1.0, 0.5)
    counts = bin_counts(biased, CI.draws, BINS)
    assert chi_square_uniformity(biased, CI.draws, BINS)[1] < level
    assert counts[: BINS // 2].sum() > counts[BINS // 2 :].sum()


def test_sbc_detects_a_wrong_sampler():
    """A sampler told standard errors 30% too small fails the family-wise test."""
    case = SBCCase(
        "meta_wrong_se",
        "meta",
        "sampler told se x 0.7",
        tuple(sbc_meta.NAMES.values()),
        sbc_meta.meta_replicator(TauPrior("half_cauchy", 1.0), assumed_se_factor=0.7),
    )
    table = run_case(case, REPLICATIONS, CI, derive_rng(7, "sbc-negative-meta"))
    ranks = {p: g["rank"].to_numpy() for p, g in table.groupby("parameter")}
    # The excess spread of y is put on tau: it is overestimated, a slope
    # (the truth sits low among the draws).
    tau = ranks["sd_study__Intercept"]
    assert chi_square_uniformity(tau, CI.draws, BINS)[1] < LEVEL
    counts = bin_counts(tau, CI.draws, BINS)
    assert counts[: BINS // 2].sum() > counts[BINS // 2 :].sum()
    # The most precise study's effect is pinned too tightly to y_1: a U shape.
    coef = ranks["coef_study[S1,Intercept]"]
    assert chi_square_uniformity(coef, CI.draws, BINS)[1] < LEVEL
    counts = bin_counts(coef, CI.draws, BINS)
    assert min(counts[0], counts[-1]) > counts[1:-1].max()


def test_batch_entry_points_match_the_single_data_set_samplers():
    """The public batch samplers that SBC calls agree with the fitting entry points."""
    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    v = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]) ** 2
    kw = {"prior": TauPrior("uniform"), "chains": 3, "warmup": 20, "draws": 30}
    one = gibbs_meta(y, v, rng=np.random.default_rng(5), **kw)
    many = gibbs_meta_batch(np.tile(y, (3, 1)), v, rng=np.random.default_rng(5), **kw)
    # Same variates in the same order; only the summation order of two sums differs.
    np.testing.assert_allclose(many.theta, one.theta, rtol=0, atol=1e-9)
    with pytest.raises(InputError, match="2 data sets for 3 chains"):
        gibbs_meta_batch(np.tile(y, (2, 1)), v, rng=np.random.default_rng(5), **kw)
    n, ybar = [3, 5, 8], [1.0, 2.0, 0.5]
    priors = Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0))
    settings = GibbsSettings(chains=2, warmup=20, draws=10)
    single = gibbs_two_level(n, ybar, 4.0, priors=priors, rng=np.random.default_rng(6),
                             chains=2, warmup=20, draws=10)  # fmt: skip
    batch = gibbs_two_level_batch([n], [ybar], [4.0], priors, settings, np.random.default_rng(6))
    np.testing.assert_array_equal(batch.theta, single.theta)
    with pytest.raises(InputError, match="positive integers"):
        gibbs_two_level_batch(
            [[0, 5, 8]], [ybar], [4.0], priors, settings, np.random.default_rng(6)
        )


def test_chi_square_matches_scipy():
    ranks = np.random.default_rng(3).integers(0, 40, 500)
    counts = bin_counts(ranks, 39, BINS)
    assert counts.sum() == 500
    np.testing.assert_array_equal(counts, np.bincount(ranks // 4, minlength=BINS))
    ref = stats.chisquare(counts)
    statistic, p = chi_square_uniformity(ranks, 39, BINS)
    assert statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="divide"):
        bin_counts(ranks, 39, 7)


def test_ecdf_band_is_simultaneous_at_its_level():
    """Fresh uniform samples stay inside the 95% band 95% of the time (simulation check)."""
    n, points = 300, 40
    band = ecdf_band(n, points, alpha=0.05)
    assert band.gamma < 0.05  # wider than the pointwise 95% band, as a simultaneous band is
    rng = np.random.default_rng(99)  # not the band's own seed
    trials = 2000
    inside = sum(
        band.contains(ecdf_counts(rng.integers(0, 40, n), 39, points)) for _ in range(trials)
    )
    # SE of the fraction is 0.005 at 2000 trials; the band's own simulation adds
    # about 0.0035 (4000 samples), so 0.025 is over 4 combined SEs.
    assert inside / trials == pytest.approx(0.95, abs=0.025)
    # And a clearly non-uniform sample (ranks from a Beta(2, 2), a hump) leaves it.
    hump = np.floor(40 * rng.beta(2, 2, n)).astype(int)
    assert not band.contains(ecdf_counts(hump, 39, points))


def test_registry_and_rank_helpers():
    known = cases()
    for name in ("two_level_collapsed", "two_level_asis", "two_level_inv_gamma",
                 "two_level_known_sigma"):  # fmt: skip
        assert name in known and known[name].structure == "one_way"
    structures = {c.structure for c in known.values()}
    assert {"one_way", "lmm", "nested", "crossed", "meta"} <= structures
    with pytest.raises(ConfigError, match=r"unknown SBC case 'nope' \(known: crossed_collapsed"):
        get_case("nope")
    dup = SBCCase(
        "two_level_asis", "one_way", "dup", ("b_Intercept",), known["two_level_asis"].replicate
    )
    with pytest.raises(ValueError, match="registered twice"):
        register(dup)
    with pytest.raises(RuntimeError, match="non-finite"):
        ranks_of(np.array([0.0]), np.array([[np.nan, 1.0]]))
    assert ranks_of(np.array([0.5, 3.0]), np.array([[0.0, 1.0, 0.2], [1, 2, 4]])).tolist() == [2, 2]

    def bad(rng, r, s):
        return Replicates({"b_Intercept": np.zeros(r)}, {"b_Intercept": np.zeros((r, 3))})

    with pytest.raises(ValueError, match="expected"):
        run_case(SBCCase("shape_bug", "x", "", ("b_Intercept",), bad), 5, CI, derive_rng(1))
    assert [chunk_bounds(10, k, 3) for k in range(3)] == [(0, 4), (4, 3), (7, 3)]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs = set(), 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.ids |= {a["id"]} if "id" in a else set()
        self.imgs += tag == "img" and a.get("src", "").startswith("data:image/png;base64,")


def test_sbc_cli_chunks_and_report(tmp_path, capsys):
    args = ["--case", "two_level_known_sigma", "--replications", "50", "--chunks", "2",
            "--draws", "19", "--thin", "1", "--warmup", "50", "--seed", "4"]  # fmt: skip
    outs = [tmp_path / f"{k}.parquet" for k in range(2)]
    for k, out in enumerate(outs):
        assert main(["sbc", *args, "--chunk", str(k), "--out", str(out)]) == 0
    ranks = pd.concat([pd.read_parquet(p) for p in outs])
    case = get_case("two_level_known_sigma")
    assert sorted(ranks["replication"].unique()) == list(range(50))
    assert len(ranks) == 50 * len(case.parameters)
    assert ranks["rank"].between(0, 19).all()
    again = tmp_path / "again.parquet"
    assert main(["sbc", *args, "--chunk", "0", "--out", str(again)]) == 0
    assert again.read_bytes() == outs[0].read_bytes()  # a chunk is a pure function of its seed
    report = tmp_path / "report.html"
    assert main(["sbc-report", *map(str, outs), "--bins", "4", "--out", str(report)]) == 0
    page = _Page()
    page.feed(report.read_text())
    assert "two_level_known_sigma" in page.ids and page.imgs == 2
    assert main(["sbc", "--case", "nope", "--replications", "5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown SBC case 'nope'" in capsys.readouterr().err


def test_sbc_target_is_wired_and_not_part_of_all(tmp_path):
    cfg = {
        "studies": {"s": {"data": {"simulate": {"design": "two_level"}},
                          "formula": "score ~ 1 + (1 | school)", "fits": ["eb_reml"]}},
        "sbc": {"cases": ["two_level_asis"], "replications": 20, "chunks": 3},
    }  # fmt: skip
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))

    def planned(*target: str) -> list[str]:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
               "--directory", str(tmp_path), "-n", *target]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return [p.strip() for line in re.findall(r"^\s+output: (.+)$", proc.stdout, re.M)
                for p in line.split(",")]  # fmt: skip

    sbc = planned("sbc")
    want = [f"results/sbc/two_level_asis/{k}.parquet" for k in range(3)]
    assert sorted(sbc) == sorted([*want, "results/sbc/report.html"])
    assert not [p for p in planned() if p.startswith("results/sbc/")]
