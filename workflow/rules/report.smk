import json


def report_inputs(wildcards):
    s = wildcards.study
    fits = S.fits(config, s)
    files = {"data": f"{RESULTS}/{s}/data.parquet"}
    for f in fits:
        files[f"summary_{f}"] = f"{RESULTS}/{s}/fits/{f}/summary.parquet"
        files[f"info_{f}"] = f"{RESULTS}/{s}/fits/{f}/fit.json"
        files[f"checks_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/checks.json"
        for name in ("ppc", "ppc_overall", "residuals", "shrinkage"):
            files[f"{name}_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/{name}.parquet"
    for f in S.sampler_fits(config, s):
        files[f"convergence_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/convergence.parquet"
        files[f"prior_{f}"] = f"{RESULTS}/{s}/diagnostics/{f}/prior_predictive.parquet"
    if S.cv_fits(config, s) or S.kfold_fits(config, s):
        files["cv"] = f"{RESULTS}/{s}/cv/comparison.parquet"
    if S.is_simulated(config, s):
        files["truth"] = f"{RESULTS}/{s}/truth.parquet"
    other = S.compare_with(config, s)
    if other:
        for f in S.fits(config, other):
            files[f"companion_summary_{f}"] = f"{RESULTS}/{other}/fits/{f}/summary.parquet"
            files[f"companion_info_{f}"] = f"{RESULTS}/{other}/fits/{f}/fit.json"
    return files


rule report:
    input:
        unpack(report_inputs),
    output:
        f"{RESULTS}/{{study}}/report.html",
    params:
        study_config=lambda w: json.dumps(S.study(config, w.study), sort_keys=True),
        seed=lambda w: S.study_seed(config, w.study),
        code=CODE_REPORT,
    log:
        log_path("report.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "hierpipe report {RESULTS}/{wildcards.study} --study {wildcards.study}"
        " --config-json {params.study_config:q} --seed {params.seed} --out {output} > {log} 2>&1"


rule index:
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
        "hierpipe index {input} --out {output} > {log} 2>&1"
