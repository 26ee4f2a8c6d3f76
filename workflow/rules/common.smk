import re

from hierpipe import studies as S
from hierpipe.provenance import source_hash

RESULTS = config.get("results", "results")
STUDIES = sorted(config["studies"])
# Code hashes as params, so changed code reruns exactly the rules that run it.
CODE_DATA = source_hash("data/", "design.py", "formula.py", "io.py", "seeds.py", "cli.py")
CODE = source_hash(exclude=("report/",))
CODE_REPORT = source_hash("report/")


def alternation(names):
    """A regex matching exactly these names (none: a pattern that matches nothing)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!x)x"


SIMULATED = [s for s in STUDIES if S.data_source(config, s) == "simulate"]
INGESTED = [s for s in STUDIES if S.data_source(config, s) == "file"]
SHARED = [s for s in STUDIES if S.data_source(config, s) == "study"]
for _s in SHARED:
    S.data_origin(config, _s)  # fails at load time on unknown or cyclic links
for _s in STUDIES:
    S.compare_with(config, _s)  # fails at load time on an unknown or unrelated companion
ALL_FITS = sorted({f for s in STUDIES for f in S.fits(config, s)})
SAMPLER_FITS = sorted(S.SAMPLERS)
POINT_FITS = sorted(set(ALL_FITS) - S.SAMPLERS)


wildcard_constraints:
    study=alternation(STUDIES),
    fit=alternation(ALL_FITS),
    chunk=r"\d+",


def data_path(wildcards):
    return f"{RESULTS}/{wildcards.study}/data.parquet"


def log_path(*parts):
    return "/".join([RESULTS, "{study}", "logs", *parts])
