# Simulation-based calibration of the samplers (hierpipe.sbc), run on demand:
#   snakemake --cores 8 sbc
# Not part of `all`. Sizes come from the config's top-level `sbc:` block
# (defaults: hierpipe.sbc.core.SBC_DEFAULTS); each case's replications are split
# into `chunks` jobs, and results/sbc/report.html shows rank histograms and ECDF
# bands of every case.
from hierpipe.sbc.core import SBC_DEFAULTS, cases as sbc_cases

SBC = {**SBC_DEFAULTS, **config.get("sbc", {})}
SBC_CASES = list(SBC["cases"] or sbc_cases())
SBC_DIR = f"{RESULTS}/sbc"
# Fail when the workflow loads, not after the calibration jobs have run.
_unknown = sorted(set(SBC_CASES) - set(sbc_cases()))
if _unknown:
    raise ValueError(f"sbc.cases: unknown case '{_unknown[0]}' (known: {', '.join(sbc_cases())})")
if (SBC["draws"] + 1) % SBC["bins"]:
    raise ValueError(f"sbc.bins ({SBC['bins']}) must divide sbc.draws + 1 ({SBC['draws'] + 1})")


rule sbc_chunk:
    conda:
        CONDA_ENV
    output:
        f"{SBC_DIR}/{{case}}/{{sbc_chunk}}.parquet",
    params:
        replications=SBC["replications"],
        chunks=SBC["chunks"],
        draws=SBC["draws"],
        thin=SBC["thin"],
        warmup=SBC["warmup"],
        seed=SBC.get("seed", config.get("seed", 42)),
        code=CODE,
    wildcard_constraints:
        case=alternation(SBC_CASES),
        sbc_chunk=r"\d+",
    log:
        f"{SBC_DIR}/logs/{{case}}_{{sbc_chunk}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m hierpipe.cli sbc --case {wildcards.case} --replications {params.replications}"
        " --chunk {wildcards.sbc_chunk} --chunks {params.chunks} --draws {params.draws}"
        " --thin {params.thin} --warmup {params.warmup} --seed {params.seed} --out {output}"
        " > {log} 2>&1"


rule sbc_report:
    conda:
        CONDA_ENV
    input:
        expand(
            f"{SBC_DIR}/{{case}}/{{sbc_chunk}}.parquet",
            case=SBC_CASES,
            sbc_chunk=range(SBC["chunks"]),
        ),
    output:
        f"{SBC_DIR}/report.html",
    params:
        bins=SBC["bins"],
        code=CODE,
    log:
        f"{SBC_DIR}/logs/report.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m hierpipe.cli sbc-report {input} --bins {params.bins} --out {output} > {log} 2>&1"


rule sbc:
    conda:
        CONDA_ENV
    input:
        f"{SBC_DIR}/report.html",
    localrule: True
