# hierpipe: one reproducible hierarchical-model study per config entry.
# Thin on purpose: everything that computes lives in the hierpipe package.
from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "config/config.yaml"


# Jobs import hierpipe from this checkout, also inside a conda env without it installed.
shell.prefix(f"export PYTHONPATH='{workflow.basedir}'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/diagnose.smk"
include: "workflow/rules/cv.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/sbc.smk"


rule all:
    input:
        expand(f"{RESULTS}/{{study}}/report.html", study=STUDIES),
        f"{RESULTS}/index.html",
    default_target: True
