"""Reading user tables and writing results atomically.

Every write goes to a temporary file in the destination folder and is then
renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted
run never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hierpipe.errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open()
        # would, so results stay readable by the group on shared file systems.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    """The process's umask (reading it means setting it; the CLI is single-threaded)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``df`` as parquet, deterministically (no pandas index, no timestamps)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    # pandas metadata embeds library versions; drop it so bytes depend on data alone.
    table = table.replace_schema_metadata(None)
    _write_with(path, lambda p: pq.write_table(table, p, compression="zstd"))


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as indented, key-sorted JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    write_text(text + "\n", path)


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a text file atomically."""
    _write_with(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write a binary file atomically."""
    _write_with(path, lambda p: p.write_bytes(data))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_table_bytes(path: str | os.PathLike[str]) -> bytes:
    """The raw bytes of a file, with a one-line error when it is missing."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    return p.read_bytes()


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV or parquet file, with one-line errors for people.

    Group-like text columns stay strings; numbers are parsed by pandas.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected a CSV or parquet file")
    suffix = p.suffix.lower()
    try:
        if suffix in {".parquet", ".pq"}:
            df = pd.read_parquet(p)
        elif suffix in {".csv", ".txt", ".tsv"}:
            sep = "\t" if suffix == ".tsv" else ","
            df = pd.read_csv(p, sep=sep, keep_default_na=True)
        else:
            raise InputError(f"{p}: unknown file type '{suffix}', expected .csv or .parquet")
    except InputError:
        raise
    except pd.errors.EmptyDataError:
        raise InputError(f"{p}: file is empty") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{p}: cannot be read as {suffix[1:]} ({first})") from None
    if df.shape[0] == 0:
        raise InputError(f"{p}: file has no rows")
    return df
