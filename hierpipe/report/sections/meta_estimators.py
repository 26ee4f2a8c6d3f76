"""The meta-analysis estimators side by side: average effect, heterogeneity, prediction."""

from __future__ import annotations

from typing import Any

from hierpipe.models.engines.meta import FEW_STUDIES, KNHA_ADVISED_BELOW
from hierpipe.report.context import StudyContext
from hierpipe.report.format import num
from hierpipe.report.sections import meta_common as mc


def _ci(lo: Any, hi: Any) -> str:
    return f"[{num(lo)}, {num(hi)}]"


def _freq_cells(m: dict[str, Any]) -> dict[str, str]:
    cells: dict[str, str] = {"estimator": m["estimator_name"]}
    for c in m["coefficients"]:
        cells[c["parameter"]] = f"{num(c['estimate'])} {_ci(c['ci_lb'], c['ci_ub'])}"
        cells[f"SE of {c['parameter']}"] = num(c["se"])
        cells[f"p-value of {c['parameter']}"] = num(c["pval"], 4)
    cells["test"] = f"t on {num(m['df'], 0)} df (Knapp-Hartung)" if m["knha"] else "z (normal)"
    fixed = m["estimator"] == "FE"
    tau2 = "0 (assumed)" if fixed else num(m["tau2"], 4)
    if not fixed and m.get("tau2_se") is not None:
        tau2 += f" (SE {num(m['tau2_se'], 4)})"
    cells["tau2"] = tau2
    cells["tau2 Q-profile interval"] = "–" if fixed else _ci(*m["tau2_ci"])
    cells["tau"] = "0 (assumed)" if fixed else f"{num(m['tau'])} {_ci(*m['tau_ci'])}"
    if fixed:
        # from Q alone (Higgins & Thompson 2002), as metafor prints them for a fixed-effect fit
        cells["I2 (%)"] = f"{num(m['I2'], 1)} (from Q)"
        cells["H2"] = f"{num(m['H2'], 2)} (Q / df)"
    else:
        i2, h2 = m["I2_ci"], m["H2_ci"]
        cells["I2 (%)"] = f"{num(m['I2'], 1)} {_ci(num(i2[0], 1), num(i2[1], 1))}"
        cells["H2"] = f"{num(m['H2'], 2)} {_ci(num(h2[0], 2), num(h2[1], 2))}"
    pi = mc.prediction_interval(m)
    cells["prediction interval"] = _ci(pi[0], pi[1]) if pi else "–"
    cells["tau2 at the boundary 0"] = "yes" if m["boundary"] else ("–" if fixed else "no")
    return cells


def _bayes_cells(m: dict[str, Any]) -> dict[str, str]:
    mu, tau = m["mu"], m["tau"]
    prior = m["prior"]
    scale = f", scale {num(prior['scale'])}" if "scale" in prior else ""
    cells = {
        "estimator": f"{m['estimator']}; prior on tau: {prior['family']}{scale}",
        "b_Intercept": f"{num(mu['mean'])} {_ci(*mu['ci'])}",
        "SE of b_Intercept": f"{num(mu['sd'])} (posterior SD)",
        "tau2": f"{num(m['tau2_mean'], 4)} (posterior mean)",
        "tau": f"{num(tau['mean'])} {_ci(*tau['ci'])} (median {num(tau['median'])})",
        "test": "posterior",
    }
    pi = mc.prediction_interval(m)
    cells["prediction interval"] = _ci(pi[0], pi[1]) if pi else "–"
    return cells


def build(ctx: StudyContext) -> dict[str, Any] | None:
    if not mc.is_meta(ctx):
        return None
    facts = mc.facts(ctx)
    columns = {}
    for fit, m in facts.items():
        if "coefficients" in m:
            columns[fit] = _freq_cells(m)
        elif "mu" in m:
            columns[fit] = _bayes_cells(m)
    if not columns:
        return None
    labels: list[str] = []
    for cells in columns.values():
        labels += [lab for lab in cells if lab not in labels]
    rows = [{"label": lab, **{f: c.get(lab, "–") for f, c in columns.items()}} for lab in labels]
    k = next(iter(facts.values()))["k"]
    any_freq = [m for m in facts.values() if "coefficients" in m]
    q = any_freq[0] if any_freq else None
    advice = None
    if k < KNHA_ADVISED_BELOW and any(not m["knha"] for m in any_freq):
        advice = (
            f"With only {k} studies, normal-theory (z) intervals for the average effect are "
            "too narrow; the Knapp-Hartung (Hartung-Knapp-Sidik-Jonkman) adjustment keeps "
            "their coverage close to nominal (IntHout et al. 2014). Set meta: {knha: true} "
            "in this study's config."
        )
    levels = {m.get("level") for m in facts.values() if m.get("level") is not None}
    return {
        "fits": list(columns),
        "rows": rows,
        "k": k,
        "few": k < FEW_STUDIES,
        "q": q,
        "advice": advice,
        "level": 100 * (levels.pop() if len(levels) == 1 else 0.95),
    }
