"""Config, seed, package versions, git commit and fit times."""

from __future__ import annotations

import json
from typing import Any

from hierpipe.provenance import git_commit, versions
from hierpipe.report.context import StudyContext


def build(ctx: StudyContext) -> dict[str, Any]:
    return {
        "config": json.dumps(ctx.config, indent=2, sort_keys=True),
        "seed": ctx.seed,
        "versions": versions(),
        "commit": git_commit(),
        "fit_seconds": {fit: f.info.get("seconds") for fit, f in ctx.fits.items()},
    }
