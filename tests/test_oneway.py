"""Pooling and empirical-Bayes estimators of y ~ 1 + (1 | g) against direct computations."""

import numpy as np
import pytest
from scipy import stats as sps

from hierpipe.data.groups import factorize, group_stats
from hierpipe.models import oneway


def make(seed=1, groups=12, lo=1, hi=15, tau=2.0, sigma=3.0, mu=5.0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi + 1, groups)
    codes = np.repeat(np.arange(groups), sizes)
    theta = mu + tau * rng.standard_normal(groups)
    y = theta[codes] + sigma * rng.standard_normal(codes.size)
    labels = tuple(f"g{i:02d}" for i in range(groups))
    return y, codes, labels


def summ(result):
    return result.summary.set_index("parameter")


def test_group_stats_match_pandas_and_survive_large_offsets():
    y, codes, labels = make()
    for shift in (0.0, 1e12):
        st = group_stats(y + shift, codes, labels)
        for j in range(len(labels)):
            yj = y[codes == j] + shift
            assert st.n[j] == yj.size
            # The mean to 1e-15 relative. For the spread, inputs near 1e12 are
            # themselves quantised at ~1e-4 (their ulp), so two correct ways of
            # taking the mean differ by an ulp and the SS by ~1e-8 relative;
            # a naive sum-of-squares formula would be off by ~1e4 relative here.
            assert st.ybar[j] == pytest.approx(yj.mean(), rel=1e-15)
            want = ((yj - yj.mean()) ** 2).sum()
            assert st.ss[j] == pytest.approx(want, rel=1e-12 if shift == 0 else 1e-7)


def test_factorize_sorts_labels_as_strings():
    codes, labels = factorize(np.array(["b", "a", "b", "c"], dtype=object))
    assert labels == ("a", "b", "c")
    assert codes.tolist() == [1, 0, 1, 2]


def test_complete_pooling_is_the_grand_mean_with_t_interval():
    y, codes, labels = make()
    s = summ(oneway.complete_pooling(group_stats(y, codes, labels), "g"))
    se = y.std(ddof=1) / np.sqrt(y.size)
    t = sps.t.ppf(0.95, y.size - 1)
    assert s.loc["b_Intercept", "mean"] == pytest.approx(y.mean(), rel=1e-12)
    assert s.loc["b_Intercept", "sd"] == pytest.approx(se, rel=1e-10)
    assert s.loc["b_Intercept", "q95"] == pytest.approx(y.mean() + t * se, rel=1e-10)
    assert s.loc["sigma", "mean"] == pytest.approx(y.std(ddof=1), rel=1e-10)


def test_no_pooling_uses_group_means_and_pooled_sigma():
    y, codes, labels = make()
    st = group_stats(y, codes, labels)
    s = summ(oneway.no_pooling(st, "g"))
    resid = y - st.ybar[codes]
    sigma = np.sqrt((resid**2).sum() / (y.size - len(labels)))
    assert s.loc["sigma", "mean"] == pytest.approx(sigma, rel=1e-10)
    j = 3
    name = f"coef_g[{labels[j]},Intercept]"
    assert s.loc[name, "mean"] == pytest.approx(y[codes == j].mean(), rel=1e-12)
    assert s.loc[name, "sd"] == pytest.approx(sigma / np.sqrt((codes == j).sum()), rel=1e-10)
    assert "b_Intercept" not in s.index


def test_moments_balanced_anova():
    # Balanced one-way ANOVA: tau2 = (MSB - MSW)/n exactly (n0 = n).
    y, codes, labels = make(lo=8, hi=8)
    st = group_stats(y, codes, labels)
    tau2, sigma2, n0 = oneway.moments_variances(st)
    means = np.array([y[codes == j].mean() for j in range(len(labels))])
    msb = 8 * ((means - y.mean()) ** 2).sum() / (len(labels) - 1)
    msw = sum(((y[codes == j] - means[j]) ** 2).sum() for j in range(len(labels))) / (
        y.size - len(labels)
    )
    assert n0 == pytest.approx(8)
    assert sigma2 == pytest.approx(msw, rel=1e-12)
    assert tau2 == pytest.approx((msb - msw) / 8, rel=1e-10)


def test_eb_fit_equals_dense_gls_and_blup():
    # Against the dense mixed-model formulas: V = tau2 ZZ' + sigma2 I,
    # beta = (1'V^-1 1)^-1 1'V^-1 y, BLUP r = tau2 Z'V^-1 (y - beta).
    y, codes, labels = make(groups=6, lo=1, hi=6)
    st = group_stats(y, codes, labels)
    tau2, sigma2 = 1.7, 2.9
    z = np.eye(len(labels))[codes]
    v = tau2 * z @ z.T + sigma2 * np.eye(y.size)
    vi = np.linalg.inv(v)
    one = np.ones(y.size)
    beta = one @ vi @ y / (one @ vi @ one)
    r = tau2 * z.T @ vi @ (y - beta)
    s = summ(oneway.eb_fit(st, "g", tau2, sigma2, info={}))
    assert s.loc["b_Intercept", "mean"] == pytest.approx(beta, rel=1e-10)
    assert s.loc["b_Intercept", "sd"] == pytest.approx(np.sqrt(1 / (one @ vi @ one)), rel=1e-10)
    for j, lab in enumerate(labels):
        assert s.loc[f"r_g[{lab},Intercept]", "mean"] == pytest.approx(r[j], rel=1e-8, abs=1e-12)
        assert s.loc[f"coef_g[{lab},Intercept]", "mean"] == pytest.approx(beta + r[j], rel=1e-10)
    # Conditional SD of r_j given beta: tau2 - tau2^2 n_j / (sigma2 + n_j tau2).
    n0 = st.n[0]
    want = np.sqrt(tau2 - tau2**2 * n0 / (sigma2 + n0 * tau2))
    assert s.loc[f"r_g[{labels[0]},Intercept]", "sd"] == pytest.approx(want, rel=1e-10)
    assert s.loc["icc_g", "mean"] == pytest.approx(tau2 / (tau2 + sigma2))
