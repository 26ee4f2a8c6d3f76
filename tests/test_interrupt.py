"""Interrupted runs lose nothing and corrupt nothing (issue 7).

A real ``snakemake --cores 2`` run is killed while the Gibbs fit is running,
first with SIGKILL to its whole process group (a power cut, ``kill -9``), then
with SIGINT to the group (Ctrl-C in a terminal); each time nothing that looks
finished is wrong, and the next run completes with every parquet file
byte-identical to an uninterrupted run's.

The fit is made slow on purpose (a long warm-up on a tiny data set), and the
kill waits for an event, not for time: the Gibbs job's log must show
``hierpipe fit``'s start line, so the kill lands while the sampler runs (and
after Snakemake has recorded the simulation job, which the fit needs, as done).

After SIGKILL Snakemake's own lock stays behind (it cannot tell a dead run
from a live one in another terminal), so ``snakemake --unlock`` comes first,
as Snakemake's message says; after SIGINT it releases the lock itself.
Outputs of jobs killed half-way are rerun because the workflow profile
(``profiles/default``) sets ``rerun-incomplete``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLOW = {
    "seed": 3,
    "studies": {
        "slow": {
            "data": {"simulate": {"design": "two_level", "params": {"groups": 4, "size": 5}}},
            "formula": "score ~ 1 + (1 | school)",
            "fits": ["gibbs"],
            # 2-4 s of sampling here (0.25-0.45 ms an iteration): long enough to be
            # caught running, short enough for CI.
            "gibbs": {"chains": 2, "warmup": 8000, "draws": 100},
            "cv": {"fits": []},
        }
    },
}
WAIT = 120.0  # seconds; generous for a loaded CI machine, never reached when healthy


def _workdir(path: Path) -> Path:
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(SLOW))
    return path


def _cmd(work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
            "--directory", str(work), *args]  # fmt: skip


def _run(work: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(work, *args), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _finished_looking(results: Path) -> dict[str, Path]:
    """Files that look finished: not hidden, not temporary, not logs."""
    return {
        p.relative_to(results).as_posix(): p
        for p in results.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(".tmp")
        and "logs" not in p.relative_to(results).parts
    }


def _started(log: Path) -> bool:
    """The fit has read its data and entered the fitting code (``hierpipe fit``'s start line)."""
    return log.exists() and "fitting gibbs" in log.read_text()


def _wait_for(log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while not _started(log):
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended (status {proc.returncode}) before the kill")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for the start line in {log}")
        time.sleep(0.05)


def _interrupt(work: Path, sig: signal.Signals) -> int:
    """Start a run, send ``sig`` to its process group while Gibbs samples; its exit status."""
    res = work / "results" / "slow"
    proc = subprocess.Popen(
        _cmd(work, "--cores", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a terminal job has
    )
    try:
        _wait_for(res / "logs" / "fit_gibbs.log", proc=proc)
        time.sleep(0.3)  # into the sampler (it runs for seconds)
        assert not (res / "fits" / "gibbs" / "fit.json").exists(), "fit ended before the kill"
        os.killpg(proc.pid, sig)
        status = proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Nothing of the group may live on (a fit still writing after the kill would
    # race the next run).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the killed run are still alive")
    return status


def _check_nothing_wrong_looks_finished(work: Path, reference: Path) -> None:
    """Every finished-looking file is complete: parquet equal to the reference's bytes."""
    ref = _finished_looking(reference / "results")
    for rel, path in _finished_looking(work / "results").items():
        assert rel in ref, f"{rel} exists after the kill but not in a complete run"
        if path.suffix == ".parquet":
            pq.read_metadata(path)  # a truncated file fails here
            assert path.read_bytes() == ref[rel].read_bytes(), rel
    assert (
        not (work / "results" / "slow" / "fits" / "gibbs" / "summary.parquet").exists()
        or (work / "results" / "slow" / "fits" / "gibbs" / "fit.json").exists()
    ), "a Gibbs output survived without its fit.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    work = _workdir(tmp_path_factory.mktemp("uninterrupted"))
    _run(work, "--cores", "2")
    return work


def test_killed_and_interrupted_runs_resume_to_identical_results(reference, tmp_path):
    work = _workdir(tmp_path / "interrupted")
    data = work / "results" / "slow" / "data.parquet"

    status = _interrupt(work, signal.SIGKILL)
    assert status == -signal.SIGKILL
    _check_nothing_wrong_looks_finished(work, reference)
    data_time = data.stat().st_mtime_ns
    assert list((work / ".snakemake" / "locks").iterdir()), "expected Snakemake's stale lock"
    _run(work, "--unlock")

    status = _interrupt(work, signal.SIGINT)
    assert status != 0
    _check_nothing_wrong_looks_finished(work, reference)
    locks = work / ".snakemake" / "locks"
    assert not locks.exists() or not list(locks.iterdir()), "SIGINT left a lock"
    # hierpipe turns Ctrl-C into one "interrupted" line, but Snakemake also
    # terminates its jobs on SIGINT, so whether that line is written is a race.
    log = (work / "results" / "slow" / "logs" / "fit_gibbs.log").read_text()
    assert "Traceback" not in log, log

    _run(work, "--cores", "2")
    done = _finished_looking(work / "results")
    ref = _finished_looking(reference / "results")
    assert sorted(done) == sorted(ref)
    parquet = [rel for rel in ref if rel.endswith(".parquet")]
    assert len(parquet) >= 4
    for rel in parquet:
        assert done[rel].read_bytes() == ref[rel].read_bytes(), rel
    # The job that had finished before the first kill (the fit had started, so
    # Snakemake had recorded it done) was not redone.
    assert data.stat().st_mtime_ns == data_time
    stray = [p for p in (work / "results").rglob("*.tmp")]
    assert all(p.name.startswith(".") for p in stray), stray


_KILL_DURING_WRITE = r"""
import os, signal, sys
import pandas as pd
import pyarrow.parquet as pq
from hierpipe import io

def dying_write(table, path, **kw):
    with open(path, "wb") as fh:
        fh.write(b"PAR1 half a file")
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = dying_write
io.write_parquet(pd.DataFrame({"x": [1.0, 2.0]}), sys.argv[1])
"""


def test_kill_during_a_write_leaves_no_file_that_looks_finished(tmp_path):
    """A process killed inside ``write_parquet`` leaves at most a hidden ``.tmp`` file."""
    target = tmp_path / "out" / "summary.parquet"
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_WRITE, str(target)])
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    left = list(target.parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".summary.parquet.")
    assert left[0].name.endswith(".tmp")


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    """The temporary file is private (mkstemp); the finished one is not (umask applies)."""
    from hierpipe.io import write_text

    old = os.umask(0o027)
    try:
        write_text("x", tmp_path / "a.txt")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640
