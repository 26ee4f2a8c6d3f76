"""Derived seeds: every job's generator is a pure function of config and names.

Seeds are never drawn from time, job order or Python's salted ``hash()``. A job's
generator is ``numpy.random.default_rng(SeedSequence(seed, spawn_key=keys))``
where each key is a stable 32-bit hash (BLAKE2b) of a name such as the study,
the fit or the fold, so one fit's seed never depends on another's.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stable_key(name: str | int) -> int:
    """Map a name to a 32-bit integer that is the same on every machine and run."""
    digest = hashlib.blake2b(str(name).encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def derive_rng(seed: int, *names: str | int) -> np.random.Generator:
    """Generator for the job identified by ``names`` under the config ``seed``."""
    ss = np.random.SeedSequence(int(seed), spawn_key=tuple(stable_key(n) for n in names))
    return np.random.default_rng(ss)
