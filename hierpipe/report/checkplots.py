"""Figures of the model-checking and cross-validation sections, as base64 PNGs.

Large tables are thinned deterministically before plotting (evenly spaced
rows, or evenly spaced quantiles for QQ plots), so a figure costs the same for
a thousand observations as for a million and the page stays small. A report
has two or three figures a fit, so they are drawn cheaply: fixed margins
instead of a layout engine and a tight bounding box (each costs a full extra
rendering pass), single artists (``stairs``, line collections) instead of one
patch a bar or box; this halves the report job's time.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from scipy.special import ndtri

from hierpipe.report.plots import plt

MAX_POINTS = 4000
MAX_GROUPS_SHOWN = 40
RANK_BINS = 20


def to_base64(fig: plt.Figure, **margins: float) -> str:
    """PNG of ``fig`` with fixed margins (fractions of the figure), base64, no timestamp."""
    fig.subplots_adjust(**margins)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _even_rows(n: int, keep: int = MAX_POINTS) -> np.ndarray:
    return np.arange(n) if n <= keep else (np.arange(keep) * n) // keep


def trace_rank_plot(draws: pd.DataFrame, params: list[str]) -> str:
    """Trace (left) and rank histograms (right) of each chain, one row a parameter.

    Rank plots (Vehtari et al. 2021, sec. 4.4): the draws of all chains are
    ranked together and each chain's ranks are histogrammed; chains that mix
    give flat histograms near the dashed line (the count expected for uniform
    ranks), with the band of its central 95% binomial range.
    """
    chains = sorted(draws["chain"].unique())
    fig, axes = plt.subplots(len(params), 2, figsize=(10, 1.7 * len(params)), squeeze=False)
    total = len(draws)
    edges = np.linspace(0, total, RANK_BINS + 1)
    for row, p in zip(axes, params, strict=True):
        ranks = pd.Series(draws[p].to_numpy()).rank(method="average").to_numpy()
        for k, c in enumerate(chains):
            sel = (draws["chain"] == c).to_numpy()
            d = draws.loc[sel]
            row[0].plot(d["draw"], d[p], lw=0.4, alpha=0.8, color=f"C{k}")
            counts, _ = np.histogram(ranks[sel], bins=edges)
            row[1].step(np.arange(RANK_BINS), counts, where="post", color=f"C{k}", lw=1)
        per_chain = total / len(chains)
        expected = per_chain / RANK_BINS
        band = 1.96 * np.sqrt(per_chain * (1 / RANK_BINS) * (1 - 1 / RANK_BINS))
        row[1].axhline(expected, color="0.3", ls="--", lw=0.8)
        row[1].axhspan(expected - band, expected + band, color="0.85", zorder=0)
        row[0].set_ylabel(p, fontsize=7)
        row[1].set_yticks([])
    axes[0, 0].set_title("trace (one colour a chain)", fontsize=8)
    axes[0, 1].set_title("rank histogram of each chain", fontsize=8)
    axes[-1, 0].set_xlabel("draw")
    axes[-1, 1].set_xlabel(f"rank bin ({RANK_BINS} bins over all draws)")
    rows = len(params)
    return to_base64(
        fig,
        left=0.09,
        right=0.99,
        top=1 - 0.3 / (1.7 * rows),
        bottom=0.5 / (1.7 * rows),
        wspace=0.08,
        hspace=0.3,
    )


def ppc_plot(fit: str, table: pd.DataFrame, overall: pd.DataFrame) -> str:
    """Top: replicated overall statistics against the observed; bottom: per group.

    Per group, the grey bar is the central 95% of the replicated statistic and
    the dot the observed value, red where its p-value is extreme (below 0.025
    or above 0.975, so outside the bar up to the replicates' discreteness).
    """
    stats = ("mean", "sd", "min", "max")
    obs_overall = table[table["scope"] == "overall"].set_index("statistic")
    groups = table[table["scope"] == "group"]
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.5))
    one_panel = set(groups["statistic"]) <= {"mean"}
    if one_panel:
        # one statistic a group (a meta-analysis: each study's estimate): one wide
        # panel for it instead of three empty ones beside it
        for ax in axes[1]:
            ax.remove()
        axes[1, 0] = fig.add_subplot(2, 1, 2)
    for k, stat in enumerate(stats):
        ax = axes[0, k]
        counts, edges = np.histogram(overall[stat].dropna(), bins=30)
        ax.stairs(counts, edges, fill=True, color="0.7")
        ax.axvline(obs_overall.loc[stat, "observed"], color="C3", lw=1.5)
        ax.set_title(f"overall {stat}: p = {obs_overall.loc[stat, 'p_value']:.3f}", fontsize=8)
        ax.set_yticks([])
        g = groups[groups["statistic"] == stat].reset_index(drop=True)
        g = g.iloc[_even_rows(len(g), MAX_GROUPS_SHOWN * 3)]
        y = np.arange(len(g))
        if g.empty and one_panel:
            continue
        ax = axes[1, k]
        if g.empty:  # e.g. no per-cell min/max where a predictor varies within cells
            ax.axis("off")
            ax.text(0.5, 0.5, f"no per-group {stat}", ha="center", va="center", fontsize=8)
            continue
        ax.hlines(y, g["rep_q025"], g["rep_q975"], color="0.6", lw=2)
        colour = np.where(g["extreme"], "C3", "k")
        ax.scatter(g["observed"], y, c=colour, s=8, zorder=3)
        ax.set_yticks([])
        # one statistic a group (a meta-analysis: each study's estimate)
        only = groups["statistic"].nunique() == 1
        ax.set_xlabel("study estimate" if only else f"group {stat}", fontsize=8)
    axes[1, 0].set_ylabel("groups")
    fig.suptitle(f"{fit}: observed (red line, dots) against replicated data", fontsize=9)
    return to_base64(fig, left=0.04, right=0.99, top=0.9, bottom=0.09, wspace=0.12, hspace=0.3)


def prior_plot(prior: pd.DataFrame, observed_sd: float, deviations: np.ndarray) -> str:
    """Implied SD of the outcome (log scale); a new observation's deviation from the intercept."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    sd = prior["outcome_sd"].to_numpy()
    sd = sd[np.isfinite(sd) & (sd > 0)]
    bins = np.logspace(np.log10(sd.min()), np.log10(sd.max()), 40)
    axes[0].stairs(np.histogram(sd, bins=bins)[0], bins, fill=True, color="0.7")
    axes[0].set_xscale("log")
    axes[0].axvline(observed_sd, color="C3", lw=1.5, label="observed SD of the outcome")
    axes[0].set_xlabel("prior predictive SD of the outcome about the intercept")
    axes[0].legend(fontsize=7)
    # Absolute deviations on a log scale: the priors' tails span orders of magnitude.
    dev = np.abs(prior["new_observation_deviation"].to_numpy())
    dev = dev[np.isfinite(dev) & (dev > 0)]
    obs = np.abs(deviations)
    obs = obs[obs > 0]
    lo = min(float(dev.min()), float(obs.min()))
    hi = max(float(dev.max()), float(obs.max()))
    bins = np.logspace(np.log10(lo), np.log10(hi), 50)
    # Share of draws (of observations) a bin: log-width bins would distort a density.
    for values, style in ((dev, {"fill": True, "color": "0.7", "label": "prior predictive"}),
                          (obs, {"color": "C3", "label": "observed |y - mean|"})):  # fmt: skip
        share = np.histogram(values, bins=bins)[0] / values.size
        axes[1].stairs(share, bins, **style)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("|new observation - intercept| (share of draws a bin)")
    axes[1].legend(fontsize=7)
    axes[1].set_yticks([])
    return to_base64(fig, left=0.06, right=0.99, top=0.95, bottom=0.16, wspace=0.12)


def residual_plot(fit: str, resid: pd.DataFrame) -> str:
    """Standardised residuals against fitted values, normal QQ plot, and by group."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    r = resid.iloc[_even_rows(len(resid))]
    axes[0].scatter(r["fitted"], r["standardised"], s=4, alpha=0.4, color="C0")
    axes[0].axhline(0, color="0.4", lw=0.8)
    for z in (-2, 2):
        axes[0].axhline(z, color="0.6", lw=0.6, ls="--")
    axes[0].set_xlabel("fitted value")
    axes[0].set_ylabel("standardised residual")
    std = np.sort(resid["standardised"].dropna().to_numpy())
    n = std.size
    if n:
        idx = _even_rows(n)
        theory = ndtri((idx + 0.5) / n)
        axes[1].scatter(theory, std[idx], s=4, color="C0")
        lim = [float(min(theory[0], std[0])), float(max(theory[-1], std[-1]))]
        axes[1].plot(lim, lim, color="0.4", lw=0.8)
    axes[1].set_xlabel("standard normal quantile")
    axes[1].set_ylabel("standardised residual")
    axes[1].set_title("normal QQ plot", fontsize=8)
    labels = sorted(resid["group"].unique())
    shown = [labels[i] for i in _even_rows(len(labels), MAX_GROUPS_SHOWN)]
    sel = resid[resid["group"].isin(shown)]
    q = sel.groupby("group")["standardised"].quantile([0.0, 0.25, 0.5, 0.75, 1.0]).unstack()
    q = q.reindex(shown)
    x = np.arange(len(shown))
    # Box plot drawn as three collections: range, interquartile box, median tick.
    axes[2].vlines(x, q[0.0], q[1.0], color="0.45", lw=0.8)
    axes[2].vlines(x, q[0.25], q[0.75], color="C0", lw=5)
    axes[2].scatter(x, q[0.5], marker="_", color="k", s=25, zorder=3)
    axes[2].set_xticks(x, shown, rotation=90, fontsize=6)
    axes[2].axhline(0, color="0.4", lw=0.8)
    title = "by group: range, quartiles, median"
    if len(shown) < len(labels):
        title += f" ({len(shown)} of {len(labels)} groups)"
    axes[2].set_title(title, fontsize=8)
    fig.suptitle(f"{fit}: standardised (Pearson) residuals", fontsize=9)
    return to_base64(fig, left=0.05, right=0.99, top=0.88, bottom=0.2, wspace=0.22)


def shrinkage_size_plot(
    tables: dict[str, pd.DataFrame], x: str = "n", xlabel: str = "group size n_j"
) -> str:
    """Shrinkage factor :math:`1 - \\lambda_j` of each group against its size, per fit.

    The James–Stein (or Efron–Morris) factor :math:`B_j` is drawn beside as
    crosses when known. ``x`` is the column on the horizontal axis (a
    meta-analysis has one estimate a study and plots against its SE).
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    js_done = False
    for k, (fit, t) in enumerate(tables.items()):
        ax.scatter(t[x], t["shrinkage"], s=14, color=f"C{k}", label=fit, alpha=0.8)
        if not js_done and "js_shrinkage" in t and t["js_shrinkage"].notna().any():
            ax.scatter(
                t[x], t["js_shrinkage"], marker="x", color="k", s=18, label="James-Stein B_j"
            )
            js_done = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel("shrinkage factor (1 = fully pooled)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    return to_base64(fig, left=0.11, right=0.98, top=0.97, bottom=0.13)


def elpd_diff_plot(per_group: pd.DataFrame, best: str, title: str) -> str:
    """Per-group elpd of each fit minus the best fit's, groups in label order."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(len(per_group))
    for k, fit in enumerate(per_group.columns):
        if fit == best:
            continue
        ax.plot(
            x, per_group[fit] - per_group[best], marker="o", ms=3, lw=0.8, label=fit, color=f"C{k}"
        )
    ax.axhline(0, color="0.5", lw=1)
    ax.set_xlabel("group (label order)")
    ax.set_ylabel(f"elpd minus {best}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return to_base64(fig, left=0.1, right=0.98, top=0.91, bottom=0.14)


def khat_plot(tables: dict[str, pd.DataFrame], limit: float) -> str:
    """PSIS k-hat per group with the reliability threshold."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for k, (fit, t) in enumerate(tables.items()):
        ax.scatter(np.arange(len(t)), t["khat"], s=12, label=fit, color=f"C{k}")
    ax.axhline(limit, color="C3", ls="--", lw=1, label=f"threshold {limit:.2f}: refit exactly")
    ax.set_xlabel("group (label order)")
    ax.set_ylabel("Pareto k-hat")
    ax.legend(fontsize=7)
    return to_base64(fig, left=0.1, right=0.98, top=0.96, bottom=0.16)
