"""The meta-analysis Gibbs sampler against the exact posterior of meta_bayes.

The reference is :func:`hierpipe.models.meta_bayes.posterior_tau_grid`, which
integrates mu and theta out in closed form and was itself checked against a
brute-force grid over (mu, tau) and BDA3 (tests/test_meta.py); it shares no
code with the sampler. Monte Carlo error is judged with the sampler's own
effective sample size (hierpipe.diagnostics.convergence, Vehtari et al. 2021):
each check allows 4 MCSE (seeds are fixed, so a pass is reproducible; for a
random seed a correct sampler fails one such check with probability 6e-5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hierpipe.diagnostics.convergence import ess_bulk, mcse_mean, split_rhat
from hierpipe.errors import ConfigError
from hierpipe.models.gibbs_meta import TauPrior, gibbs_meta, tau_prior_from_config
from hierpipe.models.meta import log_risk_ratio
from hierpipe.models.meta_bayes import posterior_tau_grid
from hierpipe.seeds import derive_rng

DATA = Path(__file__).parent / "data"
CHAINS, WARMUP, DRAWS = 4, 500, 2500


def eight_schools() -> tuple[np.ndarray, np.ndarray]:
    d = pd.read_csv(DATA / "eight_schools.csv")
    return d["y"].to_numpy(float), d["sigma"].to_numpy(float) ** 2


def bcg() -> tuple[np.ndarray, np.ndarray]:
    d = pd.read_csv(DATA / "bcg.csv")
    return log_risk_ratio(d["tpos"], d["tneg"], d["cpos"], d["cneg"])


CASES = {
    # tau near 0 relative to the SEs: where a centred sampler sticks
    "eight_schools_uniform": (eight_schools, TauPrior("uniform")),
    "eight_schools_bounded": (eight_schools, TauPrior("uniform", 12.0)),
    "eight_schools_half_cauchy": (eight_schools, TauPrior("half_cauchy", 5.0)),
    # informative studies (tau^2 >> most v_j): where a non-centred sampler sticks
    "bcg_half_normal": (bcg, TauPrior("half_normal", 0.5)),
    "bcg_uniform": (bcg, TauPrior("uniform")),
}


def mcse_of_indicator(x: np.ndarray) -> float:
    return float(mcse_mean(x.astype(np.float64)))


@pytest.mark.parametrize("case", list(CASES))
def test_gibbs_matches_the_exact_posterior(case):
    data, prior = CASES[case]
    y, v = data()
    post = posterior_tau_grid(y, v, prior.family, prior.scale)
    g = gibbs_meta(y, v, prior=prior, chains=CHAINS, warmup=WARMUP, draws=DRAWS,
                   rng=derive_rng(20240611, "test_gibbs_meta", case))  # fmt: skip
    assert g.tau.shape == (CHAINS, DRAWS) and g.theta.shape == (CHAINS, DRAWS, y.size)
    assert float(np.max(split_rhat(np.stack([g.mu, g.tau], axis=-1)))) < 1.01
    # posterior means of mu, tau and every theta_j
    assert abs(g.mu.mean() - post.mu_mean) < 4 * float(mcse_mean(g.mu))
    assert abs(g.tau.mean() - post.mean) < 4 * float(mcse_mean(g.tau))
    for j in range(y.size):
        th = g.theta[:, :, j]
        assert abs(th.mean() - post.theta_mean[j]) < 4 * float(mcse_mean(th)), j
    # the whole distribution of tau: P(tau <= exact q-quantile) should be q
    for q in (0.1, 0.5, 0.9):
        below = g.tau <= float(post.quantile(q))
        assert abs(below.mean() - q) < 4 * mcse_of_indicator(below), q
    # posterior SD of tau: its MCSE is about sd / sqrt(2 ESS) for a light tail;
    # tau's kurtosis is up to ~9 here, so allow 6 of those (about 4 true MCSEs)
    ess = float(ess_bulk(g.tau))
    assert abs(g.tau.std() - post.sd) < 6 * post.sd / np.sqrt(2 * ess)
    if prior.family == "uniform" and prior.scale is not None:
        assert g.tau.max() <= prior.scale


def test_interweaving_mixes_in_both_regimes():
    """ESS of tau per draw: ASIS keeps it high where each parametrisation alone fails.

    Measured with these seeds (4 x 2500 draws): eight schools ASIS ~0.7 per draw,
    centred ~0.03; BCG ASIS ~0.5, non-centred ~0.04. The bounds leave a wide margin.
    """
    out = {}
    for name, data in (("schools", eight_schools), ("bcg", bcg)):
        y, v = data()
        for scheme in ("asis", "centred", "noncentred"):
            g = gibbs_meta(y, v, prior=TauPrior("uniform"), chains=CHAINS, warmup=WARMUP,
                           draws=DRAWS, rng=derive_rng(7, name, scheme), scheme=scheme)  # fmt: skip
            out[name, scheme] = float(ess_bulk(g.tau)) / (CHAINS * DRAWS)
    assert out["schools", "asis"] > 0.3 and out["bcg", "asis"] > 0.3
    assert out["schools", "asis"] > 5 * out["schools", "centred"]
    assert out["bcg", "asis"] > 5 * out["bcg", "noncentred"]


def test_same_generator_same_draws_and_one_chain_works():
    y, v = eight_schools()
    a = gibbs_meta(y, v, prior=TauPrior("uniform"), chains=2, warmup=10, draws=50,
                   rng=derive_rng(1, "x"))  # fmt: skip
    b = gibbs_meta(y, v, prior=TauPrior("uniform"), chains=2, warmup=10, draws=50,
                   rng=derive_rng(1, "x"))  # fmt: skip
    np.testing.assert_array_equal(a.theta, b.theta)
    one = gibbs_meta(y, v, prior=TauPrior("half_normal", 5.0), chains=1, warmup=0, draws=20,
                     rng=derive_rng(1, "y"))  # fmt: skip
    assert one.mu.shape == (1, 20) and np.all(one.tau > 0)
    assert set(one.info()["acceptance"]) == {"centred_tau", "noncentred_tau"}


@pytest.mark.parametrize(
    ("spec", "k", "match"),
    [
        ({"family": "gamma", "scale": 1.0}, 8, "unknown family 'gamma'"),
        ({"family": "half_cauchy"}, 8, "half_cauchy needs a scale"),
        ({"family": "half_normal", "scale": -1.0}, 8, "scale must be finite and > 0"),
        ({"family": "uniform"}, 2, "improper posterior with k = 2"),
        ({"family": "uniform", "shape": 2.0}, 8, "unknown key 'shape'"),
    ],
)
def test_prior_config_errors(spec, k, match):
    with pytest.raises(ConfigError, match=match):
        tau_prior_from_config(spec, k)


def test_defaults_and_bad_settings():
    assert tau_prior_from_config(None, 8) == TauPrior("uniform", None)
    assert tau_prior_from_config({"family": "uniform", "scale": 3}, 2) == TauPrior("uniform", 3.0)
    y, v = eight_schools()
    with pytest.raises(ConfigError, match="scheme"):
        gibbs_meta(y, v, prior=TauPrior("uniform"), rng=derive_rng(1), scheme="blocked")
    with pytest.raises(ConfigError, match="chains >= 1"):
        gibbs_meta(y, v, prior=TauPrior("uniform"), rng=derive_rng(1), chains=0)
