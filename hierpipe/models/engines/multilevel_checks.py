r"""Optional engine functions of the multilevel engine: model checks and cross-validation.

The model (:mod:`hierpipe.models.engines.multilevel`) is

.. math::
    y = X\beta + \sum_{k=1}^K Z_k b_k + e,\qquad b_k \sim N(0, \sigma_k^2 I),\qquad
    e \sim N(0, \sigma^2 I),

nested (``(1 | school/classroom)``) or crossed (``(1 | student) + (1 | teacher)``),
reduced once to per-cell statistics (:class:`~hierpipe.models.variance_components.CellStats`;
a cell is a distinct combination of the factors' groups). "Group" below means a
group of the first grouping factor of the formula (``design.random[0]``, the
factor that leave-one-group-out holds out and the diagnose stage tabulates).
:mod:`hierpipe.models.engines.multilevel` re-exports everything here; the
interface is described in :mod:`hierpipe.models.engines`.

What each check does for nested and crossed models:

* ``ppc_replicates``: exact per-cell sufficient statistics (no rows simulated);
* ``prior_predictive``, ``residuals``: as for the one-way model, every factor;
* ``james_stein_table``: nested models whose first factor is the top level and
  with no predictors (sampling variances from Henderson's method I within the
  top-level groups); None otherwise, with the reason in
  :func:`james_stein_unavailable`;
* ``logo_log_lik``: per-cell closed form for nested models whose first factor is
  the top level; otherwise (crossed) the conditional density
  :math:`p(y_j \mid y_{-j}, \beta, \sigma)` from two evaluations of the
  block-elimination evaluator (see :func:`logo_log_lik`);
* ``kfold_split`` / ``score_kfold``: within-group K-fold with the columns of
  :mod:`hierpipe.models.engines.one_way_checks`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import logsumexp

from hierpipe.cv.psis import weighted_quantile
from hierpipe.diagnostics.ppc import BLOCK_VALUES, Replicates, thin_indices
from hierpipe.diagnostics.residuals import residual_table
from hierpipe.diagnostics.shrinkage import james_stein
from hierpipe.models.structure import Structure
from hierpipe.models.variance_components import CellStats, cell_stats, icc_denominators, iccs

if TYPE_CHECKING:
    from hierpipe.models.engines.multilevel import Prepared

PPC_REPLICATES = 400
PRIOR_DRAWS = 4000
Z90 = 1.6448536269514722
LOG_2PI = float(np.log(2.0 * np.pi))


# --------------------------------------------------------------------------- helpers


def _nested_top(prep: Prepared) -> bool:
    """True when the factors are nested and the first factor is the top level."""
    return prep.order is not None and prep.order[0] == prep.group_index


def _centred(st: CellStats, beta: np.ndarray) -> np.ndarray:
    """beta (S, p) on the data's scale -> on the statistics' scale (y - shift)."""
    out = np.array(beta, dtype=np.float64, copy=True)
    if st.intercept is not None:
        out[:, st.intercept] -= float(st.shift[0])
    return out


@dataclass(frozen=True)
class _Hyper:
    """Fixed effects (S, p) on the data's scale, factor variances (S, K), sigma^2 (S,)."""

    beta: np.ndarray
    var: np.ndarray
    sigma2: np.ndarray

    @property
    def size(self) -> int:
        return int(self.sigma2.size)


def _hyper_draws(st: CellStats, draws: pd.DataFrame) -> _Hyper:
    cols = [draws[f"b_{n}"].to_numpy(dtype=np.float64) for n in st.fixed_names]
    beta = np.column_stack(cols) if cols else np.zeros((len(draws), 0))
    sd = np.column_stack(
        [draws[f"sd_{f}__Intercept"].to_numpy(dtype=np.float64) for f in st.factors]
    )
    sigma = draws["sigma"].to_numpy(dtype=np.float64)
    return _Hyper(beta, sd**2, sigma**2)


def _effect_names(st: CellStats, k: int) -> list[str]:
    return [f"r_{st.factors[k]}[{lab},Intercept]" for lab in st.labels[k]]


def _estimates(st: CellStats, summary: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Point estimates: beta (p,), each factor's effects (0 where the fit has none), sigma."""
    est = summary.set_index("parameter")["mean"]
    beta = np.array([float(est.get(f"b_{n}", np.nan)) for n in st.fixed_names])
    effects = [
        np.nan_to_num(est.reindex(_effect_names(st, k)).to_numpy(dtype=np.float64))
        for k in range(st.K)
    ]
    return beta, effects, float(est.get("sigma", np.nan))


def _group_cells(st: CellStats, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells ordered by their group of factor ``g``, and where each group's cells start."""
    order = np.argsort(st.codes[:, g], kind="stable")
    starts = np.searchsorted(st.codes[order, g], np.arange(len(st.labels[g])))
    return order, starts


def _cell_blocks(st: CellStats, g: int, per_block: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Consecutive blocks of groups of factor ``g`` holding at most ``per_block`` cells.

    A block holds at least one group, so a group with more cells than
    ``per_block`` is a block of its own. Yields (first group, stop, cells in
    group order).
    """
    order, starts = _group_cells(st, g)
    ends = np.append(starts[1:], order.size)
    G = len(st.labels[g])
    first = 0
    while first < G:
        stop = first + 1
        while stop < G and ends[stop] - starts[first] <= per_block:
            stop += 1
        yield first, stop, order[starts[first] : ends[stop - 1]]
        first = stop


# --------------------------------------------------------------------------- PPC


def _cell_replicates(
    theta: np.ndarray,
    sigma: np.ndarray,
    n: np.ndarray,
    ncp: np.ndarray | None,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    r"""Replicated statistics of each cell's rows: mean, within sum of squares, min, max.

    Given the cell's mean function the rows are :math:`y_i = \mu_i + e_i`; with
    :math:`\mu_i = \theta_c + (x_i - \bar x_c)\beta`, :math:`\bar y_c \sim
    N(\theta_c, \sigma^2/n_c)` independently of :math:`S_c = \sum_i (y_i - \bar
    y_c)^2 \sim \sigma^2 \chi'^2_{n_c - 1}(\lambda)`, :math:`\lambda =
    \beta^\top W_{xx,c}\beta/\sigma^2` (noncentral; central when :math:`x` is
    constant within the cell). Minimum and maximum are exact only when the rows
    share one mean (``ncp`` zero): :math:`\theta_c \mp \sigma\Phi^{-1}(U^{1/n_c})`
    (:mod:`hierpipe.diagnostics.ppc`); NaN otherwise, since the cell statistics
    do not keep each row's :math:`x_i`.
    """
    from scipy.special import ndtri

    r, m = theta.shape
    s = sigma[:, None]
    mean = theta + s / np.sqrt(n) * rng.standard_normal((r, m))
    df = np.broadcast_to(np.maximum(n - 1.0, 1.0), (r, m))
    if ncp is None:
        chi = rng.chisquare(df)
    else:
        chi = rng.noncentral_chisquare(df, np.maximum(ncp / s**2, 0.0))
    ss = np.where(n > 1, s**2 * chi, 0.0)
    upper = -np.expm1(np.log(rng.random((r, m))) / n)
    lower = -np.expm1(np.log(rng.random((r, m))) / n)
    lo = theta + s * ndtri(lower)
    hi = theta - s * ndtri(upper)
    if ncp is not None:
        # a predictor constant within the cell leaves rounding-level cross-products;
        # below 1e-12 of sigma^2 its rows share one mean for any practical purpose
        varying = np.any(ncp > 1e-12 * s**2, axis=0)
        lo[:, varying] = np.nan
        hi[:, varying] = np.nan
    return {"mean": mean, "ss": ss, "min": lo, "max": hi}


def _group_replicates(
    cell: dict[str, np.ndarray], n: np.ndarray, group: np.ndarray, n_groups: int
) -> dict[str, np.ndarray]:
    r"""Cells (sorted by ``group``, codes 0..n_groups-1) -> groups' mean, SD, min, max.

    :math:`n_j\bar y_j = \sum_c n_c\bar y_c`, :math:`S_j = \sum_c S_c + \sum_c
    n_c(\bar y_c - \bar y_j)^2`, extremes are the extremes of the cells'.
    """
    starts = np.searchsorted(group, np.arange(n_groups))
    n_j = np.add.reduceat(n, starts)
    mean = np.add.reduceat(cell["mean"] * n, starts, axis=1) / n_j
    dev = cell["mean"] - mean[:, group]
    ss = np.add.reduceat(cell["ss"] + n * dev**2, starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(n_j > 1, np.sqrt(ss / (n_j - 1.0)), np.nan)
    return {
        "mean": mean,
        "sd": sd,
        "min": np.minimum.reduceat(cell["min"], starts, axis=1),
        "max": np.maximum.reduceat(cell["max"], starts, axis=1),
    }


def _all_effects_stored(st: CellStats, draws: pd.DataFrame) -> bool:
    return all(set(_effect_names(st, k)) <= set(draws.columns) for k in range(st.K))


def _draw_effects(
    st: CellStats,
    order: tuple[int, ...] | None,
    h: _Hyper,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    r"""Every factor's effects :math:`b \mid \beta, \sigma_{1..K}, \sigma, y`, a set a row of ``h``.

    Exact joint draws by the engine's evaluator (top-down for nested factors,
    the block Cholesky factor for crossed ones), as the sampler draws them; in
    chunks of rows so that the crossed evaluator's (rows x q x q) Schur
    complements stay within :data:`~hierpipe.diagnostics.ppc.BLOCK_VALUES`.
    """
    from hierpipe.models.crossed_reml import CrossedEvaluator
    from hierpipe.models.gibbs_multilevel import residual_sums
    from hierpipe.models.nested_reml import NestedEvaluator

    ev = NestedEvaluator(st, order) if order is not None else CrossedEvaluator(st)
    q = getattr(ev, "q2", 0)
    chunk = max(1, BLOCK_VALUES // max(1, q * q + st.n_cells))
    out: list[list[np.ndarray]] = [[] for _ in range(st.K)]
    sums = st.sums
    for a in range(0, h.size, chunk):
        sl = slice(a, min(a + chunk, h.size))
        s2 = h.sigma2[sl]
        theta2 = h.var[sl] / s2[:, None]
        resid = residual_sums(sums, _centred(st, h.beta[sl]))
        for k, e in enumerate(ev.draw(theta2, np.sqrt(s2), resid, rng)):
            out[k].append(e)
    return [np.concatenate(parts, axis=0) for parts in out]


def _cell_means(st: CellStats, cells: np.ndarray, beta: np.ndarray, effects: list) -> np.ndarray:
    """(R, cells) mean of each listed cell: :math:`\\bar x_c\\beta + \\sum_k b_k`."""
    xbar = st.zbar[0, cells, : st.p]
    theta = beta @ xbar.T if st.p else np.zeros((beta.shape[0], cells.size))
    for k in range(st.K):
        theta = theta + effects[k][:, st.codes[cells, k]]
    return theta


def ppc_replicates(
    prep: Prepared,
    structure: Structure,
    summary: pd.DataFrame,
    draws: pd.DataFrame | None,
    rng: np.random.Generator,
    replicates: int = PPC_REPLICATES,
) -> Replicates:
    r"""Test statistics of replicated data sets (:mod:`hierpipe.diagnostics.ppc`).

    Per replicate and cell :math:`c` the cell's mean :math:`\theta_c = \bar
    x_c\beta + \sum_k b_{k, g_k(c)}`; its rows' mean, within sum of squares,
    minimum and maximum are drawn from their exact distributions
    (:func:`_cell_replicates`) and combined into each group's mean, SD, minimum
    and maximum (:func:`_group_replicates`), so a replicate costs
    :math:`O(\text{cells})` whatever the number of rows. With predictors that
    vary within a cell the minimum and maximum of its group are NaN (the cell
    statistics do not keep the rows' :math:`x`); mean and SD stay exact.

    Samplers: one replicate per posterior draw, thinned evenly to
    ``replicates``. Unless ``draws.parquet`` stores every group's effects,
    all effects are drawn jointly from :math:`b \mid \beta, \sigma_{1..K},
    \sigma, y` (:func:`_draw_effects`), so each replicate is a draw from the
    joint posterior. Nested models whose first factor is the top level draw them
    a block of top-level groups at a time (the groups are independent given
    the variances and :math:`\beta`), so memory is bounded by a block; for
    crossed models the effects are dependent across groups and all of them are
    held, replicates x (sum of the factors' groups) values.
    Point estimators: ``replicates`` data sets simulated at the estimates
    :math:`(\hat\beta, \hat b, \hat\sigma)` (a parametric bootstrap; the
    estimates' own uncertainty is not propagated; complete pooling has no effects).
    """
    st = prep.stats
    g = prep.group_index
    ncp_w = st.within[0, :, : st.p, : st.p] if st.p else None
    varies = ncp_w is not None and bool(np.any(np.abs(ncp_w) > 0))
    if draws is not None:
        idx = thin_indices(len(draws), replicates)
        sub = draws.iloc[idx]
        h = _hyper_draws(st, sub)
        beta, sigma = h.beta, np.sqrt(h.sigma2)
        stored = _all_effects_stored(st, sub)
        how = (
            "effects as stored in draws.parquet"
            if stored
            else "all effects drawn jointly from their conditional given the draw's "
            "fixed effects and variances"
        )
        note = (
            f"one replicate per posterior draw, {idx.size} of {len(draws)} draws taken "
            f"evenly; {how}"
        )
        if stored:
            effects: list[np.ndarray] | None = [
                sub[_effect_names(st, k)].to_numpy(dtype=np.float64) for k in range(st.K)
            ]
        elif _nested_top(prep):
            effects = None  # drawn block by block below
        else:
            effects = _draw_effects(st, prep.order, h, rng)
    else:
        b_hat, e_hat, s_hat = _estimates(st, summary)
        beta = np.broadcast_to(b_hat, (replicates, st.p))
        sigma = np.full(replicates, s_hat)
        effects = [np.broadcast_to(e, (replicates, e.size)) for e in e_hat]
        note = (
            f"parametric simulation at the estimates: {replicates} data sets drawn from "
            "N(fixed effects + every factor's effect estimates, sigma estimate^2); the "
            "estimates' uncertainty is not propagated"
        )
    if varies:
        note += "; min and max are NaN where predictors vary within a cell"
    count = sigma.size
    per_block = max(1, BLOCK_VALUES // max(1, count))

    def blocks():
        for first, stop, cells in _cell_blocks(st, g, per_block):
            if effects is None:
                theta = _block_nested_theta(prep, cells, h, rng)
            else:
                theta = _cell_means(st, cells, beta, effects)
            ncp = None
            if varies:
                ncp = np.einsum("ri,cij,rj->rc", beta, ncp_w[cells], beta)
            cell = _cell_replicates(theta, sigma, st.n[cells], ncp, rng)
            group = st.codes[cells, g] - first
            yield first, stop, _group_replicates(cell, st.n[cells], group, stop - first)

    return Replicates(count=count, blocks=blocks(), note=note)


def _block_nested_theta(
    prep: Prepared, cells: np.ndarray, h: _Hyper, rng: np.random.Generator
) -> np.ndarray:
    """Cell means of one block of top-level groups, effects drawn for that block only."""
    st = prep.stats
    keep = np.zeros(st.n_cells, dtype=bool)
    keep[cells] = True
    sub = st.subset(keep)
    effects = _draw_effects(sub, prep.order, h, rng)
    # subset keeps the cells in their original relative order; map ours to it
    pos = np.searchsorted(np.flatnonzero(keep), cells)
    return _cell_means(sub, pos, h.beta, effects)


# --------------------------------------------------------------------------- prior predictive


def prior_predictive(
    prep: Prepared,
    structure: Structure,
    info: dict[str, Any],
    rng: np.random.Generator,
    size: int = PRIOR_DRAWS,
) -> pd.DataFrame | None:
    r"""Draws from the sampler's priors and what they imply on the outcome's scale.

    Per draw: each factor's :math:`\sigma_k` (one prior shared by the factors,
    drawn independently), :math:`\sigma`, the ICCs (the engine's definitions),
    the outcome's SD about the fixed part :math:`\sqrt{\sum_k\sigma_k^2 +
    \sigma^2}`, a new group's deviation :math:`\sigma_{1} z_1` (first factor),
    a new observation's deviation :math:`\sum_k \sigma_k z_k + \sigma z_0`
    (new groups of every factor) and, with a normal prior on ``b_Intercept``,
    the new observation itself (NaN under the flat prior).
    """
    from hierpipe.models.engines.one_way_checks import draw_scale

    priors = info.get("priors")
    if not priors or "sd" not in priors or "sigma" not in priors:
        return None
    st = prep.stats
    sd = np.column_stack([draw_scale(priors["sd"], rng, size) for _ in range(st.K)])
    sigma = draw_scale(priors["sigma"], rng, size)
    b = priors.get("b_Intercept", {"family": "flat"})
    if b.get("family") == "normal":
        mu = float(b["mean"]) + float(b["sd"]) * rng.standard_normal(size)
    else:
        mu = np.full(size, np.nan)
    z = rng.standard_normal((size, st.K))
    group_dev = sd[:, prep.group_index] * z[:, prep.group_index]
    obs_dev = (sd * z).sum(axis=1) + sigma * rng.standard_normal(size)
    icc = iccs(sd**2, sigma**2, icc_denominators(st, prep.order))
    out = {"draw": np.arange(size, dtype=np.int64), "b_Intercept": mu}
    out |= {f"sd_{f}__Intercept": sd[:, k] for k, f in enumerate(st.factors)}
    out["sigma"] = sigma
    out |= {f"icc_{f}": icc[:, k] for k, f in enumerate(st.factors)}
    out["outcome_sd"] = np.sqrt((sd**2).sum(axis=1) + sigma**2)
    out["new_group_deviation"] = group_dev
    out["new_observation_deviation"] = obs_dev
    out["new_observation"] = mu + obs_dev
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- residuals


def residuals(
    design: Any, prep: Prepared, structure: Structure, summary: pd.DataFrame
) -> pd.DataFrame:
    r"""Conditional Pearson residuals (:mod:`hierpipe.diagnostics.residuals`).

    Fitted :math:`\hat y_i = x_i\hat\beta + \sum_k \hat b_{k, g_k(i)}` with every
    factor's effect (lme4's ``fitted``; statsmodels' ``fittedvalues``), over
    :math:`\hat\sigma`; posterior means for samplers; complete pooling has no
    effects.
    """
    st = prep.stats
    beta, effects, sigma = _estimates(st, summary)
    fitted = design.X @ beta if st.p else np.zeros(design.n_obs)
    for k, term in enumerate(design.random):
        fitted = fitted + effects[k][term.codes]
    first = design.random[0]
    return residual_table(design.y, fitted, sigma, first.codes, first.labels)


# --------------------------------------------------------------------------- James-Stein


def james_stein_unavailable(prep: Prepared, structure: Structure | None = None) -> str | None:
    """Why no sound James–Stein comparison exists for this model (None when it does)."""
    st = prep.stats
    if prep.order is None:
        return (
            "crossed factors: a group's raw mean carries the effects of the other factors' "
            "groups, shared with other groups, so the raw means are not independent given "
            "the group effects as James-Stein/Efron-Morris assume"
        )
    if not _nested_top(prep):
        return (
            f"the first factor ({st.factors[prep.group_index]}) is not the top of the "
            "nesting, so its raw means share their parents' effects"
        )
    if st.p != 1 or st.intercept is None:
        return "fixed predictors: the raw group means are not exchangeable estimates of the groups"
    if len(st.labels[prep.group_index]) < 2:
        return "fewer than two groups"
    if st.n_obs - st.n_cells <= 0 or float(st.pooled_within[0, st.p, st.p]) <= 0:
        return "no within-cell replication to estimate sigma^2"
    return None


def lower_components(prep: Prepared) -> tuple[np.ndarray, float]:
    r"""Henderson's method I for the variances below the top level of a nested model.

    With levels :math:`l = 0` (top) to :math:`L-1` (the cells),
    :math:`SS_l = \sum_{h \in l} n_h(\bar y_h - \bar y_{\text{parent}(h)})^2`
    (:math:`l \ge 1`) and the pooled within-cell :math:`S_W`,

    .. math::
        E[S_W] = (N - G_{L-1})\sigma^2,\qquad
        E[SS_l] = (G_l - G_{l-1})\sigma^2 + \sum_{m \ge l} c_{lm}\sigma_m^2,\qquad
        c_{lm} = \sum_{g \in m}\Big(\frac{n_g^2}{n_{a_l(g)}} - \frac{n_g^2}{n_{a_{l-1}(g)}}\Big),

    :math:`a_l(g)` the level-:math:`l` ancestor of :math:`g` (Searle, Casella &
    McCulloch 1992, sec. 5.2); solved from the bottom up, negative values set
    to 0. Every statistic is a within-top-group contrast, so under the model the
    estimates are independent of the top-level group means.

    Returns
    -------
    (var, sigma2) : variances of levels 1..L-1 (in nesting order) and sigma^2.
    """
    st = prep.stats
    order = prep.order
    assert order is not None
    p = st.p
    L = len(order)
    cell_sum = st.n * st.zbar[0, :, p]
    sizes = [st.group_sizes(order[lvl]) for lvl in range(L)]
    means = [
        np.bincount(st.codes[:, order[lvl]], weights=cell_sum, minlength=sizes[lvl].size)
        / sizes[lvl]
        for lvl in range(L)
    ]
    sigma2 = float(st.pooled_within[0, p, p]) / (st.n_obs - st.n_cells)
    var = np.zeros(L - 1)
    for lvl in range(L - 1, 0, -1):
        codes_l, codes_u = st.codes[:, order[lvl]], st.codes[:, order[lvl - 1]]
        parent = np.zeros(sizes[lvl].size, dtype=np.int64)
        parent[codes_l] = codes_u
        ss = float(np.sum(sizes[lvl] * (means[lvl] - means[lvl - 1][parent]) ** 2))
        rhs = ss - (sizes[lvl].size - sizes[lvl - 1].size) * sigma2
        for m in range(lvl + 1, L):
            rhs -= _henderson_c(st, order, lvl, m, sizes) * var[m - 1]
        c = _henderson_c(st, order, lvl, lvl, sizes)
        var[lvl - 1] = max(rhs / c, 0.0) if c > 0 else 0.0
    return var, sigma2


def _henderson_c(st: CellStats, order, lvl: int, m: int, sizes: list[np.ndarray]) -> float:
    """:math:`c_{lm}` of :func:`lower_components`."""
    n_g = sizes[m]
    codes_m = st.codes[:, order[m]]
    anc = np.zeros(n_g.size, dtype=np.int64)
    anc_up = np.zeros(n_g.size, dtype=np.int64)
    anc[codes_m] = st.codes[:, order[lvl]]
    anc_up[codes_m] = st.codes[:, order[lvl - 1]]
    return float(np.sum(n_g**2 / sizes[lvl][anc] - n_g**2 / sizes[lvl - 1][anc_up]))


def _within_top_weights(prep: Prepared) -> list[np.ndarray]:
    """Per level below the top: :math:`\\sum_{g \\subset j} n_g^2 / n_j^2` for each top group j."""
    st = prep.stats
    order = prep.order
    assert order is not None
    top = order[0]
    n_top = st.group_sizes(top)
    out = []
    for lvl in range(1, len(order)):
        n_g = st.group_sizes(order[lvl])
        anc = np.zeros(n_g.size, dtype=np.int64)
        anc[st.codes[:, order[lvl]]] = st.codes[:, top]
        out.append(np.bincount(anc, weights=n_g**2, minlength=n_top.size) / n_top**2)
    return out


def james_stein_table(
    prep: Prepared, structure: Structure
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    r"""James–Stein / Efron–Morris estimates of the top-level groups' means (nested models).

    Given its own effect :math:`a_j`, the raw mean of top-level group :math:`j`
    is unbiased for :math:`\beta_0 + a_j` with sampling variance
    :math:`D_j = \sum_{l \ge 1}\sigma_l^2 \sum_{g \in l, g \subset j} n_g^2/n_j^2 +
    \sigma^2/n_j` (its sub-groups' effects and the residuals average in), and the
    raw means of different groups are independent. The variances are estimated
    within the top-level groups (:func:`lower_components`) and treated as known,
    as the one-way engine treats its pooled :math:`s^2`. None (with the reason
    in :func:`james_stein_unavailable`) for crossed models, a first factor that
    is not the top level, fixed predictors, or no within-cell replication.
    """
    if james_stein_unavailable(prep) is not None:
        return None
    st = prep.stats
    top = prep.group_index
    var, sigma2 = lower_components(prep)
    n_top = st.group_sizes(top)
    d = sigma2 / n_top
    for v, w in zip(var, _within_top_weights(prep), strict=True):
        d = d + v * w
    ybar = (
        np.bincount(st.codes[:, top], weights=st.n * st.zbar[0, :, st.p], minlength=n_top.size)
        / n_top
        + st.shift[0]
    )
    js = james_stein(ybar, d)
    table = pd.DataFrame(
        {
            "group": pd.Series(st.labels[top], dtype=str),
            "james_stein": js.estimate,
            "js_shrinkage": js.shrinkage,
        }
    )
    assert prep.order is not None
    facts = {
        "form": js.form,
        "sigma2": float(sigma2),
        "lower_variances": {
            st.factors[k]: float(v) for k, v in zip(prep.order[1:], var, strict=True)
        },
        "sampling_variance": "sum of the lower levels' variances (Henderson's method I "
        "within the top-level groups) x sum n_g^2/n_j^2, plus sigma^2/n_j",
        "a_hat": float(js.a_hat),
        "centre": float(js.centre),
        "effective_parameters": js.effective_parameters,
    }
    return table, facts


# --------------------------------------------------------------------------- PSIS-LOGO


def _nested_group_loglik(st: CellStats, order, h: _Hyper, cells: np.ndarray) -> np.ndarray:
    r""":math:`\log p(y_j \mid \beta, \sigma_{1..K}, \sigma)` of the top-level groups of ``cells``.

    Per draw, residual cell means :math:`\bar e_c = \bar y_c - \bar x_c\beta` and
    within sums of squares :math:`w_c = v^\top W_c v`, :math:`v = (-\beta, 1)`; then
    up the levels with :math:`\theta_l = \sigma_l^2/\sigma^2` (Woodbury and the
    determinant lemma, as in :mod:`hierpipe.models.nested_reml`): at the cells
    :math:`q_c = w_c + n_c\bar e_c^2/d_c`, :math:`t_c = n_c\bar e_c/d_c`,
    :math:`m_c = n_c/d_c`, :math:`d_c = 1 + \theta_{L-1} n_c`; a group :math:`h`
    of a higher level sums its children's :math:`(q, t, m, \log d)` into
    :math:`(Q, T, M, \Lambda)`, :math:`d_h = 1 + \theta_l M`, and has
    :math:`q_h = Q - \theta_l T^2/d_h`, :math:`t_h = T/d_h`, :math:`m_h = M/d_h`,
    :math:`\log|V_h| = \Lambda + \log d_h`. Then :math:`\log p = -\tfrac12[n_j
    \log(2\pi\sigma^2) + \log|V_j| + q_j/\sigma^2]`. Cost :math:`O(S \cdot
    \text{cells})`.

    Returns (S, top-level groups of ``cells``), the groups in code order.
    """
    p = st.p
    beta_c = _centred(st, h.beta)
    v = np.concatenate([-beta_c, np.ones((h.size, 1))], axis=1)
    zbar = st.zbar[0, cells]
    n = st.n[cells]
    ebar = zbar[:, p][None, :] - (beta_c @ zbar[:, :p].T if p else 0.0)
    w = np.einsum("si,cij,sj->sc", v, st.within[0, cells], v)
    theta = h.var[:, list(order)] / h.sigma2[:, None]
    L = len(order)
    d = 1.0 + theta[:, L - 1, None] * n
    q = w + n * ebar**2 / d
    t = n * ebar / d
    m = n / d
    logdet = np.log(d)
    # the cells are the innermost groups, so the innermost level's index is the cell's
    child = np.arange(cells.size)
    for lvl in range(L - 2, -1, -1):
        up = np.unique(st.codes[cells, order[lvl]], return_inverse=True)[1].reshape(-1)
        parent = np.zeros(int(child.max()) + 1, dtype=np.int64)
        parent[child] = up
        agg = sparse.csr_matrix(
            (np.ones(parent.size), (np.arange(parent.size), parent)),
            shape=(parent.size, int(up.max()) + 1),
        )
        Q, T, M, LD = (np.asarray(x @ agg) for x in (q, t, m, logdet))
        dh = 1.0 + theta[:, lvl, None] * M
        q = Q - theta[:, lvl, None] * T**2 / dh
        t, m = T / dh, M / dh
        logdet = LD + np.log(dh)
        child = up
    n_j = np.bincount(child, weights=n)
    return -0.5 * (n_j * (LOG_2PI + np.log(h.sigma2[:, None])) + logdet + q / h.sigma2[:, None])


def _held_out_stats(prep: Prepared, j: int) -> tuple[np.ndarray, CellStats]:
    st = prep.stats
    keep = st.codes[:, prep.group_index] != j
    return keep, st.subset(keep)


def _conditional_loglik(prep: Prepared, j: int, h: _Hyper) -> np.ndarray:
    r""":math:`\log p(y_j \mid y_{-j}, \beta, \sigma_{1..K}, \sigma) = \log p(y \mid \cdot) -
    \log p(y_{-j} \mid \cdot)`, each from the evaluator's :math:`(\log|V_\theta|, Q)`."""
    from hierpipe.models.variance_components import make_evaluator

    st = prep.stats
    _, sub = _held_out_stats(prep, j)
    q = max(len(lab) for lab in st.labels)
    chunk = max(1, BLOCK_VALUES // max(1, q * q + st.n_cells))
    out = np.empty(h.size)
    evs = [(make_evaluator(st), st, 1.0), (make_evaluator(sub), sub, -1.0)]
    for a in range(0, h.size, chunk):
        sl = slice(a, min(a + chunk, h.size))
        s2 = h.sigma2[sl]
        total = np.zeros(s2.size)
        for ev, stats, sign in evs:
            logdet, Q = ev.terms(h.var[sl] / s2[:, None])
            v = np.concatenate([-_centred(stats, h.beta[sl]), np.ones((s2.size, 1))], axis=1)
            quad = np.einsum("si,sij,sj->s", v, Q, v)
            ll = -0.5 * (stats.n_obs * (LOG_2PI + np.log(s2)) + logdet + quad / s2)
            total += sign * ll
        out[sl] = total
    return out


def logo_log_lik(
    prep: Prepared,
    structure: Structure,
    draws: pd.DataFrame,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    r"""Log density of each group's observations given each draw, shape (S, G).

    PSIS leave-one-group-out reweights the draws :math:`\phi = (\beta,
    \sigma_{1..K}, \sigma)` by :math:`1/p(y_j \mid y_{-j}, \phi)`, since
    :math:`p(\phi \mid y_{-j}) \propto p(\phi \mid y)/p(y_j \mid y_{-j}, \phi)`;
    every effect is integrated out.

    Nested models whose first factor is the top level: given :math:`\phi` the
    top-level groups are independent, so :math:`p(y_j \mid y_{-j}, \phi) =
    p(y_j \mid \phi)`, with the group's own effect and all its sub-groups'
    effects integrated out, in closed form from the group's cells
    (:func:`_nested_group_loglik`, :math:`O(S \cdot \text{cells})` for all groups).

    Crossed models (and a first factor below the top of a nesting): the held-out
    group shares the other factors' groups with the rest of the data, so
    :math:`p(y_j \mid y_{-j}, \phi)` does not reduce to the group's own cells.
    It is computed as :math:`\log p(y \mid \phi) - \log p(y_{-j} \mid \phi)`,
    two evaluations of the engine's evaluator
    (:mod:`hierpipe.models.crossed_reml`) over the draws:
    :math:`O(S(\text{cells} + \text{pairs} + q_R^3))` a group, :math:`q_R` the
    groups of the factors other than the largest. That is no per-cell shortcut,
    but it is still one evaluation a draw where an exact refit of the sampler
    costs (warm-up + draws) x Metropolis steps evaluations a chain, so it is kept.
    """
    st = prep.stats
    h = _hyper_draws(st, draws)
    g = np.arange(len(st.labels[prep.group_index])) if groups is None else np.asarray(groups)
    if _nested_top(prep):
        top = prep.group_index
        cells = np.flatnonzero(np.isin(st.codes[:, top], g))
        cells = cells[np.argsort(st.codes[cells, top], kind="stable")]
        ll = _nested_group_loglik(st, prep.order, h, cells)
        present = np.unique(st.codes[cells, top])
        return ll[:, np.searchsorted(present, g)]
    return np.column_stack([_conditional_loglik(prep, int(j), h) for j in g]).reshape(h.size, -1)


def _touched(st: CellStats, held: np.ndarray, sub: CellStats, k: int):
    """Factor ``k``'s groups in the held-out cells: weight n_g/n_j and index in ``sub`` or -1."""
    n_j = st.n[held].sum()
    w = np.bincount(st.codes[held, k], weights=st.n[held], minlength=len(st.labels[k])) / n_j
    touched = np.flatnonzero(w)
    index = {lab: i for i, lab in enumerate(sub.labels[k])}
    pos = np.array([index.get(st.labels[k][t], -1) for t in touched], dtype=np.int64)
    return w[touched], pos


def score_held_out_weighted(
    prep: Prepared,
    j: int,
    structure: Structure,
    draws: pd.DataFrame,
    log_weights: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, Any]:
    r"""Group ``j``'s CV row from full-data draws reweighted to leave it out.

    elpd :math:`= \log\sum_s w_s\, p(y_j \mid y_{-j}, \phi_s)` (:func:`logo_log_lik`).
    The group's mean :math:`\bar y_j` is simulated once a draw: :math:`\bar x_j\beta`
    plus, for each factor's groups its rows touch (weights :math:`w_g =
    n_{jg}/n_j`), a new group's :math:`N(0, w_g^2\sigma_k^2)` where the rest of
    the data has no rows of it, else its effect drawn from :math:`b \mid y_{-j},
    \phi` (exact, by the evaluator of the data without group ``j``), plus
    :math:`N(0, \sigma^2/n_j)`; the 90% interval is the weighted 5% and 95%
    quantiles, the point prediction the weighted mean. This is the predictive
    the exact refit (:func:`hierpipe.models.engines.multilevel.score_held_out`)
    simulates, with the refit's draws replaced by reweighted ones.
    """
    st = prep.stats
    h = _hyper_draws(st, draws)
    ll = logo_log_lik(prep, structure, draws, groups=np.array([j]))[:, 0]
    lw = np.asarray(log_weights, dtype=np.float64)
    keep, sub = _held_out_stats(prep, j)
    held = ~keep
    n_j = float(st.n[held].sum())
    xbar = (st.n[held, None] * st.zbar[0, held, : st.p]).sum(axis=0) / n_j
    ybar = float((st.n[held] * st.zbar[0, held, st.p]).sum() / n_j + st.shift[0])
    mean = h.beta @ xbar if st.p else np.zeros(h.size)
    var = h.sigma2 / n_j
    sub_effects = None
    for k in range(st.K):
        w, pos = _touched(st, held, sub, k)
        if np.any(pos >= 0) and sub_effects is None:
            sub_effects = _draw_effects(sub, _sub_order(sub), h, rng)
        for wi, pi in zip(w, pos, strict=True):
            if pi >= 0:
                assert sub_effects is not None
                mean = mean + wi * sub_effects[k][:, pi]
            else:
                var = var + wi**2 * h.var[:, k]
    sims = mean + np.sqrt(var) * rng.standard_normal(h.size)
    wts = np.exp(lw - lw.max())
    centre = float(np.dot(wts, mean) / wts.sum())
    lo, hi = (float(x) for x in weighted_quantile(sims, wts, np.array([0.05, 0.95])))
    return {
        "group": st.labels[prep.group_index][j],
        "n": n_j,
        "elpd": float(logsumexp(ll + lw) - logsumexp(lw)),
        "pred_mean": centre,
        "pred_q5": lo,
        "pred_q95": hi,
        "observed_mean": ybar,
        "error": ybar - centre,
        "covered": bool(lo <= ybar <= hi),
    }


def _sub_order(st: CellStats) -> tuple[int, ...] | None:
    from hierpipe.models.variance_components import nesting_order

    return nesting_order(st)


# --------------------------------------------------------------------------- within-group K-fold


@dataclass(frozen=True)
class FoldRows:
    """One side of a K-fold split: its rows, with every factor's full label set."""

    y: np.ndarray
    X: np.ndarray
    codes: np.ndarray
    factors: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    fixed_names: tuple[str, ...]
    group_index: int


def kfold_split(
    design: Any, prep: Prepared, structure: Structure, fold: np.ndarray, k: int
) -> tuple[FoldRows, FoldRows]:
    """The training rows and the rows with ``fold == k`` (rows, since cells may be split)."""
    codes = np.column_stack([t.codes for t in design.random])
    factors = tuple(t.name for t in design.random)
    labels = tuple(tuple(t.labels) for t in design.random)

    def side(mask: np.ndarray) -> FoldRows:
        return FoldRows(
            design.y[mask],
            design.X[mask],
            codes[mask],
            factors,
            labels,
            tuple(design.fixed_names),
            prep.group_index,
        )

    held = fold == k
    return side(~held), side(held)


def _rows_stats(rows: FoldRows, mask: np.ndarray | None = None) -> CellStats:
    """Cell statistics of ``rows`` (or of its rows in ``mask``), groups with no rows dropped."""
    codes = rows.codes if mask is None else rows.codes[mask]
    X = rows.X if mask is None else rows.X[mask]
    y = rows.y if mask is None else rows.y[mask]
    new_codes = np.empty_like(codes)
    labels = []
    for k in range(codes.shape[1]):
        used, inv = np.unique(codes[:, k], return_inverse=True)
        new_codes[:, k] = inv.reshape(-1)
        labels.append(tuple(rows.labels[k][i] for i in used))
    return cell_stats(rows.factors, labels, new_codes, X, y, rows.fixed_names)


def _stack(train: FoldRows, held: FoldRows, mask: np.ndarray) -> CellStats:
    both = FoldRows(
        np.concatenate([train.y, held.y[mask]]),
        np.concatenate([train.X, held.X[mask]]),
        np.concatenate([train.codes, held.codes[mask]]),
        train.factors,
        train.labels,
        train.fixed_names,
        train.group_index,
    )
    return _rows_stats(both)


def score_kfold(
    train: FoldRows,
    held: FoldRows,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    r"""Refit on ``train`` and score each group's held-out rows jointly.

    The density of group :math:`j`'s held-out rows :math:`y_{jk}` is
    :math:`\log p(y_{jk} \mid y_{\text{train}}) = \log m(y_{\text{train}} \cup y_{jk}) -
    \log m(y_{\text{train}})`, :math:`m` the likelihood with :math:`\beta` (against its
    prior; flat unless ``b_Intercept`` has a normal one) and every effect integrated
    out (:func:`hierpipe.models.engines.multilevel.cv_log_density`), at the refit's
    variances (point fits) or averaged over the refit's draws (Gibbs). Held-out
    rows in the training data's groups are predicted from those groups'
    estimates through the integrated likelihood; rows in a group of another
    factor that the training rows lack (a classroom all of whose rows are held
    out) get a new group's effect. Cost: one evaluation of the training and one
    of the training-plus-block statistics a group (a draw), after building the
    block's cell statistics from its rows, :math:`O(\text{rows})`.

    The 90% interval for the held-out rows' mean adds, as
    :func:`hierpipe.models.engines.multilevel.score_held_out` does, the
    conditional variances of the training groups' effects (point fits; without
    their covariances) or simulates from the draws (Gibbs), and a new group's
    variance for groups the training rows lack.
    """
    from hierpipe.models.engines import multilevel as ml
    from hierpipe.models.gibbs_multilevel import MultilevelPriors, _Marginal
    from hierpipe.models.gibbs_twolevel import HalfCauchy
    from hierpipe.models.variance_components import fit_components, make_evaluator

    tr = _rows_stats(train)
    K, p = tr.K, tr.p
    if method == "gibbs":
        sample, priors = ml.run_gibbs(tr, settings, rng)
        prior_obj = ml.priors_from_config(priors)
        sds = sample.sd.reshape(-1, K)
        sigma = sample.sigma.reshape(-1)
        beta = sample.beta.reshape(-1, p)
        r_draws = [r.reshape(-1, r.shape[-1]) for r in sample.r]
    else:
        prior_obj = MultilevelPriors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0))
        if method == "complete_pooling":
            b_hat, cov, s2f, _ = ml._complete_pooling_fit(tr)
            sds_hat = np.zeros(K)
            modes = None
        elif method in ("eb_ml", "eb_reml"):
            ev = make_evaluator(tr)
            cf = fit_components(ev, "REML" if method == "eb_reml" else "ML")
            b_hat, cov, s2f, sds_hat = cf.beta, cf.beta_cov, cf.sigma**2, cf.sds
            modes = ml._effects(ml.Prepared(tr, ml.nesting_order(tr), 0, ""), ev, cf)
        else:
            raise ml.MethodError(f"fit method '{method}' does not apply to multilevel models")
        sds = sds_hat[None, :]
        sigma = np.array([np.sqrt(s2f)])
    u = np.column_stack([np.log(np.maximum(sds, 1e-300)), np.log(sigma)])
    base = _Marginal(make_evaluator(tr), prior_obj).logp(u)
    g = train.group_index
    rows = []
    for j in np.unique(held.codes[:, g]):
        mask = held.codes[:, g] == j
        n_h = int(mask.sum())
        both = _stack(train, held, mask)
        lp = _Marginal(make_evaluator(both), prior_obj).logp(u) - base - 0.5 * n_h * LOG_2PI
        xbar = held.X[mask].mean(axis=0)
        ybar = float(held.y[mask].mean())
        weights = []
        for k in range(K):
            lab, cnt = np.unique(held.codes[mask, k], return_counts=True)
            index = {x: i for i, x in enumerate(tr.labels[k])}
            pos = np.array([index.get(held.labels[k][c], -1) for c in lab], dtype=np.int64)
            weights.append((cnt / n_h, pos))
        if method == "gibbs":
            elpd = float(logsumexp(lp) - np.log(lp.size))
            mean = beta @ xbar if p else np.zeros(lp.size)
            var = sigma**2 / n_h
            for k, (w, pos) in enumerate(weights):
                for wi, pi in zip(w, pos, strict=True):
                    if pi >= 0:
                        mean = mean + wi * r_draws[k][:, pi]
                    else:
                        var = var + wi**2 * sds[:, k] ** 2
            sims = mean + np.sqrt(var) * rng.standard_normal(mean.size)
            centre = float(mean.mean())
            lo, hi = (float(x) for x in np.quantile(sims, [0.05, 0.95]))
        else:
            elpd = float(lp[0])
            centre = float(b_hat @ xbar) if p else 0.0
            var = float(sigma[0] ** 2) / n_h + (float(xbar @ cov @ xbar) if p else 0.0)
            for k, (w, pos) in enumerate(weights):
                for wi, pi in zip(w, pos, strict=True):
                    if pi >= 0 and modes is not None:
                        centre += wi * float(modes[k][0][pi])
                        var += wi**2 * float(modes[k][1][pi]) ** 2
                    elif pi < 0:
                        var += wi**2 * float(sds_hat[k]) ** 2
            sd = float(np.sqrt(var))
            lo, hi = centre - Z90 * sd, centre + Z90 * sd
        rows.append(
            {
                "group": held.labels[g][j],
                "n": float(n_h),
                "elpd": elpd,
                "pred_mean": centre,
                "pred_q5": lo,
                "pred_q95": hi,
                "observed_mean": ybar,
                "error": ybar - centre,
                "covered": bool(lo <= ybar <= hi),
            }
        )
    return rows
