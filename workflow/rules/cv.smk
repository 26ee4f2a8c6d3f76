# Cross-validation (hierpipe.cv): leave-one-group-out (new groups) and
# within-group K-fold (new observations of known groups), then one comparison.
# A fit whose folds each refit a sampler is split into cv.chunks jobs that run
# in parallel and are gathered; every other fit is scored by one job that
# writes its table directly (fewer jobs: start-up dominates cheap folds).

for _s in STUDIES:
    for _f in S.cv_fits(config, _s):
        S.cv_method(config, _s, _f)  # fails at load time on psis for a point fit


rule cv_chunk:
    conda:
        CONDA_ENV
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
        "python -m hierpipe.cli cv {input.data} {params.args} --chunk {wildcards.chunk} --chunks {params.chunks}"
        " --out {output} > {log} 2>&1"


rule cv_fit:
    conda:
        CONDA_ENV
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


rule kfold_chunk:
    conda:
        CONDA_ENV
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
        "python -m hierpipe.cli cv-kfold {input.data} {params.args} --chunk {wildcards.chunk}"
        " --chunks {params.chunks} --out {output} > {log} 2>&1"


rule kfold_fit:
    conda:
        CONDA_ENV
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
    conda:
        CONDA_ENV
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
        "python -m hierpipe.cli cv-compare {input.logo} --kfold {input.kfold} --out {output} > {log} 2>&1"
