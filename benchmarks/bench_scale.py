"""Scale: 10^7 observations in 10^5 groups through data -> eb_reml -> gibbs -> diagnostics.

    python benchmarks/bench_scale.py [--groups 100000] [--size 100] [--work DIR]

Each stage runs as the ``hierpipe`` command the workflow rule runs, in its own
process, and its peak memory is that process's maximum resident set size
(``os.wait4`` -> ``ru_maxrss``), so the figures are what a Snakemake job (or a
cluster job's ``mem_mb``) needs. Stages:

1. ``simulate``: the two-level design, ``groups`` groups of ``size``;
2. ``fit eb_reml``;
3. ``fit gibbs`` with 4 chains x (500 warm-up + 500 kept draws) and
   ``store_group_draws`` 1000: the summary covers every group, ``draws.parquet``
   the hyperparameters and an evenly spaced sample of 1000 groups;
4. ``diagnose`` of the Gibbs fit: shrinkage, checks, predictive checks, and
   convergence (R-hat, ESS) on the stored draw set;
5. ``report``: the study's HTML page from those files.

Prints a markdown table (stage, seconds, peak RSS, output size) and checks the
peak against the 8 GiB budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BUDGET_GIB = 8.0
FORMULA = "score ~ 1 + (1 | school)"


def run(argv: list[str], log: Path) -> tuple[float, float]:
    """Run one command; its wall time (s) and peak resident memory (GiB)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        pid = os.posix_spawnp(argv[0], argv, {**os.environ, "PYTHONUNBUFFERED": "1"},
                              file_actions=[(os.POSIX_SPAWN_DUP2, fh.fileno(), 1),
                                            (os.POSIX_SPAWN_DUP2, fh.fileno(), 2)])  # fmt: skip
        _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv[:3])} failed; see {log}:\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20  # Linux reports KiB


def size_of(*paths: Path) -> str:
    total = sum(p.stat().st_size if p.is_file() else sum(
        q.stat().st_size for q in p.rglob("*") if q.is_file()) for p in paths)  # fmt: skip
    return f"{total / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--store-group-draws", default="1000")
    parser.add_argument("--work", help="folder for the files (default: a temporary one, removed)")
    args = parser.parse_args()
    exe = shutil.which("hierpipe")
    if exe is None:
        sys.exit("the hierpipe command is not installed (pip install -e .)")
    work = Path(args.work or tempfile.mkdtemp(prefix="hierpipe-scale-"))
    study = work / "results" / "scale"
    study.mkdir(parents=True, exist_ok=True)
    data = study / "data.parquet"
    store = (
        args.store_group_draws if args.store_group_draws == "all" else int(args.store_group_draws)
    )
    gibbs = {"chains": args.chains, "warmup": args.warmup, "draws": args.draws,
             "store_group_draws": store}  # fmt: skip
    fit = [exe, "fit", str(data), "--formula", FORMULA, "--seed", "1", "--key", "scale"]
    stages = [
        ("simulate", [exe, "simulate", "--design", "two_level", "--out", str(data),
                      "--truth", str(study / "truth.parquet"), "--seed", "1", "--key", "scale",
                      "--set", f"groups={args.groups}", "--set", f"size={args.size}",
                      "--set", "mu=50", "--set", "tau=5", "--set", "sigma=10"],
         [data]),
        ("fit eb_reml", [*fit, "--fit", "eb_reml", "--key", "eb_reml",
                         "--out", str(study / "fits" / "eb_reml")],
         [study / "fits" / "eb_reml"]),
        ("fit gibbs", [*fit, "--fit", "gibbs", "--key", "gibbs", "--settings", json.dumps(gibbs),
                       "--out", str(study / "fits" / "gibbs")],
         [study / "fits" / "gibbs"]),
        ("diagnose gibbs", [exe, "diagnose", str(data), "--formula", FORMULA,
                            "--fit-dir", str(study / "fits" / "gibbs"),
                            "--out", str(study / "diagnostics" / "gibbs"),
                            "--seed", "1", "--key", "scale", "--key", "gibbs"],
         [study / "diagnostics" / "gibbs"]),
        ("diagnose eb_reml", [exe, "diagnose", str(data), "--formula", FORMULA,
                              "--fit-dir", str(study / "fits" / "eb_reml"),
                              "--out", str(study / "diagnostics" / "eb_reml"),
                              "--seed", "1", "--key", "scale", "--key", "eb_reml"],
         [study / "diagnostics" / "eb_reml"]),
    ]  # fmt: skip
    config = {"formula": FORMULA, "fits": ["eb_reml", "gibbs"], "gibbs": gibbs,
              "data": {"simulate": {"design": "two_level"}}}  # fmt: skip
    stages.append(
        ("report", [exe, "report", str(study), "--study", "scale", "--config-json",
                    json.dumps(config), "--seed", "1", "--out", str(study / "report.html")],
         [study / "report.html"])
    )  # fmt: skip
    print(f"{args.groups * args.size:,} observations in {args.groups:,} groups; files in {work}")
    print("| stage | seconds | peak RSS (GiB) | output |\n|---|---|---|---|")
    peaks = []
    for name, argv, outputs in stages:
        seconds, peak = run(argv, work / f"{name.replace(' ', '_')}.log")
        peaks.append(peak)
        print(f"| {name} | {seconds:.1f} | {peak:.2f} | {size_of(*outputs)} |", flush=True)
    info = json.loads((study / "fits" / "gibbs" / "fit.json").read_text())
    drawn = info.get("group_draws", {})
    print(f"\ngibbs: draws of {drawn.get('groups')} of {drawn.get('of')} groups stored "
          f"({drawn.get('rule')}); fit_table (sampling + summaries) "
          f"{info.get('seconds')} s")  # fmt: skip
    worst = max(peaks)
    print(f"largest peak {worst:.2f} GiB of a {BUDGET_GIB:.0f} GiB budget")
    if not args.work:
        shutil.rmtree(work)
    if worst > BUDGET_GIB:
        sys.exit(f"peak memory {worst:.2f} GiB exceeds {BUDGET_GIB} GiB")


if __name__ == "__main__":
    main()
