"""The new-group predictive density against a dense multivariate normal."""

import numpy as np
import pytest
from scipy import stats as sps

from hierpipe.cv.logo import Predictive, group_log_density, score_group


@pytest.mark.parametrize("n", [1, 2, 7])
def test_group_log_density_equals_dense_mvn(n):
    rng = np.random.default_rng(n)
    y = 3 + rng.standard_normal(n) * 2
    mu, a, s2 = 2.5, 1.3, 4.1
    cov = s2 * np.eye(n) + a * np.ones((n, n))
    want = sps.multivariate_normal(mean=np.full(n, mu), cov=cov).logpdf(y)
    got = group_log_density(n, y.mean(), ((y - y.mean()) ** 2).sum(), mu, a, s2)
    assert got == pytest.approx(want, rel=1e-12)


def test_score_with_draws_is_log_mean_of_densities():
    rng = np.random.default_rng(0)
    y = np.array([1.0, 2.0, 4.0])
    mus = rng.normal(2, 0.3, 50)
    a = rng.uniform(0.5, 1.5, 50)
    s2 = rng.uniform(1, 2, 50)
    dens = [
        sps.multivariate_normal(np.full(3, m), v * np.eye(3) + aa).pdf(y)
        for m, aa, v in zip(mus, a, s2, strict=True)
    ]
    s = score_group(Predictive(mus, a, s2), 3, y.mean(), ((y - y.mean()) ** 2).sum(), rng)
    assert s.elpd == pytest.approx(np.log(np.mean(dens)), rel=1e-10)
    assert s.pred_q5 < s.pred_mean < s.pred_q95
