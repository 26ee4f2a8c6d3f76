"""Mixing of the meta-analysis Gibbs sampler: ESS of tau per draw, per scheme and regime.

Run from the repository root::

    python benchmarks/bench_gibbs_meta.py [--chains 4] [--warmup 1000] [--draws 5000]

Data: the eight schools (tau small against the standard errors: a centred
sampler sticks near tau = 0) and the BCG trials (log risk ratios; tau^2 larger
than most sampling variances: a non-centred sampler sticks), plus a simulated
weak regime (100 studies, v = 1, tau = 0.05). Flat prior on tau. For each
scheme (``asis``, ``centred``, ``noncentred``) it prints the bulk ESS of tau
and mu per kept draw, the largest |mean - exact| / MCSE over mu, tau and the
thetas (exact: hierpipe.models.meta_bayes), and seconds per 1000 iterations
(wall time on a shared machine: indicative only).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd

from hierpipe.diagnostics.convergence import ess_bulk, mcse_mean
from hierpipe.models.gibbs_meta import SCHEMES, TauPrior, gibbs_meta
from hierpipe.models.meta import log_risk_ratio
from hierpipe.models.meta_bayes import posterior_tau_grid
from hierpipe.seeds import derive_rng


def data_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    es = pd.read_csv("data/eight_schools.csv")
    bcg = pd.read_csv("data/bcg.csv")
    rng = derive_rng(1, "bench_gibbs_meta", "weak")
    v = np.ones(100)
    return {
        "eight_schools": (es["y"].to_numpy(float), es["sigma"].to_numpy(float) ** 2),
        "bcg": log_risk_ratio(bcg["tpos"], bcg["tneg"], bcg["cpos"], bcg["cneg"]),
        "weak_k100": (rng.normal(0.0, np.sqrt(v + 0.05**2)), v),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=5000)
    args = ap.parse_args()
    kept = args.chains * args.draws
    print(f"{'data':14s} {'scheme':11s} {'ESS(tau)/draw':>14s} {'ESS(mu)/draw':>13s} "
          f"{'max |z|':>8s} {'s/1000 it':>10s}")  # fmt: skip
    for name, (y, v) in data_sets().items():
        post = posterior_tau_grid(y, v, "uniform")
        for scheme in SCHEMES:
            start = time.perf_counter()
            g = gibbs_meta(y, v, prior=TauPrior("uniform"), chains=args.chains,
                           warmup=args.warmup, draws=args.draws,
                           rng=derive_rng(2, name, scheme), scheme=scheme)  # fmt: skip
            sec = (time.perf_counter() - start) / (args.warmup + args.draws) * 1000
            z = [abs(g.mu.mean() - post.mu_mean) / float(mcse_mean(g.mu)),
                 abs(g.tau.mean() - post.mean) / float(mcse_mean(g.tau))]  # fmt: skip
            for j in range(y.size):
                th = g.theta[..., j]
                z.append(abs(th.mean() - post.theta_mean[j]) / float(mcse_mean(th)))
            print(f"{name:14s} {scheme:11s} {float(ess_bulk(g.tau)) / kept:14.3f} "
                  f"{float(ess_bulk(g.mu)) / kept:13.3f} {max(z):8.2f} {sec:10.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
