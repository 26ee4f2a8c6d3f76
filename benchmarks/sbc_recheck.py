"""Re-run SBC cases with many replications and well-thinned draws; per-parameter verdicts.

Follow-up of the full ``snakemake sbc`` run (benchmarks/README.md, SBC section):
the cases given on the command line run ``--replications`` replications (in
chunks of 1000, each chunk its own derived seed) with ``L = 99`` kept draws,
thinning ``--thin`` and ``--warmup`` warm-up iterations. For each ranked
parameter it prints

* the chi-square p-value on 20 bins (:func:`hierpipe.sbc.uniformity.chi_square_uniformity`);
* whether the ECDF leaves the simultaneous 95% band at 100 points
  (:func:`hierpipe.sbc.uniformity.ecdf_band`);
* the shape as two z-scores of the ranks scaled to ``u = r / L``:
  ``z_mean`` of the mean of ``u`` (a slope: posterior biased; negative means
  the truth sits low among the draws) and ``z_spread`` of the mean of
  ``(u - 1/2)^2`` (positive: a U, posterior too narrow; negative: a hump, too wide);
* the 90% and 99% quantiles over chains of the lag-1 autocorrelation of the kept
  draws (log scale for positive parameters), and the ESS per kept draw from the
  chain-averaged autocorrelation (Geyer's initial positive sequence).

Usage::

    python benchmarks/sbc_recheck.py nested_collapsed slopes_huang_wand --replications 4000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hierpipe.models import gibbs_lmm
from hierpipe.sbc.core import SBCSettings, get_case, ranks_of
from hierpipe.sbc.uniformity import chi_square_uniformity, ecdf_band, ecdf_counts
from hierpipe.seeds import derive_rng

DRAWS = 99
BINS = 20
CHUNK = 1000


def _lag1(x: np.ndarray) -> np.ndarray:
    """Lag-1 autocorrelation of each chain (rows of x)."""
    x = x - x.mean(axis=1, keepdims=True)
    v = (x * x).mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x[:, :-1] * x[:, 1:]).mean(axis=1) / v


def _ess_per_draw(x: np.ndarray) -> float:
    """ESS / n from the chain-averaged autocorrelation, Geyer's initial positive sequence."""
    x = x - x.mean(axis=1, keepdims=True)
    n = x.shape[1]
    v = (x * x).mean(axis=1)
    x, v = x[v > 0], v[v > 0]
    rho = [float(np.mean((x[:, : n - k] * x[:, k:]).sum(axis=1) / n / v)) for k in range(n // 2)]
    total, k = 0.0, 1
    while k + 1 < len(rho) and rho[k] + rho[k + 1] >= 0:
        total += rho[k] + rho[k + 1]
        k += 2
    return 1.0 / (1.0 + 2.0 * total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--replications", type=int, default=4000)
    ap.add_argument("--thin", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument(
        "--lmm-backend",
        choices=("auto", "numpy", "numba"),
        default="auto",
        help="back end of the slopes cases' sampler (they use the default, 'auto')",
    )
    args = ap.parse_args()
    if args.lmm_backend != "auto":
        backend = args.lmm_backend
        gibbs_lmm._resolve_backend = lambda _: backend  # the cases build their own settings
    settings = SBCSettings(draws=DRAWS, thin=args.thin, warmup=args.warmup)
    band = ecdf_band(args.replications, DRAWS + 1)
    for name in args.cases:
        case = get_case(name)
        ranks: dict[str, list[np.ndarray]] = {p: [] for p in case.parameters}
        acf: dict[str, list[np.ndarray]] = {p: [] for p in case.parameters}
        ess: dict[str, list[float]] = {p: [] for p in case.parameters}
        start = time.perf_counter()
        for chunk, first in enumerate(range(0, args.replications, CHUNK)):
            reps = min(CHUNK, args.replications - first)
            rep = case.replicate(derive_rng(args.seed, "sbc_recheck", name, chunk), reps, settings)
            for p in case.parameters:
                d = np.asarray(rep.draws[p])
                ranks[p].append(ranks_of(np.asarray(rep.truth[p]), d))
                x = np.log(d) if (d > 0).all() else d
                acf[p].append(_lag1(x))
                ess[p].append(_ess_per_draw(x))
        wall = time.perf_counter() - start
        print(
            f"\n{name}: R = {args.replications}, L = {DRAWS}, thin {args.thin}, "
            f"warm-up {args.warmup}, {wall:.0f} s"
        )
        print(
            f"{'parameter':34s} {'chi2 p':>8s} {'band':>5s} {'z_mean':>7s} {'z_sprd':>7s} "
            f"{'acf1 q90':>8s} {'acf1 q99':>8s} {'ess/n':>6s}"
        )
        for p in case.parameters:
            r = np.concatenate(ranks[p])
            _, pv = chi_square_uniformity(r, DRAWS, BINS)
            inside = band.contains(ecdf_counts(r, DRAWS, DRAWS + 1))
            u = r / DRAWS
            n = u.size
            # Exact moments of u = r / L for r uniform on 0..L.
            var_u = (DRAWS + 2) / (12.0 * DRAWS)
            s = (u - 0.5) ** 2
            ks = np.arange(DRAWS + 1) / DRAWS
            m2 = float(np.mean((ks - 0.5) ** 2))
            v2 = float(np.var((ks - 0.5) ** 2))
            z_mean = (u.mean() - 0.5) / np.sqrt(var_u / n)
            z_spread = (s.mean() - m2) / np.sqrt(v2 / n)
            a = np.concatenate(acf[p])
            a = a[np.isfinite(a)]
            print(
                f"{p:34s} {pv:8.3f} {'in' if inside else 'OUT':>5s} {z_mean:7.2f} {z_spread:7.2f} "
                f"{np.quantile(a, 0.9):8.3f} {np.quantile(a, 0.99):8.3f} {np.mean(ess[p]):6.2f}"
            )


if __name__ == "__main__":
    main()
