r"""Per-fit checks: shrinkage, predictive checks, residuals, convergence, flags.

One diagnose job a fit reads the data once and writes to
``results/{study}/diagnostics/{fit}/``:

``shrinkage.parquet``
    one row a group: ``n``, the no-pooling estimate :math:`\bar y_j`, the
    fit's estimate :math:`\hat\theta_j`, the population estimate
    :math:`\hat\beta_0`, and :math:`\lambda_j`, the weight the fit puts on
    the group's own data in :math:`\hat\theta_j = \lambda_j \bar y_j +
    (1-\lambda_j) \hat\beta_0` (1: no pooling, 0: complete pooling);
    ``shrinkage`` is :math:`1-\lambda_j`. The sum of :math:`\lambda_j` is the
    effective number of group parameters (Hodges & Sargent 2001). Where the
    engine provides it, ``james_stein`` and ``js_shrinkage`` give the
    James–Stein (or Efron–Morris) estimate and its :math:`B_j` beside them
    (:mod:`hierpipe.diagnostics.shrinkage`).
``ppc.parquet``, ``ppc_overall.parquet``
    posterior (or parametric) predictive checks (:mod:`hierpipe.diagnostics.ppc`):
    observed and replicated statistics with p-values; the overall statistics
    of every replicate.
``residuals.parquet``
    observation-level Pearson residuals (:mod:`hierpipe.diagnostics.residuals`).
``checks.json``
    ICC, effective parameters, predictions, warnings, boundary and convergence
    flags, the James–Stein facts, the PPC's extreme groups, and the checks the
    engine does not provide (``skipped``).
``convergence.parquet``, ``prior_predictive.parquet`` (samplers)
    R-hat, bulk/tail ESS and MCSE of the mean and of the 5% and 95% quantiles
    of every parameter; draws from the priors on the outcome's scale.

A check the engine does not provide leaves its table with no rows, so the
workflow's outputs are the same for every structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hierpipe.diagnostics.ppc import empty_ppc, observed_statistics, ppc_tables
from hierpipe.diagnostics.residuals import empty_residuals
from hierpipe.io import read_json, read_table, write_json, write_parquet
from hierpipe.names import is_hyperparameter
from hierpipe.seeds import derive_rng

RHAT_MAX = 1.01
ESS_MIN = 400.0


def hyper_flags(summary: pd.DataFrame) -> list[str]:
    """Hyperparameters with R-hat above 1.01 or bulk/tail ESS below 400 (Vehtari et al. 2021)."""
    from hierpipe.diagnostics.convergence import flag_convergence

    if "rhat" not in summary.columns:
        return []
    hyper = [p for p in summary["parameter"] if is_hyperparameter(p)]
    return flag_convergence(summary, hyper, rhat_max=RHAT_MAX, ess_min=ESS_MIN)


def diagnose_fit(
    data: str | Path,
    formula: str,
    fit_dir: Path,
    out_dir: Path,
    *,
    seed: int = 42,
    keys: Sequence[str] = (),
) -> None:
    """Write one fit's diagnostics (module docstring); samplers are fits with ``draws.parquet``.

    ``seed`` and ``keys`` (study, fit) derive the generators of the replicates
    and the prior draws.
    """
    from hierpipe.cv.kfold import model_and_design

    model, design = model_and_design(read_table(data), formula, str(data))
    summary = pd.read_parquet(fit_dir / "summary.parquet")
    info = read_json(fit_dir / "fit.json")
    draws_path = fit_dir / "draws.parquet"
    draws = pd.read_parquet(draws_path) if draws_path.exists() else None
    skipped: list[str] = []
    table, js_facts = shrinkage_table(model, summary, info, skipped)
    ppc, overall, ppc_facts = predictive_checks(
        model, design, summary, draws, seed, keys, skipped, info
    )
    resid = residual_check(model, design, summary, skipped)
    if hasattr(model.engine, "KFOLD_UNAVAILABLE"):  # an engine that cannot have a K-fold says why
        skipped.append(f"kfold: {model.engine.KFOLD_UNAVAILABLE}")
    checks = {
        "method": info.get("method"),
        "icc": _icc(summary, model.structure.group),
        # an engine that knows the trace of the hat matrix exactly (LMM: the weights
        # are per coefficient and do not add up to it) reports it in fit.json
        "effective_parameters": float(info.get("effective_parameters", np.nansum(table["weight"]))),
        "groups": len(table),
        "predictions": info.get("predictions", []),
        "warnings": info.get("warnings", []),
        "boundary": info.get("boundary", []),
        "convergence_flags": hyper_flags(summary),
        "james_stein": js_facts,
        "ppc": ppc_facts,
        "skipped": skipped,
    }
    if draws is not None:
        write_parquet(convergence_table(draws), out_dir / "convergence.parquet")
        prior = prior_check(model, info, seed, keys, skipped)
        write_parquet(prior, out_dir / "prior_predictive.parquet")
    elif info.get("priors"):
        # a Bayesian fit without draws (meta_bayes: exact posterior); its prior
        # predictive is written only when the priors are proper
        prior = prior_check(model, info, seed, keys, skipped)
        if len(prior):
            write_parquet(prior, out_dir / "prior_predictive.parquet")
    write_parquet(table, out_dir / "shrinkage.parquet")
    write_parquet(ppc, out_dir / "ppc.parquet")
    write_parquet(overall, out_dir / "ppc_overall.parquet")
    write_parquet(resid, out_dir / "residuals.parquet")
    write_json(checks, out_dir / "checks.json")


def _icc(summary: pd.DataFrame, group: str) -> dict[str, float] | None:
    est = summary.set_index("parameter")
    return est.loc[f"icc_{group}"].to_dict() if f"icc_{group}" in est.index else None


def shrinkage_table(
    model: Any, summary: pd.DataFrame, info: dict[str, Any], skipped: list[str]
) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """The engine's shrinkage table with the James–Stein columns beside it when available."""
    engine = model.engine
    table = engine.shrinkage(model.prepared, model.structure, summary, info)
    js = None
    if hasattr(engine, "james_stein_table"):
        js = engine.james_stein_table(model.prepared, model.structure)
        if js is None:
            why = getattr(engine, "james_stein_unavailable", None)
            reason = (
                why(model.prepared, model.structure)
                if why is not None
                else "no within-group replication to estimate sigma^2"
            )
            skipped.append(f"james_stein: {reason}")
    else:
        skipped.append("james_stein: not provided for this model structure")
    if js is None:
        table["james_stein"] = np.nan
        table["js_shrinkage"] = np.nan
        return table, None
    js_table, facts = js
    merged = table.merge(js_table, on="group", how="left", validate="one_to_one")
    return merged, facts


def predictive_checks(
    model: Any,
    design: Any,
    summary: pd.DataFrame,
    draws: pd.DataFrame | None,
    seed: int,
    keys: Sequence[str],
    skipped: list[str],
    info: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any] | None]:
    """PPC tables and the facts checks.json reports (extreme groups, overall p-values).

    An engine with ``PPC_NEEDS_INFO`` is also given the fit's ``info`` (fit.json).
    """
    engine = model.engine
    if not hasattr(engine, "ppc_replicates"):
        skipped.append("ppc: not provided for this model structure")
        return (*empty_ppc(), None)
    term = design.random[0]
    observed = observed_statistics(design.y, term.codes, len(term.labels))
    rng = derive_rng(seed, *keys, "ppc")
    extra = {"info": info} if getattr(engine, "PPC_NEEDS_INFO", False) else {}
    reps = engine.ppc_replicates(model.prepared, model.structure, summary, draws, rng, **extra)
    table, overall_reps = ppc_tables(observed, reps, term.labels)
    groups = table[table["scope"] == "group"]
    extreme = groups[groups["extreme"]]
    overall = table[table["scope"] == "overall"].set_index("statistic")["p_value"]
    facts = {
        "note": reps.note,
        "replicates": int(reps.count),
        "overall_p": {k: float(v) for k, v in overall.items()},
        "extreme": [
            {"group": r.group, "statistic": r.statistic, "p_value": float(r.p_value)}
            for r in extreme.itertuples(index=False)
        ],
        "p_values": int(groups["p_value"].notna().sum()),
    }
    return table, overall_reps, facts


def residual_check(
    model: Any, design: Any, summary: pd.DataFrame, skipped: list[str]
) -> pd.DataFrame:
    if not hasattr(model.engine, "residuals"):
        skipped.append("residuals: not provided for this model structure")
        return empty_residuals()
    return model.engine.residuals(design, model.prepared, model.structure, summary)


def prior_check(
    model: Any, info: dict[str, Any], seed: int, keys: Sequence[str], skipped: list[str]
) -> pd.DataFrame:
    """Draws from the sampler's priors (zero rows when the engine or fit has none)."""
    prior = None
    if hasattr(model.engine, "prior_predictive"):
        rng = derive_rng(seed, *keys, "prior_predictive")
        prior = model.engine.prior_predictive(model.prepared, model.structure, info, rng)
    if prior is None:
        reason = (
            "the recorded priors are improper (e.g. uniform on tau without an upper bound), "
            "so they imply no distribution on the outcome's scale"
            if info.get("priors")
            else "no priors recorded for this fit"
        )
        skipped.append(f"prior_predictive: {reason}")
        return pd.DataFrame({"draw": pd.Series(dtype=np.int64)})
    return prior


def convergence_table(draws: pd.DataFrame | Path) -> pd.DataFrame:
    """R-hat, bulk/tail ESS and MCSE of the mean, 5% and 95% quantiles, every parameter.

    All from :mod:`hierpipe.diagnostics.convergence` (Vehtari et al. 2021), one
    batch over the parameters; ``mcse_q5``/``mcse_q95`` are the MCSEs of the
    quantiles that bound the summary's 90% intervals.
    """
    from hierpipe.diagnostics.convergence import diagnose_draws

    if not isinstance(draws, pd.DataFrame):
        draws = pd.read_parquet(draws)
    params = [c for c in draws.columns if c not in ("chain", "draw")]
    chains = int(draws["chain"].max()) + 1
    x = draws[params].to_numpy(dtype=np.float64).reshape(chains, -1, len(params))
    values = diagnose_draws(x)
    return pd.DataFrame(
        {
            "parameter": pd.Series(params, dtype=str),
            **{
                c: values[c]
                for c in ("rhat", "ess_bulk", "ess_tail", "mcse_mean", "mcse_q5", "mcse_q95")
            },
            "hyperparameter": [is_hyperparameter(p) for p in params],
        }
    )
