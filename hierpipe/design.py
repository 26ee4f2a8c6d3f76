"""From a parsed formula and a table to the numeric arrays every fit works on.

:func:`build_design` validates the table at the door (missing columns,
non-numeric or non-finite values, missing group labels, too few groups,
non-positive standard errors) and returns a frozen :class:`Design`: the
response, the known standard errors of a meta-analysis, the fixed-effects
matrix ``X`` with brms column names, and per varying term the integer group
codes, their labels and the matrix ``Z`` of varying coefficients.

Coding follows R's ``model.matrix``, so column names and values match what
lme4 and brms build:

* Numeric columns enter as they are. Columns of dtype object, string,
  category or bool are categorical; their levels are sorted as strings (a
  category dtype keeps its own order) and the first level is the reference.
* A categorical variable in a term is coded by treatment contrasts (one
  indicator per level except the reference) when the term without it is in
  the model (the intercept counts as the empty term), and by indicators of all
  levels otherwise; without an intercept the first categorical variable gets
  all levels. So ``y ~ x * g`` gives ``x, gB, gC, x:gB, x:gC`` and
  ``y ~ 0 + g`` gives ``gA, gB, gC``.
* In an interaction the first variable's columns vary fastest.
* Names follow brms: a level's column is the variable name and the level
  with brms's substitutions (spaces, brackets, quotes, commas and ``?``
  removed; ``+ - * / ^ =`` spelt ``P M MU D E EQ``), interactions joined by
  ``':'``.

Group labels are strings (whole numbers without a trailing ``.0``), coded
``0 .. G-1`` in sorted order; a nested factor's label joins its parts with
``':'`` as lme4 does (``"S01:C2"``), so classroom ``A`` of school ``S01`` and
classroom ``A`` of school ``S02`` are different groups.

Everything is vectorised over rows (``pd.factorize``, boolean masks, one QR
for the rank check); no Python loop runs over observations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api import types as pdt

from hierpipe.errors import InputError
from hierpipe.formula import Formula, RandomTerm, Term, parse_formula

__all__ = ["Design", "RandomDesign", "brms_name", "build_design"]

# brms:::rename's default table, applied to coefficient names.
_BRMS_SUBSTITUTIONS = (
    (" ", ""),
    ("(", ""),
    (")", ""),
    ("[", ""),
    ("]", ""),
    (",", ""),
    ('"', ""),
    ("'", ""),
    ("?", ""),
    ("+", "P"),
    ("-", "M"),
    ("*", "MU"),
    ("/", "D"),
    ("^", "E"),
    ("=", "EQ"),
)

# Relative size of a column's part orthogonal to the columns before it below
# which the column counts as a linear combination of them (see _check_rank).
_RANK_TOL = 1e-10


def brms_name(text: str) -> str:
    """Clean a coefficient name the way brms does (``"dose-1 mg"`` -> ``"doseM1mg"``)."""
    for old, new in _BRMS_SUBSTITUTIONS:
        text = text.replace(old, new)
    return text


@dataclass(frozen=True, eq=False)
class RandomDesign:
    """The data of one varying term.

    Attributes
    ----------
    name : str
        Grouping factor as lme4 names it: ``"school"`` or ``"school:classroom"``.
    group : tuple of str
        The factor's component columns.
    codes : ndarray of int64, shape (n,)
        Each row's group, ``0 .. G-1`` in the order of ``labels``.
    labels : tuple of str
        Group labels sorted as strings; nested ones joined by ``':'``.
    Z : ndarray of float64, shape (n, q)
        Row ``i`` multiplies group ``codes[i]``'s varying coefficients.
    z_names : tuple of str
        brms names of the coefficients (``"Intercept"``, ``"x"``, ``"gB"``).
    correlated : bool
        Whether the coefficients are correlated (``|``) or not (``||``).
    """

    name: str
    group: tuple[str, ...]
    codes: np.ndarray
    labels: tuple[str, ...]
    Z: np.ndarray
    z_names: tuple[str, ...]
    correlated: bool

    @property
    def n_groups(self) -> int:
        """Number of groups ``G``."""
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Design:
    """Numeric design of one formula on one table.

    Attributes
    ----------
    formula : Formula
        The parsed formula.
    y : ndarray of float64, shape (n,)
        The response.
    se : ndarray of float64, shape (n,), or None
        Known standard errors of a meta-analysis (the square root of the
        column for ``var(...)``); ``None`` otherwise.
    X : ndarray of float64, shape (n, p)
        Fixed-effects matrix, full column rank.
    fixed_names : tuple of str
        brms names of the columns of ``X`` (``"Intercept"``, ``"x"``, ``"gB"``,
        ``"x:gB"``); the summary prefixes them with ``b_``.
    ref_levels : dict of str to str
        Reference level of each categorical variable coded by contrasts.
    levels : dict of str to tuple of str
        Levels, in coding order, of each categorical predictor.
    random : tuple of RandomDesign
        One entry per varying term of ``formula.random``, in that order.
    source : str
        Name of the table (file) for messages.

    Notes
    -----
    The arrays are read-only: a design is shared by every fit of a study.
    """

    formula: Formula
    y: np.ndarray
    se: np.ndarray | None
    X: np.ndarray
    fixed_names: tuple[str, ...]
    ref_levels: dict[str, str]
    levels: dict[str, tuple[str, ...]]
    random: tuple[RandomDesign, ...]
    source: str

    @property
    def n_obs(self) -> int:
        """Number of observations ``n``."""
        return int(self.y.shape[0])


def build_design(formula: Formula | str, df: pd.DataFrame, *, source: str = "data") -> Design:
    """Validate ``df`` for ``formula`` and build its numeric design.

    Parameters
    ----------
    formula : Formula or str
        A parsed formula, or its text.
    df : pandas.DataFrame
        One row an observation.
    source : str
        The table's file name, used to start every error message.

    Returns
    -------
    Design

    Raises
    ------
    FormulaError
        When ``formula`` is text that does not parse.
    InputError
        When the table cannot serve the formula; the one-line message names
        ``source``, the column, and the first bad row (1-based, header not
        counted) or the group at fault.

    Examples
    --------
    >>> df = pd.DataFrame({"y": [1.0, 2.0, 3.0, 5.0], "g": ["a", "a", "b", "b"]})
    >>> d = build_design("y ~ 1 + (1 | g)", df)
    >>> d.fixed_names, d.random[0].labels, d.random[0].codes.tolist()
    (('Intercept',), ('a', 'b'), [0, 0, 1, 1])
    """
    form = parse_formula(formula) if isinstance(formula, str) else formula
    _check_columns(df, form.variables(), source)
    table = _Table(df, source)
    y = _numeric(df[form.response], form.response, source)
    se = _standard_errors(df, form, source)
    X, fixed_names, refs = _model_matrix(form.intercept, form.fixed, table)
    _check_rank(X, fixed_names, source)
    random = tuple(_random_design(rt, table) for rt in form.random)
    return Design(
        formula=form,
        y=_frozen(y),
        se=None if se is None else _frozen(se),
        X=_frozen(X),
        fixed_names=fixed_names,
        ref_levels=refs | table.random_refs,
        levels=table.levels(),
        random=random,
        source=source,
    )


# --------------------------------------------------------------------------- validation


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _check_columns(df: pd.DataFrame, names: tuple[str, ...], source: str) -> None:
    """Every referenced column exists once, and there is at least one row."""
    for name in names:
        count = int((df.columns == name).sum())
        if count == 0:
            listed = ", ".join(map(str, df.columns))
            raise InputError(f"{source}: column '{name}' not found (columns: {listed})")
        if count > 1:
            raise InputError(f"{source}: column '{name}' appears {count} times")
    if len(df) == 0:
        raise InputError(f"{source}: no rows")


def _is_text_like(dtype: object) -> bool:
    """Object, string, category or bool: the dtypes read as categorical."""
    return (
        pdt.is_bool_dtype(dtype)
        or pdt.is_object_dtype(dtype)
        or pdt.is_string_dtype(dtype)
        or isinstance(dtype, pd.CategoricalDtype)
    )


def _numeric(series: pd.Series, col: str, source: str) -> np.ndarray:
    """A column that must hold finite numbers, as float64."""
    dtype = series.dtype
    if pdt.is_bool_dtype(dtype):
        raise InputError(f"{source}: column '{col}' holds true/false values; expected numbers")
    raw: pd.Series | None = None
    if pdt.is_numeric_dtype(dtype) and not pdt.is_complex_dtype(dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    elif _is_text_like(dtype):
        # Numbers stored as text (e.g. a parquet string column) are accepted;
        # the raw values are kept to quote the first one that is not a number.
        raw = series.astype(object)
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        raise InputError(f"{source}: column '{col}' has type {dtype}; expected numbers")
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{source}: column '{col}' row {i + 1}: {_why_bad(values[i], raw, i)}")
    return values


def _why_bad(value: float, raw: pd.Series | None, i: int) -> str:
    """Why row ``i``'s value is not a finite number, quoting it as written."""
    if raw is None:
        return "missing value" if np.isnan(value) else f"{value} is not finite"
    written = raw.iloc[i]
    if _is_missing_scalar(written):
        return "missing value"
    return f"'{written}' is not {'a number' if np.isnan(value) else 'finite'}"


def _is_missing_scalar(value: object) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return bool(np.ndim(value) == 0 and pd.isna(value))


def _standard_errors(df: pd.DataFrame, form: Formula, source: str) -> np.ndarray | None:
    """Known standard errors from ``se(col)`` or ``var(col)``; positive and finite."""
    col = form.se_column
    if col is None:
        return None
    values = _numeric(df[col], col, source)
    bad = values <= 0
    if bad.any():
        i = int(np.argmax(bad))
        what = "standard error" if form.se_kind == "se" else "variance"
        raise InputError(
            f"{source}: column '{col}' row {i + 1}: {what} must be positive, got {values[i]:g}"
        )
    return values if form.se_kind == "se" else np.sqrt(values)


# --------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class _Factor:
    """A categorical column: codes ``0 .. K-1`` into ``levels``."""

    codes: np.ndarray
    levels: tuple[str, ...]


def _as_strings(series: pd.Series) -> np.ndarray:
    """Non-missing values as ``str`` (object array); whole floats without ``.0``."""
    dtype = series.dtype
    if pdt.is_float_dtype(dtype):
        v = series.to_numpy(dtype=np.float64)
        out = v.astype(str).astype(object)
        # 2**53: beyond it floats are not exact integers, and int64 could overflow.
        whole = np.isfinite(v) & (np.abs(v) < 2.0**53) & (v == np.trunc(v))
        out[whole] = v[whole].astype(np.int64).astype(str)
        return out
    return series.astype(str).to_numpy(dtype=object)


def _raw_codes(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Row codes (``-1`` where missing) into the distinct values written as ``str``.

    Only the distinct values are converted to text, so the cost over rows is
    one hash pass.
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        codes = series.cat.codes.to_numpy(dtype=np.int64)
        return codes, _as_strings(pd.Series(series.cat.categories))
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    return codes.astype(np.int64), _as_strings(pd.Series(uniques))


def _check_no_missing(
    codes: np.ndarray, texts: np.ndarray, col: str, source: str, what: str
) -> None:
    """Fail at the first row whose label is missing or blank."""
    blank = np.array([not t.strip() for t in texts], dtype=bool)
    bad = codes < 0
    if blank.any():
        bad |= blank[np.maximum(codes, 0)] & (codes >= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{source}: column '{col}' row {i + 1}: missing {what}")


def _factor(
    codes: np.ndarray, texts: np.ndarray, order_of: dict[str, int] | None = None
) -> _Factor:
    """Factor of rows coded into ``texts``: unused entries dropped, equal texts merged.

    Levels are sorted as strings, or by ``order_of`` (a category dtype's order).
    """
    # Equal texts from different values (1 and "1" in an object column) are one level.
    merged, levels = pd.factorize(texts)
    levels = np.asarray(levels, dtype=object)
    # Work on the distinct texts, then map the rows once: one pass over the
    # rows for the counts and one gather, however the texts were merged.
    present = np.bincount(codes, minlength=len(texts)) > 0
    used = np.zeros(len(levels), dtype=bool)
    used[merged[present]] = True
    keys = levels if order_of is None else np.array([order_of[t] for t in levels])
    order = np.argsort(keys, kind="stable")
    order = order[used[order]].astype(np.int64)
    rank = np.full(len(levels), -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    return _Factor(rank[merged][codes], tuple(str(t) for t in levels[order]))


def _labelled(series: pd.Series, col: str, source: str, what: str) -> _Factor:
    """A column's factor with levels sorted as strings; missing labels fail."""
    codes, texts = _raw_codes(series)
    _check_no_missing(codes, texts, col, source, what)
    return _factor(codes, texts)


def _categorical(series: pd.Series, col: str, source: str) -> _Factor:
    """A categorical predictor; a category dtype keeps its level order."""
    codes, texts = _raw_codes(series)
    _check_no_missing(codes, texts, col, source, "value")
    order_of = None
    if isinstance(series.dtype, pd.CategoricalDtype):
        order_of = {t: k for k, t in reversed(list(enumerate(texts)))}
    factor = _factor(codes, texts, order_of)
    if len(factor.levels) < 2:
        raise InputError(
            f"{source}: column '{col}' has one value ('{factor.levels[0]}'); "
            "a categorical predictor needs at least two"
        )
    return factor


def _group_factor(df: pd.DataFrame, group: tuple[str, ...], source: str) -> _Factor:
    """Codes and sorted labels of a (possibly nested) grouping factor.

    Components are combined as integer codes (``c1 * K2 + c2``, below ``n**2``)
    and only the distinct combinations are joined into ``"a:b"`` labels.
    """
    factor = _labelled(df[group[0]], group[0], source, "group label")
    for col in group[1:]:
        part = _labelled(df[col], col, source, "group label")
        k = len(part.levels)
        combined, pairs = pd.factorize(factor.codes * k + part.codes)
        outer = np.asarray(factor.levels, dtype=object)[pairs // k]
        inner = np.asarray(part.levels, dtype=object)[pairs % k]
        texts = outer + ":" + inner
        if len(set(texts)) != len(texts):
            raise InputError(
                f"{source}: labels of grouping factor '{':'.join(group)}' contain ':', "
                "so two different groups get the same label"
            )
        factor = _factor(combined.astype(np.int64), texts)
    return factor


class _Table:
    """Lazily encoded columns of one table, each encoded once."""

    def __init__(self, df: pd.DataFrame, source: str) -> None:
        self.df = df
        self.source = source
        self._predictors: dict[str, np.ndarray | _Factor] = {}
        self.random_refs: dict[str, str] = {}

    @property
    def n(self) -> int:
        return len(self.df)

    def predictor(self, col: str) -> np.ndarray | _Factor:
        """A numeric column as float64, or a categorical one as a :class:`_Factor`."""
        if col not in self._predictors:
            series = self.df[col]
            if _is_text_like(series.dtype):
                self._predictors[col] = _categorical(series, col, self.source)
            else:
                self._predictors[col] = _numeric(series, col, self.source)
        return self._predictors[col]

    def is_factor(self, col: str) -> bool:
        return isinstance(self.predictor(col), _Factor)

    def levels(self) -> dict[str, tuple[str, ...]]:
        return {k: v.levels for k, v in self._predictors.items() if isinstance(v, _Factor)}


# --------------------------------------------------------------------------- matrices


def _full_codings(intercept: bool, terms: tuple[Term, ...], table: _Table) -> list[list[bool]]:
    """R's rule: for each variable of each term, whether a categorical gets all levels.

    A categorical variable ``v`` in term ``T`` is coded by contrasts when
    ``T`` without ``v`` is empty or contained in an earlier term, by
    indicators of all levels otherwise (``stats:::TermCode`` in R). Without an
    intercept the first categorical variable takes all levels instead.
    """
    full: list[list[bool]] = []
    for j, term in enumerate(terms):
        row = []
        for v in term:
            rest = set(term) - {v}
            margin = not rest or any(rest <= set(t) for t in terms[:j])
            row.append(table.is_factor(v) and not margin)
        full.append(row)
    if not intercept:
        first = next(
            ((j, k) for j, t in enumerate(terms) for k, v in enumerate(t) if table.is_factor(v)),
            None,
        )
        if first is not None:
            full[first[0]][first[1]] = True
    return full


def _term_columns(
    term: Term, full: list[bool], table: _Table, refs: dict[str, str]
) -> tuple[list[np.ndarray], list[str]]:
    """Columns and brms names of one term; the first variable varies fastest."""
    cols: list[np.ndarray] = [np.ones(table.n)]
    names: list[list[str]] = [[]]
    for v, all_levels in zip(term, full, strict=True):
        enc = table.predictor(v)
        if isinstance(enc, _Factor):
            start = 0 if all_levels else 1
            if not all_levels:
                refs[v] = enc.levels[0]
            pieces = [
                ((enc.codes == k).astype(np.float64), brms_name(v + enc.levels[k]))
                for k in range(start, len(enc.levels))
            ]
        else:
            pieces = [(enc, brms_name(v))]
        cols = [c * p for p, _ in pieces for c in cols]
        names = [[*nm, pn] for _, pn in pieces for nm in names]
    return cols, [":".join(nm) for nm in names]


def _model_matrix(
    intercept: bool, terms: tuple[Term, ...], table: _Table
) -> tuple[np.ndarray, tuple[str, ...], dict[str, str]]:
    """The model matrix of ``intercept + terms``, its column names and reference levels."""
    cols: list[np.ndarray] = [np.ones(table.n)] if intercept else []
    names: list[str] = ["Intercept"] if intercept else []
    refs: dict[str, str] = {}
    for term, full in zip(terms, _full_codings(intercept, terms, table), strict=True):
        c, nm = _term_columns(term, full, table, refs)
        cols += c
        names += nm
    _check_unique_names(names, table.source)
    if len(cols) == 1:  # e.g. the intercept alone: a view, not a copy of N rows
        matrix = cols[0].reshape(table.n, 1)
    else:
        matrix = np.column_stack(cols) if cols else np.empty((table.n, 0))
    return np.ascontiguousarray(matrix, dtype=np.float64), tuple(names), refs


def _check_unique_names(names: list[str], source: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(
                f"{source}: two design columns are both named '{name}' "
                "(levels that differ only in characters brms drops, or a column named so)"
            )
        seen.add(name)


def _check_rank(X: np.ndarray, names: tuple[str, ...], source: str) -> None:
    """Fail when a fixed-effect column is (numerically) a combination of earlier ones.

    ``|R_jj|`` of the QR decomposition is the size of column ``j``'s part
    orthogonal to the columns before it; relative to the column's norm it
    is scale-free.
    """
    n, p = X.shape
    if p == 0:
        return
    if p > n:
        raise InputError(f"{source}: {p} fixed-effect columns but only {n} rows")
    norms = np.linalg.norm(X, axis=0)
    if p == 1:
        # One column: |R_11| is its norm, so only a zero column fails; skipping
        # the QR saves a pass (15 ms at 10^6 rows) on every intercept-only model.
        bad = norms == 0
    else:
        r = np.linalg.qr(X, mode="r")
        bad = np.abs(np.diag(r)) <= _RANK_TOL * norms
    if bad.any():
        j = int(np.argmax(bad))
        if norms[j] == 0:
            raise InputError(f"{source}: fixed-effect column '{names[j]}' is zero in every row")
        raise InputError(
            f"{source}: fixed-effect column '{names[j]}' is a linear combination of "
            f"{', '.join(names[:j])}; its effect cannot be estimated"
        )


def _random_design(rt: RandomTerm, table: _Table) -> RandomDesign:
    """Group codes, labels and ``Z`` of one varying term."""
    factor = _group_factor(table.df, rt.group, table.source)
    if len(factor.levels) < 2:
        raise InputError(
            f"{table.source}: grouping factor '{rt.name}' has one group "
            f"('{factor.levels[0]}'); a varying effect needs at least two"
        )
    Z, z_names, refs = _model_matrix(rt.intercept, rt.terms, table)
    table.random_refs.update(refs)
    return RandomDesign(
        name=rt.name,
        group=rt.group,
        codes=_frozen(factor.codes),
        labels=factor.levels,
        Z=_frozen(Z),
        z_names=z_names,
        correlated=rt.correlated,
    )
