r"""Engine of varying intercepts on several grouping factors, nested or crossed.

Formulas such as ``score ~ 1 + (1 | school/classroom)``, ``(1 | a/b/c)``,
``y ~ 1 + x + (1 | student) + (1 | teacher)``: fixed effects of any kind, and a
varying intercept on each factor (nested factors with varying slopes are routed to
:mod:`hierpipe.models.engines.nested_slopes`; crossed ones are refused). The data
are reduced once to per-cell statistics
(:class:`~hierpipe.models.variance_components.CellStats`); nested factors are
evaluated by the recursion of :mod:`hierpipe.models.nested_reml`, all others
by the block elimination of :mod:`hierpipe.models.crossed_reml`.

Outputs (brms/lme4 names): ``b_*``; ``sd_<factor>__Intercept`` for each
factor (``sd_school:classroom__Intercept``); ``sigma``; ``icc_<factor>``;
``r_<factor>[label,Intercept]`` (lme4's ``ranef``) and
``coef_<factor>[label,Intercept]`` = ``b_Intercept`` + that factor's ``r_``
(lme4's ``coef``: for a nested factor it does *not* include the parent's
effect, so ``coef_school:classroom`` is not the classroom's mean).

ICCs (:func:`~hierpipe.models.variance_components.icc_denominators`): for
nested factors :math:`\rho_k = \sigma_k^2/(\sigma_k^2 + \sum_{j \text{ below } k}
\sigma_j^2 + \sigma^2)`, so :math:`\rho_{school} = \sigma^2_{school} /
(\sigma^2_{school} + \sigma^2_{classroom} + \sigma^2)` (two students of a school in
different classrooms) and :math:`\rho_{school:classroom} = \sigma^2_{classroom}
/(\sigma^2_{classroom} + \sigma^2)` (two students of one classroom, within their
school); for crossed factors the share of the total variance.

Intervals: ``eb_ml``/``eb_reml`` give 90% profile-likelihood intervals for the
SDs, sigma and the ICCs (profiles of the fitted criterion), normal intervals
for ``b_``, ``r_`` and ``coef_``; ``gibbs`` gives posterior quantiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import logsumexp, stdtrit

from hierpipe.errors import ConfigError, InputError, MethodError
from hierpipe.models.oneway import Prediction, prediction_rows
from hierpipe.models.result import FitResult, normal_row, point_row, summary_frame
from hierpipe.models.structure import Structure
from hierpipe.models.variance_components import (
    CellStats,
    ComponentsFit,
    cell_stats,
    fit_components,
    icc_denominators,
    iccs,
    make_evaluator,
    nesting_order,
    profile_intervals,
    profile_out,
)

METHODS = ("complete_pooling", "eb_ml", "eb_reml", "gibbs")
GIBBS_KEYS = (
    "chains",
    "warmup",
    "draws",
    "priors",
    "scheme",
    "steps",
    "thin",
    "store_group_draws",
    "backend",
)
Z90 = 1.6448536269514722


@dataclass(frozen=True)
class Prepared:
    """The cell statistics, the nesting (if any) and the factor folds hold out."""

    stats: CellStats
    order: tuple[int, ...] | None
    group_index: int
    source: str

    @property
    def structure_kind(self) -> str:
        return "nested" if self.order is not None else "crossed"


def prepare(design: Any, structure: Structure) -> Prepared:
    """Per-cell statistics; varying slopes and degenerate factors are refused here."""
    text = design.formula.text
    for rt in design.formula.random:
        if not rt.intercept or rt.terms:
            coefs = " + ".join(rt.coef_labels()) or "0"
            raise MethodError(
                f"formula '{text}': term ({coefs} | {rt.name}): models with several grouping "
                "factors are fitted with a varying intercept only, (1 | factor), in this version"
            )
    n = design.n_obs
    for term in design.random:
        if term.n_groups >= n:
            raise InputError(
                f"{design.source}: grouping factor '{term.name}' has {term.n_groups} groups for "
                f"{n} rows; its variance cannot be told apart from sigma (as lme4 refuses)"
            )
    y = design.y
    if y.min() == y.max():
        raise InputError(
            f"{design.source}: column '{structure.response}' has the same value in every row; "
            "there is no variation to model"
        )
    codes = np.column_stack([t.codes for t in design.random])
    stats = cell_stats(
        [t.name for t in design.random],
        [t.labels for t in design.random],
        codes,
        design.X,
        y,
        design.fixed_names,
    )
    names = [t.name for t in design.random]
    return Prepared(stats, nesting_order(stats), names.index(structure.group), design.source)


def group_labels(prep: Prepared) -> tuple[str, ...]:
    return prep.stats.labels[prep.group_index]


# --------------------------------------------------------------------------- helpers


def _dens(prep: Prepared) -> list[tuple[int, ...]]:
    return icc_denominators(prep.stats, prep.order)


def icc_definitions(prep: Prepared) -> dict[str, str]:
    """Each ICC's formula in words, for fit.json and the report."""
    st = prep.stats
    out = {}
    for k, dens in enumerate(_dens(prep)):
        terms = " + ".join([f"var({st.factors[j]})" for j in dens] + ["sigma^2"])
        out[f"icc_{st.factors[k]}"] = f"var({st.factors[k]}) / ({terms})"
    return out


def _check_settings(method: str, settings: dict[str, Any]) -> None:
    unknown = sorted(set(settings) - set(GIBBS_KEYS))
    if unknown:
        raise ConfigError(
            f"fit method '{method}': unknown setting '{unknown[0]}' "
            f"(known: {', '.join(GIBBS_KEYS)})"
        )


def _complete_pooling_fit(st: CellStats) -> tuple[np.ndarray, np.ndarray, float, int]:
    """OLS: beta (shift added back), its covariance, s^2 = RSS/(n-p), df."""
    ev = make_evaluator(st)
    logdet, Q = ev.terms(np.zeros((1, st.K)))
    prof = profile_out(logdet, Q, st.n_obs, st.p, True)
    df = st.n_obs - st.p
    s2 = float(prof.r2[0]) / df
    beta = prof.beta[0].copy()
    if st.intercept is not None:
        beta[st.intercept] += float(st.shift[0])
    cov = s2 * np.linalg.inv(prof.xvx[0]) if st.p else np.zeros((0, 0))
    return beta, cov, s2, df


def complete_pooling(prep: Prepared) -> FitResult:
    r"""One regression for everyone, :math:`y \sim N(X\beta, \sigma^2 I)`: OLS with t intervals.

    Every group's ``coef_`` is ``b_Intercept`` (no group varies).
    """
    st = prep.stats
    beta, cov, s2, df = _complete_pooling_fit(st)
    se = np.sqrt(np.diag(cov))
    t = float(stdtrit(df, 0.95))
    rows = [
        point_row(f"b_{name}", b, s, b - t * s, b + t * s)
        for name, b, s in zip(st.fixed_names, beta, se, strict=True)
    ]
    rows.append(point_row("sigma", np.sqrt(s2)))
    ic = st.intercept
    if ic is not None:
        b, s = beta[ic], se[ic]
        for k, f in enumerate(st.factors):
            rows += [
                point_row(f"coef_{f}[{lab},Intercept]", b, s, b - t * s, b + t * s)
                for lab in st.labels[k]
            ]
    preds = []
    if ic is not None:
        b, s = beta[ic], se[ic]
        sd_obs = np.sqrt(s2 + s**2)
        preds = [
            Prediction(
                "new_group_mean",
                b,
                s,
                b - t * s,
                b + t * s,
                "complete pooling: every group has the common mean",
            ),
            Prediction(
                "new_observation_new_group",
                b,
                sd_obs,
                b - t * sd_obs,
                b + t * sd_obs,
                "t interval on N-p df with the SE of the mean added",
            ),
        ]
    info = {"df": df, "predictions": prediction_rows(preds), "warnings": []}
    return FitResult(summary=summary_frame(rows), info=info)


def _effects(prep: Prepared, ev: Any, fit: ComponentsFit):
    """Conditional modes, their conditional SDs and the coef_ SDs with beta's uncertainty.

    ``r`` is :math:`\\hat b_k(\\hat\\beta)`; its SD is lme4's ``condVar`` (given
    :math:`\\beta`). For ``coef_`` = :math:`\\hat\\beta_0 + \\hat b_h`,
    :math:`\\operatorname{Var}(\\widehat{coef} - coef) = \\operatorname{condVar}
    + a_h^\\top \\operatorname{Cov}(\\hat\\beta) a_h`, :math:`a_h = e_0 -
    \\partial \\hat b_h/\\partial\\beta` (the prediction error of :math:`b` given
    :math:`\\beta` is uncorrelated with :math:`\\hat\\beta`, Henderson 1975).
    """
    st = prep.stats
    th = fit.theta2[None, :]
    modes = ev.modes(th, st.sums)  # per factor (1, G, p+1): columns X then y
    cvar = ev.cond_var(th)
    beta_c = fit.beta.copy()
    if st.intercept is not None:
        beta_c[st.intercept] -= float(st.shift[0])
    out = []
    for k in range(st.K):
        m = modes[k][0]
        bx, by = m[:, : st.p], m[:, st.p]
        r = by - bx @ beta_c
        r_sd = np.sqrt(fit.sigma**2 * cvar[k][0])
        a = -bx
        if st.intercept is not None:
            a[:, st.intercept] += 1.0
        coef_sd = np.sqrt(r_sd**2 + np.einsum("gi,ij,gj->g", a, fit.beta_cov, a))
        out.append((r, r_sd, coef_sd))
    return out


def _boundary_messages(prep: Prepared, fit: ComponentsFit) -> list[str]:
    return [
        f"boundary fit: sd_{prep.stats.factors[k]}__Intercept estimated at 0" for k in fit.boundary
    ]


def eb_result(prep: Prepared, method: str) -> FitResult:
    """ML/REML fit with profile intervals, modes and predictions (module docstring)."""
    st = prep.stats
    ev = make_evaluator(st)
    fit = fit_components(ev, "REML" if method == "eb_reml" else "ML")
    dens = _dens(prep)
    intervals = profile_intervals(fit, ev, dens)
    se_b = np.sqrt(np.diag(fit.beta_cov))
    rows = [
        normal_row(f"b_{n}", b, s) for n, b, s in zip(st.fixed_names, fit.beta, se_b, strict=True)
    ]
    for k, f in enumerate(st.factors):
        name = f"sd_{f}__Intercept"
        rows.append(point_row(name, fit.sds[k], np.nan, *intervals[name]))
    rows.append(point_row("sigma", fit.sigma, np.nan, *intervals["sigma"]))
    icc = iccs(fit.sds[None] ** 2, np.array([fit.sigma**2]), dens)[0]
    for k, f in enumerate(st.factors):
        rows.append(point_row(f"icc_{f}", icc[k], np.nan, *intervals[f"icc_{f}"]))
    effects = _effects(prep, ev, fit)
    b0 = fit.beta[st.intercept] if st.intercept is not None else 0.0
    for k, f in enumerate(st.factors):
        r, r_sd, _ = effects[k]
        rows += [
            normal_row(f"r_{f}[{lab},Intercept]", m, s)
            for lab, m, s in zip(st.labels[k], r, r_sd, strict=True)
        ]
    for k, f in enumerate(st.factors):
        r, _, c_sd = effects[k]
        rows += [
            normal_row(f"coef_{f}[{lab},Intercept]", b0 + m, s)
            for lab, m, s in zip(st.labels[k], r, c_sd, strict=True)
        ]
    boundary = _boundary_messages(prep, fit)
    warnings = list(boundary)
    if not fit.converged:
        warnings.append(f"{fit.method} optimiser convergence checks did not pass")
    checks = fit.convergence["checks"]
    info = {
        "criterion": fit.method,
        "loglik": fit.loglik,
        "reml_criterion": fit.reml_criterion,
        "converged": fit.converged,
        "convergence": checks,
        "optimizer_evaluations": fit.n_evaluations,
        "structure": prep.structure_kind,
        "intervals": "sd_, sigma, icc_: 90% profile likelihood "
        + ("(restricted)" if method == "eb_reml" else "")
        + " with the chi-square(1) cut-off 2.706; b_, r_, coef_: normal",
        "icc_definitions": icc_definitions(prep),
        "variance_components": _components(st, fit.sds**2, fit.sigma**2),
        "boundary": boundary,
        "warnings": warnings,
        "predictions": prediction_rows(_eb_predictions(st, fit, se_b)),
    }
    return FitResult(summary=summary_frame(rows), info=info)


def _components(st: CellStats, var: np.ndarray, sigma2: float) -> dict[str, float]:
    out = {f: float(v) for f, v in zip(st.factors, var, strict=True)}
    out["residual"] = float(sigma2)
    return out


def _eb_predictions(st: CellStats, fit: ComponentsFit, se_b: np.ndarray) -> list[Prediction]:
    if st.intercept is None:
        return []
    b0, se0 = fit.beta[st.intercept], se_b[st.intercept]
    top = int(np.argmin(st.group_counts))
    sd_mean = np.sqrt(fit.sds[top] ** 2 + se0**2)
    sd_obs = np.sqrt(np.sum(fit.sds**2) + fit.sigma**2 + se0**2)
    return [
        Prediction(
            "new_group_mean",
            b0,
            sd_mean,
            b0 - Z90 * sd_mean,
            b0 + Z90 * sd_mean,
            f"a new {st.factors[top]}'s mean: normal, var({st.factors[top]}) + "
            "SE(b_Intercept)^2, variances plugged in",
        ),
        Prediction(
            "new_observation_new_group",
            b0,
            sd_obs,
            b0 - Z90 * sd_obs,
            b0 + Z90 * sd_obs,
            "normal: every factor's variance + sigma^2 + SE(b_Intercept)^2 "
            "(new groups of every factor)",
        ),
    ]


# --------------------------------------------------------------------------- gibbs


def resolve_priors(st: CellStats, given: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Config priors over the defaults: flat b_Intercept, half-Cauchy(outcome SD) on every SD."""
    p = st.p
    y = st.zbar[0, :, p]
    total = st.within[0, :, p, p].sum() + float(
        np.dot(st.n, (y - np.dot(st.n, y) / st.n.sum()) ** 2)
    )
    scale = float(np.sqrt(total / max(st.n_obs - 1, 1))) or 1.0
    priors: dict[str, dict[str, Any]] = {
        "b_Intercept": {"family": "flat"},
        "sd": {"family": "half_cauchy", "scale": scale},
        "sigma": {"family": "half_cauchy", "scale": scale},
    }
    for name, spec in (given or {}).items():
        merged = dict(spec)
        if merged.get("family") == "half_cauchy" and "scale" not in merged:
            merged["scale"] = priors[name]["scale"]
        priors[name] = merged
    return priors


def priors_from_config(priors: dict[str, dict[str, Any]]):
    """The sampler's prior objects (half_cauchy or inv_gamma SDs; flat or normal b_Intercept).

    The families are the two-level sampler's; one SD prior serves every factor.
    """
    from hierpipe.models.gibbs_fit import priors_from_config as two_level_priors
    from hierpipe.models.gibbs_multilevel import MultilevelPriors

    p = two_level_priors(priors, sampler="multilevel")
    return MultilevelPriors(sd=p.sd, sigma=p.sigma, b_Intercept=p.b_Intercept)


def gibbs_settings(settings: dict[str, Any]):
    from hierpipe.models.gibbs_multilevel import MultilevelSettings

    try:
        s = MultilevelSettings(
            chains=int(settings.get("chains", 4)),
            warmup=int(settings.get("warmup", 1000)),
            draws=int(settings.get("draws", 1000)),
            thin=int(settings.get("thin", 1)),
            scheme=str(settings.get("scheme", "collapsed")),  # type: ignore[arg-type]
            steps=int(settings.get("steps", 5)),
            backend=str(settings.get("backend", "numpy")),
        )
    except (TypeError, ValueError):
        raise ConfigError(
            "gibbs settings chains, warmup, draws, thin and steps must be integers"
        ) from None
    if s.chains < 1 or s.warmup < 0 or s.draws < 10 or s.thin < 1 or s.steps < 1:
        raise ConfigError(
            "gibbs needs chains >= 1, warmup >= 0, draws >= 10, thin >= 1, steps >= 1"
        )
    if s.backend not in ("numpy", "numba"):
        raise ConfigError(f"gibbs setting 'backend' must be numpy or numba, got {s.backend!r}")
    return s


def run_gibbs(st: CellStats, settings: dict[str, Any], rng: np.random.Generator):
    """Draws and the priors as resolved from config."""
    from hierpipe.models.gibbs_multilevel import gibbs_multilevel

    priors = resolve_priors(st, settings.get("priors"))
    sample = gibbs_multilevel(
        make_evaluator(st), priors_from_config(priors), gibbs_settings(settings), rng
    )
    return sample, priors


def gibbs_result(prep: Prepared, settings: dict[str, Any], rng: np.random.Generator) -> FitResult:
    """Summary, draws and facts of one Gibbs run (posterior quantiles as intervals)."""
    from hierpipe.diagnostics.convergence import summarise_draws
    from hierpipe.models.gibbs_fit import draws_frame

    st = prep.stats
    sample, priors = run_gibbs(st, settings, rng)
    arrays: dict[str, np.ndarray] = {}
    for i, name in enumerate(st.fixed_names):
        arrays[f"b_{name}"] = sample.beta[..., i]
    for k, f in enumerate(st.factors):
        arrays[f"sd_{f}__Intercept"] = sample.sd[..., k]
    arrays["sigma"] = sample.sigma
    icc = iccs(sample.sd**2, sample.sigma**2, _dens(prep))
    for k, f in enumerate(st.factors):
        arrays[f"icc_{f}"] = icc[..., k]
    for k, f in enumerate(st.factors):
        for g, lab in enumerate(st.labels[k]):
            arrays[f"r_{f}[{lab},Intercept]"] = sample.r[k][..., g]
    b0 = sample.beta[..., st.intercept] if st.intercept is not None else 0.0
    for k, f in enumerate(st.factors):
        for g, lab in enumerate(st.labels[k]):
            arrays[f"coef_{f}[{lab},Intercept]"] = b0 + sample.r[k][..., g]
    summary = summarise_draws(arrays)
    stored = _stored_columns(st, settings.get("store_group_draws"))
    preds = []
    if st.intercept is not None:
        top = int(np.argmin(st.group_counts))
        mean_new = b0 + sample.sd[..., top] * rng.standard_normal(b0.shape)
        total_sd = np.sqrt((sample.sd**2).sum(axis=-1) + sample.sigma**2)
        y_new = b0 + total_sd * rng.standard_normal(b0.shape)
        for target, x, how in (
            (
                "new_group_mean",
                mean_new,
                f"posterior predictive draws of a new {st.factors[top]}'s mean",
            ),
            (
                "new_observation_new_group",
                y_new,
                "posterior predictive draws (new groups of every factor)",
            ),
        ):
            q5, q95 = np.quantile(x, [0.05, 0.95])
            preds.append(
                Prediction(
                    target, float(x.mean()), float(x.std(ddof=1)), float(q5), float(q95), how
                )
            )
    info = {
        **sample.info(),
        "priors_config": priors,
        "structure": prep.structure_kind,
        "intervals": "90% posterior quantiles",
        "icc_definitions": icc_definitions(prep),
        "variance_components": _components(
            st, (sample.sd**2).mean(axis=(0, 1)), float((sample.sigma**2).mean())
        ),
        "predictions": prediction_rows(preds),
        "warnings": [],
    }
    kept = {k: v for k, v in arrays.items() if not k.startswith(("r_", "coef_")) or k in stored}
    return FitResult(summary=summary, draws=draws_frame(kept), info=info)


def _stored_columns(st: CellStats, setting: Any) -> set[str]:
    """r_/coef_ columns whose draws go into draws.parquet (``store_group_draws``, per factor)."""
    from hierpipe.models.gibbs_fit import stored_groups

    out = set()
    for k, f in enumerate(st.factors):
        for g in stored_groups(len(st.labels[k]), setting):
            lab = st.labels[k][g]
            out |= {f"r_{f}[{lab},Intercept]", f"coef_{f}[{lab},Intercept]"}
    return out


# --------------------------------------------------------------------------- interface


def fit(
    prep: Prepared,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> FitResult:
    """Fit the multilevel model by ``method`` from the cell statistics."""
    _check_settings(method, settings)
    if method == "complete_pooling":
        return complete_pooling(prep)
    if method in ("eb_ml", "eb_reml"):
        return eb_result(prep, method)
    if method == "gibbs":
        return gibbs_result(prep, settings, rng)
    raise MethodError(f"fit method '{method}' does not apply to multilevel models")


# --------------------------------------------------------------------------- CV


def cv_log_density(
    st: CellStats, sub: CellStats, sds: np.ndarray, sigma: np.ndarray, priors: Any = None
) -> np.ndarray:
    """:math:`\\log p(y_j \\mid y_{-j})` given each row of ``sds`` (S, K) and ``sigma`` (S,).

    The held-out rows' density with :math:`\\beta` and every effect integrated out:
    :math:`\\log m(y) - \\log m(y_{-j})`, :math:`m` the marginal likelihood with
    :math:`\\beta` integrated against its prior (flat unless ``priors`` gives
    ``b_Intercept`` a normal one); the held-out rows' 2-pi terms are added back,
    all other constants cancel.
    """
    from hierpipe.models.gibbs_multilevel import MultilevelPriors, _Marginal
    from hierpipe.models.gibbs_twolevel import HalfCauchy

    if priors is None:  # the SD priors cancel; only beta's matters
        priors = MultilevelPriors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0))
    u = np.column_stack([np.log(np.maximum(sds, 1e-300)), np.log(sigma)])
    full = _Marginal(make_evaluator(st), priors).logp(u)
    rest = _Marginal(make_evaluator(sub), priors).logp(u)
    return full - rest - 0.5 * (st.n_obs - sub.n_obs) * np.log(2.0 * np.pi)


def _held_out(prep: Prepared, j: int):
    st = prep.stats
    keep = st.codes[:, prep.group_index] != j
    return keep, st.subset(keep)


def _touch(st: CellStats, keep: np.ndarray, k: int):
    """Factor k's groups touched by the held-out cells: full codes, weights, sub index or -1."""
    held = ~keep
    n_j = st.n[held].sum()
    codes = st.codes[held, k]
    w = np.bincount(codes, weights=st.n[held], minlength=len(st.labels[k])) / n_j
    touched = np.flatnonzero(w)
    present = np.unique(st.codes[keep, k])
    pos = np.searchsorted(present, touched)
    pos = np.where(
        (pos < present.size) & (present[np.minimum(pos, present.size - 1)] == touched), pos, -1
    )
    return w[touched], pos


def score_held_out(
    prep: Prepared, j: int, method: str, settings: dict[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    r"""Refit without group ``j`` and score its observations.

    The log predictive density is exact given the variances: with :math:`\beta`
    and every effect integrated out (:func:`cv_log_density`),
    :math:`\log p(y_j \mid y_{-j}) = \log m(y) - \log m(y_{-j})`, :math:`m` the
    integrated likelihood, at the refitted variances
    (plug-in) or averaged over the refit's draws (Gibbs). The 90% interval for
    the group's mean uses, for each factor's groups the held-out rows touch,
    the refit's estimate where the group is in the training data and a new
    group's variance where it is not; for point fits it adds the variances
    (conditional SDs of the effects, covariance of :math:`\hat\beta`) without
    their covariances, exact when no group is shared (nested data), a
    normal approximation otherwise.
    """
    st = prep.stats
    keep, sub = _held_out(prep, j)
    held = ~keep
    n_j = float(st.n[held].sum())
    xbar = (st.n[held, None] * st.zbar[0, held, : st.p]).sum(axis=0) / n_j
    ybar = float((st.n[held] * st.zbar[0, held, st.p]).sum() / n_j + st.shift[0])
    if method == "gibbs":
        sample, priors = run_gibbs(sub, settings, rng)
        sd = sample.sd.reshape(-1, st.K)
        s2 = sample.sigma.reshape(-1) ** 2
        lp = cv_log_density(st, sub, sd, np.sqrt(s2), priors_from_config(priors))
        elpd = float(logsumexp(lp) - np.log(lp.size))
        beta = sample.beta.reshape(-1, st.p)
        mean = beta @ xbar if st.p else np.zeros(s2.size)
        var = s2 / n_j
        for k in range(st.K):
            w, pos = _touch(st, keep, k)
            r = sample.r[k].reshape(-1, sample.r[k].shape[-1])
            for wi, pi in zip(w, pos, strict=True):
                if pi >= 0:
                    mean = mean + wi * r[:, pi]
                else:
                    var = var + wi**2 * sd[:, k] ** 2
        sims = mean + np.sqrt(var) * rng.standard_normal(mean.size)
        centre = float(mean.mean())
        lo, hi = (float(q) for q in np.quantile(sims, [0.05, 0.95]))
    else:
        if method == "complete_pooling":
            beta, cov, s2f, _ = _complete_pooling_fit(sub)
            sds = np.zeros(st.K)
            modes = None
        elif method in ("eb_ml", "eb_reml"):
            ev = make_evaluator(sub)
            cf = fit_components(ev, "REML" if method == "eb_reml" else "ML")
            beta, cov, s2f, sds = cf.beta, cf.beta_cov, cf.sigma**2, cf.sds
            sub_prep = Prepared(sub, prep.order, prep.group_index, prep.source)
            modes = _effects(sub_prep, ev, cf)
        else:
            raise MethodError(f"fit method '{method}' cannot predict a new group")
        lp = cv_log_density(st, sub, sds[None, :], np.array([np.sqrt(s2f)]))
        elpd = float(lp[0])
        centre = float(beta @ xbar) if st.p else 0.0
        var = s2f / n_j + float(xbar @ cov @ xbar)
        for k in range(st.K):
            w, pos = _touch(st, keep, k)
            for wi, pi in zip(w, pos, strict=True):
                if pi >= 0 and modes is not None:
                    centre += wi * modes[k][0][pi]
                    var += wi**2 * modes[k][1][pi] ** 2
                elif pi < 0:
                    var += wi**2 * sds[k] ** 2
        sd_pred = float(np.sqrt(var))
        lo, hi = centre - Z90 * sd_pred, centre + Z90 * sd_pred
    return {
        "group": st.labels[prep.group_index][j],
        "n": n_j,
        "elpd": elpd,
        "pred_mean": centre,
        "pred_q5": lo,
        "pred_q95": hi,
        "observed_mean": ybar,
        "error": ybar - centre,
        "covered": bool(lo <= ybar <= hi),
    }


# --------------------------------------------------------------------------- shrinkage


def shrinkage(
    prep: Prepared, structure: Structure, summary: pd.DataFrame, info: dict[str, Any]
) -> pd.DataFrame:
    """Per group of the first factor: raw mean, the fit's ``coef_``, and the weight on own data.

    The weight :math:`\\lambda_j` solves :math:`\\widehat{coef}_j = \\lambda_j \\bar
    y_j + (1-\\lambda_j)\\hat\\beta_0`; groups of the other factors are in the
    report's per-level shrinkage (:mod:`hierpipe.report.sections.variance_decomposition`).
    """
    st = prep.stats
    k = prep.group_index
    f = st.factors[k]
    G = len(st.labels[k])
    n = st.group_sizes(k)
    ysum = np.bincount(st.codes[:, k], weights=st.n * st.zbar[0, :, st.p], minlength=G)
    ybar = ysum / n + st.shift[0]
    est = summary.set_index("parameter")["mean"]
    pop = (
        float(est["b_Intercept"])
        if "b_Intercept" in est.index
        else float((ysum.sum()) / n.sum() + st.shift[0])
    )
    theta = np.array([est.get(f"coef_{f}[{lab},Intercept]", np.nan) for lab in st.labels[k]])
    dev = ybar - pop
    scale = max(abs(pop), float(np.max(np.abs(ybar))))
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(np.abs(dev) > 1e-12 * scale, (theta - pop) / dev, np.nan)
    return pd.DataFrame(
        {
            "group": pd.Series(st.labels[k], dtype=str),
            "n": n.astype(np.float64),
            "no_pooling": ybar.astype(np.float64),
            "estimate": theta.astype(np.float64),
            "population": np.full(G, pop, dtype=np.float64),
            "weight": lam.astype(np.float64),
            "shrinkage": (1.0 - lam).astype(np.float64),
        }
    )


# Optional engine functions (model checks, PSIS-LOGO, within-group K-fold); see
# hierpipe.models.engines for the interface. Kept in their own module.
from hierpipe.models.engines.multilevel_checks import (  # noqa: E402, F401
    james_stein_table,
    james_stein_unavailable,
    kfold_split,
    logo_log_lik,
    ppc_replicates,
    prior_predictive,
    residuals,
    score_held_out_weighted,
    score_kfold,
)
