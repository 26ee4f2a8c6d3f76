r"""Observation-level residuals of a fit.

``residuals.parquet`` has one row an observation, in the data's row order:
``group``, ``observed`` :math:`y_{ij}`, ``fitted`` :math:`\hat y_{ij}` (the fit's
estimate of the observation's mean, including its group's effect),
``residual`` :math:`y_{ij} - \hat y_{ij}` and ``standardised``, the residual over
the fit's residual SD :math:`\hat\sigma`. These are lme4's Pearson residuals
(``residuals(fit, type = "pearson")``, the default of ``plot(fit)``); for
samplers :math:`\hat y` and :math:`\hat\sigma` are posterior means. Under the
model the standardised residuals are roughly standard normal, so a normal QQ
plot shows heavy tails or skew, a plot against the fitted values shows
non-constant variance, and a plot by group shows groups whose spread differs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

RESIDUAL_COLUMNS = ["group", "observed", "fitted", "residual", "standardised"]


def residual_table(
    y: np.ndarray, fitted: np.ndarray, sigma: float, codes: np.ndarray, labels: tuple[str, ...]
) -> pd.DataFrame:
    """Residuals and Pearson residuals (residual over ``sigma``), one row an observation."""
    y = np.asarray(y, dtype=np.float64)
    fitted = np.asarray(fitted, dtype=np.float64)
    resid = y - fitted
    with np.errstate(invalid="ignore", divide="ignore"):
        std = resid / sigma if np.isfinite(sigma) and sigma > 0 else np.full_like(resid, np.nan)
    return pd.DataFrame(
        {
            "group": pd.Series(np.asarray(labels, dtype=object)[codes], dtype=str),
            "observed": y,
            "fitted": fitted,
            "residual": resid,
            "standardised": std,
        }
    )


def empty_residuals() -> pd.DataFrame:
    """Zero-row table with the right columns, for fits whose engine has no residuals."""
    return pd.DataFrame(
        {
            "group": pd.Series(dtype=str),
            **{c: pd.Series(dtype=float) for c in RESIDUAL_COLUMNS[1:]},
        }
    )
