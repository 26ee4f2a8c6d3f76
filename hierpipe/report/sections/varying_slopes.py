r"""Varying intercepts and slopes: their scatter, covariance ellipse and correlation.

Only for one-factor linear mixed models (structure kind ``"lmm"``); other
studies return None. For every fit that estimates the covariance of the
varying coefficients (ML, REML, Gibbs) the section shows

* each group's intercept against its (first) slope, the ``coef_`` rows, with
  the group's own least-squares line (the ``no_pooling`` fit, when present)
  and the simulated truth (when known), and the ellipses that hold 50% and
  90% of the estimated population of groups,
  :math:`N\big((\hat\beta_0, \hat\beta_1), \hat\Sigma\big)`: the points
  :math:`\mu + \hat\Sigma^{1/2} r (\cos t, \sin t)` with
  :math:`r^2 = -2\log(1-p)`, the :math:`p` quantile of :math:`\chi^2_2`; for
  samplers at the posterior means of the SDs and the correlation (a summary,
  not the posterior of the ellipse);
* the SDs and correlations with their intervals and how each was made;
* the priors of sampler fits, as the sampler states them;
* a notice for every boundary fit.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hierpipe.report import plots
from hierpipe.report.context import StudyContext

LEVELS = (0.5, 0.9)


def _coefs(ctx: StudyContext) -> list[str]:
    """Varying coefficients, in the fits' order, from their ``sd_`` rows or ``coef_`` rows."""
    g = ctx.group
    names: list[str] = []
    for f in ctx.fits.values():
        for p in f.summary["parameter"]:
            c = None
            if p.startswith(f"sd_{g}__"):
                c = p[len(f"sd_{g}__") :]
            elif p.startswith(f"coef_{g}["):
                c = p.rsplit(",", 1)[1][:-1]
            if c is not None and c not in names:
                names.append(c)
    return names


def _group_values(summary: pd.DataFrame, prefix: str, coef: str) -> pd.Series:
    """``prefix[label,coef]`` means indexed by label."""
    s = summary[summary["parameter"].str.startswith(prefix + "[")]
    s = s[s["parameter"].str.endswith(f",{coef}]")]
    labels = s["parameter"].str.slice(len(prefix) + 1, -len(f",{coef}]"))
    return pd.Series(s["mean"].to_numpy(), index=labels.to_numpy())


def ellipse(center: np.ndarray, cov: np.ndarray, level: float, k: int = 200) -> np.ndarray:
    """Points (k, 2) of the contour of N(center, cov) holding ``level`` of its mass."""
    evals, evecs = np.linalg.eigh(cov)
    radius = np.sqrt(-2.0 * np.log(1.0 - level))
    t = np.linspace(0.0, 2.0 * np.pi, k)
    circle = radius * np.stack([np.cos(t), np.sin(t)])
    return (center[:, None] + evecs @ (np.sqrt(np.clip(evals, 0, None))[:, None] * circle)).T


def _population(est: pd.DataFrame, g: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Centre and covariance of the coefficients (a, b) of a new group."""
    mean = est["mean"]
    center = np.array([float(mean.get(f"b_{a}", 0.0)), float(mean.get(f"b_{b}", 0.0))])
    sd = np.array([float(mean[f"sd_{g}__{a}"]), float(mean[f"sd_{g}__{b}"])])
    rho = float(mean.get(f"cor_{g}__{a}__{b}", 0.0))
    return center, np.outer(sd, sd) * np.array([[1.0, rho], [rho, 1.0]])


def scatter_figure(ctx: StudyContext, fits: list[str], a: str, b: str) -> str:
    """One panel a fit: groups' (a, b) coefficients, own lines, truth, population ellipses."""
    g = ctx.group
    own = None
    if "no_pooling" in ctx.fits:
        s = ctx.fits["no_pooling"].summary
        own = pd.DataFrame(
            {"a": _group_values(s, f"coef_{g}", a), "b": _group_values(s, f"coef_{g}", b)}
        )
    truth = None
    if ctx.truth is not None:
        t = ctx.truth.rename(columns={"value": "mean"})
        truth = pd.DataFrame(
            {"a": _group_values(t, f"coef_{g}", a), "b": _group_values(t, f"coef_{g}", b)}
        )
    fig, axes = plt.subplots(1, len(fits), figsize=(4.6 * len(fits), 4.2), squeeze=False)
    for ax, fit in zip(axes[0], fits, strict=True):
        f = ctx.fits[fit]
        s = f.summary
        pts = pd.DataFrame(
            {"a": _group_values(s, f"coef_{g}", a), "b": _group_values(s, f"coef_{g}", b)}
        )
        if own is not None:
            both = pts.join(own, rsuffix="_own", how="inner").dropna()
            for r in both.itertuples():
                ax.plot([r.a_own, r.a], [r.b_own, r.b], color="0.75", lw=0.6, zorder=1)
            ax.scatter(
                both["a_own"],
                both["b_own"],
                s=14,
                facecolors="none",
                edgecolors="0.5",
                label="own least squares",
                zorder=2,
            )
        ax.scatter(pts["a"], pts["b"], s=16, color="C0", label=f"{fit} (coef_)", zorder=3)
        if truth is not None:
            ax.scatter(truth["a"], truth["b"], marker="x", s=16, color="k", label="truth", zorder=4)
        center, cov = _population(f.estimates, g, a, b)
        for level, ls in zip(LEVELS, ("-", "--"), strict=True):
            e = ellipse(center, cov, level)
            ax.plot(
                e[:, 0], e[:, 1], color="C3", ls=ls, lw=1.2, label=f"{int(level * 100)}% of groups"
            )
        ax.plot(*center, marker="+", color="C3", ms=10)
        ax.set_xlabel(f"{a} (coef_{g}[·,{a}])")
        ax.set_ylabel(f"{b} (coef_{g}[·,{b}])")
        ax.set_title(fit)
    axes[0][0].legend(fontsize=7, loc="best")
    return plots.to_base64(fig)


def _is_sampler(summary: pd.DataFrame) -> bool:
    return "rhat" in summary.columns


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if ctx.structure.kind != "lmm":
        return None
    g = ctx.group
    coefs = _coefs(ctx)
    covariance_fits = [
        fit
        for fit, f in ctx.fits.items()
        if all(f"sd_{g}__{c}" in f.estimates.index for c in coefs) and coefs
    ]
    sds, cors = [], []
    for fit in covariance_fits:
        f = ctx.fits[fit]
        est = f.estimates
        sampler = _is_sampler(f.summary)
        for c in coefs:
            r = est.loc[f"sd_{g}__{c}"]
            sds.append(
                {
                    "fit": fit,
                    "parameter": f"sd_{g}__{c}",
                    "mean": r["mean"],
                    "q5": r["q5"],
                    "q95": r["q95"],
                }
            )
        for name in [p for p in est.index if p.startswith(f"cor_{g}__")]:
            r = est.loc[name]
            if sampler:
                how = "posterior mean and 5%/95% quantiles"
            elif np.isfinite(r["q5"]):
                how = f.info.get("cor_interval", "Wald")
            else:
                how = "none: the fit is on the boundary (an SD at 0 or the correlation at ±1)"
            cors.append(
                {
                    "fit": fit,
                    "parameter": name,
                    "mean": r["mean"],
                    "q5": r["q5"],
                    "q95": r["q95"],
                    "how": how,
                }
            )
    structure = {fit: ctx.fits[fit].info.get("covariance_structure") for fit in covariance_fits}
    priors = [
        {"fit": fit, "priors": f.info.get("priors"), "statement": f.info.get("prior_statement")}
        for fit, f in ctx.fits.items()
        if _is_sampler(f.summary) and (f.info.get("priors") or f.info.get("prior_statement"))
    ]
    boundary = [
        {"fit": fit, "flag": flag}
        for fit, f in ctx.fits.items()
        for flag in f.info.get("boundary", []) or []
    ]
    slopes = [c for c in coefs if c != "Intercept"]
    figure, pair = None, None
    if "Intercept" in coefs and slopes and covariance_fits:
        pair = ("Intercept", slopes[0])
        figure = scatter_figure(ctx, covariance_fits, *pair)
    if not (sds or boundary or figure):
        return None
    return {
        "coefs": coefs,
        "pair": pair,
        "more_slopes": slopes[1:],
        "figure": figure,
        "sds": sds,
        "cors": cors,
        "structure": structure,
        "priors": priors,
        "boundary": boundary,
    }
