"""Provenance: a hash of hierpipe's own source and the versions of what it ran with."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_hash(*parts: str, exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 over the package's Python and template files, in sorted order.

    ``parts`` limits it to files under these package-relative paths (all files
    when empty); ``exclude`` leaves paths out. The rules take such a hash as a
    param: Snakemake's code trigger sees only a rule's own text, so without it a
    changed model would not rerun the fits. Each rule hashes only the code it
    runs, so editing the report template does not refit anything.
    """
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*")):
        if path.suffix not in {".py", ".j2", ".css"} or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        if parts and not rel.startswith(parts):
            continue
        if exclude and rel.startswith(exclude):
            continue
        h.update(rel.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of Python and of hierpipe's run-time dependencies."""
    out = {"python": platform.python_version()}
    for pkg in (
        "hierpipe",
        "numpy",
        "scipy",
        "pandas",
        "pyarrow",
        "matplotlib",
        "jinja2",
        "snakemake",
    ):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit(cwd: str | Path = ".") -> str | None:
    """The working tree's git commit, with ``-dirty`` when it has changes; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")
