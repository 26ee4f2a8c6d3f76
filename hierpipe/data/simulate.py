"""Simulated designs: data whose truth is known, for recovery and calibration.

Each design returns a :class:`Simulated` pair: the canonical long table and the
true parameter values under brms names, so the recovery table can compare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.errors import ConfigError


@dataclass(frozen=True)
class Simulated:
    """A simulated data set and its true parameters (``parameter``, ``value``)."""

    data: pd.DataFrame
    truth: pd.DataFrame


def group_labels(prefix: str, count: int) -> list[str]:
    """Zero-padded labels ``S01 … S30`` so lexical order is numeric order."""
    width = max(2, len(str(count)))
    return [f"{prefix}{i + 1:0{width}d}" for i in range(count)]


def group_sizes(size: Any, groups: int, rng: np.random.Generator) -> np.ndarray:
    """Group sizes: an int for balanced designs, ``[lo, hi]`` for uniform sizes."""
    if isinstance(size, int | np.integer):
        if size < 1:
            raise ConfigError(f"design parameter 'size' must be at least 1, got {size}")
        return np.full(groups, int(size))
    if isinstance(size, list | tuple) and len(size) == 2:
        lo, hi = int(size[0]), int(size[1])
        if not 1 <= lo <= hi:
            raise ConfigError(
                f"design parameter 'size' range must satisfy 1 <= lo <= hi, got {size}"
            )
        return rng.integers(lo, hi + 1, size=groups)
    raise ConfigError(f"design parameter 'size' must be an int or [lo, hi], got {size!r}")


def two_level(
    rng: np.random.Generator,
    *,
    groups: int = 30,
    size: Any = 50,
    mu: float = 70.0,
    tau: float = 5.0,
    sigma: float = 10.0,
    group: str = "school",
    outcome: str = "score",
    prefix: str = "S",
) -> Simulated:
    r"""Varying-intercept data.

    .. math::
        \theta_j \sim N(\mu, \tau^2), \qquad y_{ij} \sim N(\theta_j, \sigma^2).

    The true group means :math:`\theta_j` are returned as ``coef_{group}[label,Intercept]``.
    """
    if groups < 2:
        raise ConfigError(f"design parameter 'groups' must be at least 2, got {groups}")
    if tau < 0 or sigma <= 0:
        raise ConfigError("design parameters need tau >= 0 and sigma > 0")
    labels = group_labels(prefix, groups)
    sizes = group_sizes(size, groups, rng)
    theta = mu + tau * rng.standard_normal(groups)
    codes = np.repeat(np.arange(groups), sizes)
    y = theta[codes] + sigma * rng.standard_normal(codes.size)
    data = pd.DataFrame(
        {group: pd.Series(np.asarray(labels, dtype=object)[codes], dtype="string"), outcome: y}
    )
    rows = [
        ("b_Intercept", mu),
        (f"sd_{group}__Intercept", tau),
        ("sigma", sigma),
        (f"icc_{group}", tau**2 / (tau**2 + sigma**2)),
    ]
    rows += [(f"r_{group}[{lab},Intercept]", t - mu) for lab, t in zip(labels, theta, strict=True)]
    rows += [(f"coef_{group}[{lab},Intercept]", t) for lab, t in zip(labels, theta, strict=True)]
    truth = pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": "float64"})
    return Simulated(data=data, truth=truth)


DESIGNS = {"two_level": two_level}


def simulate(design: str, rng: np.random.Generator, **params: Any) -> Simulated:
    """Run the named design with ``params`` (unknown names are a ConfigError)."""
    try:
        fn = DESIGNS[design]
    except KeyError:
        known = ", ".join(sorted(DESIGNS))
        raise ConfigError(f"unknown design '{design}' (known: {known})") from None
    try:
        return fn(rng, **params)
    except TypeError as exc:
        raise ConfigError(f"design '{design}': {exc}") from None
