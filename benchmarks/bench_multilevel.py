"""Nested and crossed models: hierpipe's eb_reml and gibbs against statsmodels MixedLM.

    python benchmarks/bench_multilevel.py [--repeats 3] [--quick]

Data sets (built here, seeds fixed):

* N1: the default ``three_level`` study, 20 schools x 4 classrooms x 10 students;
* N2: 500 schools x [3, 8] classrooms x [5, 30] students (about 60,000 rows);
* C1: the default ``crossed`` study, 60 students x 8 teachers, 3 teachers each, 2 rows a pair;
* C2: 2,000 students x 40 teachers, 4 teachers each, 1 row a pair (8,000 rows).

For each: eb_reml time (estimates only, and the whole fit with profile
intervals), the restricted log-likelihood reached, and statsmodels MixedLM
REML (nested: ``groups=school`` with a classroom variance component; crossed:
one group and a variance component per factor) with its default optimiser
and the best over five optimisers, with their times. Gibbs: wall time and
ESS per draw and per second (the minimum over bulk and tail ESS) of every
``sd_*``, ``sigma`` and ``b_Intercept``, for the collapsed scheme (default),
its slice-sampling variant and the plain centred Gibbs sampler, 4 chains x
1,000 warm-up x 1,000 draws. BLAS pinned to one thread.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hierpipe.data.simulate import simulate  # noqa: E402
from hierpipe.diagnostics.convergence import ess_bulk, ess_tail  # noqa: E402
from hierpipe.models.engines.multilevel import priors_from_config, resolve_priors  # noqa: E402
from hierpipe.models.fitting import fit_table, load_model  # noqa: E402
from hierpipe.models.gibbs_multilevel import MultilevelSettings, gibbs_multilevel  # noqa: E402
from hierpipe.models.variance_components import fit_components, make_evaluator  # noqa: E402
from hierpipe.seeds import derive_rng  # noqa: E402

NESTED = "score ~ 1 + (1 | school/classroom)"
CROSSED = "y ~ 1 + (1 | student) + (1 | teacher)"


def datasets(quick: bool) -> dict[str, tuple[str, pd.DataFrame]]:
    out = {
        "N1": (
            NESTED,
            simulate(
                "three_level",
                derive_rng(42, "three_level", "data"),
                schools=20,
                classrooms=4,
                students=10,
                sd_classroom=4.0,
            ).data,
        ),
        "C1": (
            CROSSED,
            simulate(
                "crossed",
                derive_rng(42, "crossed", "data"),
                students=60,
                teachers=8,
                per_student=3,
                size=2,
            ).data,
        ),
    }
    if not quick:
        out["N2"] = (
            NESTED,
            simulate(
                "three_level",
                np.random.default_rng(2),
                schools=500,
                classrooms=[3, 8],
                students=[5, 30],
            ).data,
        )
        out["C2"] = (
            CROSSED,
            simulate(
                "crossed",
                np.random.default_rng(3),
                students=2000,
                teachers=40,
                per_student=4,
                size=1,
            ).data,
        )
    return out


def best_time(fn, repeats: int):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def statsmodels_fit(formula: str, df: pd.DataFrame, methods) -> list[tuple[str, float, float]]:
    import statsmodels.formula.api as smf

    if formula == NESTED:
        model = smf.mixedlm(
            "score ~ 1",
            df,
            groups="school",
            re_formula="1",
            vc_formula={"classroom": "0 + C(classroom)"},
        )
    else:
        model = smf.mixedlm(
            "y ~ 1",
            df.assign(one=1),
            groups="one",
            re_formula="0",
            vc_formula={"student": "0 + C(student)", "teacher": "0 + C(teacher)"},
        )
    out = []
    for m in methods:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                r = model.fit(reml=True, method=m)
                llf = float(r.llf)
            except Exception:  # a failing optimiser is reported as NaN
                llf = float("nan")
        out.append((m, time.perf_counter() - t, llf))
    return out


def min_ess(x: np.ndarray) -> float:
    return float(min(ess_bulk(x), ess_tail(x)))


def gibbs_row(name: str, formula: str, df: pd.DataFrame, scheme: str) -> dict:
    model = load_model(df, formula, name)
    st = model.prepared.stats
    priors = priors_from_config(resolve_priors(st, None))
    settings = MultilevelSettings(chains=4, warmup=1000, draws=1000, scheme=scheme)
    t = time.perf_counter()
    d = gibbs_multilevel(make_evaluator(st), priors, settings, np.random.default_rng(1))
    secs = time.perf_counter() - t
    params = {f"sd_{f}": d.sd[..., k] for k, f in enumerate(st.factors)}
    params["sigma"] = d.sigma
    params["b_Intercept"] = d.beta[..., 0]
    ess = {k: min_ess(v) for k, v in params.items()}
    return {
        "data": name,
        "scheme": scheme,
        "seconds": secs,
        **{f"{k} ESS/draw": v / 4000 for k, v in ess.items()},
        "min ESS/s": min(ess.values()) / secs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N1 and C1 only")
    ap.add_argument(
        "--sm-max-rows",
        type=int,
        default=100000,
        help="nested data: statsmodels' default optimiser up to this many rows",
    )
    ap.add_argument(
        "--sm-all-max-rows",
        type=int,
        default=5000,
        help="statsmodels' five optimisers up to this many rows",
    )
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}\n")
    reml_rows = []
    for name, (formula, df) in datasets(args.quick).items():
        model = load_model(df, formula, name)
        st = model.prepared.stats
        t_est, fit = best_time(
            lambda st=st: fit_components(make_evaluator(st), "REML"), args.repeats
        )
        t_whole, _ = best_time(
            lambda df=df, formula=formula, name=name: fit_table(
                df, formula, "eb_reml", settings={}, rng=np.random.default_rng(0), source=name
            ),
            1,
        )
        row = {
            "data": name,
            "rows": len(df),
            "cells": st.n_cells,
            "structure": model.prepared.structure_kind,
            "eb_reml estimates s": t_est,
            "whole fit with profiles s": t_whole,
            "restricted loglik": -0.5 * fit.objective,
            "sds": " ".join(f"{v:.4g}" for v in fit.sds),
            "sigma": f"{fit.sigma:.4g}",
        }
        nested = model.prepared.structure_kind == "nested"
        if len(df) <= args.sm_all_max_rows:
            methods = ["lbfgs", "bfgs", "cg", "nm", "powell"]
        elif nested and len(df) <= args.sm_max_rows:
            methods = ["lbfgs"]  # its default only: the sweep takes minutes
        else:
            methods = []  # crossed: one dense column per student and teacher
        if methods:
            sm = statsmodels_fit(formula, df, methods)
            row["statsmodels default (lbfgs) s"] = sm[0][1]
            row["statsmodels default gap"] = row["restricted loglik"] - sm[0][2]
            best = max(sm, key=lambda r: r[2] if np.isfinite(r[2]) else -np.inf)
            row["statsmodels best of"] = f"{best[0]} ({len(methods)})"
            row["statsmodels best gap"] = row["restricted loglik"] - best[2]
        reml_rows.append(row)
    with pd.option_context(
        "display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format
    ):
        print("eb_reml (gap = our restricted log-likelihood minus statsmodels'; > 0: ours higher)")
        print(pd.DataFrame(reml_rows).to_string(index=False))
        print()
        rows = []
        for name, (formula, df) in datasets(args.quick).items():
            for scheme in ("collapsed", "slice", "plain"):
                if scheme == "slice" and name in ("N2", "C2"):
                    continue
                rows.append(gibbs_row(name, formula, df, scheme))
        print("gibbs, 4 chains x 1000 warm-up x 1000 draws (ESS: min of bulk and tail)")
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
