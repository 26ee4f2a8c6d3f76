r"""Engine of nested models with varying slopes at some level.

Formulas such as ``score ~ 1 + ses + (1 + ses | school) + (1 | school:classroom)``
or ``score ~ 1 + ses + (1 + ses | school/classroom)``: several grouping factors that
nest, and varying coefficients beyond the intercept (correlated within a term,
``||`` uncorrelated). :func:`hierpipe.models.engines.engine_for` sends multilevel
formulas with slopes here; intercept-only multilevel formulas stay with
:mod:`hierpipe.models.engines.multilevel` (a separate engine, so that none of that
engine's cell-statistics hooks can be handed these statistics; the checks this
engine lacks are skipped by the diagnose stage with the reason recorded).
Crossed factors with slopes are refused in :func:`prepare`.

Methods: ``complete_pooling`` (OLS), ``eb_ml``/``eb_reml``
(:mod:`hierpipe.models.nested_lmm`); ``gibbs`` is refused with a MethodError.

Outputs (brms/lme4 names): ``b_*`` (normal intervals); ``sd_<factor>__<coef>``,
``cor_<factor>__<a>__<b>`` (within one correlated term) and ``sigma`` (points,
no interval); ``r_``/``coef_`` rows for the top-level groups only (conditional
modes and lme4 ``condVar`` SDs; ``coef_`` SDs add the fixed effects' covariance).
``icc_`` rows only for levels that, with every level below, vary in the intercept
only (:func:`icc_definitions`); where a level at or below has varying slopes its
variance share depends on the predictors (at x = 0 on their centring): none.
Leave-one-top-group-out is exact in closed form given the refit's estimates.

Optional hooks: :func:`residuals` (every level's conditional modes); PPC,
James-Stein, prior predictive, PSIS and K-fold are not provided, so the diagnose
and cv stages skip them and record why.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd
from scipy.linalg import block_diag
from scipy.special import stdtrit

from hierpipe.diagnostics.residuals import residual_table
from hierpipe.errors import ConfigError, InputError, MethodError
from hierpipe.models.engines.multilevel import GIBBS_KEYS
from hierpipe.models.lmm import semidefinite_cholesky
from hierpipe.models.nested_lmm import (
    NestedFit,
    NestedStats,
    all_modes,
    evaluate,
    fit_nested,
    log_marginal,
    nested_stats,
    profiled,
    top_effects,
    top_mode_gradient,
)
from hierpipe.models.result import FitResult, normal_row, point_row, summary_frame
from hierpipe.models.structure import Structure

METHODS = ("complete_pooling", "eb_ml", "eb_reml", "gibbs")
KFOLD_UNAVAILABLE = "not available for nested models with varying slopes yet"
Z90 = 1.6448536269514722


def prepare(design: Any, structure: Structure) -> NestedStats:
    """Per-innermost-group cross-products; factors ordered top down by number of groups."""
    names: list[str] = []
    terms: dict[str, list[Any]] = {}
    for rd in design.random:
        if rd.name not in terms:
            names.append(rd.name)
            terms[rd.name] = []
        terms[rd.name].append(rd)
    n = design.n_obs
    for f in names:
        # lme4's check.nobs.vs.nRE: a factor's random effects (groups x varying
        # coefficients) must be fewer than the rows, or sigma is not identified.
        q_f = sum(rd.Z.shape[1] for rd in terms[f])
        n_re = terms[f][0].n_groups * q_f
        if n_re >= n:
            raise InputError(
                f"{design.source}: grouping factor '{f}' has {terms[f][0].n_groups} groups x "
                f"{q_f} varying coefficients = {n_re} random effects for {n} rows; its "
                "variance cannot be told apart from sigma (as lme4 refuses)"
            )
    if design.y.min() == design.y.max():
        raise InputError(
            f"{design.source}: column '{structure.response}' has the same value in every row; "
            "there is no variation to model"
        )
    names = sorted(names, key=lambda f: terms[f][0].n_groups)
    levels, Z = [], []
    for f in names:
        rds = terms[f]
        coefs = tuple(c for rd in rds for c in rd.z_names)
        if len(set(coefs)) != len(coefs):
            raise InputError(f"formula '{design.formula.text}': factor '{f}' repeats a coefficient")
        levels.append((f, coefs, tuple(rd.Z.shape[1] for rd in rds), rds[0].labels))
        Z.append(np.column_stack([rd.Z for rd in rds]))
    for a, b in itertools.pairwise(names):
        if terms[a][0].n_groups == terms[b][0].n_groups:
            raise MethodError(
                f"formula '{design.formula.text}': factors '{a}' and '{b}' have as many groups; "
                "varying slopes are fitted for strictly nested factors only"
            )
    codes = np.column_stack([terms[f][0].codes for f in names])
    return nested_stats(levels, codes, Z, design.X, design.y, design.fixed_names)


def group_labels(st: NestedStats) -> tuple[str, ...]:
    return st.levels[0].labels


def _check_settings(method: str, settings: dict[str, Any]) -> None:
    """As the multilevel engine: sampler keys are accepted (and unused), others refused."""
    unknown = sorted(set(settings) - set(GIBBS_KEYS))
    if unknown:
        raise ConfigError(
            f"fit method '{method}': unknown setting '{unknown[0]}' "
            f"(known: {', '.join(GIBBS_KEYS)})"
        )


# --------------------------------------------------------------------------- fits


def _ols(st: NestedStats) -> tuple[np.ndarray, np.ndarray, float, int]:
    prof = profiled(st, np.zeros((st.q_total, st.q_total)), True)
    df = st.n_obs - st.p
    s2 = float(prof.r2[0]) / df
    beta = prof.beta[0].copy()
    if st.intercept is not None:
        beta[st.intercept] += st.shift
    cov = s2 * np.linalg.inv(prof.xvx[0]) if st.p else np.zeros((0, 0))
    return beta, cov, s2, df


def complete_pooling(st: NestedStats) -> FitResult:
    r"""One regression for everyone, :math:`y \sim N(X\beta, \sigma^2 I)`: OLS, t intervals."""
    beta, cov, s2, df = _ols(st)
    se = np.sqrt(np.diag(cov))
    t = float(stdtrit(df, 0.95))
    rows = [
        point_row(f"b_{n}", b, s, b - t * s, b + t * s)
        for n, b, s in zip(st.fixed_names, beta, se, strict=True)
    ]
    rows.append(point_row("sigma", np.sqrt(s2)))
    return FitResult(summary=summary_frame(rows), info={"df": df, "warnings": []})


def icc_definitions(st: NestedStats) -> dict[str, str]:
    r"""ICCs that do not depend on the predictors, each as its formula in words.

    A level qualifies when it and every level below it vary in the intercept only:
    then two observations of one of its groups, given the effects of the levels
    above, correlate by :math:`\sigma^2_\ell/(\sigma^2_\ell + \sum_{k>\ell}\sigma^2_k
    + \sigma^2)` (the multilevel engine's definition, Snijders & Bosker 2012, 4.9).
    """
    out: dict[str, str] = {}
    for ell, lv in enumerate(st.levels):
        below = st.levels[ell:]
        if all(b.coef_names == ("Intercept",) for b in below):
            terms = " + ".join([f"var({b.name})" for b in below] + ["sigma^2"])
            out[f"icc_{lv.name}"] = f"var({lv.name}) / ({terms})"
    return out


def _cor_pairs(lv) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in lv.block_sizes:
        out += [(start + i, start + j) for i in range(size) for j in range(i + 1, size)]
        start += size
    return out


def eb_result(st: NestedStats, method: str) -> FitResult:
    """ML/REML fit: estimates, top-level effects and the facts for fit.json."""
    fit = fit_nested(st, "REML" if method == "eb_reml" else "ML")
    se_b = np.sqrt(np.diag(fit.beta_cov))
    rows = [
        normal_row(f"b_{n}", b, s) for n, b, s in zip(st.fixed_names, fit.beta, se_b, strict=True)
    ]
    for ell, lv in enumerate(st.levels):
        for k, c in enumerate(lv.coef_names):
            rows.append(point_row(f"sd_{lv.name}__{c}", fit.sds[ell][k]))
        for a, b in _cor_pairs(lv):
            cor = fit.cors[ell][a, b]
            rows.append(
                point_row(
                    f"cor_{lv.name}__{lv.coef_names[a]}__{lv.coef_names[b]}",
                    cor if np.isfinite(cor) else np.nan,
                )
            )
    rows.append(point_row("sigma", fit.sigma))
    icc_defs = icc_definitions(st)
    for name in icc_defs:
        ell = [lv.name for lv in st.levels].index(name[4:])
        v = [float(sd[0]) ** 2 for sd in fit.sds[ell:]]
        rows.append(point_row(name, v[0] / (sum(v) + fit.sigma**2)))
    top = st.levels[0]
    modes, cov = top_effects(st, fit)
    r_sd = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0))
    grad = top_mode_gradient(st, fit)
    fixed = {n: i for i, n in enumerate(st.fixed_names)}
    for k, c in enumerate(top.coef_names):
        rows += [
            normal_row(f"r_{top.name}[{lab},{c}]", m, s)
            for lab, m, s in zip(top.labels, modes[:, k], r_sd[:, k], strict=True)
        ]
    for k, c in enumerate(top.coef_names):
        # d(beta_k + b_jk(beta))/d(beta) = e_k + grad: the prediction error of coef_
        # (Henderson's C matrix, as the one-factor engine's coef_estimates).
        a = grad[:, k, :].copy()
        b0 = 0.0
        if c in fixed:
            a[:, fixed[c]] += 1.0
            b0 = fit.beta[fixed[c]]
        c_sd = np.sqrt(r_sd[:, k] ** 2 + np.einsum("gi,ij,gj->g", a, fit.beta_cov, a))
        rows += [
            normal_row(f"coef_{top.name}[{lab},{c}]", b0 + m, s)
            for lab, m, s in zip(top.labels, modes[:, k], c_sd, strict=True)
        ]
    warnings = [f"boundary fit: {b}" for b in fit.boundary]
    if not fit.converged:
        warnings.append(f"{fit.method} optimiser convergence checks did not pass")
    reml = method == "eb_reml"
    info = {
        "criterion": fit.method,
        "loglik" if not reml else "restricted_loglik": -0.5 * fit.criterion,
        "reml_criterion" if reml else "deviance": fit.criterion,
        "converged": fit.converged,
        "convergence": fit.convergence["checks"],
        "optimizer": fit.convergence,
        "optimizer_evaluations": fit.n_evaluations,
        "structure": "nested",
        "levels": [
            {
                "factor": lv.name,
                "coefficients": list(lv.coef_names),
                "groups": len(lv.labels),
                "blocks": list(lv.block_sizes),
            }
            for lv in st.levels
        ],
        "theta": fit.theta.tolist(),
        "singular": fit.singular,
        "intervals": "b_, r_, coef_: normal (r_/coef_ for the top-level factor only); "
        "sd_, cor_, sigma: point estimates, no interval in this version",
        "icc_definitions": icc_defs,
        "icc_note": "icc_ rows only for intercept-only levels with intercept-only levels "
        "below (correlation of two observations of one group given the levels above); "
        "none where a level at or below has varying slopes: its variance share depends "
        "on the predictors' values (at x = 0 on their centring); points, no interval",
        "boundary": list(fit.boundary),
        "warnings": warnings,
    }
    return FitResult(summary=summary_frame(rows), info=info)


def fit(
    prep: NestedStats,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> FitResult:
    """Fit the nested model with varying slopes by ``method``."""
    if method == "gibbs":
        raise MethodError(
            "fit method 'gibbs' is not available for nested models with varying slopes in "
            "this version (use eb_reml or eb_ml, or varying intercepts only)"
        )
    _check_settings(method, settings)
    if method == "complete_pooling":
        return complete_pooling(prep)
    if method in ("eb_ml", "eb_reml"):
        return eb_result(prep, method)
    raise MethodError(f"fit method '{method}' does not apply to nested models with slopes")


# --------------------------------------------------------------------------- CV


def _held_out_moments(st: NestedStats, j: int) -> tuple[np.ndarray, list[list[np.ndarray]], float]:
    """Held-out top group's x-bar, per level its groups' Z-column sums / n_j, and y-bar."""
    rows = st.ancestors[:, 0] == j
    n_j = float(st.n[rows].sum())
    s = st.sums[rows]
    off, Qt, p = st.offsets, st.q_total, st.p
    per_level = []
    for ell in range(len(st.levels)):
        groups = st.ancestors[rows, ell]
        zs = s[:, off[ell] : off[ell + 1]]
        uniq, inv = np.unique(groups, return_inverse=True)
        agg = np.zeros((uniq.size, zs.shape[1]))
        np.add.at(agg, inv.reshape(-1), zs)
        per_level.append(agg / n_j)
    xbar = s[:, Qt : Qt + p].sum(axis=0) / n_j
    ybar = float(s[:, Qt + p].sum() / n_j + st.shift)
    return xbar, per_level, ybar


def score_held_out(
    st: NestedStats, j: int, method: str, settings: dict[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    r"""Refit without top-level group ``j`` and score its observations as a new group's.

    ``elpd`` is :math:`\log m(y) - \log m(y_{-j})` at the refit's :math:`\theta,
    \sigma` with :math:`\beta` integrated against a flat prior
    (:func:`hierpipe.models.nested_lmm.log_marginal`): exactly
    :math:`\log N(y_j; X_j\hat\beta_{-j}, \sigma^2 V_j
    + X_j\operatorname{Cov}(\hat\beta_{-j})X_j^\top)`.
    The 90% interval for the group's mean is normal, with variance
    :math:`\bar x^\top\operatorname{Cov}(\hat\beta)\bar x + \sum_\ell\sum_h \bar z_{h}^\top
    \Sigma_\ell \bar z_h + \sigma^2/n_j` (every effect of the group new).
    """
    if method not in ("complete_pooling", "eb_ml", "eb_reml"):
        raise MethodError(f"fit method '{method}' cannot score a held-out group of this model")
    sub = st.without_top(j)
    xbar, zbars, ybar = _held_out_moments(st, j)
    n_j = float(st.n[st.ancestors[:, 0] == j].sum())
    if method == "complete_pooling":
        beta, cov, s2, _ = _ols(sub)
        lam = np.zeros((st.q_total, st.q_total))
        sigmas = [np.zeros((lv.q, lv.q)) for lv in st.levels]
    else:
        f = fit_nested(sub, "REML" if method == "eb_reml" else "ML")
        beta, cov, s2, lam = f.beta, f.beta_cov, f.sigma**2, f.big_factor
        sigmas = [s2 * la @ la.T for la in f.lams]
    terms = evaluate(st, lam)
    all_top = np.ones(len(st.levels[0].labels), dtype=bool)
    rest = all_top.copy()
    rest[j] = False
    elpd = log_marginal(terms, all_top, st.n_obs, st.p, s2) - log_marginal(
        terms, rest, sub.n_obs, st.p, s2
    )
    centre = float(beta @ xbar) if st.p else 0.0
    var = s2 / n_j + float(xbar @ cov @ xbar)
    for z, sig in zip(zbars, sigmas, strict=True):
        var += float(np.einsum("ha,ab,hb->", z, sig, z))
    sd = float(np.sqrt(var))
    lo, hi = centre - Z90 * sd, centre + Z90 * sd
    return {
        "group": st.levels[0].labels[j],
        "n": n_j,
        "elpd": float(elpd),
        "pred_mean": centre,
        "pred_q5": lo,
        "pred_q95": hi,
        "observed_mean": ybar,
        "error": ybar - centre,
        "covered": bool(lo <= ybar <= hi),
    }


# --------------------------------------------------------------------------- residuals


def residuals(
    design: Any, st: NestedStats, structure: Structure, summary: pd.DataFrame
) -> pd.DataFrame:
    r"""Conditional Pearson residuals (:mod:`hierpipe.diagnostics.residuals`).

    Fitted :math:`\hat y_i = x_i\hat\beta + \sum_\ell z_{\ell i}^\top\hat b_{\ell, g_\ell(i)}`
    with every level's conditional modes (lme4's ``fitted``, statsmodels'
    ``fittedvalues``), recomputed from the summary's ``b_``, ``sd_``, ``cor_`` and
    ``sigma`` (:func:`hierpipe.models.nested_lmm.all_modes`); over :math:`\hat\sigma`.
    Complete pooling has no effects.
    """
    est = summary.set_index("parameter")["mean"]
    beta = np.array([float(est[f"b_{n}"]) for n in st.fixed_names])
    sigma = float(est["sigma"])
    fitted = design.X @ beta if st.p else np.zeros(design.n_obs)
    if f"sd_{st.levels[0].name}__{st.levels[0].coef_names[0]}" in est.index:
        lams = []
        for lv in st.levels:
            sd = np.array([float(est[f"sd_{lv.name}__{c}"]) for c in lv.coef_names])
            cor = np.eye(lv.q)
            for a, b in _cor_pairs(lv):
                key = f"cor_{lv.name}__{lv.coef_names[a]}__{lv.coef_names[b]}"
                cor[a, b] = cor[b, a] = float(np.nan_to_num(est[key]))
            lams.append(semidefinite_cholesky(cor * np.outer(sd, sd)) / sigma)
        modes = all_modes(st, block_diag(*lams), beta)
        names = [lv.name for lv in st.levels]
        for rd in design.random:
            ell = names.index(rd.name)
            cols = [st.levels[ell].coef_names.index(c) for c in rd.z_names]
            fitted = fitted + np.einsum("ia,ia->i", rd.Z, modes[ell][rd.codes][:, cols])
    top = next(rd for rd in design.random if rd.name == st.levels[0].name)
    return residual_table(design.y, fitted, sigma, top.codes, top.labels)


# --------------------------------------------------------------------------- shrinkage


def shrinkage(
    st: NestedStats, structure: Structure, summary: pd.DataFrame, info: dict[str, Any]
) -> pd.DataFrame:
    """Per top-level group: raw mean, the fit's ``coef_`` intercept, the weight on own data.

    As :func:`hierpipe.models.engines.multilevel.shrinkage`: the weight solves
    :math:`\\widehat{coef}_j = \\lambda_j\\bar y_j + (1-\\lambda_j)\\hat\\beta_0` (with
    slopes in the model this compares intercepts with raw means, a rough reading).
    """
    top = st.levels[0]
    G = len(top.labels)
    Qt, p = st.q_total, st.p
    n = np.bincount(st.ancestors[:, 0], weights=st.n, minlength=G)
    ysum = np.bincount(st.ancestors[:, 0], weights=st.sums[:, Qt + p], minlength=G)
    ybar = ysum / n + st.shift
    est = summary.set_index("parameter")["mean"]
    pop = float(est["b_Intercept"]) if "b_Intercept" in est.index else float(ybar @ n / n.sum())
    theta = np.array([est.get(f"coef_{top.name}[{lab},Intercept]", np.nan) for lab in top.labels])
    dev = ybar - pop
    scale = max(abs(pop), float(np.max(np.abs(ybar))))
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(np.abs(dev) > 1e-12 * scale, (theta - pop) / dev, np.nan)
    return pd.DataFrame(
        {
            "group": pd.Series(top.labels, dtype=str),
            "n": n.astype(np.float64),
            "no_pooling": ybar.astype(np.float64),
            "estimate": theta.astype(np.float64),
            "population": np.full(G, pop, dtype=np.float64),
            "weight": lam.astype(np.float64),
            "shrinkage": (1.0 - lam).astype(np.float64),
        }
    )


__all__ = [
    "METHODS",
    "NestedFit",
    "complete_pooling",
    "eb_result",
    "fit",
    "group_labels",
    "prepare",
    "residuals",
    "score_held_out",
    "shrinkage",
]
