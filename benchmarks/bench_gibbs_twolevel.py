"""Two-level Gibbs sampler: iterations/s and min ESS/s by scheme and backend.

Run: python benchmarks/bench_gibbs_twolevel.py numpy,numba collapsed,asis,centred 3
(backends, schemes, repeats; numba needs the `fast` extra). 4 chains x 1000
warm-up x 1000 draws; CPU time; min ESS over b_Intercept, sd and sigma (ArviZ).
"""

import sys
import time

import arviz as az
import numpy as np

from hierpipe.models.gibbs_twolevel import HalfCauchy, Priors, gibbs_two_level


def make(J, nlo, nhi, mu, tau, sigma, seed):
    g = np.random.default_rng(seed)
    n = g.integers(nlo, nhi + 1, J)
    th = mu + tau * g.standard_normal(J)
    ybar = th + sigma / np.sqrt(n) * g.standard_normal(J)  # exact law of group means
    ssw = sigma**2 * g.chisquare(n.sum() - J) if n.sum() > J else 0.0  # exact law of SSW
    return n, ybar, ssw


def priors_for(n, ybar, ssw):  # data-scaled half-Cauchy, as hierpipe's default_priors
    N = n.sum()
    grand = (n * ybar).sum() / N
    s = float(np.sqrt((ssw + (n * (ybar - grand) ** 2).sum()) / (N - 1)))
    return Priors(sd=HalfCauchy(s), sigma=HalfCauchy(s))


PROBLEMS = {
    "schools 30x50 (tau 5, sigma 10)": (30, 50, 50, 70.0, 5.0, 10.0, 1),
    "2000 groups, n 1-40 (tau 0.5, sigma 10)": (2000, 1, 40, 0.0, 0.5, 10.0, 2),
    "2000 groups, n 1-40 (tau 0.1, sigma 10)": (2000, 1, 40, 0.0, 0.1, 10.0, 3),
    "10000 groups, n 1-40 (tau 2, sigma 10)": (10000, 1, 40, 0.0, 2.0, 10.0, 4),
}

if __name__ == "__main__":
    backends = sys.argv[1].split(",")
    schemes = sys.argv[2].split(",")
    reps = int(sys.argv[3])
    only = sys.argv[4] if len(sys.argv) > 4 else ""
    if "numba" in backends:
        t = time.process_time()
        gibbs_two_level(
            [5, 5],
            [0.0, 1.0],
            8.0,
            priors=Priors(sd=HalfCauchy(1.0), sigma=HalfCauchy(1.0)),
            rng=np.random.default_rng(0),
            backend="numba",
            warmup=30,
            draws=2,
        )
        print(f"numba compile (once per process): {time.process_time() - t:.1f} s")
    for name, spec in PROBLEMS.items():
        if only not in name:
            continue
        n, ybar, ssw = make(*spec)
        pri = priors_for(n, ybar, ssw)
        for be in backends:
            for sc in schemes:
                best = np.inf
                for _ in range(reps):
                    t = time.process_time()
                    fit = gibbs_two_level(
                        n,
                        ybar,
                        ssw,
                        priors=pri,
                        rng=np.random.default_rng(11),
                        scheme=sc,
                        backend=be,
                    )
                    best = min(best, time.process_time() - t)
                ess = {k: az.ess(getattr(fit, k)) for k in ("b_Intercept", "sd", "sigma")}
                rhat = max(az.rhat(getattr(fit, k)) for k in ess)
                print(
                    f"{name:40s} {be:5s} {sc:9s} {best:7.3f} s {2000 / best:8.0f} it/s  "
                    f"ESS/draw b {ess['b_Intercept'] / 4000:.2f} sd {ess['sd'] / 4000:.3f} "
                    f"sigma {ess['sigma'] / 4000:.2f}  "
                    f"min ESS/s {min(ess.values()) / best:9.0f}  max R-hat {rhat:.3f}",
                    flush=True,
                )
