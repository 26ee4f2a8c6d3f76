# Cross-validation (hierpipe.cv): leave-one-group-out (new groups) and
# within-group K-fold (new observations of known groups), then one comparison.
# A fit whose folds each refit a sampler is split into cv.chunks jobs that run
# in parallel and are gathered; every other fit is scored by one job that
# writes its table directly (fewer jobs: start-up dominates cheap folds).
import shlex

for _s in STUDIES:
    for _f in S.cv_fits(config, _s):
        S.cv_method(config, _s, _f)  # fails at load time on psis for a point fit


def _draws_path(w):
    return f"{RESULTS}/{w.study}/fits/{w.fit}/draws.parquet"


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


def _logo_scoring_inputs(w):
    files = {"data": data_path(w)}
    if S.cv_method(config, w.study, w.fit) == "psis":
        files["draws"] = _draws_path(w)
    return files


def _chunk_paths(kind, w, k):
    return [f"{RESULTS}/{w.study}/cv/{kind}/{w.fit}/{i}.parquet" for i in range(k)]


# --------------------------------------------------------------- leave-one-group-out


def logo_inputs(w):
    k = S.cv_fit_chunks(config, w.study, w.fit)
    return {"chunks": _chunk_paths("chunks", w, k)} if k > 1 else _logo_scoring_inputs(w)


def logo_command(wildcards, input):
    if S.cv_fit_chunks(config, wildcards.study, wildcards.fit) > 1:
        return "hierpipe cv-gather " + " ".join(shlex.quote(p) for p in input.chunks)
    return f"hierpipe cv {shlex.quote(input.data)} {_score_args(wildcards)} --chunk 0 --chunks 1"


rule cv_chunk:
    input:
        unpack(_logo_scoring_inputs),
    output:
        f"{RESULTS}/{{study}}/cv/chunks/{{fit}}/{{chunk}}.parquet",
    params:
        args=_score_args,
        chunks=lambda w: S.cv_fit_chunks(config, w.study, w.fit),
        code=CODE,
    log:
        log_path("cv_{fit}_{chunk}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "hierpipe cv {input.data} {params.args} --chunk {wildcards.chunk} --chunks {params.chunks}"
        " --out {output} > {log} 2>&1"


rule cv_fit:
    input:
        unpack(logo_inputs),
    output:
        f"{RESULTS}/{{study}}/cv/{{fit}}.parquet",
    params:
        command=logo_command,
        code=CODE,
    log:
        log_path("cv_{fit}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "{params.command} --out {output} > {log} 2>&1"


# --------------------------------------------------------------- within-group K-fold


def kfold_inputs(w):
    k = S.kfold_chunks(config, w.study, w.fit)
    return {"chunks": _chunk_paths("kfold_chunks", w, k)} if k > 1 else {"data": data_path(w)}


def kfold_command(wildcards, input):
    w = wildcards
    if S.kfold_chunks(config, w.study, w.fit) > 1:
        return "hierpipe cv-gather " + " ".join(shlex.quote(p) for p in input.chunks)
    args = _score_args(w, folds=S.kfold_folds(config, w.study))
    return f"hierpipe cv-kfold {shlex.quote(input.data)} {args} --chunk 0 --chunks 1"


rule kfold_chunk:
    input:
        data=data_path,
    output:
        f"{RESULTS}/{{study}}/cv/kfold_chunks/{{fit}}/{{chunk}}.parquet",
    params:
        args=lambda w: _score_args(w, folds=S.kfold_folds(config, w.study)),
        chunks=lambda w: S.kfold_chunks(config, w.study, w.fit),
        code=CODE,
    log:
        log_path("kfold_{fit}_{chunk}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "hierpipe cv-kfold {input.data} {params.args} --chunk {wildcards.chunk}"
        " --chunks {params.chunks} --out {output} > {log} 2>&1"


rule kfold_fit:
    input:
        unpack(kfold_inputs),
    output:
        f"{RESULTS}/{{study}}/cv/kfold/{{fit}}.parquet",
    params:
        command=kfold_command,
        code=CODE,
    log:
        log_path("kfold_{fit}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "{params.command} --out {output} > {log} 2>&1"


# --------------------------------------------------------------- comparison


rule cv_compare:
    input:
        logo=lambda w: [f"{RESULTS}/{w.study}/cv/{f}.parquet" for f in S.cv_fits(config, w.study)],
        kfold=lambda w: [
            f"{RESULTS}/{w.study}/cv/kfold/{f}.parquet" for f in S.kfold_fits(config, w.study)
        ],
    output:
        f"{RESULTS}/{{study}}/cv/comparison.parquet",
    log:
        log_path("cv_compare.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "hierpipe cv-compare {input.logo} --kfold {input.kfold} --out {output} > {log} 2>&1"
