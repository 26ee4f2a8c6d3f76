rule report:
    conda:
        CONDA_ENV
    input:
        unpack(report_inputs),
    output:
        f"{RESULTS}/{{study}}/report.html",
    params:
        study_config=lambda w: json.dumps(S.study(config, w.study), sort_keys=True),
        seed=lambda w: S.study_seed(config, w.study),
        study_dir=lambda w: f"{RESULTS}/{w.study}",
        code=CODE_REPORT,
    log:
        log_path("report.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m hierpipe.cli report {params.study_dir} --study {wildcards.study}"
        " --config-json {params.study_config:q} --seed {params.seed} --out {output} > {log} 2>&1"


rule index:
    conda:
        CONDA_ENV
    input:
        expand(f"{RESULTS}/{{study}}/report.html", study=STUDIES),
    output:
        f"{RESULTS}/index.html",
    log:
        f"{RESULTS}/logs/index.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "python -m hierpipe.cli index {input} --out {output} > {log} 2>&1"
