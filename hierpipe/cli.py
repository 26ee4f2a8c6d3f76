"""The ``hierpipe`` command line: thin shells around library functions.

User errors (:class:`~hierpipe.errors.HierpipeError`) become one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

# Pin BLAS/OpenMP threads before numpy loads: one thread a job, so floats do not
# depend on --cores (reductions split across threads round differently).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from hierpipe.errors import ConfigError, HierpipeError  # noqa: E402


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parse_columns(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--column expects name=source_column, got '{item}'")
        out[key] = value
    return out


def _settings(text: str | None, option: str = "--settings") -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return value


def cmd_simulate(args: argparse.Namespace) -> None:
    from hierpipe.data.simulate import simulate
    from hierpipe.io import write_parquet
    from hierpipe.seeds import derive_rng

    rng = derive_rng(args.seed, *args.key, "data")
    sim = simulate(args.design, rng, **_parse_sets(args.set))
    write_parquet(sim.data, args.out)
    if args.truth:
        write_parquet(sim.truth, args.truth)
    print(f"simulated {len(sim.data)} rows with design {args.design} into {args.out}")


def cmd_ingest(args: argparse.Namespace) -> None:
    from hierpipe.data.ingest import ingest
    from hierpipe.io import read_table, write_parquet

    df = read_table(args.file)
    effect_size = _settings(args.effect_size, "--effect-size") or None
    out = ingest(
        df,
        args.formula,
        columns=_parse_columns(args.column),
        source=str(args.file),
        effect_size=effect_size,
    )
    write_parquet(out, args.out)
    print(f"ingested {len(out)} rows from {args.file} into {args.out}")


def cmd_copy(args: argparse.Namespace) -> None:
    from hierpipe.io import read_table_bytes, write_bytes

    write_bytes(read_table_bytes(args.src), args.dst)
    print(f"copied {args.src} to {args.dst}")


def cmd_fit(args: argparse.Namespace) -> None:
    from hierpipe.io import read_table, write_json, write_parquet
    from hierpipe.models.fitting import fit_table
    from hierpipe.provenance import source_hash, versions
    from hierpipe.seeds import derive_rng

    settings = _settings(args.settings)
    for name in ("chains", "warmup", "draws"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    keys = args.key or [args.fit]
    rng = derive_rng(args.seed, *keys)
    df = read_table(args.data)
    # A start line in the job's log: says what runs (and marks that it started).
    print(f"fitting {args.fit} to {len(df)} rows of {args.data}", flush=True)
    start = time.perf_counter()
    result = fit_table(
        df, args.formula, args.fit, settings=settings, rng=rng, source=str(args.data)
    )
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    write_parquet(result.summary, out / "summary.parquet")
    if result.draws is not None:
        write_parquet(result.draws, out / "draws.parquet")
    info = {
        "method": args.fit,
        "formula": args.formula,
        "data": str(args.data),
        "seed": args.seed,
        "seed_keys": keys,
        "seconds": round(elapsed, 4),
        "code": source_hash(),
        "versions": versions(),
        **result.info,
    }
    write_json(info, out / "fit.json")
    for w in result.info.get("warnings", []):
        print(f"warning: {w}")
    print(f"fitted {args.fit} in {elapsed:.3f} s into {out}")


def cmd_diagnose(args: argparse.Namespace) -> None:
    from hierpipe.diagnostics.checks import diagnose_fit

    diagnose_fit(
        args.data,
        args.formula,
        Path(args.fit_dir),
        Path(args.out),
        seed=args.seed,
        keys=args.key,
    )
    print(f"diagnostics written to {args.out}")


def cmd_convergence(args: argparse.Namespace) -> None:
    from hierpipe.diagnostics.checks import convergence_table
    from hierpipe.io import write_parquet

    table = convergence_table(Path(args.draws))
    write_parquet(table, args.out)
    print(f"convergence of {len(table)} parameters written to {args.out}")


def cmd_cv(args: argparse.Namespace) -> None:
    from hierpipe.cv.folds import run_chunk
    from hierpipe.io import read_table, write_parquet

    if not 0 <= args.chunk < args.chunks:
        raise ConfigError(f"--chunk must lie in 0..{args.chunks - 1}, got {args.chunk}")
    df = read_table(args.data)
    table = run_chunk(
        df,
        args.formula,
        args.fit,
        chunk=args.chunk,
        chunks=args.chunks,
        settings=_settings(args.settings),
        seed=args.seed,
        keys=args.key,
        source=str(args.data),
        cv_method=args.method,
        draws=read_table(args.draws) if args.draws else None,
    )
    write_parquet(table, args.out)
    print(f"scored {len(table)} held-out groups into {args.out}")


def cmd_cv_kfold(args: argparse.Namespace) -> None:
    from hierpipe.cv.kfold import run_kfold
    from hierpipe.io import read_table, write_parquet

    if not 0 <= args.chunk < args.chunks:
        raise ConfigError(f"--chunk must lie in 0..{args.chunks - 1}, got {args.chunk}")
    table = run_kfold(
        read_table(args.data),
        args.formula,
        args.fit,
        folds=args.folds,
        fold_seed=args.fold_seed,
        chunk=args.chunk,
        chunks=args.chunks,
        settings=_settings(args.settings),
        seed=args.seed,
        keys=args.key,
        source=str(args.data),
    )
    write_parquet(table, args.out)
    print(f"scored {len(table)} held-out (group, fold) blocks into {args.out}")


def cmd_cv_gather(args: argparse.Namespace) -> None:
    from hierpipe.cv.folds import gather
    from hierpipe.io import write_parquet

    write_parquet(gather(args.chunks), args.out)


def cmd_cv_compare(args: argparse.Namespace) -> None:
    from hierpipe.cv.compare import compare
    from hierpipe.io import write_parquet

    write_parquet(compare(args.files, args.kfold), args.out)


def cmd_report(args: argparse.Namespace) -> None:
    from hierpipe.report.render import render_study

    render_study(
        Path(args.study_dir), args.study, json.loads(args.config_json), args.seed, Path(args.out)
    )
    print(f"report written to {args.out}")


def cmd_index(args: argparse.Namespace) -> None:
    from hierpipe.report.render import render_index

    render_index([Path(p) for p in args.reports], Path(args.out))


def cmd_sbc(args: argparse.Namespace) -> None:
    from hierpipe.io import write_parquet
    from hierpipe.sbc.core import SBCSettings, chunk_bounds, get_case, run_case
    from hierpipe.seeds import derive_rng

    case = get_case(args.case)
    first, count = chunk_bounds(args.replications, args.chunk, args.chunks)
    settings = SBCSettings(draws=args.draws, thin=args.thin, warmup=args.warmup)
    rng = derive_rng(args.seed, "sbc", args.case, args.chunk)
    table = run_case(case, count, settings, rng, first=first)
    write_parquet(table, args.out)
    print(f"sbc {args.case}: ranks of {count} replications into {args.out}")


def cmd_sbc_report(args: argparse.Namespace) -> None:
    from hierpipe.sbc.report import render_sbc_report

    render_sbc_report(args.ranks, args.out, bins=args.bins)
    print(f"sbc report written to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hierpipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate a data set with known truth")
    s.add_argument("--design", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--truth", help="also write the true parameters here")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--key", action="append", default=[], help="seed spawn key (repeatable)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("ingest", help="validate a user's CSV/parquet into the canonical table")
    s.add_argument("file")
    s.add_argument("--formula", required=True)
    s.add_argument("--column", action="append", default=[], metavar="NAME=SOURCE")
    s.add_argument("--effect-size", help="JSON object: effect sizes to compute (data.effect_size)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("copy", help="copy a result file atomically (shared data sets)")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(func=cmd_copy)

    s = sub.add_parser("fit", help="fit one model by one method")
    s.add_argument("data")
    s.add_argument("--formula", required=True)
    s.add_argument("--fit", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--key", action="append", default=[])
    s.add_argument("--settings", help="JSON object of method settings")
    s.add_argument("--chains", type=int)
    s.add_argument("--warmup", type=int)
    s.add_argument("--draws", type=int)
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("diagnose", help="shrinkage, ICC and checks of one fit")
    s.add_argument("data")
    s.add_argument("--formula", required=True)
    s.add_argument("--fit-dir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--key", action="append", default=[], help="seed spawn key (repeatable)")
    s.set_defaults(func=cmd_diagnose)

    s = sub.add_parser("convergence", help="R-hat, ESS and MCSE of a sampler's draws")
    s.add_argument("draws")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_convergence)

    s = sub.add_parser("cv", help="leave-one-group-out scores of one chunk of folds")
    s.add_argument("data")
    s.add_argument("--formula", required=True)
    s.add_argument("--fit", required=True)
    s.add_argument("--chunk", type=int, default=0)
    s.add_argument("--chunks", type=int, default=1)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--key", action="append", default=[])
    s.add_argument("--settings")
    s.add_argument(
        "--method",
        choices=["exact", "psis"],
        default="exact",
        help="exact refits, or PSIS on the fit's draws with exact fallback",
    )
    s.add_argument("--draws", help="the fit's draws.parquet (for --method psis)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_cv)

    s = sub.add_parser("cv-kfold", help="within-group K-fold scores of one chunk of folds")
    s.add_argument("data")
    s.add_argument("--formula", required=True)
    s.add_argument("--fit", required=True)
    s.add_argument("--folds", type=int, required=True)
    s.add_argument("--fold-seed", type=int, help="seed of the fold assignment (default --seed)")
    s.add_argument("--chunk", type=int, default=0)
    s.add_argument("--chunks", type=int, default=1)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--key", action="append", default=[])
    s.add_argument("--settings")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_cv_kfold)

    s = sub.add_parser("cv-gather", help="join the chunks of one fit's folds")
    s.add_argument("chunks", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_cv_gather)

    s = sub.add_parser("cv-compare", help="elpd and errors per fit, with standard errors")
    s.add_argument("files", nargs="*", help="leave-one-group-out tables, one a fit")
    s.add_argument("--kfold", nargs="*", default=[], help="within-group K-fold tables")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_cv_compare)

    s = sub.add_parser("report", help="render a study's HTML report")
    s.add_argument("study_dir")
    s.add_argument("--study", required=True)
    s.add_argument("--config-json", default="{}")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("index", help="render results/index.html linking every study")
    s.add_argument("reports", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("sbc", help="simulation-based calibration: ranks of one chunk of a case")
    s.add_argument("--case", required=True)
    s.add_argument("--replications", type=int, required=True, help="of the whole case")
    s.add_argument("--chunk", type=int, default=0)
    s.add_argument("--chunks", type=int, default=1)
    s.add_argument("--draws", type=int, default=99)
    s.add_argument("--thin", type=int, default=3)
    s.add_argument("--warmup", type=int, default=500)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_sbc)

    s = sub.add_parser("sbc-report", help="render the SBC report from rank tables")
    s.add_argument("ranks", nargs="+")
    s.add_argument("--bins", type=int, default=20)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_sbc_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hierpipe`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HierpipeError as exc:
        print(f"hierpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hierpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
