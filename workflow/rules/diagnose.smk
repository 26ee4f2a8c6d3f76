# One diagnose job a fit: it reads the data once and writes every check of the
# fit (hierpipe.diagnostics.checks). Sampler fits also get convergence and the
# prior predictive check, from their draws.
DIAG = f"{RESULTS}/{{study}}/diagnostics/{{fit}}"
DIAGNOSE_SHELL = (
    "python -m hierpipe.cli diagnose {input.data} --formula {params.formula:q} --fit-dir {params.fitdir}"
    " --out {params.outdir} --seed {params.seed} --key {wildcards.study} --key {wildcards.fit}"
    " > {log} 2>&1"
)


rule diagnose:
    conda:
        CONDA_ENV
    input:
        data=data_path,
        summary=f"{RESULTS}/{{study}}/fits/{{fit}}/summary.parquet",
        info=f"{RESULTS}/{{study}}/fits/{{fit}}/fit.json",
    output:
        **diagnose_outputs(),
    params:
        **diagnose_params(),
    wildcard_constraints:
        fit=alternation(POINT_FITS),
    log:
        log_path("diagnose_{fit}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        DIAGNOSE_SHELL


rule diagnose_sampler:
    conda:
        CONDA_ENV
    input:
        data=data_path,
        summary=f"{RESULTS}/{{study}}/fits/{{fit}}/summary.parquet",
        info=f"{RESULTS}/{{study}}/fits/{{fit}}/fit.json",
        draws=f"{RESULTS}/{{study}}/fits/{{fit}}/draws.parquet",
    output:
        **diagnose_outputs(),
        convergence=f"{DIAG}/convergence.parquet",
        prior_predictive=f"{DIAG}/prior_predictive.parquet",
    params:
        **diagnose_params(),
    wildcard_constraints:
        fit=alternation(SAMPLER_FITS),
    log:
        log_path("diagnose_{fit}.log"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        DIAGNOSE_SHELL
