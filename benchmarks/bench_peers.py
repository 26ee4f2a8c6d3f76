"""hierpipe's ``gibbs`` against PyMC NUTS and nutpie: wall time and min ESS/s, same data, one run.

Run from the repository root (the ``bench`` extra installs the peers)::

    pip install -e '.[bench]'
    python benchmarks/bench_peers.py [--sets a,b,c,d,N1,C1,N2,C2] [--peers pymc,nutpie]
        [--timeout 300] [--peer-chains 4] [--chains 4] [--warmup 1000] [--draws 1000]
        [--backends numpy,numba]

Data sets, built here with fixed seeds: (a)-(d) of issue 3 exactly as
``bench_reml.py`` builds them ((a) the default ``schools`` study 30 x 50; (b)
2,000 groups of 1-40; (c) 10,000 x 100, N = 10^6; (d) 100 x 20 with a
correlated slope, ``score ~ 1 + ses + (1 + ses | school)``), and the nested and
crossed sets N1, C1, N2, C2 of ``bench_multilevel.py`` (issue 4).

hierpipe: ``fit_table(..., "gibbs")``, i.e. what ``hierpipe fit --fit gibbs``
computes in-process (design, statistics, sampler, the full summary with every
``r_``/``coef_`` row, predictions), with its default sampler and priors,
``--chains`` chains (vectorised, one core). *sampling* is the sampler call alone
(timed by wrapping it), *whole* the whole fit. One row a back end in
``--backends`` that the structure's sampler has: ``numpy`` (what ``pip install
-e .`` gives) and ``numba`` (the ``fast`` extra; timed on a second call, after a
short first call has compiled the kernels into numba's on-disk cache, so its
*whole* leaves the one-off compilation out).

Peers, each in its own process (so ``--timeout`` can stop it), on the
observation-level model a user writes, ``--peer-chains`` chains run one after
the other (``cores=1``; the machine has 2 cores shared with other work):
PyMC's default NUTS (``pm.sample``; *sampling* from PyMC's own
``sampling_time``, *whole* includes building and compiling the model) and
nutpie (``compile_pymc_model`` then ``sample``; *whole* includes the compile).
Both run ``--warmup`` tuning and ``--draws`` kept draws a chain.

Priors are hierpipe's defaults, written out in the peers: flat ``b_*``;
half-Cauchy(A) on ``sigma`` and every one-coefficient SD with A the SD of the
outcome (ddof 1); for (d) the Huang & Wand (2013) prior with nu = 2 and scales
A_k = s_y / s_z_k (s_z the column's SD, 1 for the intercept), as an exact
density on the log-Cholesky factor of Sigma (``pm.Potential``, Jacobian
included), so the three samplers target the same posterior. Group effects are
non-centred in the peers (``theta = mu + tau z``), except on (a) and (c), where
every group has 50 or more observations and the centred form is the better one
for NUTS.

ESS: the minimum over bulk and tail ESS (ArviZ for the peers, the same
estimators in hierpipe's summary) over every ``b_*``, ``sd_*`` and ``sigma``;
*min ESS/s* divides it by the sampling or the whole time. *ratio* is hierpipe's
min ESS/s over the peer's, sampling against sampling and whole against whole,
one a hierpipe back end.
``uptime`` load averages are printed with every set.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hierpipe.errors import ConfigError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

ONE_WAY = "score ~ 1 + (1 | school)"
SLOPES = "score ~ 1 + ses + (1 + ses | school)"
NESTED = "score ~ 1 + (1 | school/classroom)"
CROSSED = "y ~ 1 + (1 | student) + (1 | teacher)"
CENTRED = {"a", "c"}


def load_sets(keys: list[str]) -> dict[str, tuple[str, str, pd.DataFrame]]:
    """(title, formula, data) of each requested set."""
    from bench_multilevel import datasets as multilevel_sets
    from bench_reml import SETS

    from hierpipe.data.simulate import simulate
    from hierpipe.seeds import derive_rng

    out = {}
    for ds in SETS:
        if ds.key in keys:
            rng = derive_rng(42, *ds.seed_keys, "data")
            out[ds.key] = (ds.title, ds.formula, simulate(ds.design, rng, **ds.params).data)
    if any(k in keys for k in ("N1", "C1", "N2", "C2")):
        for key, (formula, df) in multilevel_sets(quick=False).items():
            if key in keys:
                out[key] = (key, formula, df)
    return {k: out[k] for k in keys if k in out}


# --------------------------------------------------------------------------- hierpipe


def run_hierpipe(
    formula: str, df: pd.DataFrame, chains: int, warmup: int, draws: int, backend: str = "numpy"
) -> dict:
    import hierpipe.models.gibbs_lmm as gl
    import hierpipe.models.gibbs_multilevel as gm
    import hierpipe.models.gibbs_twolevel as gt
    from hierpipe.models.fitting import fit_table

    spent = []
    originals = {}

    def timed(module, name):
        fn = getattr(module, name)
        originals[(module, name)] = fn

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent.append(time.perf_counter() - t)
            return out

        setattr(module, name, wrapper)

    timed(gt, "gibbs_two_level")
    timed(gl, "gibbs_lmm_stats")
    timed(gm, "gibbs_multilevel")
    try:
        t = time.perf_counter()
        res = fit_table(
            df,
            formula,
            "gibbs",
            settings={"chains": chains, "warmup": warmup, "draws": draws}
            | ({} if backend == "numpy" else {"backend": backend}),
            rng=np.random.default_rng(20261124),
            source="bench",
        )
        whole = time.perf_counter() - t
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
    s = res.summary.set_index("parameter")
    keep = [p for p in s.index if p.startswith(("b_", "sd_")) or p == "sigma"]
    ess = s.loc[keep, ["ess_bulk", "ess_tail"]].min(axis=1)
    return {
        "sampling": float(sum(spent)),
        "whole": whole,
        "min_ess": float(ess.min()),
        "worst": str(ess.idxmin()),
        "max_rhat": float(s.loc[keep, "rhat"].max()),
    }


# --------------------------------------------------------------------------- peers


def _codes(values) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype("int64"), len(uniques)


def build_pymc(formula: str, df: pd.DataFrame, centred: bool):
    """The PyMC model of ``formula`` with hierpipe's default priors; returns (model, var names)."""
    import pymc as pm
    import pytensor.tensor as pt

    yname = "y" if formula == CROSSED else "score"
    y = df[yname].to_numpy(float)
    A = float(np.std(y, ddof=1))
    with pm.Model() as model:
        sigma = pm.HalfCauchy("sigma", beta=A)
        if formula == SLOPES:
            ses = df["ses"].to_numpy(float)
            g, G = _codes(df["school"])
            scales = np.array([A / 1.0, A / float(np.std(ses))])
            nu, q = 2.0, 2
            b = pm.Flat("b", shape=2)
            log_d = pm.Flat("log_L_diag", shape=2)
            l21 = pm.Flat("L21")
            d0, d1 = pt.exp(log_d[0]), pt.exp(log_d[1])
            s00, s01, s11 = d0**2, d0 * l21, l21**2 + d1**2
            det = (d0 * d1) ** 2
            p00, p11 = s11 / det, s00 / det  # diagonal of Sigma^-1
            # Huang & Wand (2013) eq. 2 on Sigma, then |dSigma/dL| |dL/dlog L_ii|
            logp = -0.5 * (nu + 2 * q) * pt.log(det) - 0.5 * (nu + q) * (
                pt.log(nu * p00 + 1 / scales[0] ** 2) + pt.log(nu * p11 + 1 / scales[1] ** 2)
            )
            pm.Potential("huang_wand", logp + 3 * log_d[0] + 2 * log_d[1])
            pm.Deterministic("sd_Intercept", pt.sqrt(s00))
            pm.Deterministic("sd_ses", pt.sqrt(s11))
            pm.Deterministic("cor", s01 / pt.sqrt(s00 * s11))
            z = pm.Normal("z", 0.0, 1.0, shape=(G, 2))
            r0 = d0 * z[:, 0]
            r1 = l21 * z[:, 0] + d1 * z[:, 1]
            mu = b[0] + b[1] * ses + r0[g] + r1[g] * ses
            names = ["b", "sd_Intercept", "sd_ses", "sigma"]
        else:
            b0 = pm.Flat("b_Intercept")
            mu = b0
            names = ["b_Intercept", "sigma"]
            if formula == ONE_WAY:
                factors = {"school": _codes(df["school"])}
            elif formula == NESTED:
                factors = {
                    "school": _codes(df["school"]),
                    "classroom": _codes(
                        df["school"].astype(str) + "/" + df["classroom"].astype(str)
                    ),
                }
            else:
                factors = {"student": _codes(df["student"]), "teacher": _codes(df["teacher"])}
            for name, (g, G) in factors.items():
                tau = pm.HalfCauchy(f"sd_{name}", beta=A)
                names.append(f"sd_{name}")
                if centred:
                    theta = pm.Normal(f"r_{name}", 0.0, tau, shape=G)
                else:
                    theta = tau * pm.Normal(f"z_{name}", 0.0, 1.0, shape=G)
                mu = mu + theta[g]
        pm.Normal("obs", mu, sigma, observed=y)
    return model, names


def min_ess(idata, names: list[str]) -> tuple[float, float]:
    import arviz as az

    post = idata.posterior[names]
    bulk = az.ess(post, method="bulk")
    tail = az.ess(post, method="tail")
    vals = [float(np.min(bulk[n].values)) for n in names] + [
        float(np.min(tail[n].values)) for n in names
    ]
    rhat = az.rhat(post)
    return min(vals), max(float(np.max(rhat[n].values)) for n in names)


def peer_worker(peer: str, formula: str, path: str, centred: bool, args: dict) -> dict:
    """Run in a subprocess: fit one peer, return its timings and ESS."""
    import logging
    import warnings

    logging.getLogger("pymc").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    df = pd.read_parquet(path)
    t0 = time.perf_counter()
    model, names = build_pymc(formula, df, centred)
    if peer == "pymc":
        import pymc as pm

        with model:
            idata = pm.sample(
                draws=args["draws"],
                tune=args["warmup"],
                chains=args["chains"],
                cores=1,
                random_seed=20261124,
                progressbar=False,
                compute_convergence_checks=False,
            )
        whole = time.perf_counter() - t0
        sampling = float(idata.posterior.attrs["sampling_time"])
    else:
        import nutpie

        compiled = nutpie.compile_pymc_model(model)
        t1 = time.perf_counter()
        idata = nutpie.sample(
            compiled,
            draws=args["draws"],
            tune=args["warmup"],
            chains=args["chains"],
            cores=1,
            seed=20261124,
            progress_bar=False,
        )
        sampling = time.perf_counter() - t1
        whole = time.perf_counter() - t0
    ess, rhat = min_ess(idata, names)
    return {"sampling": sampling, "whole": whole, "min_ess": ess, "max_rhat": rhat}


def run_peer(peer: str, formula: str, path: Path, centred: bool, args, timeout: float) -> dict:
    spec = {"chains": args.peer_chains, "warmup": args.warmup, "draws": args.draws}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps([peer, formula, str(path), centred, spec]),
    ]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"not finished in {timeout:.0f} s"}
    if out.returncode != 0:
        return {"status": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process"] = time.perf_counter() - t
    return res


# --------------------------------------------------------------------------- report


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def fmt_rate(ess: float, secs: float) -> str:
    return f"{ess / secs:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="a,b,c,d,N1,C1,N2,C2")
    ap.add_argument("--peers", default="pymc,nutpie")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a peer may take")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--peer-chains", type=int, default=4)
    ap.add_argument(
        "--backends",
        default="numpy,numba",
        help="hierpipe back ends (numba: the `fast` extra; a sampler without one skips it)",
    )
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        peer, formula, path, centred, spec = json.loads(args.worker)
        print(json.dumps(peer_worker(peer, formula, path, centred, spec)))
        return
    import platform

    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores; hierpipe {args.chains} "
        f"chains, peers {args.peer_chains} chains (cores=1); {args.warmup} warm-up + "
        f"{args.draws} draws a chain; BLAS 1 thread",
        flush=True,
    )
    peers = [p for p in args.peers.split(",") if p]
    sets = load_sets(args.sets.split(","))
    header = (
        "| set | sampler | sampling s | whole s | min ESS | min ESS/s sampling | "
        "min ESS/s whole | hierpipe ratio (sampling / whole) | max R-hat |"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for key, (title, formula, df) in sets.items():
            print(f"\n({key}) {title}: {formula}, {len(df):,} rows; {load()}", flush=True)
            print(header)
            print("|---" * 9 + "|")
            ours = {}
            for backend in [b for b in args.backends.split(",") if b]:
                try:
                    if backend != "numpy":  # first call compiles (cached on disk); time the next
                        run_hierpipe(formula, df, args.chains, 10, 10, backend)
                    h = run_hierpipe(formula, df, args.chains, args.warmup, args.draws, backend)
                except ConfigError:
                    continue  # this structure's sampler has no such back end
                ours[backend] = h
                print(
                    f"| {key} | hierpipe gibbs ({backend}) | {h['sampling']:.2f} | "
                    f"{h['whole']:.2f} | {h['min_ess']:,.0f} ({h['worst']}) | "
                    f"{fmt_rate(h['min_ess'], h['sampling'])} | "
                    f"{fmt_rate(h['min_ess'], h['whole'])} | 1 | {h['max_rhat']:.3f} |",
                    flush=True,
                )
            path = Path(tmp) / f"{key}.parquet"
            df.to_parquet(path)
            for peer in peers:
                r = run_peer(peer, formula, path, key in CENTRED, args, args.timeout)
                name = "PyMC NUTS" if peer == "pymc" else "nutpie"
                if "status" in r:
                    print(f"| {key} | {name} | – | – | {r['status']} | – | – | – | – |", flush=True)
                    continue
                ratios = []
                for backend, h in ours.items():
                    rs = (h["min_ess"] / h["sampling"]) / (r["min_ess"] / r["sampling"])
                    rw = (h["min_ess"] / h["whole"]) / (r["min_ess"] / r["whole"])
                    ratios.append(f"{backend} {rs:,.1f}x / {rw:,.1f}x")
                print(
                    f"| {key} | {name} | {r['sampling']:.2f} | {r['whole']:.2f} | "
                    f"{r['min_ess']:,.0f} | {fmt_rate(r['min_ess'], r['sampling'])} | "
                    f"{fmt_rate(r['min_ess'], r['whole'])} | {'; '.join(ratios)} | "
                    f"{r['max_rhat']:.3f} |",
                    flush=True,
                )
            print(f"({key}) done; {load()}", flush=True)


if __name__ == "__main__":
    main()
