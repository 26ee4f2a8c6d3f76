# One diagnose job a fit: it reads the data once and writes every check of the
# fit (hierpipe.diagnostics.checks). Sampler fits also get convergence and the
# prior predictive check, from their draws.
DIAG = f"{RESULTS}/{{study}}/diagnostics/{{fit}}"
DIAGNOSE_SHELL = (
    "hierpipe diagnose {input.data} --formula {params.formula:q} --fit-dir {params.fitdir}"
    " --out {params.outdir} --seed {params.seed} --key {wildcards.study} --key {wildcards.fit}"
    " > {log} 2>&1"
)


def diagnose_params():
    return dict(
        formula=lambda w: S.study(config, w.study)["formula"],
        outdir=lambda w: f"{RESULTS}/{w.study}/diagnostics/{w.fit}",
        fitdir=lambda w: f"{RESULTS}/{w.study}/fits/{w.fit}",
        seed=lambda w: S.fit_seed(config, w.study, w.fit),
        code=CODE,
    )


def diagnose_outputs():
    return dict(
        shrinkage=f"{DIAG}/shrinkage.parquet",
        checks=f"{DIAG}/checks.json",
        ppc=f"{DIAG}/ppc.parquet",
        ppc_overall=f"{DIAG}/ppc_overall.parquet",
        residuals=f"{DIAG}/residuals.parquet",
    )


rule diagnose:
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
