r"""Optional engine functions of the LMM engine: model checks and within-group K-fold.

The model (:mod:`hierpipe.models.engines.lmm`) is

.. math::
    y_{gi} = x_{gi}^\top\beta + z_{gi}^\top b_g + e_{gi},\qquad
    b_g \sim N_q(0, \Sigma),\qquad e_{gi} \sim N(0, \sigma^2),

brms names ``b_<x>``, ``sd_<g>__<z>``, ``cor_<g>__<z>__<z'>``, ``sigma``,
``r_<g>[level,z]`` (:math:`b_{gk}`) and ``coef_<g>[level,z]`` (:math:`\beta_k +
b_{gk}`, or :math:`b_{gk}` for a varying coefficient without a fixed effect of
its name). :mod:`hierpipe.models.engines.lmm` re-exports the functions here;
the interface is described in :mod:`hierpipe.models.engines`.

Every fit's fitted value of a row is read from its summary the same way,
:math:`\hat y_{gi} = \sum_{k \notin Z} x_{gik}\hat b_k + \sum_c z_{gic}\,
\widehat{\mathrm{coef}}_{gc}`: a fixed effect of a varying coefficient's name is
inside ``coef`` (its column of :math:`X` is the same variable as that of
:math:`Z`), and a fixed effect with no summary row (no pooling drops effects
that are combinations of a group's own coefficients) contributes 0, as it did
in that fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from hierpipe.diagnostics.ppc import BLOCK_VALUES, Replicates, thin_indices
from hierpipe.diagnostics.residuals import residual_table
from hierpipe.diagnostics.shrinkage import james_stein
from hierpipe.errors import ConfigError, InputError
from hierpipe.models.engines.one_way_checks import draw_scale
from hierpipe.models.structure import Structure

if TYPE_CHECKING:  # the engine re-exports this module, so it is imported lazily below
    from hierpipe.models.engines.lmm import LmmData, Population

PPC_REPLICATES = 400
PRIOR_DRAWS = 4000
Z90 = 1.6448536269514722


# --------------------------------------------------------------------------- fitted values


def _fitted_parts(data: LmmData, summary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """From a summary's means: the shared fixed part of every row (N,) and ``coef`` (G, q).

    See the module docstring. ``coef`` is NaN for groups the fit left out.
    """
    est = summary.set_index("parameter")["mean"]
    shared = [k for k, n in enumerate(data.fixed_names) if n not in data.coef_names]
    b = np.array(
        [float(est.get(f"b_{data.fixed_names[k]}", 0.0)) for k in shared], dtype=np.float64
    )
    fixed = data.X[:, shared] @ b if shared else np.zeros(data.n_obs)
    names = [f"coef_{data.group}[{lab},{c}]" for lab in data.labels for c in data.coef_names]
    coef = est.reindex(names).to_numpy(dtype=np.float64).reshape(data.n_groups, -1)
    return fixed, coef


def fitted_values(data: LmmData, summary: pd.DataFrame) -> np.ndarray:
    r""":math:`\hat y_{gi}` of every row at the summary's means (posterior means for samplers)."""
    fixed, coef = _fitted_parts(data, summary)
    return fixed + np.einsum("nq,nq->n", data.Z, coef[data.codes])


def _sigma(summary: pd.DataFrame) -> float:
    return float(summary.set_index("parameter")["mean"].get("sigma", np.nan))


# --------------------------------------------------------------------------- residuals


def residuals(
    design: Any, data: LmmData, structure: Structure, summary: pd.DataFrame
) -> pd.DataFrame:
    r"""Pearson residuals :math:`(y_{gi} - x_{gi}^\top\hat\beta - z_{gi}^\top\hat b_g)/\hat\sigma`.

    The conditional residuals of lme4's ``residuals(fit, type = "pearson")``
    (and statsmodels' ``MixedLMResults.resid`` over :math:`\hat\sigma`), from the
    summary's means (:mod:`hierpipe.diagnostics.residuals`). Rows of groups a
    no-pooling fit left out have NaN fitted values.
    """
    return residual_table(
        data.y, fitted_values(data, summary), _sigma(summary), data.codes, data.labels
    )


# --------------------------------------------------------------------------- PPC


def _group_order(data: LmmData) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by group and each group's start in that order (G + 1,)."""
    order = np.argsort(data.codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(data.sizes)]).astype(np.int64)
    return order, starts


def _group_blocks(starts: np.ndarray, replicates: int) -> list[tuple[int, int]]:
    """Consecutive blocks of groups with at most :data:`BLOCK_VALUES` replicated rows.

    A block holds at least one group, so one huge group is a block of its own.
    The blocks depend on the group sizes and the replicate count only, so the
    random numbers drawn do too.
    """
    rows = max(1, BLOCK_VALUES // max(1, replicates))
    g = starts.size - 1
    out, a = [], 0
    while a < g:
        b = int(np.searchsorted(starts, starts[a] + rows, side="right")) - 1
        b = min(max(b, a + 1), g)
        out.append((a, b))
        a = b
    return out


def _block_statistics(y: np.ndarray, local_starts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-group mean, SD (ddof 1), min and max of (R, rows) sorted by group."""
    n = np.diff(np.append(local_starts, y.shape[1])).astype(np.float64)
    mean = np.add.reduceat(y, local_starts, axis=1) / n
    dev = y - np.repeat(mean, n.astype(np.int64), axis=1)
    ss = np.add.reduceat(dev**2, local_starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(n > 1, np.sqrt(ss / (n - 1.0)), np.nan)
    return {
        "mean": mean,
        "sd": sd,
        "min": np.minimum.reduceat(y, local_starts, axis=1),
        "max": np.maximum.reduceat(y, local_starts, axis=1),
    }


def _stored_group_draws(data: LmmData, draws: pd.DataFrame) -> np.ndarray | None:
    """``r_`` draws (S, G, q) when ``draws.parquet`` stores every group's, else None."""
    names = [f"r_{data.group}[{lab},{c}]" for lab in data.labels for c in data.coef_names]
    if not set(names).issubset(draws.columns):
        return None
    return draws[names].to_numpy(dtype=np.float64).reshape(len(draws), data.n_groups, -1)


def _conditional_b(
    pop: Population,
    z: np.ndarray,
    resid: np.ndarray,
    local_starts: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    r"""Draws of :math:`b_g \mid \beta, \Sigma, \sigma, y` for a block of groups, (S, Gb, q).

    With :math:`\Sigma = FF^\top` (eigen factor, so an SD at 0 is fine),
    :math:`b_g = Fu`, :math:`u \sim N(H^{-1}F^\top Z_g^\top r_g/\sigma^2, H^{-1})`,
    :math:`H = I + F^\top Z_g^\top Z_g F/\sigma^2`, :math:`r_g = y_g - X_g\beta`:
    the full conditional :math:`N(M^{-1}Z_g^\top r_g, \sigma^2 M^{-1})`,
    :math:`M = Z_g^\top Z_g + \sigma^2\Sigma^{-1}`, without inverting :math:`\Sigma`.
    ``resid`` is (S, rows) of :math:`r`, rows sorted by group.
    """
    from hierpipe.models.engines.lmm import _psd_factor

    ztz = np.add.reduceat(z[:, :, None] * z[:, None, :], local_starts, axis=0)  # (Gb,q,q)
    ztr = np.add.reduceat(resid[:, :, None] * z[None, :, :], local_starts, axis=1)  # (S,Gb,q)
    f = _psd_factor(pop.Sigma)  # (S,q,q)
    s2 = pop.sigma2[:, None, None, None]
    q = z.shape[1]
    h = np.eye(q) + np.einsum("skq,gkl,slm->sgqm", f, ztz, f) / s2
    lin = np.einsum("skq,sgk->sgq", f, ztr) / pop.sigma2[:, None, None]
    chol = np.linalg.cholesky(h)
    mean = np.linalg.solve(h, lin[..., None])[..., 0]
    noise = rng.standard_normal(mean.shape)
    u = mean + np.linalg.solve(np.swapaxes(chol, -1, -2), noise[..., None])[..., 0]
    return np.einsum("skq,sgq->sgk", f, u)


def ppc_replicates(
    data: LmmData,
    structure: Structure,
    summary: pd.DataFrame,
    draws: pd.DataFrame | None,
    rng: np.random.Generator,
    replicates: int = PPC_REPLICATES,
) -> Replicates:
    r"""Test statistics of replicated data sets (:mod:`hierpipe.diagnostics.ppc`).

    With predictors a group's observations are not identically distributed,
    so the replicates are whole data sets,
    :math:`y^{rep}_{gi} = x_{gi}^\top\beta + z_{gi}^\top b_g + \sigma\varepsilon_{gi}`,
    and the statistics are computed from them: :math:`O(R \times N)` time for
    :math:`R` replicates and :math:`N` rows, memory bounded by a block of groups
    (at most :data:`~hierpipe.diagnostics.ppc.BLOCK_VALUES` replicated values).

    Samplers: one replicate per posterior draw, thinned evenly to
    ``replicates``. The group coefficients are the draw's own when
    ``draws.parquet`` stores every group's; otherwise drawn from their full
    conditional given the draw's :math:`(\beta, \Sigma, \sigma)`
    (:func:`_conditional_b`), so each replicate still comes from a draw of the
    joint posterior. Point estimators: ``replicates`` data sets simulated at
    the estimates (a parametric bootstrap; the estimates' own uncertainty is
    not propagated).
    """
    order, starts = _group_order(data)
    x, z, y = data.X[order], data.Z[order], data.y[order]
    if draws is not None:
        from hierpipe.models.engines.lmm import _population_from_draws

        idx = thin_indices(len(draws), replicates)
        thinned = draws.iloc[idx]
        pop = _population_from_draws(data, thinned)
        stored = _stored_group_draws(data, thinned)
        sigma = np.sqrt(pop.sigma2)
        count = idx.size
        how = (
            "group coefficients the draw's own (draws.parquet stores every group)"
            if stored is not None
            else "group coefficients drawn from their full conditional given the draw's "
            "beta, Sigma and sigma"
        )
        note = (
            f"one replicated data set per posterior draw, {count} of {len(draws)} draws taken "
            f"evenly; {how}; y_rep = X beta + Z b_g + sigma e row by row"
        )

        def means(a: int, b: int, rng: np.random.Generator) -> np.ndarray:
            rows = slice(starts[a], starts[b])
            local = starts[a:b] - starts[a]
            fixed = pop.beta @ x[rows].T  # (R, rows)
            if stored is not None:
                coef = stored[:, a:b]
            else:
                coef = _conditional_b(pop, z[rows], y[rows][None, :] - fixed, local, rng)
            rep = np.repeat(np.arange(b - a), np.diff(starts[a : b + 1]))
            return fixed + np.einsum("nq,snq->sn", z[rows], coef[:, rep])

    else:
        fitted = fitted_values(data, summary)[order]
        count = replicates
        sigma = np.full(count, _sigma(summary))
        note = (
            f"parametric simulation at the estimates: {count} data sets drawn row by row from "
            "N(x'beta + z'b_g, sigma^2) at the fit's estimates; their uncertainty is not "
            "propagated"
        )
        if np.isnan(fitted).any():
            note += (
                "; groups without their own estimates (left out by no pooling) have no "
                "replicates, so the overall statistics are undefined"
            )

        def means(a: int, b: int, rng: np.random.Generator) -> np.ndarray:
            return np.broadcast_to(fitted[starts[a] : starts[b]], (count, starts[b] - starts[a]))

    def blocks():
        for a, b in _group_blocks(starts, count):
            m = means(a, b, rng)
            rep = m + sigma[:, None] * rng.standard_normal(m.shape)
            yield a, b, _block_statistics(rep, starts[a:b] - starts[a])

    return Replicates(count=count, blocks=blocks(), note=note)


# --------------------------------------------------------------------------- prior predictive


def _inv_wishart_identity(df: float, k: int, rng: np.random.Generator, size: int) -> np.ndarray:
    r""":math:`IW(\text{df}, I_k)` draws (size, k, k) by Bartlett's decomposition.

    :math:`W = AA^\top \sim W(\text{df}, I)` with :math:`A` lower triangular,
    :math:`A_{ii}^2 \sim \chi^2_{\text{df} - i}`, :math:`A_{ij} \sim N(0, 1)`;
    :math:`W^{-1} \sim IW(\text{df}, I)`. A scale :math:`\Psi = LL^\top` gives
    :math:`LW^{-1}L^\top \sim IW(\text{df}, \Psi)`.
    """
    a = np.tril(rng.standard_normal((size, k, k)), -1)
    i = np.arange(k)
    a[:, i, i] = np.sqrt(rng.chisquare(df - i, size=(size, k)))
    inv = np.linalg.inv(a)  # W^-1 = A^-T A^-1
    return np.swapaxes(inv, 1, 2) @ inv


def _block_draws(spec: dict[str, Any], k: int, rng: np.random.Generator, size: int) -> np.ndarray:
    r"""Covariance draws (size, k, k) of one block of :math:`\Sigma` from its prior.

    Half-Cauchy / inverse-gamma (one coefficient); Huang & Wand (2013):
    :math:`a_c \sim IG(1/2, 1/A_c^2)`, :math:`\Sigma \mid a \sim IW(\nu + k - 1,
    2\nu\,\mathrm{diag}(1/a))` (half-:math:`t_\nu(0, A_c)` SDs, uniform
    correlations at :math:`\nu = 2`); inverse-Wishart :math:`IW(\text{df}, \Psi)`.
    """
    fam = spec["family"]
    if fam in ("half_cauchy", "inv_gamma"):
        return (draw_scale(spec, rng, size) ** 2)[:, None, None]
    if fam == "huang_wand":
        nu = float(spec["nu"])
        big_a = np.broadcast_to(np.asarray(spec["scale"], dtype=np.float64), (k,))
        a = (1.0 / big_a**2) / rng.standard_gamma(0.5, size=(size, k))
        base = _inv_wishart_identity(nu + k - 1.0, k, rng, size)
        d = np.sqrt(2.0 * nu / a)
        return base * d[:, :, None] * d[:, None, :]
    if fam == "inv_wishart":
        chol = np.linalg.cholesky(np.asarray(spec["scale"], dtype=np.float64))
        base = _inv_wishart_identity(float(spec["df"]), k, rng, size)
        return chol @ base @ chol.T
    raise ValueError(f"prior family '{fam}' is not a covariance prior")


def prior_predictive(
    data: LmmData,
    structure: Structure,
    info: dict[str, Any],
    rng: np.random.Generator,
    size: int = PRIOR_DRAWS,
) -> pd.DataFrame | None:
    r"""Draws from the sampler's priors (fit.json) and what they imply for the outcome.

    Per draw: every fixed effect (NaN under the flat prior), every
    ``sd_``/``cor_`` of :math:`\Sigma`, ``sigma``; ``outcome_sd``
    :math:`= \sqrt{\overline{z^\top\Sigma z} + \sigma^2}`, the outcome's SD about
    the fixed part averaged over the data's rows (for ``(1 | g)`` it is
    :math:`\sqrt{\tau^2 + \sigma^2}`); and at one row :math:`i` of the data drawn
    at random, a new group's deviation :math:`z_i^\top b`,
    :math:`b \sim N(0, \Sigma)`, a new observation's deviation
    :math:`z_i^\top b + \sigma\varepsilon` from the fixed part, and with a proper
    prior on every fixed effect the new observation :math:`x_i^\top\beta` plus
    that deviation (NaN otherwise). The columns mirror the one-way engine's
    (``icc_<g>`` only for a varying intercept alone). None without priors.
    """
    from hierpipe.models.engines.lmm import _cor_pairs, _psd_factor

    priors = info.get("priors")
    if not priors or "blocks" not in priors or "sigma" not in priors:
        return None
    q, g = len(data.coef_names), data.group
    big = np.zeros((size, q, q))
    start = 0
    for spec, k in zip(priors["blocks"], data.block_sizes, strict=True):
        big[:, start : start + k, start : start + k] = _block_draws(spec, k, rng, size)
        start += k
    sigma = draw_scale(priors["sigma"], rng, size)
    bspec = priors.get("beta", {"family": "flat"})
    if bspec.get("family") == "normal":
        mean = np.asarray(bspec["mean"], dtype=np.float64)
        sd = np.asarray(bspec["sd"], dtype=np.float64)
        beta = mean + sd * rng.standard_normal((size, len(data.fixed_names)))
    else:
        beta = np.full((size, len(data.fixed_names)), np.nan)
    zsz = np.einsum("nk,skl,nl->s", data.Z, big, data.Z) / data.n_obs
    row = rng.integers(0, data.n_obs, size)
    b = np.einsum("skl,sl->sk", _psd_factor(big), rng.standard_normal((size, q)))
    group_dev = np.einsum("sk,sk->s", data.Z[row], b)
    obs_dev = group_dev + sigma * rng.standard_normal(size)
    out: dict[str, Any] = {"draw": np.arange(size, dtype=np.int64)}
    for k, n in enumerate(data.fixed_names):
        out[f"b_{n}"] = beta[:, k]
    sds = np.sqrt(np.diagonal(big, axis1=1, axis2=2))
    for k, c in enumerate(data.coef_names):
        out[f"sd_{g}__{c}"] = sds[:, k]
    for j, k in _cor_pairs(data):
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"cor_{g}__{data.coef_names[j]}__{data.coef_names[k]}"] = big[:, j, k] / (
                sds[:, j] * sds[:, k]
            )
    out["sigma"] = sigma
    if data.coef_names == ("Intercept",):
        out[f"icc_{g}"] = sds[:, 0] ** 2 / (sds[:, 0] ** 2 + sigma**2)
    out["outcome_sd"] = np.sqrt(zsz + sigma**2)
    out["new_group_deviation"] = group_dev
    out["new_observation_deviation"] = obs_dev
    out["new_observation"] = np.einsum("sk,sk->s", data.X[row], beta) + obs_dev
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- James-Stein


def _james_stein_obstacle(data: LmmData) -> str | None:
    """Why no Stein estimate is defined for ``data`` (None when it is)."""
    from hierpipe.models.engines.lmm import no_pooling_estimates

    est = no_pooling_estimates(data)
    if est.dropped:
        names = ", ".join(f"b_{data.fixed_names[k]}" for k in est.dropped)
        return (
            f"the groups' own coefficients are not exchangeable: group-level predictors "
            f"({names}) shift their population means, and hierpipe's Stein estimate shrinks "
            "towards one common mean"
        )
    if int(est.used.sum()) < 2:
        return "fewer than two groups can fit their own coefficients"
    if not est.df > 0:
        return "no residual degrees of freedom to estimate sigma^2"
    return None


def james_stein_unavailable(data: LmmData, structure: Structure) -> str:
    """The reason :func:`james_stein_table` returned None, for ``checks.json``."""
    return _james_stein_obstacle(data) or "not defined for these data"


def james_stein_table(
    data: LmmData, structure: Structure
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    r"""Efron–Morris estimates of each varying coefficient, coefficient by coefficient.

    The no-pooling estimates :math:`\hat c_{gk}`
    (:func:`~hierpipe.models.engines.lmm.no_pooling_estimates`: each group's own
    regression, shared fixed effects :math:`\gamma` pooled) are
    :math:`N(c_{gk}, D_{gk})` with :math:`D_{gk}` the :math:`k`-th diagonal element of
    :math:`\hat\sigma^2(Z_g^\top Z_g)^{-1} + A_g\operatorname{Var}(\hat\gamma)A_g^\top`,
    treated as known, and under the model :math:`c_{gk} \sim N(\beta_k,
    \Sigma_{kk})` exchangeably over groups, so for each coefficient :math:`k`
    :func:`hierpipe.diagnostics.shrinkage.james_stein` (Efron & Morris 1975;
    Morris 1983) applies. It is the marginal Stein estimate of each
    coefficient: it ignores the correlation of a group's coefficients (in
    :math:`\Sigma` and in the sampling errors) and the :math:`O(1/N)` covariance
    of different groups' :math:`\hat c_{gk}` through :math:`\hat\gamma`, so it is
    not the multivariate Stein estimate. The first coefficient fills
    ``james_stein``/``js_shrinkage`` beside the shrinkage table's first
    coefficient; further ones add ``james_stein__<c>``/``js_shrinkage__<c>``.
    Groups without their own regression get NaN and do not enter.

    None (with the reason from :func:`james_stein_unavailable`) when group-level
    predictors make the coefficients' population means differ by group (the
    estimate shrinks towards one common mean), fewer than two groups have their
    own regression, or there is no residual degree of freedom.
    """
    from hierpipe.models.engines.lmm import no_pooling_estimates

    if _james_stein_obstacle(data) is not None:
        return None
    est = no_pooling_estimates(data)
    used = est.used
    table: dict[str, Any] = {"group": pd.Series(data.labels, dtype=str)}
    facts: dict[str, Any] = {}
    per_coef = {}
    for k, c in enumerate(data.coef_names):
        js = james_stein(est.coef[used, k], est.coef_se[used, k] ** 2)
        estimate = np.full(data.n_groups, np.nan)
        factor = np.full(data.n_groups, np.nan)
        estimate[used], factor[used] = js.estimate, js.shrinkage
        suffix = "" if k == 0 else f"__{c}"
        table[f"james_stein{suffix}"] = estimate
        table[f"js_shrinkage{suffix}"] = factor
        per_coef[c] = {
            "form": js.form,
            "a_hat": float(js.a_hat),
            "centre": float(js.centre),
            "effective_parameters": js.effective_parameters,
        }
        if k == 0:
            facts = {**per_coef[c], "sigma2": float(est.sigma2)}
    facts["coefficient"] = data.coef_names[0]
    facts["coefficients"] = per_coef
    facts["groups_used"] = int(used.sum())
    facts["note"] = (
        "Efron-Morris on each group's own least-squares coefficient, coefficient by "
        "coefficient, sampling variances sigma^2 (Z_g'Z_g)^-1 (+ the shared effects' part) "
        "treated as known"
    )
    return pd.DataFrame(table), facts


# --------------------------------------------------------------------------- within-group K-fold


@dataclass(frozen=True)
class HeldRows:
    """The held-out rows of one fold: design rows, response and group codes."""

    labels: tuple[str, ...]
    codes: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    y: np.ndarray


def _subset(data: LmmData, keep: np.ndarray) -> LmmData:
    """``data`` restricted to the rows ``keep``; every group must keep a row."""
    from hierpipe.models.suffstats_lmm import lmm_suffstats

    x, z, y, codes = data.X[keep], data.Z[keep], data.y[keep], data.codes[keep]
    stats = lmm_suffstats(x, z, y, codes, data.n_groups)
    return replace(data, codes=codes, X=x, Z=z, y=y, stats=stats)


def kfold_split(
    design: Any, data: LmmData, structure: Structure, fold: np.ndarray, k: int
) -> tuple[LmmData, HeldRows]:
    """Training data (rows with ``fold != k``) and the held-out rows (``fold == k``).

    Folds never hold out all of a group's rows (:func:`hierpipe.cv.kfold.assign_folds`),
    so every group is in the training data.
    """
    held = np.asarray(fold) == k
    test = HeldRows(
        labels=data.labels,
        codes=data.codes[held],
        X=data.X[held],
        Z=data.Z[held],
        y=data.y[held],
    )
    return _subset(data, ~held), test


@dataclass(frozen=True)
class _Conditional:
    r"""Predictive of new rows of training group ``g``, for each draw (S = 1 for point fits).

    The rows' mean vector is ``mean_x @ x.T + z @ coef`` per draw and their
    covariance :math:`\sigma^2 I + WDW^\top` with :math:`W = [Z_h, X_h - Z_hK]`
    (``k`` (q, p); the second block only when ``d`` has it).
    """

    beta: np.ndarray  # (S, p) fixed part of the rows' means, caller's X
    coef: np.ndarray  # (S, q)
    k: np.ndarray  # (q, p) or (q, 0)
    d: np.ndarray  # (S, q + p', q + p')
    sigma2: np.ndarray  # (S,)
    cols: list[int]  # columns of X in the fixed part and in K


def _scores(
    pred: _Conditional, x: np.ndarray, z: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> dict[str, Any]:
    """elpd of ``y`` and a 90% interval for its mean.

    As :func:`hierpipe.models.engines.lmm.new_group_scores`: one parameter set gives
    the normal interval; draws give the mixture (elpd a log-mean-exp, the interval
    from one simulated mean per draw).
    """
    from hierpipe.models.engines.lmm import group_log_density

    xs = x[:, pred.cols]
    mean = pred.beta @ xs.T + pred.coef @ z.T  # (S, n)
    w = np.hstack([z, xs - z @ pred.k]) if pred.k.shape[1] else z
    logp = group_log_density(y[None, :] - mean, w, pred.d, pred.sigma2)
    n = y.size
    ones_w = w.sum(axis=0)
    ybar_mean = mean.mean(axis=1)
    ybar_sd = np.sqrt((n * pred.sigma2 + np.einsum("k,skm,m->s", ones_w, pred.d, ones_w)) / n**2)
    s = logp.size
    if s == 1:
        elpd = float(logp[0])
        centre = float(ybar_mean[0])
        lo, hi = centre - Z90 * float(ybar_sd[0]), centre + Z90 * float(ybar_sd[0])
    else:
        elpd = float(logsumexp(logp) - np.log(s))
        centre = float(ybar_mean.mean())
        sims = ybar_mean + ybar_sd * rng.standard_normal(s)
        lo, hi = (float(v) for v in np.quantile(sims, [0.05, 0.95]))
    ybar = float(y.mean())
    return {
        "elpd": elpd,
        "pred_mean": centre,
        "pred_q5": lo,
        "pred_q95": hi,
        "observed_mean": ybar,
        "error": ybar - centre,
        "covered": bool(lo <= ybar <= hi),
    }


def _blockdiag(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stacks (S, m, m) and (S, r, r) to (S, m + r, m + r)."""
    s, m, r = a.shape[0], a.shape[1], b.shape[1]
    out = np.zeros((s, m + r, m + r))
    out[:, :m, :m] = a
    out[:, m:, m:] = b
    return out


def within_predictive(
    train: LmmData,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> Callable[[int], _Conditional]:
    r"""Predictive of new rows of training group ``g``, as a function of ``g``.

    A new row of group :math:`g` is :math:`x^\top\beta + z^\top b_g + e`; its
    density is conditional on the group's estimated coefficients, with their
    estimation error carried:

    * ``eb_ml``/``eb_reml`` (the covariance parameters plugged in):
      :math:`y_h \sim N(X_h\hat\beta + Z_h\hat b_g,\ \sigma^2 I + Z_hS_gZ_h^\top +
      (X_h - Z_hK_g)\operatorname{Cov}(\hat\beta)(X_h - Z_hK_g)^\top)`,
      :math:`S_g = (Z_g^\top Z_g/\sigma^2 + \Sigma^{-1})^{-1}`,
      :math:`K_g = S_gZ_g^\top X_g/\sigma^2`: Henderson's (1975) joint
      prediction-error covariance of :math:`(\hat\beta, \hat b_g)`. This is the
      exact conditional density of :math:`y_h` given the training data under a
      flat prior on :math:`\beta` (universal kriging).
    * ``complete_pooling``:
      :math:`N(X_h\hat\beta, s^2 I + X_h\operatorname{Cov}(\hat\beta)X_h^\top)`.
    * ``no_pooling``: the group's own regression,
      :math:`N(X_{s,h}\hat\gamma + Z_h\hat c_g,\ \sigma^2 I
      + \sigma^2 Z_h(Z_g^\top Z_g)^{-1}Z_h^\top
      + (X_{s,h} - Z_hA_g)\operatorname{Var}(\hat\gamma)(X_{s,h} - Z_hA_g)^\top)`.
    * ``gibbs``: refit on the training rows; per draw :math:`(\beta, \Sigma, \sigma)`
      the group's coefficients are integrated out of their full conditional
      (Rao–Blackwell), :math:`y_h \mid \text{draw} \sim N(X_h\beta + Z_hm_g, \sigma^2 I +
      Z_hS_gZ_h^\top)`, :math:`m_g = S_gZ_g^\top(y_g - X_g\beta)/\sigma^2`; the
      elpd is the log of the mean density over draws.
    """
    from hierpipe.models.engines.lmm import (
        _population_from_draws,
        _psd_factor,
        eb_lmm,
        no_pooling_estimates,
        ols,
        run_gibbs,
    )

    p, q = len(train.fixed_names), len(train.coef_names)
    allx = list(range(p))
    if method == "complete_pooling":
        f = ols(train)
        d = _blockdiag(np.zeros((1, q, q)), f.cov[None])
        pred = _Conditional(
            f.beta[None], np.zeros((1, q)), np.zeros((q, p)), d, np.array([f.s2]), allx
        )
        return lambda g: pred
    if method == "no_pooling":
        est = no_pooling_estimates(train)
        if not est.df > 0:
            # sigma^2 is undefined (NaN), and a NaN elpd would be summed as 0 downstream
            raise InputError(
                f"within-group K-fold: under no pooling the training rows of a fold leave no "
                f"residual degrees of freedom (each {train.group} keeps at most as many rows "
                f"as it has coefficients: {', '.join(train.coef_names)}), so sigma cannot be "
                "estimated; use fewer folds or leave no_pooling out of cv.kfold.fits"
            )
        s2 = np.array([est.sigma2])

        def own(g: int) -> _Conditional:
            if not est.used[g]:
                raise InputError(
                    f"within-group K-fold: {train.group} '{train.labels[g]}' keeps too few rows "
                    f"(or too few distinct values of {', '.join(train.coef_names)}) in a training "
                    "fold to fit its own regression under no pooling; use fewer folds or leave "
                    "no_pooling out of cv.kfold.fits"
                )
            d = _blockdiag(est.sigma2 * est.zinv[g][None], est.gamma_cov[None])
            return _Conditional(
                est.gamma[None], est.coef[g][None], est.a[g], d, s2, list(est.shared)
            )

        return own
    rows_of = train.rows
    if method in ("eb_ml", "eb_reml"):
        f = eb_lmm(train, method)
        s2 = float(f.sigma) ** 2
        fac = _psd_factor(np.asarray(f.Sigma)[None])[0]
        beta = np.asarray(f.beta)[None]
        beta_cov = np.asarray(f.beta_cov)

        def eb_group(g: int) -> _Conditional:
            idx = rows_of(g)
            zg, xg = train.Z[idx], train.X[idx]
            h = np.eye(q) + fac.T @ (zg.T @ zg) @ fac / s2
            s = fac @ np.linalg.solve(h, fac.T)
            k = s @ (zg.T @ xg) / s2
            d = _blockdiag(s[None], beta_cov[None])
            coef = np.asarray(f.b_hat)[g][None]
            return _Conditional(beta, coef, k, d, np.array([s2]), allx)

        return eb_group
    if method == "gibbs":
        result = run_gibbs(train, settings, rng)
        pop = _population_from_draws(train, result.draws)
        fac = _psd_factor(pop.Sigma)  # (S,q,q)

        def gibbs_group(g: int) -> _Conditional:
            idx = rows_of(g)
            zg, xg, yg = train.Z[idx], train.X[idx], train.y[idx]
            s2 = pop.sigma2[:, None, None]
            h = np.eye(q) + np.einsum("skq,kl,slm->sqm", fac, zg.T @ zg, fac) / s2
            s = fac @ np.linalg.solve(h, np.swapaxes(fac, 1, 2))  # (S,q,q)
            ztr = (yg[None, :] - pop.beta @ xg.T) @ zg  # (S,q)
            m = np.einsum("sqk,sk->sq", s, ztr) / pop.sigma2[:, None]
            return _Conditional(pop.beta, m, np.zeros((q, 0)), s, pop.sigma2, allx)

        return gibbs_group
    raise ConfigError(f"unknown fit method '{method}'")


def score_kfold(
    train: LmmData,
    held: HeldRows,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Score each group's held-out rows of one fold (one row a group with some).

    The joint log predictive density of the group's held-out rows
    (:func:`within_predictive`), and the error and 90% interval of their mean,
    in the columns of :func:`hierpipe.models.engines.one_way_checks.score_kfold`.
    """
    predictive = within_predictive(train, structure, method, settings, rng)
    counts = np.bincount(held.codes, minlength=len(held.labels))
    order = np.argsort(held.codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = []
    for g in np.flatnonzero(counts > 0):
        idx = order[starts[g] : starts[g + 1]]
        s = _scores(predictive(int(g)), held.X[idx], held.Z[idx], held.y[idx], rng)
        rows.append({"group": held.labels[g], "n": float(idx.size), **s})
    return rows
