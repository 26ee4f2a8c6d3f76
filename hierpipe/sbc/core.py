"""SBC cases, their registry, and ranks from replications.

A case is one model with a *proper* prior (SBC needs draws from it) and one
sampler configuration. Cases are registered by name; the workflow, the CLI and
the tests find them through :func:`cases` and :func:`get_case`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hierpipe.errors import ConfigError
from hierpipe.sbc import CASE_MODULES

__all__ = [
    "RANK_COLUMNS",
    "SBC_DEFAULTS",
    "Replicates",
    "SBCCase",
    "SBCSettings",
    "cases",
    "chunk_bounds",
    "get_case",
    "ranks_of",
    "register",
    "run_case",
]

RANK_COLUMNS = ["case", "replication", "parameter", "rank", "draws", "thin", "warmup"]

# The full run of ``snakemake sbc`` (config ``sbc:`` overrides each key; the
# schema states the same defaults). 1000 replications give a chi-square test on
# 20 bins 50 expected ranks a bin; L = 99 draws make 100 possible ranks.
SBC_DEFAULTS: dict[str, object] = {
    "cases": None,  # None: every registered case
    "replications": 1000,
    "chunks": 4,
    "draws": 99,
    "thin": 3,
    "warmup": 500,
    "bins": 20,
}


@dataclass(frozen=True)
class SBCSettings:
    """Sampler effort of one SBC run.

    Attributes
    ----------
    draws : posterior draws kept per replication, :math:`L`; ranks lie in
        ``0..L``. ``L + 1`` should be divisible by the number of histogram bins.
    thin : keep every ``thin``-th iteration after warm-up, so that the kept draws
        are close to independent (autocorrelated draws make ranks non-uniform
        even for a correct sampler; Talts et al. 2018, sec. 5).
    warmup : iterations discarded before the first kept draw.
    """

    draws: int = 99
    thin: int = 3
    warmup: int = 500

    def __post_init__(self) -> None:
        for name, low in (("draws", 1), ("thin", 1), ("warmup", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
                raise ConfigError(f"sbc setting '{name}' must be an integer >= {low}, got {v!r}")


@dataclass(frozen=True)
class Replicates:
    """True values and posterior draws of ``R`` replications.

    Attributes
    ----------
    truth : parameter name -> shape ``(R,)``, the prior draw behind each data set.
    draws : parameter name -> shape ``(R, L)``, the sampler's draws given it.
    """

    truth: Mapping[str, np.ndarray]
    draws: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class SBCCase:
    """One model, prior and sampler configuration to calibrate.

    Attributes
    ----------
    name : unique name (``[a-z0-9_]+``), used in file names and the report.
    structure : the engine's structure kind (``"one_way"``, ``"meta"``, ...).
    description : one line: model, priors, group sizes, sampler scheme.
    parameters : brms names of the ranked parameters, in report order.
    replicate : ``replicate(rng, R, settings) -> Replicates``: ``R`` prior
        draws, a data set from each, and ``settings.draws`` posterior draws per
        data set, a pure function of ``rng``'s state.
    """

    name: str
    structure: str
    description: str
    parameters: tuple[str, ...]
    replicate: Callable[[np.random.Generator, int, SBCSettings], Replicates]


_REGISTRY: dict[str, SBCCase] = {}


def register(case: SBCCase) -> SBCCase:
    """Add ``case`` to the registry (a module calls this at import)."""
    if not case.name or not case.name.replace("_", "").isalnum() or case.name != case.name.lower():
        raise ValueError(f"SBC case name must be lower-case letters, digits and _: {case.name!r}")
    known = _REGISTRY.get(case.name)
    if known is not None and known is not case:
        raise ValueError(f"SBC case {case.name!r} is registered twice")
    _REGISTRY[case.name] = case
    return case


def cases() -> dict[str, SBCCase]:
    """Every registered case, by name (imports :data:`~hierpipe.sbc.CASE_MODULES`)."""
    for module in CASE_MODULES:
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def get_case(name: str) -> SBCCase:
    """The case called ``name``; a :class:`ConfigError` listing the known ones otherwise."""
    known = cases()
    try:
        return known[name]
    except KeyError:
        raise ConfigError(f"unknown SBC case '{name}' (known: {', '.join(known)})") from None


def ranks_of(truth: np.ndarray, draws: np.ndarray) -> np.ndarray:
    r"""Rank :math:`\#\{l : \theta_l < \tilde\theta\}` of each true value among its draws.

    ``truth`` has shape ``(R,)`` and ``draws`` ``(R, L)``; ties have probability
    zero for continuous parameters, so strict ``<`` is the rank of Talts et al.
    """
    truth = np.asarray(truth, dtype=np.float64)
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim != 2 or truth.shape != draws.shape[:1]:
        raise ValueError(f"ranks_of: truth {truth.shape} and draws {draws.shape} do not match")
    if not (np.isfinite(truth).all() and np.isfinite(draws).all()):
        # A sampler that returns NaN or inf is broken; a rank would hide it.
        raise RuntimeError("ranks_of: non-finite true values or draws")
    return (draws < truth[:, None]).sum(axis=1).astype(np.int64)


def run_case(
    case: SBCCase,
    replications: int,
    settings: SBCSettings,
    rng: np.random.Generator,
    *,
    first: int = 0,
) -> pd.DataFrame:
    """Ranks of ``replications`` replications of ``case``: one row a replication and parameter.

    Columns :data:`RANK_COLUMNS`; ``replication`` counts from ``first`` (so
    chunks of one run can be joined).
    """
    if replications < 1:
        raise ConfigError(f"sbc: replications must be >= 1, got {replications}")
    rep = case.replicate(rng, replications, settings)
    frames = []
    for name in case.parameters:
        draws = np.asarray(rep.draws[name])
        if draws.shape != (replications, settings.draws):
            raise ValueError(
                f"SBC case {case.name!r}: draws of {name} have shape {draws.shape}, "
                f"expected {(replications, settings.draws)}"
            )
        frames.append(
            pd.DataFrame(
                {
                    "replication": np.arange(first, first + replications, dtype=np.int64),
                    "parameter": name,
                    "rank": ranks_of(rep.truth[name], draws),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "case", case.name)
    out["draws"] = np.int64(settings.draws)
    out["thin"] = np.int64(settings.thin)
    out["warmup"] = np.int64(settings.warmup)
    return out.astype({"case": str, "parameter": str})[RANK_COLUMNS]


def chunk_bounds(replications: int, chunk: int, chunks: int) -> tuple[int, int]:
    """First replication and count of chunk ``chunk`` of ``chunks`` (sizes differ by at most 1)."""
    if not 0 <= chunk < chunks:
        raise ConfigError(f"sbc: chunk must lie in 0..{chunks - 1}, got {chunk}")
    base, extra = divmod(replications, chunks)
    start = chunk * base + min(chunk, extra)
    return start, base + (1 if chunk < extra else 0)
