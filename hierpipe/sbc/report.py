"""The SBC report page: per case, rank histograms, ECDF differences and tests.

One self-contained HTML page (inline PNGs, embedded style, autoescaped text):
for every case its description and settings, a table of the chi-square test
of each parameter's ranks (with the Bonferroni threshold for the case) and
whether its ECDF stays inside the simultaneous 95% band, then the rank
histograms with the 99% pointwise range of a uniform bin count, and the ECDF
differences :math:`F(z) - z` with the simultaneous band of Säilynoja, Bürkner
& Vehtari (2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from jinja2 import Environment
from scipy import stats

from hierpipe.io import write_text
from hierpipe.report.format import num
from hierpipe.report.plots import to_base64
from hierpipe.sbc.core import cases
from hierpipe.sbc.uniformity import (
    EcdfBand,
    bin_counts,
    chi_square_uniformity,
    ecdf_band,
    ecdf_counts,
)

FAMILY_ALPHA = 0.01
"""Family-wise false-alarm rate per case: each of its k parameters is tested at 0.01/k."""
BAND_ALPHA = 0.05


@dataclass(frozen=True)
class ParameterResult:
    parameter: str
    chi2: float
    p_value: float
    flagged: bool
    inside_band: bool


@dataclass(frozen=True)
class CaseResult:
    name: str
    description: str
    replications: int
    draws: int
    thin: int
    warmup: int
    bins: int
    threshold: float
    rows: list[ParameterResult]
    histograms: str
    ecdf: str

    @property
    def flagged(self) -> int:
        return sum(r.flagged for r in self.rows)


def read_ranks(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Join rank tables (chunks of several cases), ordered by case, parameter and replication."""
    out = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    return out.sort_values(["case", "parameter", "replication"], kind="stable").reset_index(
        drop=True
    )


def _grid(k: int) -> tuple[plt.Figure, np.ndarray]:
    cols = min(4, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel()[k:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def histogram_figure(ranks: dict[str, np.ndarray], draws: int, bins: int) -> str:
    """Rank histograms with the central 99% range of a bin's count under uniformity."""
    fig, axes = _grid(len(ranks))
    for ax, (name, r) in zip(axes, ranks.items(), strict=False):
        counts = bin_counts(r, draws, bins)
        n = counts.sum()
        lo, hi = stats.binom.ppf([0.005, 0.995], n, 1.0 / bins)
        ax.axhspan(lo, hi, color="0.85", lw=0)
        ax.axhline(n / bins, color="0.5", lw=0.8)
        ax.bar(np.arange(bins), counts, width=0.9, color="C0")
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.tick_params(labelsize=6)
    fig.supxlabel("rank (binned)", fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def ecdf_figure(ranks: dict[str, np.ndarray], draws: int, band: EcdfBand) -> str:
    """ECDF difference F(z) - z of each parameter's ranks with the simultaneous band."""
    fig, axes = _grid(len(ranks))
    points = len(band.z) + 1
    for ax, (name, r) in zip(axes, ranks.items(), strict=False):
        counts = ecdf_counts(r, draws, points)
        ax.fill_between(
            band.z, band.lower / band.n - band.z, band.upper / band.n - band.z,
            color="0.85", lw=0, step="mid",
        )  # fmt: skip
        inside = band.contains(counts)
        ax.step(band.z, counts / band.n - band.z, where="mid", color="C0" if inside else "C3")
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.supxlabel("fractional rank z", fontsize=8)
    fig.supylabel("ECDF difference", fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def case_result(name: str, table: pd.DataFrame, bins: int) -> CaseResult:
    """Tests and figures of one case's ranks."""
    draws = int(table["draws"].iloc[0])
    replications = int(table["replication"].nunique())
    known = cases()
    description = known[name].description if name in known else "(case no longer registered)"
    order = list(known[name].parameters) if name in known else []
    params = [p for p in order if p in set(table["parameter"])]
    params += sorted(set(table["parameter"]) - set(params))
    ranks = {p: table.loc[table["parameter"] == p, "rank"].to_numpy() for p in params}
    threshold = FAMILY_ALPHA / len(params)
    band = ecdf_band(replications, draws + 1 if draws + 1 <= 200 else bins, alpha=BAND_ALPHA)
    points = len(band.z) + 1
    rows = []
    for p, r in ranks.items():
        chi2, pv = chi_square_uniformity(r, draws, bins)
        inside = band.contains(ecdf_counts(r, draws, points))
        rows.append(ParameterResult(p, chi2, pv, pv < threshold, inside))
    return CaseResult(
        name=name,
        description=description,
        replications=replications,
        draws=draws,
        thin=int(table["thin"].iloc[0]),
        warmup=int(table["warmup"].iloc[0]),
        bins=bins,
        threshold=threshold,
        rows=rows,
        histograms=histogram_figure(ranks, draws, bins),
        ecdf=ecdf_figure(ranks, draws, band),
    )


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>hierpipe: simulation-based calibration</title>
<style>{{ css | safe }}</style>
</head>
<body>
<h1>Simulation-based calibration</h1>
<p>Each replication draws parameters from the prior, one data set from them, and
posterior draws from the sampler; a parameter's <em>rank</em> is the number of
its posterior draws below the true value. A correct sampler gives ranks uniform
on 0..L (Talts et al. 2018). A U shape means posteriors too narrow, a hump too
wide, a slope a bias.</p>
<p class="muted">Tests: Pearson's chi-square on {{ bins }} equiprobable bins, each
parameter at {{ family_alpha }}/k for the k parameters of a case, so a correct
sampler flags some parameter of a case with probability at most {{ family_alpha }}.
The ECDF band is simultaneous at {{ band_level }}% (Säilynoja, Bürkner &amp;
Vehtari 2022): a correct sampler's ECDF leaves it with probability
{{ band_alpha }} per parameter.</p>
<table>
<tr><th class="l">case</th><th>replications</th><th>L</th><th>flagged (chi-square)</th>
<th>outside ECDF band</th></tr>
{% for c in results %}
<tr><td class="l"><a href="#{{ c.name }}">{{ c.name }}</a></td><td>{{ c.replications }}</td>
<td>{{ c.draws }}</td>
<td class="{{ 'bad' if c.flagged else 'ok' }}">{{ c.flagged }} of {{ c.rows | length }}</td>
<td>{{ c.rows | rejectattr('inside_band') | list | length }} of {{ c.rows | length }}</td></tr>
{% endfor %}
</table>
{% for c in results %}
<section id="{{ c.name }}">
<h2>{{ c.name }}</h2>
<p>{{ c.description }}</p>
<p class="muted">{{ c.replications }} replications; L = {{ c.draws }} draws kept per
replication (thinned 1 in {{ c.thin }}, after {{ c.warmup }} warm-up iterations);
chi-square threshold p &lt; {{ c.threshold | num(4) }}.</p>
<table>
<tr><th class="l">parameter</th><th>chi-square</th><th>df</th><th>p</th><th>verdict</th>
<th>ECDF in band</th></tr>
{% for r in c.rows %}
<tr><td class="l"><code>{{ r.parameter }}</code></td><td>{{ r.chi2 | num(2) }}</td>
<td>{{ c.bins - 1 }}</td><td>{{ r.p_value | num(4) }}</td>
<td class="{{ 'bad' if r.flagged else 'ok' }}">
{{ 'miscalibrated' if r.flagged else 'uniform' }}</td>
<td>{{ 'yes' if r.inside_band else 'no' }}</td></tr>
{% endfor %}
</table>
<h3>Rank histograms</h3>
<p class="muted">Grey: central 99% range of a bin's count under uniformity (pointwise).</p>
<img alt="rank histograms of {{ c.name }}" src="data:image/png;base64,{{ c.histograms }}">
<h3>ECDF differences</h3>
<p class="muted">Grey: simultaneous {{ band_level }}% band; a red line leaves it.</p>
<img alt="ECDF differences of {{ c.name }}" src="data:image/png;base64,{{ c.ecdf }}">
</section>
{% endfor %}
</body>
</html>
"""


def render_sbc_report(paths: Sequence[str | Path], out: str | Path, *, bins: int) -> None:
    """Write the SBC page for the rank tables in ``paths``."""
    table = read_ranks(paths)
    results = [case_result(name, t, bins) for name, t in table.groupby("case", sort=True)]
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = num
    css = files("hierpipe.report").joinpath("templates/style.css").read_text(encoding="utf-8")
    page = env.from_string(_TEMPLATE).render(
        results=results,
        bins=bins,
        css=css,
        family_alpha=FAMILY_ALPHA,
        band_alpha=BAND_ALPHA,
        band_level=round(100 * (1 - BAND_ALPHA)),
    )
    write_text(page, out)
