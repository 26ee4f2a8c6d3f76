"""PSIS leave-one-group-out against exact Gibbs refits on the default schools study.

Run from the repository root::

    python benchmarks/bench_psis_logo.py [--chains 4] [--warmup 1000] [--draws 1000]

The schools data are simulated exactly as the workflow does (seed 42, key
``schools``); Gibbs is fitted once, then every school is left out twice: by
PSIS on the full-data draws (``cv_method="psis"``) and by an exact refit
(``cv_method="exact"``, the same fold generators). Printed: the largest k-hat,
the groups that fell back to refits, the largest per-school |elpd difference|,
the total elpd both ways, and the CPU seconds of each (one core).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import yaml

from hierpipe.cv.folds import run_chunk
from hierpipe.data.simulate import simulate
from hierpipe.models.fitting import fit_table
from hierpipe.seeds import derive_rng


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--draws", type=int, default=1000)
    args = p.parse_args()
    config = yaml.safe_load(open("config/config.yaml"))
    study = config["studies"]["schools"]
    seed = int(config.get("seed", 42))
    params = study["data"]["simulate"]["params"]
    df = simulate("two_level", derive_rng(seed, "schools", "data"), **params).data
    formula = study["formula"]
    settings = {"chains": args.chains, "warmup": args.warmup, "draws": args.draws}
    fit = fit_table(df, formula, "gibbs", settings=settings,
                    rng=derive_rng(seed, "schools", "gibbs"), source="schools")  # fmt: skip
    kw = dict(chunk=0, chunks=1, settings=settings, seed=seed, keys=["schools"], source="s")
    t0 = time.process_time()
    approx = run_chunk(df, formula, "gibbs", cv_method="psis", draws=fit.draws, **kw)
    t1 = time.process_time()
    exact = run_chunk(df, formula, "gibbs", cv_method="exact", **kw)
    t2 = time.process_time()
    diff = approx.set_index("group")["elpd"] - exact.set_index("group")["elpd"]
    fallback = list(approx.loc[approx["cv_method"] == "exact_fallback", "group"])
    print(f"draws {len(fit.draws)}, groups {len(approx)}")
    print(f"largest k-hat {approx['khat'].max():.3f}; exact fallbacks: {fallback or 'none'}")
    print(f"largest |elpd_psis - elpd_exact| per group {diff.abs().max():.4f}")
    print(f"total elpd: psis {approx['elpd'].sum():.3f}, exact {exact['elpd'].sum():.3f}")
    print(f"CPU seconds: psis {t1 - t0:.2f}, exact refits {t2 - t1:.2f}")


if __name__ == "__main__":
    main()
