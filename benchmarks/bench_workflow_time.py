"""Wall time of the default study (``schools``) through the real workflow.

Run from the repository root::

    python benchmarks/bench_workflow_time.py [--cores 1 2] [--study schools]

For each ``--cores`` value the study is copied out of ``config/config.yaml``
into a fresh temporary folder (as the tests do) and ``snakemake --cores N`` runs
it from nothing. Printed: the wall time, the CPU time of Snakemake and all its
jobs (user + system; on a shared machine it varies much less than the wall
time), the machine's load average before the run, and the jobs' wall time
summed by rule, from Snakemake's log (stamps of one-second resolution).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def per_rule(log: str) -> dict[str, tuple[int, float]]:
    """Jobs and summed seconds per rule, from the stamps of a Snakemake log."""
    stamp, pending, start, name = None, None, {}, {}
    totals: dict[str, list[float]] = defaultdict(list)
    for line in log.splitlines():
        if m := re.match(r"^\[(.+)\]$", line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := re.match(r"^(?:local)?rule (\w+):", line):
            pending = m.group(1)
        elif (m := re.match(r"^\s+jobid: (\d+)", line)) and pending:
            start[m.group(1)], name[m.group(1)], pending = stamp, pending, None
        elif (m := re.match(r"^Finished jobid: (\d+)", line)) and m.group(1) in start:
            totals[name[m.group(1)]].append((stamp - start[m.group(1)]).total_seconds())
    return {k: (len(v), sum(v)) for k, v in totals.items()}


def run(study: str, cores: int) -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["studies"] = {study: config["studies"][study]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "config").mkdir()
        (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
        load = os.getloadavg()[0]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
             "--directory", str(work), "--cores", str(cores)],
            capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
    rules = per_rule(proc.stdout + proc.stderr)
    jobs = sum(n for n, _ in rules.values())
    print(
        f"--cores {cores}: {wall:.1f} s wall, {cpu:.1f} s CPU (Snakemake and every job), "
        f"{jobs} jobs, load average before {load:.1f}"
    )
    for rule, (n, secs) in sorted(rules.items(), key=lambda kv: -kv[1][1]):
        print(f"    {rule:18s} {n:3d} jobs {secs:6.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    p.add_argument("--study", default="schools")
    args = p.parse_args()
    for cores in args.cores:
        run(args.study, cores)


if __name__ == "__main__":
    main()
