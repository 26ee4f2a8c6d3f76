r"""Effect sizes computed at ingest, as metafor's ``escalc`` computes them.

A study's config may ask for its effect sizes to be computed from the columns
of the file rather than read from it (``data.effect_size``), so that published
tables can be shipped as they were printed (e.g. the 2x2 counts of the BCG
trials). The new columns are added to the table before the formula's columns
are looked up, so the formula names them: ``yi | var(vi) ~ 1 + (1 | study)``.

Measures
--------
``log_risk_ratio`` (metafor ``measure = "RR"``). From a 2x2 table per study,
:math:`a_i` events and :math:`b_i` non-events in the treated arm and :math:`c_i`,
:math:`d_i` in the control arm (or :math:`a_i, n_{1i}, c_i, n_{2i}` with the arm
sizes),

.. math::

    y_i = \log\frac{a_i / n_{1i}}{c_i / n_{2i}}, \qquad
    v_i = \frac1{a_i} - \frac1{n_{1i}} + \frac1{c_i} - \frac1{n_{2i}}

(delta method; Rothman, Greenland & Lash 2008). Zero cells: as ``escalc``'s
defaults ``add = 1/2, to = "only0"``, 1/2 is added to every cell of a table
that has a zero cell (``to = "all"``: to every table; ``"if0all"``: to every
table if any has a zero cell; ``"none"``: never, and a zero event count is
then an error). A table with no events in either arm still gets an estimate,
as ``escalc`` with its default ``drop00 = FALSE``.

References
----------
Viechtbauer, W. (2010). Conducting meta-analyses in R with the metafor package.
*J. Stat. Softw.* 36(3), section 3.1.
Rothman, K. J., Greenland, S. & Lash, T. L. (2008). *Modern Epidemiology* (3rd
ed.), chapter 14.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hierpipe.errors import ConfigError, InputError

__all__ = ["MEASURES", "add_effect_sizes", "log_risk_ratio_table"]

MEASURES: tuple[str, ...] = ("log_risk_ratio",)
TO_CHOICES: tuple[str, ...] = ("only0", "all", "if0all", "none")
_KEYS = {"measure", "ai", "bi", "ci", "di", "n1i", "n2i", "yi", "vi", "add", "to"}


def _counts(df: pd.DataFrame, col: str, source: str) -> np.ndarray:
    """A column of non-negative, finite counts (not necessarily integers, as escalc)."""
    if col not in df.columns:
        listed = ", ".join(map(str, df.columns))
        raise InputError(f"{source}: column '{col}' not found (columns: {listed})")
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(values) & (values >= 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{source}: column '{col}' row {i + 1}: '{df[col].iloc[i]}' is not a count >= 0"
        )
    return values


def log_risk_ratio_table(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    d: np.ndarray,
    *,
    add: float = 0.5,
    to: str = "only0",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log risk ratios and variances of 2x2 tables with escalc's zero-cell rule.

    Returns ``(yi, vi, corrected)``, ``corrected`` flagging the tables that got
    ``add``; ``yi`` is NaN where a table still has no events in an arm
    (``to = "none"``), for the caller to report.
    """
    cells = np.stack([a, b, c, d])
    zero = np.any(cells == 0, axis=0)
    if to == "only0":
        corrected = zero
    elif to == "all":
        corrected = np.ones_like(zero)
    elif to == "if0all":
        corrected = np.full_like(zero, bool(zero.any()))
    else:
        corrected = np.zeros_like(zero)
    cells = cells + np.where(corrected, float(add), 0.0)
    a, b, c, d = cells
    n1, n2 = a + b, c + d
    with np.errstate(divide="ignore", invalid="ignore"):
        yi = np.log(a / n1) - np.log(c / n2)
        vi = 1.0 / a - 1.0 / n1 + 1.0 / c - 1.0 / n2
    undefined = (a == 0) | (c == 0)
    yi[undefined] = np.nan
    vi[undefined] = np.nan
    return yi, vi, corrected


def _check_spec(spec: dict[str, Any]) -> None:
    unknown = set(spec) - _KEYS
    if unknown:
        raise ConfigError(
            f"effect_size: unknown key '{sorted(unknown)[0]}' (keys: {', '.join(sorted(_KEYS))})"
        )
    measure = spec.get("measure")
    if measure not in MEASURES:
        raise ConfigError(
            f"effect_size: measure '{measure}' is not available (choose {', '.join(MEASURES)})"
        )
    if spec.get("to", "only0") not in TO_CHOICES:
        raise ConfigError(f"effect_size: 'to' must be one of {', '.join(TO_CHOICES)}")
    add = spec.get("add", 0.5)
    if not (isinstance(add, int | float) and np.isfinite(add) and add >= 0):
        raise ConfigError(f"effect_size: 'add' must be a number >= 0, got {add!r}")
    for arm, (other, size) in {"ai": ("bi", "n1i"), "ci": ("di", "n2i")}.items():
        if arm not in spec:
            raise ConfigError(f"effect_size: {measure} needs '{arm}' (the events column)")
        if (other in spec) == (size in spec):
            raise ConfigError(f"effect_size: give exactly one of '{other}' and '{size}'")


def add_effect_sizes(df: pd.DataFrame, spec: dict[str, Any], *, source: str) -> pd.DataFrame:
    """``df`` with the effect-size columns of ``spec`` added (``yi`` and ``vi`` by default).

    Parameters
    ----------
    df : the user's table, with the file's own column names.
    spec : the study's ``data.effect_size`` mapping: ``measure``; the count
        columns ``ai``, ``ci`` and ``bi``, ``di`` (non-events) or ``n1i``, ``n2i``
        (arm sizes); optional ``yi``, ``vi`` (names of the new columns), ``add``
        and ``to`` (zero-cell correction, see the module docstring).
    source : the file's name, for error messages.

    Raises
    ------
    ConfigError
        A spec that names no measure, an unknown key or an incomplete table.
    InputError
        A missing column, a count that is missing, negative or not a number, an
        arm size below its events, a table whose log risk ratio is undefined, or
        a new column's name already in the file. One line naming file, column, row.
    """
    _check_spec(spec)
    yi_name, vi_name = str(spec.get("yi", "yi")), str(spec.get("vi", "vi"))
    for name in (yi_name, vi_name):
        if name in df.columns:
            raise InputError(
                f"{source}: column '{name}' exists already; effect_size would overwrite it "
                "(name the new column with effect_size.yi / effect_size.vi)"
            )
    a = _counts(df, spec["ai"], source)
    c = _counts(df, spec["ci"], source)
    arms = []
    for events, key_other, key_size in ((a, "bi", "n1i"), (c, "di", "n2i")):
        if key_other in spec:
            arms.append(_counts(df, spec[key_other], source))
            continue
        size = _counts(df, spec[key_size], source)
        short = size < events
        if short.any():
            i = int(np.argmax(short))
            raise InputError(
                f"{source}: column '{spec[key_size]}' row {i + 1}: arm size {size[i]:g} is "
                f"below its {events[i]:g} events"
            )
        arms.append(size - events)
    b, d = arms
    yi, vi, _ = log_risk_ratio_table(
        a, b, c, d, add=float(spec.get("add", 0.5)), to=str(spec.get("to", "only0"))
    )
    bad = ~(np.isfinite(yi) & np.isfinite(vi) & (vi > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{source}: row {i + 1}: the log risk ratio or its variance is undefined (a zero "
            f"cell in the table of columns '{spec['ai']}', '{spec['ci']}'); allow the "
            "zero-cell correction (effect_size.to: only0)"
        )
    out = df.copy()
    out[yi_name] = yi
    out[vi_name] = vi
    return out
