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


def slopes(
    rng: np.random.Generator,
    *,
    groups: int = 40,
    size: Any = 15,
    b_intercept: float = 50.0,
    b_slope: float = 4.0,
    sd_intercept: float = 5.0,
    sd_slope: float = 2.0,
    cor: float = -0.4,
    sigma: float = 8.0,
    x_mean: float = 0.0,
    x_sd: float = 1.0,
    group: str = "school",
    outcome: str = "score",
    predictor: str = "ses",
    prefix: str = "S",
) -> Simulated:
    r"""Correlated varying intercepts and slopes on one predictor.

    .. math::
        (a_j, s_j)^\top \sim N_2\!\left(0, \begin{pmatrix} \tau_0^2 & \rho\tau_0\tau_1 \\
        \rho\tau_0\tau_1 & \tau_1^2\end{pmatrix}\right),\quad
        x_{ij} \sim N(x_\text{mean}, x_\text{sd}^2),\quad
        y_{ij} \sim N\big(\beta_0 + a_j + (\beta_1 + s_j)\,x_{ij},\ \sigma^2\big),

    fitted by ``outcome ~ 1 + predictor + (1 + predictor | group)``. ``size``
    is an int (balanced) or ``[lo, hi]`` (sizes uniform on lo..hi). The truth
    holds ``b_Intercept``, ``b_<predictor>``, both ``sd_`` and the ``cor_``,
    ``sigma`` and each group's ``r_`` and ``coef_`` for both coefficients.
    """
    if groups < 2:
        raise ConfigError(f"design parameter 'groups' must be at least 2, got {groups}")
    if sd_intercept < 0 or sd_slope < 0 or sigma <= 0 or x_sd <= 0:
        raise ConfigError("design parameters need sd_intercept, sd_slope >= 0 and sigma, x_sd > 0")
    if not -1.0 <= cor <= 1.0:
        raise ConfigError(f"design parameter 'cor' must lie in [-1, 1], got {cor}")
    if predictor in (group, outcome) or group == outcome:
        raise ConfigError("design parameters group, outcome and predictor must be three names")
    labels = group_labels(prefix, groups)
    sizes = group_sizes(size, groups, rng)
    # b = L e with L L' = Sigma written out, so cor = +-1 and zero SDs need no special case.
    e = rng.standard_normal((groups, 2))
    dev_a = sd_intercept * e[:, 0]
    dev_s = sd_slope * (cor * e[:, 0] + np.sqrt(1.0 - cor**2) * e[:, 1])
    codes = np.repeat(np.arange(groups), sizes)
    x = x_mean + x_sd * rng.standard_normal(codes.size)
    mean = b_intercept + dev_a[codes] + (b_slope + dev_s[codes]) * x
    y = mean + sigma * rng.standard_normal(codes.size)
    data = pd.DataFrame(
        {
            group: pd.Series(np.asarray(labels, dtype=object)[codes], dtype="string"),
            predictor: x,
            outcome: y,
        }
    )
    g, c = group, predictor
    rows = [
        ("b_Intercept", b_intercept),
        (f"b_{c}", b_slope),
        (f"sd_{g}__Intercept", sd_intercept),
        (f"sd_{g}__{c}", sd_slope),
        (f"cor_{g}__Intercept__{c}", cor),
        ("sigma", sigma),
    ]
    for lab, a, s in zip(labels, dev_a, dev_s, strict=True):
        rows += [(f"r_{g}[{lab},Intercept]", a), (f"r_{g}[{lab},{c}]", s)]
    for lab, a, s in zip(labels, dev_a, dev_s, strict=True):
        rows += [
            (f"coef_{g}[{lab},Intercept]", b_intercept + a),
            (f"coef_{g}[{lab},{c}]", b_slope + s),
        ]
    truth = pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": "float64"})
    return Simulated(data=data, truth=truth)


def three_level(
    rng: np.random.Generator,
    *,
    schools: int = 20,
    classrooms: Any = 4,
    students: Any = 10,
    mu: float = 70.0,
    sd_school: float = 5.0,
    sd_classroom: float = 3.0,
    sigma: float = 10.0,
    group: str = "school",
    subgroup: str = "classroom",
    outcome: str = "score",
    prefix: str = "S",
    subprefix: str = "C",
    b_slope: float = 0.0,
    sd_slope: float = 0.0,
    cor: float = 0.0,
    predictor: str = "ses",
) -> Simulated:
    r"""Students in classrooms in schools, fitted by ``score ~ 1 + (1 | school/classroom)``.

    With ``b_slope`` or ``sd_slope`` non-zero a student-level predictor
    :math:`x \sim N(0, 1)` (column ``predictor``) enters with a school-varying slope,
    :math:`y_{ski} = \mu + a_s + c_{sk} + (\beta_x + s_s)x_{ski} + e_{ski}`,
    :math:`s_s \sim N(0, \sigma^2_{slope})` with correlation ``cor`` to :math:`a_s`
    (``score ~ 1 + ses + (1 + ses | school) + (1 | school:classroom)``); the
    truth then also holds ``b_``/``sd_``/``cor_`` and the slopes' ``r_``/``coef_``,
    and no ICCs (with a varying slope a level's variance share depends on x). Its
    draws come after all others, so the default data are unchanged.

    .. math::
        a_s \sim N(0, \sigma^2_{school}),\quad c_{sk} \sim N(0, \sigma^2_{classroom}),
        \quad y_{ski} \sim N(\mu + a_s + c_{sk}, \sigma^2).

    ``classrooms`` (per school) and ``students`` (per classroom) are ints
    (balanced) or ``[lo, hi]`` (uniform on lo..hi). Classrooms are labelled
    within their school (``C01`` of ``S01`` is not ``C01`` of ``S02``). The
    truth holds ``b_Intercept``, both ``sd_``, ``sigma``, the ICCs
    :math:`\rho_{school} = \sigma^2_{school}/(\sigma^2_{school} + \sigma^2_{classroom}
    + \sigma^2)` and :math:`\rho_{school:classroom} = \sigma^2_{classroom}/(\sigma^2_{classroom}
    + \sigma^2)`, and each group's ``r_`` and ``coef_`` (lme4's ``coef``:
    :math:`\mu` + that factor's effect only).
    """
    if schools < 2:
        raise ConfigError(f"design parameter 'schools' must be at least 2, got {schools}")
    if sd_school < 0 or sd_classroom < 0 or sigma <= 0:
        raise ConfigError("design parameters need sd_school, sd_classroom >= 0 and sigma > 0")
    if group == subgroup or outcome in (group, subgroup):
        raise ConfigError("design parameters group, subgroup and outcome must be three names")
    school_labels = group_labels(prefix, schools)
    per_school = group_sizes(classrooms, schools, rng)
    class_school = np.repeat(np.arange(schools), per_school)
    class_index = np.concatenate([np.arange(m) for m in per_school])
    sub_labels = group_labels(subprefix, int(per_school.max()))
    size = group_sizes(students, class_school.size, rng)
    a = sd_school * rng.standard_normal(schools)
    c = sd_classroom * rng.standard_normal(class_school.size)
    row_class = np.repeat(np.arange(class_school.size), size)
    row_school = class_school[row_class]
    y = mu + a[row_school] + c[row_class] + sigma * rng.standard_normal(row_class.size)
    has_slope = b_slope != 0.0 or sd_slope != 0.0
    if has_slope:
        if sd_slope < 0 or not -1.0 <= cor <= 1.0 or predictor in (group, subgroup, outcome):
            raise ConfigError(
                "design parameters need sd_slope >= 0, -1 <= cor <= 1 and a predictor name "
                "other than the group, subgroup and outcome columns"
            )
        # Without school intercepts the correlation is moot; a standard normal in
        # place of a/sd_school keeps the slopes' SD at sd_slope whatever cor is.
        z_a = a / sd_school if sd_school > 0 else rng.standard_normal(schools)
        s_slope = sd_slope * (cor * z_a + np.sqrt(1.0 - cor**2) * rng.standard_normal(schools))
        x = rng.standard_normal(row_class.size)
        y = y + (b_slope + s_slope[row_school]) * x
    data = pd.DataFrame(
        {
            group: pd.Series(np.asarray(school_labels, dtype=object)[row_school], dtype="string"),
            subgroup: pd.Series(
                np.asarray(sub_labels, dtype=object)[class_index[row_class]], dtype="string"
            ),
            outcome: y,
        }
    )
    if has_slope:
        data.insert(2, predictor, x)
    nested = f"{group}:{subgroup}"
    class_labels = [
        f"{school_labels[s]}:{sub_labels[k]}"
        for s, k in zip(class_school, class_index, strict=True)
    ]
    total = sd_school**2 + sd_classroom**2 + sigma**2
    rows = [
        ("b_Intercept", mu),
        (f"sd_{group}__Intercept", sd_school),
        (f"sd_{nested}__Intercept", sd_classroom),
        ("sigma", sigma),
        (f"icc_{group}", sd_school**2 / total),
        (f"icc_{nested}", sd_classroom**2 / (sd_classroom**2 + sigma**2)),
    ]
    rows += [(f"r_{group}[{lab},Intercept]", v) for lab, v in zip(school_labels, a, strict=True)]
    rows += [(f"r_{nested}[{lab},Intercept]", v) for lab, v in zip(class_labels, c, strict=True)]
    rows += [
        (f"coef_{group}[{lab},Intercept]", mu + v) for lab, v in zip(school_labels, a, strict=True)
    ]
    rows += [
        (f"coef_{nested}[{lab},Intercept]", mu + v) for lab, v in zip(class_labels, c, strict=True)
    ]
    if has_slope:
        rows = [r for r in rows if not r[0].startswith("icc_")]
        rows += [
            (f"b_{predictor}", b_slope),
            (f"sd_{group}__{predictor}", sd_slope),
            (f"cor_{group}__Intercept__{predictor}", cor),
        ]
        rows += [
            (f"r_{group}[{lab},{predictor}]", v)
            for lab, v in zip(school_labels, s_slope, strict=True)
        ]
        rows += [
            (f"coef_{group}[{lab},{predictor}]", b_slope + v)
            for lab, v in zip(school_labels, s_slope, strict=True)
        ]
    truth = pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": "float64"})
    return Simulated(data=data, truth=truth)


def crossed(
    rng: np.random.Generator,
    *,
    students: int = 60,
    teachers: int = 8,
    per_student: Any = 3,
    size: Any = 1,
    mu: float = 50.0,
    sd_student: float = 4.0,
    sd_teacher: float = 2.0,
    sigma: float = 5.0,
    outcome: str = "y",
) -> Simulated:
    r"""Students crossed with teachers, fitted by ``y ~ 1 + (1 | student) + (1 | teacher)``.

    .. math::
        s_i \sim N(0, \sigma^2_{student}),\quad t_h \sim N(0, \sigma^2_{teacher}),
        \quad y_{ihr} \sim N(\mu + s_i + t_h, \sigma^2).

    The incidence is sparse: each student sees ``per_student`` distinct teachers
    drawn at random (an int, or ``[lo, hi]``), with ``size`` observations per
    student-teacher pair (an int, or ``[lo, hi]``). Teachers that no student
    drew do not appear. Columns ``student`` (labels ``P001``...), ``teacher``
    (``T01``...) and ``outcome``; the ICCs in the truth are shares of the total
    variance.
    """
    if students < 2 or teachers < 2:
        raise ConfigError("design parameters 'students' and 'teachers' must be at least 2")
    if sd_student < 0 or sd_teacher < 0 or sigma <= 0:
        raise ConfigError("design parameters need sd_student, sd_teacher >= 0 and sigma > 0")
    k = group_sizes(per_student, students, rng)
    if k.max() > teachers:
        raise ConfigError(
            f"design parameter 'per_student' ({int(k.max())}) exceeds 'teachers' ({teachers})"
        )
    # each student's teachers: the first k_i of a random permutation of all teachers
    perms = np.argsort(rng.random((students, teachers)), axis=1)
    pair_student = np.repeat(np.arange(students), k)
    pair_teacher = np.concatenate([perms[i, : k[i]] for i in range(students)])
    reps = group_sizes(size, pair_student.size, rng)
    row_s = np.repeat(pair_student, reps)
    row_t = np.repeat(pair_teacher, reps)
    s_eff = sd_student * rng.standard_normal(students)
    t_eff = sd_teacher * rng.standard_normal(teachers)
    y = mu + s_eff[row_s] + t_eff[row_t] + sigma * rng.standard_normal(row_s.size)
    s_labels = group_labels("P", students)
    t_labels = group_labels("T", teachers)
    if outcome in ("student", "teacher"):
        raise ConfigError("design parameter 'outcome' must differ from 'student' and 'teacher'")
    data = pd.DataFrame(
        {
            "student": pd.Series(np.asarray(s_labels, dtype=object)[row_s], dtype="string"),
            "teacher": pd.Series(np.asarray(t_labels, dtype=object)[row_t], dtype="string"),
            outcome: y,
        }
    )
    seen = np.unique(row_t)
    total = sd_student**2 + sd_teacher**2 + sigma**2
    rows = [
        ("b_Intercept", mu),
        ("sd_student__Intercept", sd_student),
        ("sd_teacher__Intercept", sd_teacher),
        ("sigma", sigma),
        ("icc_student", sd_student**2 / total),
        ("icc_teacher", sd_teacher**2 / total),
    ]
    rows += [(f"r_student[{lab},Intercept]", v) for lab, v in zip(s_labels, s_eff, strict=True)]
    rows += [(f"r_teacher[{t_labels[h]},Intercept]", t_eff[h]) for h in seen]
    rows += [
        (f"coef_student[{lab},Intercept]", mu + v) for lab, v in zip(s_labels, s_eff, strict=True)
    ]
    rows += [(f"coef_teacher[{t_labels[h]},Intercept]", mu + t_eff[h]) for h in seen]
    truth = pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": "float64"})
    return Simulated(data=data, truth=truth)


DESIGNS = {"two_level": two_level, "slopes": slopes, "three_level": three_level, "crossed": crossed}


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
