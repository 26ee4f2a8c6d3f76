def cv_chunk_files(wildcards):
    k = S.cv_chunks(config, wildcards.study)
    return [f"{RESULTS}/{wildcards.study}/cv/chunks/{wildcards.fit}/{i}.parquet" for i in range(k)]


rule cv_chunk:
    input:
        data=data_path,
    output:
        f"{RESULTS}/{{study}}/cv/chunks/{{fit}}/{{chunk}}.parquet",
    params:
        formula=lambda w: S.study(config, w.study)["formula"],
        settings=lambda w: S.fit_settings_json(config, w.study, w.fit),
        seed=lambda w: S.study_seed(config, w.study),
        chunks=lambda w: S.cv_chunks(config, w.study),
        code=CODE,
    log:
        log_path("cv_{fit}_{chunk}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "hierpipe cv {input.data} --formula {params.formula:q} --fit {wildcards.fit}"
        " --chunk {wildcards.chunk} --chunks {params.chunks} --seed {params.seed}"
        " --key {wildcards.study} --settings {params.settings:q} --out {output} > {log} 2>&1"


rule cv_fit:
    input:
        cv_chunk_files,
    output:
        f"{RESULTS}/{{study}}/cv/{{fit}}.parquet",
    log:
        log_path("cv_{fit}.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "hierpipe cv-gather {input} --out {output} > {log} 2>&1"


rule cv_compare:
    input:
        lambda w: [f"{RESULTS}/{w.study}/cv/{f}.parquet" for f in S.cv_fits(config, w.study)],
    output:
        f"{RESULTS}/{{study}}/cv/comparison.parquet",
    log:
        log_path("cv_compare.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "hierpipe cv-compare {input} --out {output} > {log} 2>&1"
