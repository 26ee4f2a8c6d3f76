"""eb_reml against statsmodels MixedLM and against the one-pass data floor.

Run from the repository root::

    python benchmarks/bench_reml.py [--repeats 3] [--sm-timeout 300] [--skip-sm-c]

Data sets (built here, written to parquet in a temporary folder):

(a) schools: 30 groups x 50, ``score ~ 1 + (1 | school)``, the default study's data
    (the same seed derivation as ``hierpipe simulate`` in the workflow);
(b) 2,000 groups of 1-40 observations, same model;
(c) 10,000 groups x 100 observations (N = 10^6), same model;
(d) 100 groups x 20 with a correlated slope, ``score ~ 1 + ses + (1 + ses | school)``.

For each set it times

* ``floor``: the one-pass floor, reading the parquet file (group labels read
  dictionary-encoded, i.e. as integer codes) and the per-group count, sum and
  sum of squares (``np.bincount``);
* ``eb_reml``: what ``hierpipe fit --fit eb_reml`` computes, in-process: read the
  file, validate it and build the design, the sufficient statistics, the REML
  fit and the whole summary table (every ``r_`` and ``coef_`` row) and
  predictions; writing the files is left out;
* ``estimates``: the same up to the estimates (read, design, statistics, REML
  optimisation), without the per-group summary table;
* ``general``: for (a)-(c), the general LMM engine (``hierpipe.models.engines.lmm``,
  L-BFGS-B on lme4's theta) on the same data, whose estimates must equal the
  one-way shortcut's (Brent) to 1e-6 relative;
* ``statsmodels``: ``MixedLM.fit(reml=True)`` with its defaults, in a
  subprocess (so a timeout can stop it), reading the same parquet file.

Exactness: the REML criterion (-2 restricted log-likelihood, beta and sigma
profiled) at statsmodels' estimates minus ours; positive means statsmodels
stopped away from the optimum. Times are the best of ``--repeats`` runs
(statsmodels: one run); BLAS is pinned to one thread for both.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from hierpipe.data.simulate import simulate  # noqa: E402
from hierpipe.design import build_design  # noqa: E402
from hierpipe.formula import parse_formula  # noqa: E402
from hierpipe.io import read_table, write_parquet  # noqa: E402
from hierpipe.models import lmm  # noqa: E402
from hierpipe.models.engines import lmm as lmm_engine  # noqa: E402
from hierpipe.models.fitting import fit_table, load_model  # noqa: E402
from hierpipe.models.structure import classify  # noqa: E402
from hierpipe.seeds import derive_rng  # noqa: E402

ONE_WAY = "score ~ 1 + (1 | school)"
SLOPES = "score ~ 1 + ses + (1 + ses | school)"


@dataclass(frozen=True)
class DataSet:
    key: str
    title: str
    formula: str
    design: str
    params: dict
    seed_keys: tuple[str, ...]


SETS = (
    DataSet(
        "a",
        "schools 30 x 50",
        ONE_WAY,
        "two_level",
        {"groups": 30, "size": 50, "mu": 70.0, "tau": 5.0, "sigma": 10.0},
        ("schools",),
    ),
    DataSet(
        "b",
        "2,000 groups of 1-40",
        ONE_WAY,
        "two_level",
        {"groups": 2000, "size": [1, 40], "mu": 70.0, "tau": 5.0, "sigma": 10.0},
        ("bench_b",),
    ),
    DataSet(
        "c",
        "10,000 x 100 (N = 10^6)",
        ONE_WAY,
        "two_level",
        {"groups": 10000, "size": 100, "mu": 70.0, "tau": 5.0, "sigma": 10.0},
        ("bench_c",),
    ),
    DataSet(
        "d",
        "100 x 20, correlated slope",
        SLOPES,
        "slopes",
        {"groups": 100, "size": 20},
        ("bench_d",),
    ),
)

STATSMODELS_SCRIPT = r"""
import os, sys, json, time, warnings
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = "1"
import numpy as np, pandas as pd
import statsmodels.formula.api as smf
path, slopes = sys.argv[1], sys.argv[2] == "1"
start = time.perf_counter()
df = pd.read_parquet(path).astype({"school": str})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if slopes:
        model = smf.mixedlm("score ~ ses", df, groups="school", re_formula="~ses")
    else:
        model = smf.mixedlm("score ~ 1", df, groups="school")
    res = model.fit(reml=True)
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "cov_re": np.asarray(res.cov_re).tolist(),
    "scale": float(res.scale),
    "fe": [float(v) for v in res.fe_params],
    "llf": float(res.llf),
    "converged": bool(res.converged),
    "warnings": sorted({type(w.message).__name__ for w in caught}),
}))
"""


def best_time(fn, repeats: int):
    """Best of ``repeats`` runs: on a shared machine the minimum is the least disturbed."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.min(times)), out


def floor(path: Path) -> np.ndarray:
    """Read the file and take per-group count, sum and sum of squares: the one-pass floor."""
    table = pq.read_table(path, read_dictionary=["school"])
    codes = table.column("school").combine_chunks().indices.to_numpy()
    y = table.column("score").to_numpy()
    n = np.bincount(codes)
    s1 = np.bincount(codes, y)
    s2 = np.bincount(codes, y * y)
    return np.stack([n, s1, s2])


def estimates_only(path: Path, formula: str):
    """Read, validate, reduce and run the REML optimiser; no summary table."""
    model = load_model(read_table(path), formula, str(path))
    if model.structure.kind == "one_way":
        st = model.prepared
        return lmm.one_way_reml(st.n, st.ybar, st.ss, "REML")
    return lmm_engine.eb_lmm(model.prepared, "eb_reml")


def general_path(path: Path, formula: str):
    """The general engine (L-BFGS-B over theta) on a one-way model."""
    parsed = parse_formula(formula)
    design = build_design(parsed, read_table(path), source=str(path))
    data = lmm_engine.prepare(design, classify(parsed))
    return lmm_engine.eb_lmm(data, "eb_reml")


def breakdown(path: Path, formula: str, repeats: int) -> dict[str, float]:
    """Best time of each stage of the whole eb_reml fit (one-way engine)."""
    from hierpipe.models.engines import engine_for

    parsed = parse_formula(formula)
    structure = classify(parsed)
    engine = engine_for(structure, formula)
    t_read, df = best_time(lambda: read_table(path), repeats)
    t_design, design = best_time(lambda: build_design(parsed, df, source=str(path)), repeats)
    t_stats, prepared = best_time(lambda: engine.prepare(design, structure), repeats)
    if structure.kind == "one_way":
        t_opt, _ = best_time(
            lambda: lmm.one_way_reml(prepared.n, prepared.ybar, prepared.ss, "REML"), repeats
        )
    else:
        t_opt, _ = best_time(lambda: lmm_engine.eb_lmm(prepared, "eb_reml"), repeats)
    t_fit, _ = best_time(lambda: engine.fit(prepared, structure, "eb_reml", {}, None), repeats)
    return {
        "read parquet (pandas)": t_read,
        "validate and build the design (group labels to codes)": t_design,
        "per-group statistics": t_stats,
        "REML optimisation and checks": t_opt,
        "summary table and predictions (engine fit minus optimisation)": t_fit - t_opt,
    }


def statsmodels_run(path: Path, slopes: bool, timeout: float | None) -> dict | None:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", STATSMODELS_SCRIPT, str(path), "1" if slopes else "0"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sm_criterion_gap(path: Path, formula: str, sm: dict, ours: lmm.LmmFit) -> float:
    """Our REML criterion at statsmodels' relative covariance minus ours at our optimum."""
    model = load_model(read_table(path), formula, str(path))
    if model.structure.kind == "one_way":
        st = model.prepared
        from hierpipe.models.suffstats_lmm import one_way_stats

        stats = one_way_stats(st.n, st.ybar, st.ss)
    else:
        stats = model.prepared.stats
    rel = np.asarray(sm["cov_re"], dtype=float) / sm["scale"]
    chol = np.linalg.cholesky(rel + 1e-300 * np.eye(rel.shape[0]))
    theta = lmm.factor_to_theta(chol)
    return float(lmm.criterion(stats, theta, "REML") - ours.reml_criterion)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds in SETS:
            if args.only and ds.key not in args.only:
                continue
            rng = derive_rng(42, *ds.seed_keys, "data")
            path = Path(tmp) / f"{ds.key}.parquet"
            sim = simulate(ds.design, rng, **ds.params)
            write_parquet(sim.data, path)
            n_obs, n_groups = len(sim.data), int(sim.data["school"].nunique())
            floor(path)  # warm the file cache and imports for every timing alike
            t_floor, _ = best_time(lambda p=path: floor(p), args.repeats)
            t_full, _ = best_time(
                lambda p=path, f=ds.formula: fit_table(
                    read_table(p), f, "eb_reml", settings={}, rng=None, source=str(p)
                ),
                args.repeats,
            )
            t_est, fit = best_time(lambda p=path, f=ds.formula: estimates_only(p, f), args.repeats)
            row = {
                "set": ds.key,
                "title": ds.title,
                "N": n_obs,
                "groups": n_groups,
                "floor": t_floor,
                "eb_reml": t_full,
                "estimates": t_est,
                "sd": float(fit.sds[0]),
                "sd_slope": float(fit.sds[1]) if fit.sds.size > 1 else None,
                "converged": bool(fit.converged),
            }
            if ds.formula == ONE_WAY:
                t_gen, gen = best_time(
                    lambda p=path, f=ds.formula: general_path(p, f), args.repeats
                )
                row["general"] = t_gen
                row["general_rel_diff"] = float(
                    max(
                        abs(gen.sds[0] / fit.sds[0] - 1),
                        abs(gen.sigma / fit.sigma - 1),
                        abs(gen.beta[0] / fit.beta[0] - 1),
                        abs(gen.reml_criterion / fit.reml_criterion - 1),
                    )
                )
            if ds.key == "c":
                row["breakdown"] = breakdown(path, ds.formula, args.repeats)
            skip = args.skip_sm_c and ds.key == "c"
            sm = (
                None
                if skip
                else statsmodels_run(
                    path, ds.formula == SLOPES, args.sm_timeout if ds.key == "c" else None
                )
            )
            row["statsmodels"] = sm
            if sm and "cov_re" in sm:
                sds = np.sqrt(np.diag(np.asarray(sm["cov_re"], dtype=float)))
                row["sm_sd"] = float(sds[0])
                row["sm_gap"] = sm_criterion_gap(path, ds.formula, sm, fit)
            rows.append(row)
            print(f"done ({ds.key}) {ds.title}", file=sys.stderr)
    return rows


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def table(rows: list[dict]) -> str:
    out = [
        "| set | N | groups | floor | eb_reml (whole fit) | eb_reml / floor | estimates only "
        "| estimates / floor | general engine | statsmodels REML | speed-up (whole fit) "
        "| sd_school__Intercept: ours / statsmodels | criterion gap of statsmodels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        sm = r["statsmodels"]
        if sm is None:
            sm_t, speed, sds, gap = "not run", "–", f"{r['sd']:.6g} / –", "–"
        elif "timeout" in sm:
            sm_t, speed = (
                f"> {sm['timeout']:.0f} s (stopped)",
                f"> {sm['timeout'] / r['eb_reml']:.0f}x",
            )
            sds, gap = f"{r['sd']:.6g} / –", "–"
        elif "error" in sm:
            sm_t, speed, sds, gap = f"error: {sm['error']}", "–", f"{r['sd']:.6g} / –", "–"
        else:
            flag = "" if not sm["warnings"] else " (" + ", ".join(sm["warnings"]) + ")"
            sm_t = fmt_s(sm["seconds"]) + flag
            speed = f"{sm['seconds'] / r['eb_reml']:.0f}x"
            sds = f"{r['sd']:.6g} / {r['sm_sd']:.6g}"
            gap = f"{r['sm_gap']:.2g}"
        gen = fmt_s(r.get("general"))
        if "general_rel_diff" in r:
            gen += f" (max rel. diff {r['general_rel_diff']:.1g})"
        out.append(
            f"| ({r['set']}) {r['title']} | {r['N']:,} | {r['groups']:,} | {fmt_s(r['floor'])} "
            f"| {fmt_s(r['eb_reml'])} | {r['eb_reml'] / r['floor']:.1f}x | {fmt_s(r['estimates'])} "
            f"| {r['estimates'] / r['floor']:.1f}x | {gen} | {sm_t} | {speed} | {sds} | {gap} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--sm-timeout",
        type=float,
        default=300.0,
        help="seconds before statsmodels is stopped on (c)",
    )
    p.add_argument("--skip-sm-c", action="store_true", help="do not run statsmodels on (c)")
    p.add_argument("--only", nargs="*", help="data set keys to run (a b c d)")
    p.add_argument("--json", help="also write the raw rows here")
    args = p.parse_args()
    rows = run(args)
    print(
        f"python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} cores; best of {args.repeats} runs; BLAS 1 thread\n"
    )
    print(table(rows))
    for r in rows:
        if "breakdown" in r:
            print(
                f"\nWhere the whole fit's time goes on ({r['set']}), floor {fmt_s(r['floor'])}:\n"
            )
            print("| stage | time | / floor |\n|---|---:|---:|")
            for stage, t in r["breakdown"].items():
                print(f"| {stage} | {fmt_s(t)} | {t / r['floor']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
