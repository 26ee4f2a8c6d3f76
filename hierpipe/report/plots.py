"""Figures for the report, returned as base64 PNG strings to inline in HTML."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def to_base64(fig: plt.Figure) -> str:
    """PNG bytes of ``fig`` as base64, without the timestamp metadata."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# Above this many groups a panel plots an evenly spaced sample of them (in the
# table's label order) and its title says so: drawing 10^5 coloured markers a
# panel took about 10 s of the report at scale (issue 7), and they overlap into
# a blot long before. The axis range still spans every group.
MAX_SHRINKAGE_POINTS = 2000


def shrinkage_plot(tables: dict[str, pd.DataFrame]) -> str:
    """No-pooling against hierarchical estimate per group, with the diagonal."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), squeeze=False)
    for ax, (fit, t) in zip(axes[0], tables.items(), strict=True):
        lo = float(np.nanmin([t["no_pooling"].min(), t["estimate"].min()]))
        hi = float(np.nanmax([t["no_pooling"].max(), t["estimate"].max()]))
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1, label="no shrinkage")
        ax.axhline(t["population"].iloc[0], color="C3", lw=1, ls="--", label="population mean")
        title = fit
        if len(t) > MAX_SHRINKAGE_POINTS:
            keep = np.unique(np.round(np.linspace(0, len(t) - 1, MAX_SHRINKAGE_POINTS)).astype(int))
            title = f"{fit}: {len(keep):,} of {len(t):,} groups, evenly spaced"
            t = t.iloc[keep]
        sc = ax.scatter(t["no_pooling"], t["estimate"], c=t["n"], cmap="viridis", s=22, zorder=3)
        ax.set_xlabel("no-pooling estimate (group mean)")
        ax.set_ylabel(f"{fit} estimate")
        ax.set_title(title, fontsize=10 if title != fit else None)
        fig.colorbar(sc, ax=ax, label="group size")
    axes[0][0].legend(loc="upper left", fontsize=8)
    return to_base64(fig)


def estimates_plot(per_group: pd.DataFrame, fits: list[str], truth: pd.Series | None) -> str:
    """Each group's estimate under each fit (points) and the truth when known."""
    order = per_group.sort_values(fits[0]).index if fits else per_group.index
    y = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(order) + 1)))
    for k, fit in enumerate(fits):
        ax.scatter(per_group.loc[order, fit], y + (k - len(fits) / 2) * 0.1, s=12, label=fit)
    if truth is not None:
        ax.scatter(truth.reindex(order), y, marker="x", color="k", s=18, label="truth")
    ax.set_yticks(y, [str(i) for i in order], fontsize=6)
    ax.set_xlabel("group estimate")
    ax.legend(fontsize=7, loc="best")
    return to_base64(fig)
