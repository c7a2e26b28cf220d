"""The ``ifbench`` command line: run | list | leaderboard | export | check-estimator | throughput | profile | peers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cli_args, cli_published
from bench.config import ConfigError, load_suite, make_config, with_overrides
from bench.preflight import check_device, check_writable, slug, split_names
from bench.registry import RegistryError

#: Exit codes: 0 every cell of the plan ok or not applicable; 1 some cell of the plan is failed in the folder
#: (recorded); 2 refused before any work (bad name, option, value or path); 3 stopped: a cached θ̂ or ground
#: truth differs from what the folder's records were judged against; 130 interrupted (finished cells kept).
EXIT_FAILED_CELLS = 1
EXIT_USAGE = 2
EXIT_MIXED_TRUTH = 3
EXIT_INTERRUPTED = 130


_names = split_names


def _cmd_run(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["IFBENCH_DATA_DIR"] = str(args.data_dir)
    if args.against:
        return cli_published.run_against(args, _execute)
    suite = load_suite(args.suite or "default")  # a malformed suite is refused here, before torch is imported
    suite = with_overrides(suite, tasks=_names(args.tasks), estimators=_names(args.estimators), device=args.device,
                           seed=args.seed, threads=args.threads, isolate=args.isolate, cell_timeout_s=args.cell_timeout_s,
                           cell_memory_mb=args.cell_memory_mb, scheduler=args.scheduler,
                           workers=1 if args.scheduler and args.workers is None else args.workers)
    check_device(suite.device)
    from bench.heartbeat import heartbeat

    with heartbeat("ifbench: loading estimators, tasks and protocols", enabled=not args.no_progress):
        from bench.catalog import default_registries
        from bench.planning import plan_suite

        registries = default_registries(args.plugin)
        registries.protocols.check(_names(args.protocols) or ())  # a typo gets "did you mean" before narrowing
        suite = with_overrides(suite, protocols=_names(args.protocols))
        plan = plan_suite(suite, registries)  # validates everything, sizes against each task, before any write
    results = args.results or Path("results") / slug(suite.name)
    check_writable(results)
    cli_published.keep_suite(args.suite or "default", results)
    print(f"ifbench: suite {suite.name!r} · {len(plan.tasks)} task(s) × {len(plan.protocols)} protocol(s) × "
          f"{len(plan.estimators)} estimator(s) → {results}", file=sys.stderr)
    return _execute(plan, results, args)


def _execute(plan: Any, results: Path, args: argparse.Namespace, published: Any = None) -> int:
    """Run the plan into ``results`` under its lock and report the folder's state: exit non-zero while any
    cell of the plan is failed (this run's or an earlier one's). ``published``: scoring against it (--against)."""
    from bench.leaderboard import write_leaderboard
    from bench.runner import MixedTruthError, Runner
    from bench.store import FolderBusyError, ResultsStore, exclusive

    try:
        with exclusive(results):
            runner = Runner(plan, results, progress=not args.no_progress, retry_failed=args.retry_failed,
                            plugins=args.plugin, published=published is not None)
            summary = runner.run()
            board = write_leaderboard(results, results / "leaderboard.md")
    except FolderBusyError as err:
        raise ConfigError(str(err)) from None
    except MixedTruthError as err:
        print(f"ifbench: error: {err}", file=sys.stderr)
        return EXIT_MIXED_TRUTH
    except KeyboardInterrupt:
        kept = len(ResultsStore(results).latest())
        print(f"\nifbench: interrupted; {kept} cell(s) finished and kept in {results}; re-run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    for retried in summary.retried:
        print(f"  ran again: {retried}", file=sys.stderr)
    before = (f" ({summary.failed_before} of them failed: --retry-failed runs them again)"
              if summary.failed_before else "")
    print(f"ifbench: {summary.ran} cell(s) run, {summary.skipped} already finished{before}, {summary.failed} failed; "
          f"leaderboard: {board}", file=sys.stderr)
    for failure in summary.failures:
        print(f"  failed: {failure}", file=sys.stderr)
    if published is not None:
        from bench.published import holding

        for sentence in holding(published, runner.differing) or ["every published ground truth holds on this machine"]:
            print(f"ifbench: {sentence}", file=sys.stderr)
    failed = summary.failed + summary.failed_before
    if failed:
        print(f"ifbench: {failed} cell(s) of this plan are failed in {results}", file=sys.stderr)
    return EXIT_FAILED_CELLS if failed else 0


def _cmd_list(args: argparse.Namespace) -> int:
    from bench.catalog import default_registries

    registries = default_registries(args.plugin)
    for title, registry in (("estimators", registries.estimators), ("tasks", registries.tasks),
                            ("protocols", registries.protocols)):
        print(f"{title}:")
        width = max(map(len, registry.names()), default=0)
        for name in registry.names():
            obj = registry.get(name)
            doc = (obj.__doc__ or "").strip().splitlines()[0].replace("``", "") if obj.__doc__ else ""
            extra = f"  [{registry.origin(name)}]" if registry.origin(name) != "built-in" else ""
            print(f"  {name:<{width}}  {doc}{extra}")
            if hasattr(obj, "capabilities"):
                print(f"  {'':<{width}}  provides: {', '.join(sorted(obj.capabilities))}")
            if getattr(obj, "peer", ""):
                print(f"  {'':<{width}}  peer: runs {obj.peer}'s implementation of {obj.counterpart} "
                      "(pip install 'ifbench[peers]'; only when named, never through \"all\")")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.store import FolderBusyError, shared

    if not (args.results / "records.jsonl").exists():
        raise ConfigError(f"no results in {args.results} (records.jsonl is missing): run `ifbench run` first")
    try:
        with shared(args.results):
            out = cli_published.write_board(args)
    except FolderBusyError as err:
        raise ConfigError(str(err)) from None
    print(f"ifbench: wrote {out}", file=sys.stderr)
    return 0


def _cmd_throughput(args: argparse.Namespace) -> int:
    import torch

    from bench.catalog import default_registries
    from bench.throughput import markdown, measure
    from tasks.deep import SgdTask

    stacks = [int(size) for size in _names(args.stacks) or ()]
    if not stacks or min(stacks) < 1 or min(args.steps, args.repeats, args.workers) < 1:
        raise ConfigError(f"--stacks, --steps, --repeats and --workers must be ≥ 1, got {stacks}, {args.steps}, "
                          f"{args.repeats}, {args.workers}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
    registry = default_registries(entry_points=False).tasks
    names = _names(args.tasks) or []
    registry.check(names)
    torch.set_num_threads(args.threads)
    rows = []
    for name in names:
        cls = registry.get(name)
        if not issubclass(cls, SgdTask):
            raise ConfigError(f"task {name!r} is not trained by SGD (its retrains are exact): throughput measures "
                              "SGD tasks such as mnist-resnet and rt-bert")
        if args.preset not in cls.presets:
            raise ConfigError(f"unknown preset {args.preset!r} for task {name!r}. Valid presets: {', '.join(cls.presets)}")
        rows += measure(cls(cls.presets[args.preset], seed=0, device=args.device), stacks, steps=args.steps,
                        repeats=args.repeats, workers=args.workers)
    print(markdown(rows), end="")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from bench import scaling
    from bench.catalog import default_registries
    from bench.leaderboard import write_leaderboard
    from bench.planning import own_estimators

    registries = default_registries(args.plugin)
    registry = registries.estimators
    names = own_estimators(registries) if "all" in args.estimators else _names(args.estimators) or []
    registry.check(names)
    axes = _names(args.axes) or []
    if not axes or set(axes) - set(scaling.AXES):
        raise ConfigError(f"--axes must name some of {', '.join(scaling.AXES)}, got {' '.join(axes)}")
    config = scaling.SweepConfig()
    if args.repeats is not None:
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be ≥ 1, got {args.repeats}")
        config = dataclasses.replace(config, repeats=args.repeats)
    check_writable(args.results)
    torch.set_num_threads(args.threads)
    done = scaling.resumable(args.results, config, args.threads)  # an interrupted sweep goes on where it stopped
    if done:
        print(f"ifbench: resuming the sweep in {args.results} ({len(done)} point(s) already measured)", file=sys.stderr)
    points = scaling.sweep([(name, registry.get(name)) for name in names], axes, config, progress=not args.no_progress,
                           done=done, on_point=lambda so_far: scaling.save(so_far, config, args.results),
                           plugins=args.plugin)
    path = scaling.save(points, config, args.results)
    board = write_leaderboard(args.results, args.results / "leaderboard.md")
    print(f"ifbench: wrote {path} and {board}", file=sys.stderr)
    return 0


def _cmd_peers(args: argparse.Namespace) -> int:
    from bench import peers
    from bench.catalog import default_registries
    from bench.leaderboard import write_leaderboard

    registries = default_registries(entry_points=False)
    registry = registries.estimators
    adapters = [name for name in registry.names() if registry.get(name).peer]
    names = adapters if "all" in args.peers else _names(args.peers) or []
    registry.check(names)
    not_peers = [name for name in names if not registry.get(name).peer]
    if not_peers:
        raise ConfigError(f"not peer adapters: {', '.join(not_peers)}. Peer adapters: {', '.join(adapters)}")
    registries.tasks.check([args.task])
    task_cls = registries.tasks.get(args.task)
    if args.preset not in task_cls.presets:
        raise ConfigError(f"unknown preset {args.preset!r} for task {args.task!r}. Valid presets: "
                          f"{', '.join(task_cls.presets)}")
    if min(args.repeats, args.threads) < 1:
        raise ConfigError(f"--repeats and --threads must be ≥ 1, got {args.repeats}, {args.threads}")
    check_writable(args.results)
    pairs = [(registry.get(registry.get(name).counterpart), registry.get(name)) for name in names]

    def report(row: peers.PeerRow) -> None:
        outcome = row.error or f"ours {row.ours_s:.3g} s, peer {row.peer_s:.3g} s, agreement {row.agreement:.4f}"
        print(f"ifbench: {row.ours} vs {row.peer}: {outcome}", file=sys.stderr)

    rows = peers.compare(pairs, task_cls(task_cls.presets[args.preset], seed=0), threads=args.threads,
                         repeats=args.repeats, on_row=report)
    path = peers.save(rows, args.results, merge=args.merge)
    board = write_leaderboard(args.results, args.results / "leaderboard.md")
    print(f"ifbench: wrote {path} and {board}", file=sys.stderr)
    return 0


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=v", …]`` as suite-file options: each value read as TOML (a bare word that is not TOML is a string)."""
    import tomllib

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = text.strip()
    return options


def _cmd_check(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from bench.catalog import default_registries
    from bench.conformance import STEPS, check_estimator

    cls = default_registries(args.plugin).estimators.get(args.name)
    config = make_config(cls.Config, {**cls.check_options, **parse_options(args.option)}, f"estimator {args.name}")
    with tqdm(total=len(STEPS), desc=f"check {args.name}", unit="step", leave=False, disable=args.no_progress) as bar:
        def step(name: str) -> None:
            bar.update(STEPS.index(name) - bar.n)
            bar.set_postfix_str(name)

        checks = check_estimator(cls, config, step=step)
    for check in checks:
        print(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    passed = all(c.passed for c in checks)
    print(f"{args.name}: {'conforms' if passed else 'does NOT conform'}")
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    from bench.environment import silence_known_warnings

    silence_known_warnings()
    args = cli_args.parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"run": _cmd_run, "list": _cmd_list, "leaderboard": _cmd_leaderboard, "check-estimator": _cmd_check,
                "export": cli_published.cmd_export,
                "throughput": _cmd_throughput, "profile": _cmd_profile, "peers": _cmd_peers}
    try:
        return commands[args.command](args)
    except (RegistryError, ConfigError, FileNotFoundError) as err:
        print(f"ifbench: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # e.g. the disk filled up: finished records are whole, the run can resume
        print(f"ifbench: error: {err}", file=sys.stderr)
        return EXIT_FAILED_CELLS


if __name__ == "__main__":
    sys.exit(main())
