"""What the workflow needs to know about the configured studies.

Pure functions over the validated config dictionary; the Snakefile and the
rules call them, and the tests can too, without Snakemake.
"""

from __future__ import annotations

import json
from typing import Any

SAMPLERS = frozenset({"gibbs"})
GIBBS_DEFAULTS = {"chains": 4, "warmup": 1000, "draws": 1000}


def study(config: dict[str, Any], name: str) -> dict[str, Any]:
    return config["studies"][name]


def study_seed(config: dict[str, Any], name: str) -> int:
    """The study's own seed, or the config's."""
    return int(study(config, name).get("seed", config.get("seed", 42)))


def fit_seed(config: dict[str, Any], name: str, fit: str) -> int:
    """The seed of one fit (and its CV folds): ``fit_seeds.FIT``, or the study's seed.

    The data keep the study's seed, so changing one fit's seed reruns that fit alone.
    """
    return int(study(config, name).get("fit_seeds", {}).get(fit, study_seed(config, name)))


def data_source(config: dict[str, Any], name: str) -> str:
    """``simulate``, ``file`` or ``study`` (data shared with another study)."""
    data = study(config, name)["data"]
    return next(k for k in ("simulate", "file", "study") if k in data)


def data_origin(config: dict[str, Any], name: str) -> str:
    """The study whose data this one uses, following shared-data links."""
    seen = [name]
    while data_source(config, seen[-1]) == "study":
        other = study(config, seen[-1])["data"]["study"]
        if other not in config["studies"]:
            raise ValueError(f"study '{seen[-1]}': data.study names unknown study '{other}'")
        if other in seen:
            raise ValueError(
                f"studies {' -> '.join([*seen, other])}: data.study links form a cycle"
            )
        seen.append(other)
    return seen[-1]


def is_simulated(config: dict[str, Any], name: str) -> bool:
    """True when the study's data (possibly through another study) were simulated."""
    return data_source(config, data_origin(config, name)) == "simulate"


def compare_with(config: dict[str, Any], name: str) -> str | None:
    """The companion study whose fits the report shows beside this one's, if any."""
    other = study(config, name).get("compare_with")
    if other is None:
        return None
    if other not in config["studies"] or other == name:
        raise ValueError(f"study '{name}': compare_with names unknown study '{other}'")
    if data_origin(config, other) != data_origin(config, name):
        raise ValueError(
            f"study '{name}': compare_with study '{other}' does not share its data "
            f"(use data: {{study: {data_origin(config, name)}}} in '{other}')"
        )
    return other


def fits(config: dict[str, Any], name: str) -> list[str]:
    return list(study(config, name)["fits"])


def sampler_fits(config: dict[str, Any], name: str) -> list[str]:
    return [f for f in fits(config, name) if f in SAMPLERS]


def cv_fits(config: dict[str, Any], name: str) -> list[str]:
    """Fits scored by leave-one-group-out; by default all that can predict a new group."""
    cv = study(config, name).get("cv", {})
    default = [f for f in fits(config, name) if f != "no_pooling"]
    chosen = list(cv.get("fits", default))
    return [f for f in chosen if f in fits(config, name)]


def cv_chunks(config: dict[str, Any], name: str) -> int:
    return int(study(config, name).get("cv", {}).get("chunks", 1))


def cv_method(config: dict[str, Any], name: str, fit: str) -> str:
    """How ``fit`` leaves a group out: ``exact`` refits or ``psis`` (samplers' default)."""
    chosen = study(config, name).get("cv", {}).get("method", {})
    method = chosen.get(fit, "psis" if fit in SAMPLERS else "exact")
    if method == "psis" and fit not in SAMPLERS:
        raise ValueError(
            f"study '{name}': cv.method.{fit} is 'psis', but PSIS needs posterior draws "
            f"(samplers: {', '.join(sorted(SAMPLERS))})"
        )
    return method


def cv_fit_chunks(config: dict[str, Any], name: str, fit: str) -> int:
    """Jobs that score ``fit``'s leave-one-group-out folds.

    ``cv.chunks`` for fits that refit a sampler in every fold (``exact``); one
    job otherwise: closed forms and PSIS cost less than starting another job.
    """
    refits = fit in SAMPLERS and cv_method(config, name, fit) == "exact"
    return cv_chunks(config, name) if refits else 1


def kfold_folds(config: dict[str, Any], name: str) -> int:
    """Folds of the within-group K-fold (``cv.kfold.folds``); 0 when it is off."""
    return int(study(config, name).get("cv", {}).get("kfold", {}).get("folds", 0))


def kfold_fits(config: dict[str, Any], name: str) -> list[str]:
    """Fits scored by within-group K-fold (``cv.kfold.fits``, default all); none when off."""
    if kfold_folds(config, name) == 0:
        return []
    chosen = study(config, name)["cv"]["kfold"].get("fits", fits(config, name))
    return [f for f in chosen if f in fits(config, name)]


def kfold_chunks(config: dict[str, Any], name: str, fit: str) -> int:
    """Jobs that score ``fit``'s K-fold folds: ``cv.chunks`` (at most K) for samplers, else 1."""
    if fit not in SAMPLERS:
        return 1
    return max(1, min(cv_chunks(config, name), kfold_folds(config, name)))


def fit_settings(config: dict[str, Any], name: str, fit: str) -> dict[str, Any]:
    """The settings one fit uses, and nothing else, so a change reruns only it."""
    meta = meta_settings(config, name, fit)
    if fit in SAMPLERS:
        g = dict(GIBBS_DEFAULTS)
        g.update(study(config, name).get("gibbs", {}))
        return {**g, **meta}
    return meta


def meta_settings(config: dict[str, Any], name: str, fit: str) -> dict[str, Any]:
    """The meta-analysis options (``studies.NAME.meta``) that ``fit`` reads.

    The Bayesian fits read the prior on tau and the interval level; the
    frequentist ones Knapp-Hartung and the level; no pooling reads none.
    """
    meta = study(config, name).get("meta", {})
    if fit in ("meta_bayes", "gibbs"):
        keys: tuple[str, ...] = ("level", "prior")
    elif fit == "no_pooling":
        keys = ()
    else:
        keys = ("knha", "level")
    return {k: meta[k] for k in keys if k in meta}


def fit_settings_json(config: dict[str, Any], name: str, fit: str) -> str:
    return json.dumps(fit_settings(config, name, fit), sort_keys=True, separators=(",", ":"))


def effect_size_json(config: dict[str, Any], name: str) -> str:
    """The study's ``data.effect_size`` as JSON (``{}`` when the file holds the effect sizes)."""
    spec = study(config, name)["data"].get("effect_size", {})
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def simulate_args(config: dict[str, Any], name: str) -> str:
    """``--set key=value`` arguments of a simulated study (JSON values)."""
    params = study(config, name)["data"]["simulate"].get("params", {})
    return " ".join(
        f"--set {k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(params.items())
    )
