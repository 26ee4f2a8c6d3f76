import shlex

rule simulate:
    conda:
        CONDA_ENV
    output:
        data=f"{RESULTS}/{{study}}/data.parquet",
        truth=f"{RESULTS}/{{study}}/truth.parquet",
    params:
        design=lambda w: S.study(config, w.study)["data"]["simulate"]["design"],
        sets=lambda w: S.simulate_args(config, w.study),
        seed=lambda w: S.study_seed(config, w.study),
        code=CODE_DATA,
    wildcard_constraints:
        study=alternation(SIMULATED),
    log:
        log_path("simulate.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m hierpipe.cli simulate --design {params.design} --out {output.data} --truth {output.truth}"
        " --seed {params.seed} --key {wildcards.study} {params.sets} > {log} 2>&1"


rule ingest:
    conda:
        CONDA_ENV
    input:
        lambda w: S.study(config, w.study)["data"]["file"],
    output:
        f"{RESULTS}/{{study}}/data.parquet",
    params:
        formula=lambda w: S.study(config, w.study)["formula"],
        columns=lambda w: " ".join(
            # quoted: file column names may hold spaces ("School ID")
            f"--column {shlex.quote(f'{k}={v}')}"
            for k, v in sorted(S.study(config, w.study)["data"].get("columns", {}).items())
        ),
        effect_size=lambda w: S.effect_size_json(config, w.study),
        code=CODE_DATA,
    wildcard_constraints:
        study=alternation(INGESTED),
    log:
        log_path("ingest.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m hierpipe.cli ingest {input:q} --formula {params.formula:q} {params.columns}"
        " --effect-size {params.effect_size:q} --out {output} > {log} 2>&1"


rule share_data:
    conda:
        CONDA_ENV
    input:
        lambda w: f"{RESULTS}/{S.study(config, w.study)['data']['study']}/data.parquet",
    output:
        f"{RESULTS}/{{study}}/data.parquet",
    wildcard_constraints:
        study=alternation(SHARED),
    log:
        log_path("share_data.log"),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "python -m hierpipe.cli copy {input} {output} > {log} 2>&1"


rule share_truth:
    conda:
        CONDA_ENV
    input:
        lambda w: f"{RESULTS}/{S.study(config, w.study)['data']['study']}/truth.parquet",
    output:
        f"{RESULTS}/{{study}}/truth.parquet",
    wildcard_constraints:
        study=alternation(SHARED),
    log:
        log_path("share_truth.log"),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "python -m hierpipe.cli copy {input} {output} > {log} 2>&1"
