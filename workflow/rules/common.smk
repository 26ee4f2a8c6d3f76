import os
import re
import json
import shlex

from hierpipe import studies as S
from hierpipe.provenance import source_hash

RESULTS = config.get("results", "results")
# Every rule runs in this environment under `--sdm conda`; relative to workflow/rules/.
CONDA_ENV = "../envs/hierpipe.yaml"
STUDIES = sorted(config["studies"])
# Code hashes as params, so changed code reruns exactly the rules that run it.
CODE_DATA = source_hash("data/", "design.py", "formula.py", "io.py", "seeds.py", "cli.py")
CODE = source_hash(exclude=("report/",))
CODE_REPORT = source_hash("report/")


def alternation(names):
    """A regex matching exactly these names (none: a pattern that matches nothing)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!x)x"


SIMULATED = [s for s in STUDIES if S.data_source(config, s) == "simulate"]
INGESTED = [s for s in STUDIES if S.data_source(config, s) == "file"]
SHARED = [s for s in STUDIES if S.data_source(config, s) == "study"]
for _s in SHARED:
    S.data_origin(config, _s)  # fails at load time on unknown or cyclic links
for _s in STUDIES:
    S.compare_with(config, _s)  # fails at load time on an unknown or unrelated companion
ALL_FITS = sorted({f for s in STUDIES for f in S.fits(config, s)})
SAMPLER_FITS = sorted(S.SAMPLERS)
POINT_FITS = sorted(set(ALL_FITS) - S.SAMPLERS)


wildcard_constraints:
    study=alternation(STUDIES),
    fit=alternation(ALL_FITS),
    chunk=r"\d+",


def data_path(wildcards):
    return f"{RESULTS}/{wildcards.study}/data.parquet"


def log_path(*parts):
    return os.path.join(RESULTS, "{study}", "logs", *parts)


# from fit.smk
def fit_params():
    return dict(
        formula=lambda w: S.study(config, w.study)["formula"],
        settings=lambda w: S.fit_settings_json(config, w.study, w.fit),
        seed=lambda w: S.fit_seed(config, w.study, w.fit),
        outdir=lambda w: f"{RESULTS}/{w.study}/fits/{w.fit}",
        code=CODE,
    )


# from diagnose.smk
def diagnose_params():
    return dict(
        formula=lambda w: S.study(config, w.study)["formula"],
        outdir=lambda w: f"{RESULTS}/{w.study}/diagnostics/{w.fit}",
        fitdir=lambda w: f"{RESULTS}/{w.study}/fits/{w.fit}",
        seed=lambda w: S.fit_seed(config, w.study, w.fit),
        code=CODE,
    )


# from diagnose.smk
def diagnose_outputs():
    return dict(
        shrinkage=f"{DIAG}/shrinkage.parquet",
        checks=f"{DIAG}/checks.json",
        ppc=f"{DIAG}/ppc.parquet",
        ppc_overall=f"{DIAG}/ppc_overall.parquet",
        residuals=f"{DIAG}/residuals.parquet",
    )


# from cv.smk
def _draws_path(w):
    return f"{RESULTS}/{w.study}/fits/{w.fit}/draws.parquet"


# from cv.smk
def _score_args(w, folds=None):
    """The scoring options shared by the chunk jobs and the single-job command."""
    args = [
        "--formula", S.study(config, w.study)["formula"],
        "--fit", w.fit,
        "--seed", str(S.fit_seed(config, w.study, w.fit)),
        "--key", w.study,
        "--settings", S.fit_settings_json(config, w.study, w.fit),
    ]
    if folds is not None:
        # The folds are dealt from the study's seed, so every fit is scored on the same.
        args += ["--folds", str(folds), "--fold-seed", str(S.study_seed(config, w.study))]
    elif S.cv_method(config, w.study, w.fit) == "psis":
        args += ["--method", "psis", "--draws", _draws_path(w)]
    return " ".join(shlex.quote(a) for a in args)


# from cv.smk
def _logo_scoring_inputs(w):
    files = {"data": data_path(w)}
    if S.cv_method(config, w.study, w.fit) == "psis":
        files["draws"] = _draws_path(w)
    return files


# from cv.smk
def _chunk_paths(kind, w, k):
    return [f"{RESULTS}/{w.study}/cv/{kind}/{w.fit}/{i}.parquet" for i in range(k)]


# --------------------------------------------------------------- leave-one-group-out


# from cv.smk
def logo_inputs(w):
    k = S.cv_fit_chunks(config, w.study, w.fit)
    return {"chunks": _chunk_paths("chunks", w, k)} if k > 1 else _logo_scoring_inputs(w)


# from cv.smk
def logo_command(wildcards, input):
    if S.cv_fit_chunks(config, wildcards.study, wildcards.fit) > 1:
        return "python -m hierpipe.cli cv-gather " + " ".join(shlex.quote(p) for p in input.chunks)
    return f"python -m hierpipe.cli cv {shlex.quote(input.data)} {_score_args(wildcards)} --chunk 0 --chunks 1"


# from cv.smk
def kfold_inputs(w):
    k = S.kfold_chunks(config, w.study, w.fit)
    return {"chunks": _chunk_paths("kfold_chunks", w, k)} if k > 1 else {"data": data_path(w)}


# from cv.smk
def kfold_command(wildcards, input):
    w = wildcards
    if S.kfold_chunks(config, w.study, w.fit) > 1:
        return "python -m hierpipe.cli cv-gather " + " ".join(shlex.quote(p) for p in input.chunks)
    args = _score_args(w, folds=S.kfold_folds(config, w.study))
    return f"python -m hierpipe.cli cv-kfold {shlex.quote(input.data)} {args} --chunk 0 --chunks 1"


# from report.smk
def report_inputs(wildcards):
    s = wildcards.study
    fits = S.fits(config, s)
    files = {"data": f"{RESULTS}/{s}/data.parquet"}
    for f in fits:
        files[f"summary_{f}"] = f"{RESULTS}/{s}/fits/{f}/summary.parquet"
        files[f"info_{f}"] = f"{RESULTS}/{s}/fits/{f}/fit.json"
        files[f"checks_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/checks.json"
        for name in ("ppc", "ppc_overall", "residuals", "shrinkage"):
            files[f"{name}_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/{name}.parquet"
    for f in S.sampler_fits(config, s):
        files[f"convergence_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/convergence.parquet"
        files[f"prior_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/prior_predictive.parquet"
    if S.cv_fits(config, s) or S.kfold_fits(config, s):
        files["cv"] = f"{RESULTS}/{s}/cv/comparison.parquet"
    if S.is_simulated(config, s):
        files["truth"] = f"{RESULTS}/{s}/truth.parquet"
    other = S.compare_with(config, s)
    if other:
        for f in S.fits(config, other):
            files[f"companion_summary_{f}"] = f"{RESULTS}/{other}/fits/{f}/summary.parquet"
            files[f"companion_info_{f}"] = f"{RESULTS}/{other}/fits/{f}/fit.json"
    return files
