FIT_SHELL = (
    "python -m hierpipe.cli fit {input.data} --formula {params.formula:q} --fit {wildcards.fit}"
    " --out {params.outdir} --seed {params.seed} --key {wildcards.study} --key {wildcards.fit}"
    " --settings {params.settings:q} > {log} 2>&1"
)


rule fit_point:
    conda:
        CONDA_ENV
    input:
        data=data_path,
    output:
        summary=f"{RESULTS}/{{study}}/fits/{{fit}}/summary.parquet",
        info=f"{RESULTS}/{{study}}/fits/{{fit}}/fit.json",
    params:
        **fit_params(),
    wildcard_constraints:
        fit=alternation(POINT_FITS),
    log:
        log_path("fit_{fit}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        FIT_SHELL


rule fit_sampler:
    conda:
        CONDA_ENV
    input:
        data=data_path,
    output:
        summary=f"{RESULTS}/{{study}}/fits/{{fit}}/summary.parquet",
        info=f"{RESULTS}/{{study}}/fits/{{fit}}/fit.json",
        draws=f"{RESULTS}/{{study}}/fits/{{fit}}/draws.parquet",
    params:
        **fit_params(),
    wildcard_constraints:
        fit=alternation(SAMPLER_FITS),
    log:
        log_path("fit_{fit}.log"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        FIT_SHELL
