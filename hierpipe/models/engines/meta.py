r"""Engine of the meta-analysis ``yi | se(sei) ~ 1 [+ moderators] + (1 | study)``.

The model (see :mod:`hierpipe.models.meta`) is

.. math::

    y_j = x_j^\top\beta + u_j + e_j, \qquad u_j \sim N(0, \tau^2), \qquad
    e_j \sim N(0, v_j), \qquad v_j = \mathrm{se}_j^2 \text{ known},

one row a study. Its sufficient statistics are the triples :math:`(y_j, v_j,
x_j)` themselves (:class:`MetaData`). Summary names follow brms:
``b_Intercept`` and ``b_<moderator>`` (:math:`\beta`), ``sd_<g>__Intercept``
(:math:`\tau`), ``r_<g>[j,Intercept]`` (:math:`u_j`) and
``coef_<g>[j,Intercept]`` (:math:`\beta_0 + u_j`, lme4's ``coef``; without
moderators this is the study's true effect :math:`\theta_j`); there is no
``sigma``. Everything else a meta-analyst reads (:math:`\tau^2` and its
Q-profile interval, Cochran's Q, :math:`I^2`, :math:`H^2`, the prediction
interval, the study effects :math:`x_j^\top\beta + u_j`) goes into
``fit.json`` under ``"meta"``.

Fit methods
-----------
``meta_dl``, ``meta_pm``, ``meta_ml``, ``meta_reml``, ``meta_hs``, ``meta_sj``
    :func:`hierpipe.models.meta.meta_fit` with that :math:`\tau^2` estimator;
    settings ``knha`` (Knapp-Hartung) and ``level`` (of the intervals in
    ``fit.json``; ``summary.parquet`` always holds 90% intervals).
``complete_pooling``
    the fixed-effect (common-effect) model, inverse-variance weights.
``no_pooling``
    each study's own estimate with its standard error.
``meta_bayes``
    the exact posterior (:mod:`hierpipe.models.meta_bayes`), setting ``prior``.
``gibbs``
    the interweaving Gibbs sampler (:mod:`hierpipe.models.gibbs_meta`), settings
    ``chains``, ``warmup``, ``draws`` and ``prior``.

The two Bayesian fits take the intercept-only model (a flat prior on
:math:`\mu`); meta-regression is fitted by the frequentist estimators.

Leave one study out
-------------------
:func:`score_held_out` refits without study :math:`j` and scores its estimate
under the predictive :math:`y_j \sim N(x_j^\top\hat\beta_{(-j)}, \hat\tau^2_{(-j)} +
v_j + x_j^\top V_{\beta(-j)} x_j)` (plug-in fits), or the exact posterior
predictive mixture (``meta_bayes``) or its Monte Carlo average over draws
(``gibbs``). Besides the CV columns each row carries the influence of the study
(Viechtbauer & Cheung 2010): :math:`\hat\mu`, its SE, :math:`\hat\tau` and the
prediction interval without the study, and the externally standardised residual.

References
----------
Viechtbauer, W. & Cheung, M. W.-L. (2010). Outlier and influence diagnostics for
meta-analysis. *Research Synthesis Methods* 1, 112-125.
Higgins, J. P. T., Thompson, S. G. & Spiegelhalter, D. J. (2009). A re-evaluation
of random-effects meta-analysis. *JRSS A* 172, 137-159.
IntHout, J., Ioannidis, J. P. A. & Borm, G. F. (2014). The Hartung-Knapp-Sidik-
Jonkman method for random effects meta-analysis is straightforward and
considerably outperforms the standard DerSimonian-Laird method. *BMC Medical
Research Methodology* 14, 25.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import stats
from scipy.special import logsumexp

from hierpipe.data.meta_input import study_order
from hierpipe.errors import ConfigError, MethodError
from hierpipe.models.meta import FIXED, MetaResult, meta_fit, q_profile_ci
from hierpipe.models.oneway import Prediction, prediction_rows
from hierpipe.models.result import FitResult, normal_row, point_row, summary_frame
from hierpipe.models.structure import Structure

FloatArray = NDArray[np.float64]

ESTIMATORS: dict[str, str] = {
    "meta_dl": "DL",
    "meta_pm": "PM",
    "meta_ml": "ML",
    "meta_reml": "REML",
    "meta_hs": "HS",
    "meta_sj": "SJ",
}
ESTIMATOR_NAMES: dict[str, str] = {
    "DL": "DerSimonian-Laird",
    "PM": "Paule-Mandel",
    "ML": "maximum likelihood",
    "REML": "restricted maximum likelihood",
    "HS": "Hunter-Schmidt",
    "SJ": "Sidik-Jonkman",
    FIXED: "fixed effect (inverse variance)",
}
METHODS = ("complete_pooling", "no_pooling", *ESTIMATORS, "meta_bayes", "gibbs")
BAYES = ("meta_bayes", "gibbs")

Z90 = float(stats.norm.ppf(0.95))
# below this many studies tau is poorly identified (the threshold; with
# k < 5 the Q-profile interval for tau2 typically spans two orders of magnitude)
FEW_STUDIES = 5
# below this many studies the report recommends Knapp-Hartung: the normal-theory
# interval for mu then undercovers noticeably (IntHout et al. 2014)
KNHA_ADVISED_BELOW = 10
PI_VARIANT_HTS = "Higgins, Thompson & Spiegelhalter (2009): mu +- t(k-2) * sqrt(tau2 + SE(mu)^2)"
PI_VARIANT_METAFOR = "metafor default: mu +- z * sqrt(tau2 + SE(mu)^2) (t(k-p) under Knapp-Hartung)"


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MetaData:
    """One row a study, in the order of the study labels.

    Attributes
    ----------
    labels : study labels.
    y, v : effect sizes and their known sampling variances.
    X : design matrix (intercept and moderators), one row a study.
    names : brms names of the columns of ``X`` (``"Intercept"``, ``"year"``).
    source : the table's name, for messages.
    """

    labels: tuple[str, ...]
    y: FloatArray
    v: FloatArray
    X: FloatArray
    names: tuple[str, ...]
    source: str

    @property
    def k(self) -> int:
        return len(self.labels)

    @property
    def intercept_only(self) -> bool:
        return self.names == ("Intercept",)

    def without(self, j: int) -> MetaData:
        keep = np.arange(self.k) != j
        labels = tuple(lab for i, lab in enumerate(self.labels) if i != j)
        return MetaData(labels, self.y[keep], self.v[keep], self.X[keep], self.names, self.source)


def prepare(design: Any, structure: Structure) -> MetaData:
    """The studies' :math:`(y_j, v_j, x_j)`, one row a study (validated)."""
    random = design.random
    if len(random) != 1 or random[0].z_names != ("Intercept",):
        raise MethodError(
            f"formula '{design.formula.text}': a meta-analysis takes one varying intercept, "
            "e.g. 'yi | se(sei) ~ 1 + year + (1 | study)'"
        )
    order = study_order(design)
    se = np.asarray(design.se, dtype=np.float64)[order]
    return MetaData(
        labels=random[0].labels,
        y=np.asarray(design.y, dtype=np.float64)[order],
        v=se**2,
        X=np.asarray(design.X, dtype=np.float64)[order],
        names=design.fixed_names,
        source=design.source,
    )


def group_labels(data: MetaData) -> tuple[str, ...]:
    return data.labels


# ----------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------


def _level(settings: dict[str, Any]) -> float:
    level = settings.get("level", 0.95)
    if not isinstance(level, int | float) or not 0.5 <= float(level) < 1.0:
        raise ConfigError(f"meta.level must be a number in [0.5, 1), got {level!r}")
    return float(level)


def _knha(settings: dict[str, Any]) -> bool:
    knha = settings.get("knha", False)
    if not isinstance(knha, bool):
        raise ConfigError(f"meta.knha must be true or false, got {knha!r}")
    return knha


def _gibbs_settings(settings: dict[str, Any]) -> tuple[int, int, int]:
    if settings.get("priors"):
        raise ConfigError(
            "gibbs.priors does not apply to a meta-analysis: set the prior on tau with "
            "meta.prior (the prior on b_Intercept is flat, as in meta_bayes)"
        )
    try:
        chains = int(settings.get("chains", 4))
        warmup = int(settings.get("warmup", 1000))
        draws = int(settings.get("draws", 1000))
    except (TypeError, ValueError):
        raise ConfigError("gibbs settings chains, warmup and draws must be integers") from None
    if chains < 1 or warmup < 0 or draws < 10:
        raise ConfigError("gibbs needs chains >= 1, warmup >= 0 and draws >= 10")
    return chains, warmup, draws


def _need_intercept_only(data: MetaData, method: str) -> None:
    if not data.intercept_only:
        raise MethodError(
            f"fit method '{method}' fits the intercept-only meta-analysis; for moderators "
            f"({', '.join(data.names[1:])}) use meta_reml, meta_ml, meta_dl, meta_pm, "
            "meta_hs or meta_sj"
        )


def _num(x: float) -> float | None:
    """A float for fit.json, None where undefined (JSON has no NaN)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _few_studies_warnings(k: int, knha: bool | None) -> list[str]:
    if k >= FEW_STUDIES:
        return []
    advice = "" if knha is not False else "; consider meta.knha: true (Hartung-Knapp-Sidik-Jonkman)"
    return [
        f"only {k} studies: tau (the between-study SD) is poorly identified, so its "
        f"estimate and every interval that depends on it are unreliable{advice}"
    ]


# ----------------------------------------------------------------------------
# frequentist fits
# ----------------------------------------------------------------------------


def _fit_frequentist(data: MetaData, method: str, settings: dict[str, Any]) -> MetaResult:
    tau2_method = FIXED if method == "complete_pooling" else ESTIMATORS[method]
    return meta_fit(
        data.y, data.v, data.X, method=tau2_method, knha=_knha(settings), level=_level(settings)
    )


def _crit90(res: MetaResult) -> float:
    """Two-sided 90% critical value of the fit's reference distribution."""
    return float(stats.t.ppf(0.95, res.df)) if res.test == "t" else Z90


def _coefficient_rows(data: MetaData, res: MetaResult) -> list[dict[str, Any]]:
    crit = _crit90(res)
    return [
        point_row(f"b_{name}", b, se, b - crit * se, b + crit * se)
        for name, b, se in zip(data.names, res.beta, res.se, strict=True)
    ]


def _study_rows(data: MetaData, group: str, res: MetaResult) -> list[dict[str, Any]]:
    r"""``r_`` and ``coef_`` rows of a random-effects fit.

    :math:`\hat u_j = \lambda_j (y_j - x_j^\top\hat\beta)` with
    :math:`\lambda_j = \hat\tau^2/(\hat\tau^2 + v_j)`; its SD is the conditional SD
    given :math:`\beta`, :math:`\sqrt{\lambda_j v_j}` (lme4's ``condVar``, as the
    one-way engine). ``coef_`` is :math:`\hat\beta_0 + \hat u_j = \lambda_j y_j +
    c_j^\top\hat\beta` with :math:`c_j = e_1 - \lambda_j x_j`, whose prediction SD
    is :math:`\sqrt{\lambda_j v_j + c_j^\top V_\beta c_j}` (Henderson 1975; without
    moderators this is metafor's ``blup`` SE).
    """
    lam = res.tau2 / (res.tau2 + data.v)
    xb = np.einsum("ki,i->k", data.X, res.beta)
    u = lam * (data.y - xb)
    u_sd = np.sqrt(lam * data.v)
    c = -lam[:, None] * data.X
    c[:, 0] += 1.0
    coef_sd = np.sqrt(lam * data.v + np.einsum("ki,ij,kj->k", c, res.vcov, c))
    rows = [
        normal_row(f"r_{group}[{lab},Intercept]", m, s)
        for lab, m, s in zip(data.labels, u, u_sd, strict=True)
    ]
    rows += [
        normal_row(f"coef_{group}[{lab},Intercept]", res.beta[0] + m, s)
        for lab, m, s in zip(data.labels, u, coef_sd, strict=True)
    ]
    return rows


def _meta_facts(data: MetaData, res: MetaResult, method: str) -> dict[str, Any]:
    """What fit.json says about a frequentist fit, under ``"meta"``."""
    coefficients = [
        {
            "parameter": f"b_{name}",
            "estimate": float(b),
            "se": float(se),
            "statistic": _num(z),
            "pval": _num(p),
            "ci_lb": float(lo),
            "ci_ub": float(hi),
        }
        for name, b, se, z, p, lo, hi in zip(
            data.names, res.beta, res.se, res.zval, res.pval, res.ci_lb, res.ci_ub, strict=True
        )
    ]
    facts: dict[str, Any] = {
        "method": method,
        "estimator": res.method,
        "estimator_name": ESTIMATOR_NAMES[res.method],
        "k": res.k,
        "p": res.p,
        "level": res.level,
        "knha": res.test == "t",
        "test": res.test,
        "df": _num(res.df),
        "s2w": res.s2w,
        "coefficients": coefficients,
        "tau2": res.tau2,
        "tau2_se": _num(res.se_tau2),
        "tau2_ci": [res.tau2_ci_lb, res.tau2_ci_ub],
        "tau": res.tau,
        "tau_ci": [float(np.sqrt(res.tau2_ci_lb)), float(np.sqrt(res.tau2_ci_ub))],
        "Q": res.Q,
        "Q_df": res.Q_df,
        "Q_pval": res.Q_pval,
        "I2": res.I2,
        "I2_ci": [res.I2_ci_lb, res.I2_ci_ub],
        "H2": res.H2,
        "H2_ci": [res.H2_ci_lb, res.H2_ci_ub],
        "boundary": bool(res.boundary),
        "loglik": res.loglik,
        "loglik_reml": res.loglik_reml,
        "study_effects": {
            "study": list(data.labels),
            "estimate": res.blup.tolist(),
            "se": res.blup_se.tolist(),
        },
        "knha_advised": res.k < KNHA_ADVISED_BELOW and res.test != "t",
    }
    if data.intercept_only and res.method != FIXED:
        facts["pi"] = {
            "lb": _num(res.pi_hts_lb),
            "ub": _num(res.pi_hts_ub),
            "variant": PI_VARIANT_HTS,
        }
        facts["pi_metafor"] = {"lb": res.pi_lb, "ub": res.pi_ub, "variant": PI_VARIANT_METAFOR}
    return facts


def _frequentist(data: MetaData, group: str, method: str, settings: dict[str, Any]) -> FitResult:
    res = _fit_frequentist(data, method, settings)
    rows = _coefficient_rows(data, res)
    fixed = res.method == FIXED
    if fixed:
        # every study has the common effect b_Intercept (brms' coef without a varying part)
        b0 = rows[0]
        rows += [
            point_row(f"coef_{group}[{lab},Intercept]", b0["mean"], b0["sd"], b0["q5"], b0["q95"])
            for lab in data.labels
        ]
    else:
        # 90% Q-profile interval for tau2, square-rooted: an exact interval for tau
        lo, hi = q_profile_ci(data.y, data.v, data.X, level=0.90)
        tau_se = res.se_tau2 / (2.0 * res.tau) if res.tau > 0 else np.nan
        rows.append(point_row(f"sd_{group}__Intercept", res.tau, tau_se, np.sqrt(lo), np.sqrt(hi)))
        rows += _study_rows(data, group, res)
    facts = _meta_facts(data, res, method)
    boundary = []
    if res.boundary:
        boundary.append(
            f"boundary fit: tau2 estimated at 0 ({ESTIMATOR_NAMES[res.method]}; "
            f"Q = {res.Q:.3g} on {res.Q_df} df), so every study is shrunk fully to the mean"
        )
    warnings = [*boundary, *_few_studies_warnings(res.k, facts["knha"])]
    lam = np.zeros(res.k) if fixed else res.tau2 / (res.tau2 + data.v)
    info: dict[str, Any] = {
        "meta": facts,
        "boundary": boundary,
        "warnings": warnings,
        "shrinkage": {lab: float(w) for lab, w in zip(data.labels, lam, strict=True)},
        "predictions": _plugin_predictions(data, res),
    }
    return FitResult(summary=summary_frame(rows), info=info)


def _plugin_predictions(data: MetaData, res: MetaResult) -> list[dict[str, Any]]:
    if not data.intercept_only:
        return []
    mu, se = float(res.beta[0]), float(res.se[0])
    if res.method == FIXED:
        crit = _crit90(res)
        pred = Prediction(
            "new_study_effect", mu, se, mu - crit * se, mu + crit * se,
            "fixed effect: every study has the common effect",
        )  # fmt: skip
        return prediction_rows([pred])
    sd = float(np.sqrt(res.tau2 + se**2))
    df = res.k - 2
    crit = float(stats.t.ppf(0.95, df)) if df >= 1 else Z90
    kind = "t(k-2) * sqrt(tau2 + SE(mu)^2) (Higgins et al. 2009)" if df >= 1 else "normal"
    pred = Prediction("new_study_effect", mu, sd, mu - crit * sd, mu + crit * sd, kind)
    return prediction_rows([pred])


def _no_pooling(data: MetaData, group: str) -> FitResult:
    se = np.sqrt(data.v)
    rows = [
        normal_row(f"coef_{group}[{lab},Intercept]", m, s)
        for lab, m, s in zip(data.labels, data.y, se, strict=True)
    ]
    info = {
        "meta": {"method": "no_pooling", "k": data.k},
        "warnings": [],
        "shrinkage": dict.fromkeys(data.labels, 1.0),
    }
    return FitResult(summary=summary_frame(rows), info=info)


# ----------------------------------------------------------------------------
# Bayesian fits
# ----------------------------------------------------------------------------


def _posterior(data: MetaData, settings: dict[str, Any]):
    from hierpipe.models.gibbs_meta import tau_prior_from_config
    from hierpipe.models.meta_bayes import posterior_tau_grid

    prior = tau_prior_from_config(settings.get("prior"), data.k)
    return prior, posterior_tau_grid(data.y, data.v, prior.family, prior.scale)


def _density_for_plot(post: Any, points: int = 301) -> dict[str, list[float]]:
    """The posterior density of tau on an even grid up to its 99.9% quantile (for the report)."""
    top = float(post.quantile(0.999))
    tau = np.linspace(0.0, top, points)
    dens = np.interp(tau, post.grid, post.density, left=0.0)
    return {"tau": tau.tolist(), "density": dens.tolist()}


def _meta_bayes(data: MetaData, group: str, settings: dict[str, Any]) -> FitResult:
    from hierpipe.models.meta_bayes import (
        mixture_quantiles,
        mixture_weights,
        new_study_mixture,
        study_effect_mixtures,
    )

    _need_intercept_only(data, "meta_bayes")
    level = _level(settings)
    prior, post = _posterior(data, settings)
    idx, w = mixture_weights(post)
    probs = [0.05, 0.5, 0.95, (1 - level) / 2, (1 + level) / 2]
    mu_q = mixture_quantiles(w, post._mu_hat[idx], np.sqrt(post._v_mu[idx]), probs)
    new_m, new_s = new_study_mixture(post)
    new_q = mixture_quantiles(w, new_m[idx], new_s[idx], probs)
    tm, ts, rm, rs = study_effect_mixtures(post, idx)
    q = mixture_quantiles(w, np.hstack([tm, rm]), np.hstack([ts, rs]), probs[:3])
    theta_q, r_q = q[: data.k], q[data.k :]
    r_mean = post.theta_mean - post.mu_mean
    r_sd = np.sqrt(np.maximum(w @ (rs**2 + rm**2) - (w @ rm) ** 2, 0.0))
    tau_q = post.quantile(np.array(probs))

    def row(name: str, mean: float, sd: float, qs: FloatArray) -> dict[str, Any]:
        return {"parameter": name, "mean": mean, "sd": sd, "q5": qs[0], "q50": qs[1], "q95": qs[2]}

    rows = [
        row("b_Intercept", post.mu_mean, post.mu_sd, mu_q),
        row(f"sd_{group}__Intercept", post.mean, post.sd, tau_q),
    ]
    rows += [
        row(f"r_{group}[{lab},Intercept]", r_mean[j], r_sd[j], r_q[j])
        for j, lab in enumerate(data.labels)
    ]
    rows += [
        row(f"coef_{group}[{lab},Intercept]", post.theta_mean[j], post.theta_sd[j], theta_q[j])
        for j, lab in enumerate(data.labels)
    ]
    # E[1 - B_j | y] = E[tau^2 / (tau^2 + v_j) | y]: the posterior weight on the study's own data
    lam = np.einsum(
        "n,nk->k", post._weights, post.grid[:, None] ** 2 / (post.grid[:, None] ** 2 + data.v)
    )
    new_sd = float(np.sqrt(w @ (new_s[idx] ** 2 + new_m[idx] ** 2) - (w @ new_m[idx]) ** 2))
    facts = {
        "method": "meta_bayes",
        "estimator": "exact posterior (grid over tau)",
        "k": data.k,
        "level": level,
        "prior": prior.to_dict(),
        "grid_points": int(post.grid.size),
        "grid_upper": post.upper,
        "mu": {"mean": post.mu_mean, "sd": post.mu_sd, "ci": [mu_q[3], mu_q[4]], "median": mu_q[1]},
        "tau": {"mean": post.mean, "sd": post.sd, "ci": [tau_q[3], tau_q[4]], "median": tau_q[1]},
        "tau2_mean": float(np.dot(post._weights, post.grid**2)),
        "pi": {
            "lb": new_q[3],
            "ub": new_q[4],
            "variant": "posterior predictive of a new study's true effect (exact mixture)",
        },
        "study_effects": {
            "study": list(data.labels),
            "estimate": post.theta_mean.tolist(),
            "se": post.theta_sd.tolist(),
        },
        "tau_posterior": _density_for_plot(post),
    }
    pred = Prediction(
        "new_study_effect", float(w @ new_m[idx]), new_sd, new_q[0], new_q[2],
        "posterior predictive (exact normal mixture over the tau grid)",
    )  # fmt: skip
    info = {
        "meta": facts,
        "priors": {"b_Intercept": {"family": "flat"}, "sd": prior.to_dict()},
        "warnings": _few_studies_warnings(data.k, None),
        "shrinkage": {lab: float(x) for lab, x in zip(data.labels, lam, strict=True)},
        "predictions": prediction_rows([pred]),
    }
    return FitResult(summary=summary_frame(rows), info=info)


def _run_gibbs(data: MetaData, settings: dict[str, Any], rng: np.random.Generator):
    from hierpipe.models.gibbs_meta import gibbs_meta, tau_prior_from_config

    _need_intercept_only(data, "gibbs")
    chains, warmup, draws = _gibbs_settings(settings)
    prior = tau_prior_from_config(settings.get("prior"), data.k)
    return gibbs_meta(
        data.y, data.v, prior=prior, chains=chains, warmup=warmup, draws=draws, rng=rng
    )


def _gibbs(
    data: MetaData, group: str, settings: dict[str, Any], rng: np.random.Generator
) -> FitResult:
    from hierpipe.diagnostics.convergence import summarise_draws
    from hierpipe.models.gibbs_fit import draws_frame

    level = _level(settings)
    sample = _run_gibbs(data, settings, rng)
    mu, tau = sample.mu, sample.tau
    arrays: dict[str, FloatArray] = {"b_Intercept": mu, f"sd_{group}__Intercept": tau}
    r = sample.r
    for j, lab in enumerate(data.labels):
        arrays[f"r_{group}[{lab},Intercept]"] = r[:, :, j]
    for j, lab in enumerate(data.labels):
        arrays[f"coef_{group}[{lab},Intercept]"] = sample.theta[:, :, j]
    summary = summarise_draws(arrays)
    theta_new = mu + tau * rng.standard_normal(mu.shape)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    q5, q95 = np.quantile(theta_new, [0.05, 0.95])
    pred = Prediction(
        "new_study_effect", float(theta_new.mean()), float(theta_new.std(ddof=1)),
        float(q5), float(q95), "posterior predictive draws",
    )  # fmt: skip
    t2 = tau[..., None] ** 2
    lam = (t2 / (t2 + data.v)).mean(axis=(0, 1))
    facts = {
        "method": "gibbs",
        "estimator": "Gibbs sampler (ASIS interweaving)",
        "k": data.k,
        "level": level,
        "prior": sample.prior.to_dict(),
        "mu": {
            "mean": float(mu.mean()),
            "sd": float(mu.std(ddof=1)),
            "ci": np.quantile(mu, [lo, hi]).tolist(),
            "median": float(np.median(mu)),
        },
        "tau": {
            "mean": float(tau.mean()),
            "sd": float(tau.std(ddof=1)),
            "ci": np.quantile(tau, [lo, hi]).tolist(),
            "median": float(np.median(tau)),
        },
        "tau2_mean": float((tau**2).mean()),
        "pi": {
            "lb": float(np.quantile(theta_new, lo)),
            "ub": float(np.quantile(theta_new, hi)),
            "variant": "posterior predictive draws of a new study's true effect",
        },
        "study_effects": {
            "study": list(data.labels),
            "estimate": sample.theta.mean(axis=(0, 1)).tolist(),
            "se": sample.theta.std(axis=(0, 1), ddof=1).tolist(),
        },
    }
    info = {
        **sample.info(),
        "meta": facts,
        "warnings": _few_studies_warnings(data.k, None),
        "shrinkage": {lab: float(x) for lab, x in zip(data.labels, lam, strict=True)},
        "predictions": prediction_rows([pred]),
    }
    return FitResult(summary=summary, draws=draws_frame(arrays), info=info)


# ----------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------


def fit(
    data: MetaData,
    structure: Structure,
    method: str,
    settings: dict[str, Any],
    rng: np.random.Generator,
) -> FitResult:
    """Fit the meta-analysis by ``method`` (see the module docstring)."""
    group = structure.group
    if method in ESTIMATORS or method == "complete_pooling":
        return _frequentist(data, group, method, settings)
    if method == "no_pooling":
        return _no_pooling(data, group)
    if method == "meta_bayes":
        return _meta_bayes(data, group, settings)
    if method == "gibbs":
        return _gibbs(data, group, settings, rng)
    raise ConfigError(f"unknown fit method '{method}'")


@dataclass(frozen=True)
class _Held:
    """Without one study: its predictive and the fit's headline numbers."""

    elpd: float
    pred_mean: float
    pred_sd: float
    pred_q5: float
    pred_q95: float
    mu: float
    mu_se: float
    tau: float
    pi_lb: float
    pi_ub: float


def _held_plugin(rest: MetaData, xj: FloatArray, yj: float, vj: float, method: str, settings):
    res = _fit_frequentist(rest, method, settings)
    m = float(xj @ res.beta)
    sd = float(np.sqrt(res.tau2 + vj + xj @ res.vcov @ xj))
    elpd = float(stats.norm.logpdf(yj, m, sd))
    pi_lb, pi_ub = (res.pi_hts_lb, res.pi_hts_ub) if res.method != FIXED else (np.nan, np.nan)
    return _Held(
        elpd, m, sd, m - Z90 * sd, m + Z90 * sd,
        float(res.beta[0]), float(res.se[0]), res.tau, pi_lb, pi_ub,
    )  # fmt: skip


def _held_bayes(rest: MetaData, yj: float, vj: float, settings: dict[str, Any]) -> _Held:
    from hierpipe.models.meta_bayes import (
        mixture_quantiles,
        mixture_weights,
        new_study_mixture,
        predictive_log_density,
    )

    level = _level(settings)
    _, post = _posterior(rest, settings)
    idx, w = mixture_weights(post)
    m_y, s_y = new_study_mixture(post, vj)
    q_y = mixture_quantiles(w, m_y[idx], s_y[idx], [0.05, 0.95])
    m_t, s_t = new_study_mixture(post)
    q_t = mixture_quantiles(w, m_t[idx], s_t[idx], [(1 - level) / 2, (1 + level) / 2])
    mean = float(w @ m_y[idx])
    sd = float(np.sqrt(w @ (s_y[idx] ** 2 + m_y[idx] ** 2) - mean**2))
    return _Held(
        predictive_log_density(post, yj, vj), mean, sd, q_y[0], q_y[1],
        post.mu_mean, post.mu_sd, post.mean, q_t[0], q_t[1],
    )  # fmt: skip


def _held_gibbs(
    rest: MetaData, yj: float, vj: float, settings: dict[str, Any], rng: np.random.Generator
) -> _Held:
    level = _level(settings)
    sample = _run_gibbs(rest, settings, rng)
    mu, tau = sample.mu.ravel(), sample.tau.ravel()
    sd_draw = np.sqrt(tau**2 + vj)
    logp = stats.norm.logpdf(yj, mu, sd_draw)
    elpd = float(logsumexp(logp) - np.log(logp.size))
    z = rng.standard_normal((2, mu.size))
    y_sim = mu + sd_draw * z[0]
    theta_new = mu + tau * z[1]
    q5, q95 = np.quantile(y_sim, [0.05, 0.95])
    lo, hi = np.quantile(theta_new, [(1 - level) / 2, (1 + level) / 2])
    return _Held(
        elpd, float(mu.mean()), float(y_sim.std(ddof=1)), float(q5), float(q95),
        float(mu.mean()), float(mu.std(ddof=1)), float(tau.mean()), float(lo), float(hi),
    )  # fmt: skip


def score_held_out(
    data: MetaData, j: int, method: str, settings: dict[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    """Refit without study ``j``; score its estimate and report the fit without it."""
    if method == "no_pooling":
        raise ConfigError(
            "fit method 'no_pooling' cannot predict a new study, so it has no "
            "leave-one-study-out score (no pooling has no population of studies)"
        )
    rest = data.without(j)
    yj, vj = float(data.y[j]), float(data.v[j])
    if method == "meta_bayes":
        _need_intercept_only(data, method)
        h = _held_bayes(rest, yj, vj, settings)
    elif method == "gibbs":
        h = _held_gibbs(rest, yj, vj, settings, rng)
    else:
        h = _held_plugin(rest, data.X[j], yj, vj, method, settings)
    return {
        "group": data.labels[j],
        "n": 1.0,
        "elpd": h.elpd,
        "pred_mean": h.pred_mean,
        "pred_q5": h.pred_q5,
        "pred_q95": h.pred_q95,
        "observed_mean": yj,
        "error": yj - h.pred_mean,
        "covered": bool(h.pred_q5 <= yj <= h.pred_q95),
        "se": float(np.sqrt(vj)),
        "std_residual": (yj - h.pred_mean) / h.pred_sd,
        "mu": h.mu,
        "mu_se": h.mu_se,
        "tau": h.tau,
        "pi_lb": float(h.pi_lb),
        "pi_ub": float(h.pi_ub),
    }


def logo_log_lik(data: MetaData, structure: Structure, draws: pd.DataFrame) -> FloatArray:
    r""":math:`\log N(y_j \mid \mu^{(s)}, \tau^{(s)2} + v_j)` per draw and study, shape (S, k).

    The study's own effect :math:`\theta_j` integrated out, so PSIS leave-one-study-out
    (:mod:`hierpipe.cv.psis`) reweights the draws of :math:`(\mu, \tau)` by
    :math:`1/p(y_j \mid \mu, \tau)` exactly.
    """
    mu = draws["b_Intercept"].to_numpy(dtype=np.float64)[:, None]
    tau = draws[f"sd_{structure.group}__Intercept"].to_numpy(dtype=np.float64)[:, None]
    return stats.norm.logpdf(data.y[None, :], mu, np.sqrt(tau**2 + data.v[None, :]))


def _weighted_quantiles(x: FloatArray, w: FloatArray, probs: list[float]) -> FloatArray:
    """Quantiles of the weighted sample ``(x, w)`` (``w`` sums to 1), by the inverse ECDF."""
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(w[order])
    idx = np.minimum(np.searchsorted(cum, probs, side="left"), x.size - 1)
    return x[order][idx]


def score_held_out_weighted(
    data: MetaData,
    j: int,
    structure: Structure,
    draws: pd.DataFrame,
    log_weights: FloatArray,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Study ``j``'s CV row from full-data draws reweighted (PSIS) to leave it out.

    As :func:`score_held_out` for ``gibbs``, with weighted means and quantiles of
    the draws; the prediction interval without the study is the 95% one (this
    interface receives no settings, so ``meta.level`` does not reach it).
    """
    w = np.exp(log_weights - logsumexp(log_weights))
    mu = draws["b_Intercept"].to_numpy(dtype=np.float64)
    tau = draws[f"sd_{structure.group}__Intercept"].to_numpy(dtype=np.float64)
    yj, vj = float(data.y[j]), float(data.v[j])
    sd_draw = np.sqrt(tau**2 + vj)
    elpd = float(logsumexp(stats.norm.logpdf(yj, mu, sd_draw), b=w))
    z = rng.standard_normal((2, mu.size))
    y_sim = mu + sd_draw * z[0]
    q5, q95 = _weighted_quantiles(y_sim, w, [0.05, 0.95])
    # the interface passes no settings, so the prediction interval is at the default level
    lo, hi = _weighted_quantiles(mu + tau * z[1], w, [0.025, 0.975])
    mean = float(w @ mu)
    pred_sd = float(np.sqrt(w @ (sd_draw**2 + mu**2) - mean**2))
    return {
        "group": data.labels[j],
        "n": 1.0,
        "elpd": elpd,
        "pred_mean": mean,
        "pred_q5": float(q5),
        "pred_q95": float(q95),
        "observed_mean": yj,
        "error": yj - mean,
        "covered": bool(q5 <= yj <= q95),
        "se": float(np.sqrt(vj)),
        "std_residual": (yj - mean) / pred_sd,
        "mu": mean,
        "mu_se": float(np.sqrt(max(w @ mu**2 - mean**2, 0.0))),
        "tau": float(w @ tau),
        "pi_lb": float(lo),
        "pi_ub": float(hi),
    }


def shrinkage(
    data: MetaData, structure: Structure, summary: pd.DataFrame, info: dict[str, Any]
) -> pd.DataFrame:
    r"""Per study: its own estimate, the fit's study effect and the weight on its own data.

    The study effect is :math:`x_j^\top\hat\beta + \hat u_j` (the fit's
    ``study_effects`` in fit.json, equal to ``coef_`` without moderators); the
    weight :math:`\lambda_j = \tau^2/(\tau^2 + v_j)` (its posterior mean for the
    Bayesian fits) solves :math:`\hat\theta_j = \lambda_j y_j + (1-\lambda_j)
    x_j^\top\hat\beta` for the plug-in fits.
    """
    est = summary.set_index("parameter")["mean"]
    names = [f"b_{n}" for n in data.names]
    if all(n in est.index for n in names):
        population = data.X @ est[names].to_numpy(dtype=np.float64)
    else:  # no pooling: the fixed-effect mean, for reference
        w = 1.0 / data.v
        population = np.full(data.k, float(np.dot(w, data.y) / w.sum()))
    effects = info.get("meta", {}).get("study_effects")
    if effects:
        theta = np.asarray(effects["estimate"], dtype=np.float64)
    else:
        theta = np.array(
            [est.get(f"coef_{structure.group}[{lab},Intercept]", np.nan) for lab in data.labels]
        )
    lam = np.array([info.get("shrinkage", {}).get(lab, np.nan) for lab in data.labels])
    return pd.DataFrame(
        {
            "group": pd.Series(data.labels, dtype=str),
            "n": np.ones(data.k, dtype=np.float64),
            "no_pooling": data.y.astype(np.float64),
            "estimate": theta.astype(np.float64),
            "population": population.astype(np.float64),
            "weight": lam.astype(np.float64),
            "shrinkage": (1.0 - lam).astype(np.float64),
            "se": np.sqrt(data.v),
        }
    )


# Optional engine functions (model checks); see hierpipe.models.engines for the
# interface. Kept in their own module. There is no within-study K-fold
# (KFOLD_UNAVAILABLE says why).
from hierpipe.models.engines.meta_checks import (  # noqa: E402, F401
    KFOLD_UNAVAILABLE,
    PPC_NEEDS_INFO,
    james_stein_table,
    ppc_replicates,
    prior_predictive,
    residuals,
)
