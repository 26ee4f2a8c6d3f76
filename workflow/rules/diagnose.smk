rule diagnose:
    input:
        data=data_path,
        summary=f"{RESULTS}/{{study}}/fits/{{fit}}/summary.parquet",
        info=f"{RESULTS}/{{study}}/fits/{{fit}}/fit.json",
    output:
        shrinkage=f"{RESULTS}/{{study}}/diagnostics/{{fit}}/shrinkage.parquet",
        checks=f"{RESULTS}/{{study}}/diagnostics/{{fit}}/checks.json",
    params:
        formula=lambda w: S.study(config, w.study)["formula"],
        outdir=lambda w: f"{RESULTS}/{w.study}/diagnostics/{w.fit}",
        fitdir=lambda w: f"{RESULTS}/{w.study}/fits/{w.fit}",
        code=CODE,
    log:
        log_path("diagnose_{fit}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "hierpipe diagnose {input.data} --formula {params.formula:q} --fit-dir {params.fitdir}"
        " --out {params.outdir} > {log} 2>&1"


rule convergence:
    input:
        draws=f"{RESULTS}/{{study}}/fits/{{fit}}/draws.parquet",
    output:
        f"{RESULTS}/{{study}}/diagnostics/{{fit}}/convergence.parquet",
    params:
        code=CODE,
    wildcard_constraints:
        fit=alternation(SAMPLER_FITS),
    log:
        log_path("convergence_{fit}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "hierpipe convergence {input.draws} --out {output} > {log} 2>&1"
