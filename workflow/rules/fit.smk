FIT_SHELL = (
    "hierpipe fit {input.data} --formula {params.formula:q} --fit {wildcards.fit}"
    " --out {params.outdir} --seed {params.seed} --key {wildcards.study} --key {wildcards.fit}"
    " --settings {params.settings:q} > {log} 2>&1"
)


def fit_params():
    return dict(
        formula=lambda w: S.study(config, w.study)["formula"],
        settings=lambda w: S.fit_settings_json(config, w.study, w.fit),
        seed=lambda w: S.fit_seed(config, w.study, w.fit),
        outdir=lambda w: f"{RESULTS}/{w.study}/fits/{w.fit}",
        code=CODE,
    )


rule fit_point:
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
