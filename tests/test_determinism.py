"""Determinism and caching through the real workflow (issue 7).

* Every parquet file is byte-identical whatever the order of the studies in the
  config (reruns and ``--cores 1`` against ``--cores 2`` are covered by
  ``tests/test_workflow.py::test_parquet_bytes_identical_across_runs_and_cores``).
* Adding a study reruns nothing of the others (the dry run's job list).
* Changing one fit's seed (``studies.NAME.fit_seeds``) reruns and changes that
  fit alone: its draws differ, every other file keeps its bytes and its mtime.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STUDY_A = {
    "data": {"simulate": {"design": "two_level", "params": {"groups": 6, "size": [2, 6]}}},
    "formula": "score ~ 1 + (1 | school)",
    "fits": ["eb_reml", "gibbs"],
    "gibbs": {"chains": 2, "warmup": 100, "draws": 100},
    "cv": {"fits": ["gibbs"]},
}
STUDY_B = {
    "data": {"simulate": {"design": "two_level", "params": {"groups": 5, "size": 4}}},
    "formula": "score ~ 1 + (1 | school)",
    "fits": ["complete_pooling"],
    "cv": {"fits": []},
}


def _config(*order: str) -> dict:
    studies = {"alpha": STUDY_A, "beta": STUDY_B}
    return {"seed": 11, "studies": {name: copy.deepcopy(studies[name]) for name in order}}


def _write_config(work: Path, cfg: dict) -> Path:
    (work / "config").mkdir(parents=True, exist_ok=True)
    # sort_keys=False keeps the order of the studies as written.
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return work


def _snakemake(work: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--directory", str(work), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _planned_outputs(log: str) -> list[str]:
    """Every output file of every job a dry run lists."""
    outs = []
    for line in re.findall(r"^\s+output: (.+)$", log, flags=re.M):
        outs += [p.strip() for p in line.split(",")]
    return outs


def _parquet(work: Path) -> dict[str, Path]:
    res = work / "results"
    return {p.relative_to(res).as_posix(): p for p in sorted(res.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def run_ab(tmp_path_factory) -> Path:
    work = _write_config(tmp_path_factory.mktemp("ab"), _config("alpha", "beta"))
    _snakemake(work, "--cores", "2")
    return work


def test_parquet_identical_whatever_the_order_of_studies(run_ab, tmp_path):
    work = _write_config(tmp_path / "ba", _config("beta", "alpha"))
    assert list(yaml.safe_load((work / "config" / "config.yaml").read_text())["studies"]) == [
        "beta",
        "alpha",
    ]
    _snakemake(work, "--cores", "2")
    a, b = _parquet(run_ab), _parquet(work)
    assert sorted(a) == sorted(b)
    assert len(a) >= 12
    for rel in a:
        assert a[rel].read_bytes() == b[rel].read_bytes(), rel


def test_adding_a_study_reruns_nothing_of_the_others(run_ab, tmp_path):
    cfg = _config("alpha", "beta")
    cfg["studies"]["gamma"] = copy.deepcopy(STUDY_B)
    alt = tmp_path / "more.yaml"
    alt.write_text(yaml.safe_dump(cfg, sort_keys=False))
    outs = _planned_outputs(_snakemake(run_ab, "-n", "--configfile", str(alt)))
    assert any(p.startswith("results/gamma/") for p in outs)
    # Only the new study's jobs, and the index that links every study.
    others = [p for p in outs if not p.startswith("results/gamma/")]
    assert others == ["results/index.html"], others


def test_changing_one_fits_seed_changes_that_fit_alone(run_ab, tmp_path):
    work = tmp_path / "seeded"
    shutil.copytree(run_ab, work, symlinks=True)  # copy2: mtimes kept, so nothing is stale
    before = {rel: (p.read_bytes(), p.stat().st_mtime_ns) for rel, p in _parquet(work).items()}
    cfg = _config("alpha", "beta")
    cfg["studies"]["alpha"]["fit_seeds"] = {"gibbs": 12345}
    _write_config(work, cfg)

    outs = _planned_outputs(_snakemake(work, "-n"))
    gibbs_fit = "results/alpha/fits/gibbs/draws.parquet"
    assert gibbs_fit in outs
    touched = {p for p in outs if p.endswith(".parquet")}
    # The fit, what is computed from it, and the CV folds that refit it; nothing else.
    allowed = re.compile(
        r"results/alpha/(fits|diagnostics)/gibbs/[^/]+\.parquet"
        r"|results/alpha/cv/(chunks/gibbs/\d+|gibbs|comparison)\.parquet"
    )
    assert all(allowed.fullmatch(p) for p in touched), sorted(touched)

    _snakemake(work, "--cores", "2")
    after = _parquet(work)
    assert sorted(after) == sorted(before)
    for rel, path in after.items():
        same = path.read_bytes() == before[rel][0]
        if rel in ("alpha/fits/gibbs/draws.parquet", "alpha/fits/gibbs/summary.parquet"):
            assert not same, f"{rel} did not change with the fit's seed"
        elif not allowed.fullmatch(f"results/{rel}"):
            assert same and path.stat().st_mtime_ns == before[rel][1], f"{rel} was rerun"
