"""The publishing side of the command line: ``ifbench export``, ``ifbench run --against`` and
``ifbench leaderboard --records``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import ConfigError, load_suite, with_overrides
from bench.preflight import check_device, check_writable, slug
from bench.preflight import split_names as _names


def add_export_parser(sub: Any) -> None:
    export = sub.add_parser("export", help="publish a results folder: leaderboard, records and ground truth as data")
    export.add_argument("--results", type=Path, required=True, help="the folder the suite ran in")
    export.add_argument("--out", type=Path, default=Path("leaderboard"), help="where to publish (default: leaderboard)")
    export.add_argument("--suite", help="the suite that ran (default: the one the records name)")
    export.add_argument("--no-figures", action="store_true")
    export.add_argument("--push", metavar="NAME", help="then upload it to the hub dataset NAME (needs network access)")


def cmd_export(args: argparse.Namespace) -> int:
    from bench.export import export
    from bench.store import FolderBusyError, shared

    if not (args.results / "records.jsonl").exists():
        raise ConfigError(f"no results in {args.results} (records.jsonl is missing): run `ifbench run` first")
    try:
        with shared(args.results):
            summary = export(args.results, args.out, suite=args.suite, with_figures=not args.no_figures)
    except FolderBusyError as err:
        raise ConfigError(str(err)) from None
    print(f"ifbench: published {args.out}: {summary.truths} ground truths, {summary.shipped_models} base models' "
          f"weights, {summary.fingerprinted_models} fingerprinted; {summary.total_bytes / 1e6:.1f} MB in all",
          file=sys.stderr)
    if args.push:
        from bench.published import push

        sent = push(args.out, args.push)
        print(f"ifbench: pushed {len(sent) - 1} ground truths and the folder to the hub dataset {args.push}",
              file=sys.stderr)
    return 0


def keep_suite(source: str, results: Path) -> None:
    """The suite's TOML beside the records (``results/suite.toml``), for ``ifbench export`` and provenance."""
    from bench.atomic import atomic_write
    from bench.export import SUITE_FILE, suite_text

    text = suite_text(source)
    atomic_write(results / SUITE_FILE, lambda p: p.write_text(text))


def run_against(args: argparse.Namespace, execute: Callable[..., int]) -> int:
    """``ifbench run --against PUBLISHED --estimators ...``: the published suite and truths, only these
    estimators fitted and scored, the published leaderboard rendered with their rows among the published ones."""
    from bench.heartbeat import heartbeat
    from bench.published import check_keys, open_published, seed_folder

    if not args.estimators:
        raise ConfigError("--against scores the estimators you name against the published truth: give --estimators")
    if args.suite is not None:
        raise ConfigError("--against runs the published suite (its suite.toml); leave out --suite")
    for flag in ("seed", "threads", "device"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--against keeps the published {flag}: leave out --{flag} (it is part of every key)")
    with heartbeat("ifbench: checking the published leaderboard", enabled=not args.no_progress):
        published = open_published(args.against)
        suite = with_overrides(load_suite(str(published.suite_path)), tasks=_names(args.tasks),
                               estimators=_names(args.estimators), isolate=args.isolate,
                               cell_timeout_s=args.cell_timeout_s, cell_memory_mb=args.cell_memory_mb,
                               workers=args.workers)
        check_device(suite.device)
        from bench.catalog import default_registries
        from bench.planning import plan_suite

        registries = default_registries(args.plugin)
        registries.protocols.check(_names(args.protocols) or ())
        plan = plan_suite(with_overrides(suite, protocols=_names(args.protocols)), registries)
        check_keys(published, plan)
        results = args.results or Path("results") / f"against-{slug(suite.name)}"
        check_writable(results)
        seeded = seed_folder(published, results, rescored={e.name for e in plan.estimators})
    print(f"ifbench: scoring {', '.join(e.name for e in plan.estimators)} against {published.root} "
          f"({len(published.manifest['truths'])} published ground truths"
          + (f"; {seeded} published records" if seeded else "") + f") → {results}", file=sys.stderr)
    return execute(plan, results, args, published=published)


def write_board(args: argparse.Namespace) -> Path:
    """The leaderboard (and with ``--records`` the records and measurements shown) from ``args.results``."""
    from bench.leaderboard import write_leaderboard

    out = write_leaderboard(args.results, args.out or args.results / "leaderboard.md", with_figures=not args.no_figures)
    if args.records:
        import shutil

        from bench import peers_report, scaling_report
        from bench.pooling import select_latest
        from bench.store import ResultsStore, write_records

        write_records(out.parent / "records.jsonl", select_latest(ResultsStore(args.results).records()))
        for name in (scaling_report.PROFILE_FILE, peers_report.PEERS_FILE):  # the scaling and peers sections' measurements
            source = args.results / name
            if source.exists() and source.resolve() != (out.parent / name).resolve():
                shutil.copyfile(source, out.parent / name)
    return out
