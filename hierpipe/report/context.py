"""Everything a report section may read about one study, loaded once."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from hierpipe.formula import Formula, parse_formula
from hierpipe.io import read_json
from hierpipe.models.structure import Structure, classify


@dataclass
class FitFiles:
    """One fit's outputs: summary, fit.json facts and its diagnostics when present."""

    name: str
    summary: pd.DataFrame
    info: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)
    shrinkage: pd.DataFrame | None = None
    convergence: pd.DataFrame | None = None
    draws_path: Path | None = None

    @cached_property
    def estimates(self) -> pd.DataFrame:
        # Indexed once: sections look it up per fit and at 10^5 groups the
        # summary has 2 x 10^5 rows.
        return self.summary.set_index("parameter")


@dataclass
class StudyContext:
    """A study's config and result files, as the report sections see them."""

    study: str
    study_dir: Path
    config: dict[str, Any]
    seed: int
    formula: Formula
    structure: Structure
    data: pd.DataFrame
    fits: dict[str, FitFiles]
    truth: pd.DataFrame | None

    @property
    def group(self) -> str:
        return self.structure.group

    @property
    def response(self) -> str:
        return self.structure.response


def _read_parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def load_fit(study_dir: Path, fit: str) -> FitFiles:
    fdir = study_dir / "fits" / fit
    ddir = study_dir / "diagnostics" / fit
    draws = fdir / "draws.parquet"
    return FitFiles(
        name=fit,
        summary=pd.read_parquet(fdir / "summary.parquet"),
        info=read_json(fdir / "fit.json"),
        checks=read_json(ddir / "checks.json") if (ddir / "checks.json").exists() else {},
        shrinkage=_read_parquet(ddir / "shrinkage.parquet"),
        convergence=_read_parquet(ddir / "convergence.parquet"),
        draws_path=draws if draws.exists() else None,
    )


def load_context(study_dir: Path, study: str, config: dict[str, Any], seed: int) -> StudyContext:
    """Read a study's files; missing optional ones (truth, diagnostics) are None."""
    formula = parse_formula(config["formula"])
    return StudyContext(
        study=study,
        study_dir=study_dir,
        config=config,
        seed=seed,
        formula=formula,
        structure=classify(formula),
        data=pd.read_parquet(study_dir / "data.parquet"),
        fits={f: load_fit(study_dir, f) for f in config["fits"]},
        truth=_read_parquet(study_dir / "truth.parquet"),
    )
