r"""Leave-one-group-out folds as chunks, so Snakemake can run them in parallel.

Chunk ``k`` of ``K`` holds the groups whose position in sorted label order is
``k`` modulo ``K``; each fold refits the method without its group and scores the
group as a new one (:mod:`hierpipe.cv.logo`). A fold's generator is derived from
the seed, the study, the fit and the held-out group's label, so a fold's result
does not depend on how the folds are chunked.

Two ways to leave a group out (``cv_method``):

``"exact"``
    refit without the group: closed forms for the point estimators, a new
    sampler run for samplers;
``"psis"`` (samplers)
    reweight the full-data draws by Pareto-smoothed importance sampling
    (:mod:`hierpipe.cv.psis`) with ratios :math:`1/p(y_j \mid \phi^{(s)})`, the
    group's density given each draw with its own effect integrated out (the
    engine's ``logo_log_lik``). Groups whose :math:`\hat k` exceeds
    :func:`~hierpipe.cv.psis.khat_threshold` (0.7 for 2,200 draws or more) are
    refitted exactly instead, with the same generator the exact method would use.
    Each row records its ``cv_method`` (``exact``, ``psis`` or
    ``exact_fallback``) and ``khat``.

The relative efficiency :math:`r_{\text{eff}}` that sets PSIS's tail length is
the ESS of the group's likelihood values over the draws (Vehtari et al. 2021,
mean ESS) divided by their number, as R ``loo``'s ``relative_eff`` computes it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.cv.psis import khat_threshold, psis
from hierpipe.errors import ConfigError
from hierpipe.models.fitting import load_model
from hierpipe.seeds import derive_rng

CV_COLUMNS = [
    "group",
    "n",
    "elpd",
    "pred_mean",
    "pred_q5",
    "pred_q95",
    "observed_mean",
    "error",
    "covered",
    "cv_method",
    "khat",
]
CV_METHODS = ("exact", "psis")
_BLOCK_VALUES = 1 << 21  # draws x groups of log-likelihood held at once (16 MB)


def run_chunk(
    df: pd.DataFrame,
    formula: str,
    method: str,
    *,
    chunk: int,
    chunks: int,
    settings: dict[str, Any],
    seed: int,
    keys: Sequence[str],
    source: str,
    cv_method: str = "exact",
    draws: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Scores of the held-out groups of one chunk: one row a group.

    ``cv_method="psis"`` needs ``draws``, the fit's draws table (``chain``,
    ``draw`` and one column a parameter).
    """
    model = load_model(df, formula, source)
    model.check(method)
    labels = model.engine.group_labels(model.prepared)
    groups = fold_groups(len(labels), chunk, chunks)
    if cv_method == "psis" and not hasattr(model.engine, "logo_log_lik"):
        # The default for samplers; an engine without the marginal likelihood of a
        # group refits every fold instead (each row says so in cv_method).
        print(
            f"cv method 'psis' is not available for {model.structure.kind} models; "
            "refitting every fold exactly"
        )
        cv_method = "exact"
    if cv_method == "psis":
        rows = _psis_rows(model, method, groups, labels, settings, seed, keys, draws)
    elif cv_method == "exact":
        rows = []
        for j in groups:
            rng = derive_rng(seed, *keys, method, "logo", labels[j])
            row = model.engine.score_held_out(model.prepared, int(j), method, settings, rng)
            rows.append({**row, "cv_method": "exact", "khat": np.nan})
    else:
        raise ConfigError(f"cv method must be one of {', '.join(CV_METHODS)}, got '{cv_method}'")
    # engines may add columns after the contract's (the meta engine's influence
    # statistics); every row of an engine has the same keys
    extra = [c for c in (rows[0] if rows else {}) if c not in CV_COLUMNS]
    out = pd.DataFrame(rows, columns=CV_COLUMNS + extra)
    out.insert(0, "fit", method)
    return out.astype({"fit": str, "group": str, "covered": bool, "cv_method": str, "khat": float})


def _psis_rows(model, method, groups, labels, settings, seed, keys, draws) -> list[dict[str, Any]]:
    """PSIS-LOGO rows of ``groups``, refitting exactly where k-hat is too high."""
    engine = model.engine
    if draws is None:
        raise ConfigError(f"cv method 'psis' for fit '{method}' needs the fit's draws")
    chain = draws["chain"].to_numpy()
    limit = khat_threshold(len(draws))
    rows = []
    # A block of groups at a time: the (draws x groups) log-likelihood of every
    # group at once would be 3.2 GB at 4,000 draws and 10^5 groups.
    step = max(1, _BLOCK_VALUES // max(1, len(draws)))
    by_block = "groups" in inspect.signature(engine.logo_log_lik).parameters
    every = None if by_block else engine.logo_log_lik(model.prepared, model.structure, draws)
    for first in range(0, len(groups), step):
        block = np.asarray(groups[first : first + step])
        if every is None:
            loglik = engine.logo_log_lik(model.prepared, model.structure, draws, groups=block)
        else:
            loglik = every[:, block]
        r_eff = relative_efficiency(loglik, chain)
        for k, j in enumerate(block):
            rng = derive_rng(seed, *keys, method, "logo", labels[j])
            smoothed = psis(-loglik[:, k], r_eff[k])
            if smoothed.khat > limit:
                row = engine.score_held_out(model.prepared, int(j), method, settings, rng)
                rows.append({**row, "cv_method": "exact_fallback", "khat": smoothed.khat})
            else:
                row = engine.score_held_out_weighted(
                    model.prepared, int(j), model.structure, draws, smoothed.log_weights, rng
                )
                rows.append({**row, "cv_method": "psis", "khat": smoothed.khat})
    return rows


def relative_efficiency(loglik: np.ndarray, chain: np.ndarray) -> np.ndarray:
    """ESS / S of each column's likelihood values ``exp(loglik)`` (NaN or 0 -> 1)."""
    from hierpipe.diagnostics.convergence import ess_mean

    s, j = loglik.shape
    chains = int(chain.max()) + 1
    if s % chains or not np.array_equal(chain, np.repeat(np.arange(chains), s // chains)):
        return np.ones(j)  # not chain-major blocks of equal length: treat as independent
    lik = np.exp(loglik - loglik.max(axis=0))
    ess = np.asarray(ess_mean(lik.reshape(chains, s // chains, j)), dtype=np.float64)
    r = ess / s
    return np.where(np.isfinite(r) & (r > 0), r, 1.0)


def gather(paths: Sequence[str]) -> pd.DataFrame:
    """Join chunk tables into one, ordered by group label (and fold, for K-fold tables)."""
    parts = [pd.read_parquet(p) for p in paths]
    # a chunk with no folds (more chunks than groups) has untyped columns; leave it
    # out so it cannot turn the float columns into objects
    parts = [t for t in parts if len(t)] or parts[:1]
    out = pd.concat(parts, ignore_index=True)
    keys = ["group", "fold"] if "fold" in out.columns else ["group"]
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def fold_groups(n_groups: int, chunk: int, chunks: int) -> np.ndarray:
    """Indices of the groups that chunk ``chunk`` of ``chunks`` holds out."""
    return np.arange(chunk, n_groups, chunks)
