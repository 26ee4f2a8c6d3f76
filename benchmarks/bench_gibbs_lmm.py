"""Mixing of the varying-slopes Gibbs sampler: ESS per draw of each sd_*, with and without
the marginal move and the interweaving moves, in a weak-data and a strong-data regime.

Run from the repository root::

    python benchmarks/bench_gibbs_lmm.py [--chains 4] [--warmup 1000] [--draws 1000]

Model ``y ~ 1 + x + (1 + x | g)``, x ~ N(0, 1), simulated here (fixed seeds):

* weak: 1,000 groups x 3 observations, sd_Intercept = 0.3, sd_x = 0.2, cor = 0.3,
  sigma = 1 (each group says little about its own coefficients: the funnel);
* strong: 50 groups x 100 observations, sd_Intercept = 1, sd_x = 0.5, cor = 0.3,
  sigma = 0.5.

Default priors of the ``gibbs`` method (Huang-Wand nu = 2 with scales s_y/s_z,
half-Cauchy sigma with scale s_y, flat beta). ESS is
min(bulk, tail) (hierpipe.diagnostics.convergence.summarise_draws) divided by
the number of kept draws (chains x draws). Milliseconds per iteration (all
chains) are CPU time of this process (``time.process_time``), which a shared
machine inflates less than wall time; *min ESS/s* is the smallest ESS over
the sd_*, cor_* and sigma per CPU second.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from hierpipe.diagnostics.convergence import summarise_draws
from hierpipe.models import gibbs_lmm as gl
from hierpipe.models.suffstats_lmm import lmm_suffstats

REGIMES = {
    "weak": {"groups": 1000, "size": 3, "sd": (0.3, 0.2), "cor": 0.3, "sigma": 1.0},
    "strong": {"groups": 50, "size": 100, "sd": (1.0, 0.5), "cor": 0.3, "sigma": 0.5},
}


def simulate(seed: int, groups: int, size: int, sd, cor: float, sigma: float):
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(groups), size)
    x = rng.standard_normal(codes.size)
    X = np.column_stack([np.ones_like(x), x])
    cov = np.array([[sd[0] ** 2, cor * sd[0] * sd[1]], [cor * sd[0] * sd[1], sd[1] ** 2]])
    b = rng.multivariate_normal(np.zeros(2), cov, size=groups)
    y = X @ [1.0, 0.5] + np.einsum("nk,nk->n", X, b[codes]) + sigma * rng.standard_normal(x.size)
    return X, codes, y


def default_priors(X: np.ndarray, y: np.ndarray) -> gl.LmmPriors:
    sy = float(np.std(y, ddof=1))
    sz = (1.0, float(np.std(X[:, 1])))
    return gl.LmmPriors(
        gl.FlatBeta(), (gl.HuangWand((sy / sz[0], sy / sz[1]), nu=2.0),), gl.HalfCauchySigma(sy)
    )


def run(
    regime: str, interweave: bool, marginal: bool, chains: int, warmup: int, draws: int
) -> dict:
    spec = REGIMES[regime]
    X, codes, y = simulate(1, **spec)
    stats = lmm_suffstats(X, X, y, codes, spec["groups"])
    settings = gl.LmmGibbsSettings(chains, warmup, draws, interweave=interweave, marginal=marginal)
    t0 = time.process_time()
    d = gl.gibbs_lmm_stats(stats, default_priors(X, y), settings, np.random.default_rng(2))
    secs = time.process_time() - t0
    arrays = gl.parameter_arrays(d, "g", ("Intercept", "x"), ("Intercept", "x"), (2,))
    s = summarise_draws(arrays).set_index("parameter")
    n = chains * draws
    ess = {k: min(s.loc[k, "ess_bulk"], s.loc[k, "ess_tail"]) / n for k in arrays}
    hyper = [k for k in arrays if not k.startswith("b_")]
    rate = min(ess[k] for k in hyper) * n / secs
    return {
        "ess": ess,
        "s_per_iter": secs / (warmup + draws),
        "rhat": s["rhat"].max(),
        "rate": rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=1000)
    a = ap.parse_args()
    cols = ["sd_g__Intercept", "sd_g__x", "cor_g__Intercept__x", "sigma", "b_Intercept", "b_x"]
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    print(
        "| regime | marginal | interweave | "
        + " | ".join(cols)
        + " | max R-hat | ms/iteration (CPU) | min ESS/s |"
    )
    print("|---" * (len(cols) + 6) + "|")
    for regime in REGIMES:
        for marginal, inter in ((True, True), (False, True), (False, False)):
            r = run(regime, inter, marginal, a.chains, a.warmup, a.draws)
            vals = " | ".join(f"{r['ess'][c]:.2f}" for c in cols)
            print(
                f"| {regime} | {'yes' if marginal else 'no'} | {'yes' if inter else 'no'} | "
                f"{vals} | {r['rhat']:.3f} | {1e3 * r['s_per_iter']:.2f} | {r['rate']:,.0f} |",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
