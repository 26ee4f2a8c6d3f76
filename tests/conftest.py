"""Test-wide settings: one BLAS thread, as every workflow job runs.

Set before numpy is first imported, so dense-algebra references do not
oversubscribe the cores, and subprocesses (Snakemake runs) inherit it.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
