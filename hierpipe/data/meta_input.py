"""Checks a meta-analysis table needs beyond the design builder's: one row a study.

The design builder (:func:`hierpipe.design.build_design`) already rejects a
missing, zero, negative or non-finite standard error or variance. A
meta-analysis also needs each study on exactly one row (its estimate and
standard error are the study's summary; two rows with one label are a typing
error or two studies that need two labels) and at least two studies. Ingest and
the meta engine both call :func:`study_order`, so a file that ingests cleanly
also fits.
"""

from __future__ import annotations

import numpy as np

from hierpipe.design import Design
from hierpipe.errors import InputError

__all__ = ["study_order"]


def study_order(design: Design) -> np.ndarray:
    """Row index of each study, in the order of the study labels.

    Raises
    ------
    InputError
        A study label on two or more rows (naming the label and the first two
        rows, 1-based, header not counted), or fewer than two studies.
    """
    term = design.random[0]
    column = ":".join(term.group)
    codes = term.codes
    counts = np.bincount(codes, minlength=term.n_groups)
    if np.any(counts > 1):
        # the first study, in row order, whose label repeats
        repeated = counts[codes] > 1
        first = int(np.argmax(repeated))
        rows = np.flatnonzero(codes == codes[first])[:2] + 1
        raise InputError(
            f"{design.source}: column '{column}': study '{term.labels[codes[first]]}' is on rows "
            f"{rows[0]} and {rows[1]}; a meta-analysis needs one row a study "
            "(combine the rows or give them different labels)"
        )
    if term.n_groups < 2:
        raise InputError(
            f"{design.source}: a meta-analysis needs at least 2 studies, found {term.n_groups}"
        )
    order = np.empty(term.n_groups, dtype=np.int64)
    order[codes] = np.arange(codes.size)
    return order
