"""The ``ifbench`` command line: run | list | leaderboard | export | check-estimator | throughput | profile | peers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cli_published
from bench.config import BUILTIN_SUITES, DEVICES, ConfigError, load_suite, make_config, with_overrides
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


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ifbench")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ifbench", description="Benchmark training-data influence estimators "
                                     "against leave-out-and-retrain ground truth.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_published.add_export_parser(sub)

    run = sub.add_parser("run", help="run a suite (resumes: finished cells are skipped)")
    run.add_argument("--suite", help=f"built-in suite ({', '.join(BUILTIN_SUITES)}) or a TOML file (default: default)")
    run.add_argument("--against", metavar="PUBLISHED", help="score only --estimators against a published leaderboard "
                     "(a folder `ifbench export` wrote, e.g. leaderboard/, or a hub dataset's name)")
    run.add_argument("--tasks", nargs="+", help="only these tasks")
    run.add_argument("--estimators", nargs="+", help="only these estimators (default: all registered)")
    run.add_argument("--protocols", nargs="+", help="only these ground-truth protocols")
    run.add_argument("--results", type=Path, help="results folder (default: results/<suite name as a slug>)")
    run.add_argument("--device", help=f"{' or '.join(DEVICES)} (or cuda:N); default from the suite (cpu)")
    run.add_argument("--seed", type=int, help="root seed (default from the suite: 0)")
    run.add_argument("--threads", type=int, help="torch CPU threads (recorded; results depend on it)")
    run.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                     help="import estimators from a module or .py file (repeatable)")
    run.add_argument("--data-dir", type=Path, help="where network datasets (CIFAR-10, SST-2) live or are downloaded to")
    run.add_argument("--no-isolate", dest="isolate", action="store_false", default=None,
                     help="run cells in this process (faster to debug; a crashing estimator then ends the run)")
    run.add_argument("--cell-timeout-s", type=float, help="per-cell time limit in seconds (default from the suite: 1800)")
    run.add_argument("--cell-memory-mb", type=float, help="cap on a cell worker's resident memory, MB (default: none)")
    run.add_argument("--workers", type=int, help="retrain in N local worker processes, each with --threads threads "
                     "(default from the suite: 1, in this process; the numbers do not change)")
    run.add_argument("--scheduler", help="retrain on Dask: local:N (a local cluster of N workers) or tcp://HOST:PORT")
    run.add_argument("--retry-failed", action="store_true", help="re-run cells that failed before")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    lst = sub.add_parser("list", help="list registered estimators, tasks and protocols")
    lst.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE")

    board = sub.add_parser("leaderboard", help="render the markdown leaderboard from a results folder")
    board.add_argument("--results", type=Path, required=True)
    board.add_argument("--out", type=Path, help="markdown file to write, figures beside it (default: RESULTS/leaderboard.md)")
    board.add_argument("--no-figures", action="store_true")
    board.add_argument("--records", action="store_true",
                       help="also write the records shown (latest per cell) as records.jsonl beside --out "
                       "(and the profile's and peers' measurements, profile.json and peers.json, where there are some)")

    speed = sub.add_parser("throughput", help="warm retrains per second: one model at a time vs stacked")
    speed.add_argument("--tasks", nargs="+", default=["mnist-resnet", "rt-bert"], help="SGD-trained tasks")
    speed.add_argument("--preset", default="default", help="task size preset (default: default)")
    speed.add_argument("--stacks", nargs="+", default=["1", "8", "32"], help="models trained together (default: 1 8 32)")
    speed.add_argument("--steps", type=int, default=10, help="SGD steps timed per configuration (default: 10)")
    speed.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is shown (default: 3)")
    speed.add_argument("--device", default="cpu", help=f"{' or '.join(DEVICES)} (or cuda:N)")
    speed.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    speed.add_argument("--workers", type=int, default=1,
                       help="also time stacks spread over N one-thread worker processes (default: 1, not timed)")

    prof = sub.add_parser("profile", help="how fit and score time and memory grow with n and P (log-log sweeps)")
    prof.add_argument("--results", type=Path, default=Path("results") / "profile",
                      help="folder for profile.json (and its leaderboard section; default: results/profile)")
    prof.add_argument("--estimators", nargs="+", default=["all"], help="estimators to sweep (default: all)")
    prof.add_argument("--axes", nargs="+", default=["n", "Q", "P"],
                      help="n (training points), Q (queries) and/or P (parameters) (default: all three)")
    prof.add_argument("--repeats", type=int, help="repeats per point; the median is kept (default: 3)")
    prof.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    prof.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE")
    prof.add_argument("--no-progress", action="store_true", help="hide progress bars")

    peers = sub.add_parser("peers", help="ifbench's estimators beside the peers' implementations (ifbench[peers])")
    peers.add_argument("--results", type=Path, default=Path("results") / "peers",
                       help="folder for peers.json (and its leaderboard section; default: results/peers)")
    peers.add_argument("--peers", nargs="+", default=["all"], help="peer adapters to compare (default: all)")
    peers.add_argument("--task", default="mnist-logreg", help="the cell's task (default: mnist-logreg)")
    peers.add_argument("--preset", default="default", help="task size preset (default: default)")
    peers.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is kept (default: 3)")
    peers.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")

    check = sub.add_parser("check-estimator", help="conformance check of an estimator on a tiny exact problem")
    check.add_argument("name")
    check.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE")
    check.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="an estimator option, as in a suite file (TOML value; repeatable): --option damping=0.01")
    check.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


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
    path = peers.save(rows, args.results)
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
    config = make_config(cls.Config, parse_options(args.option), f"estimator {args.name}")
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
    args = _parser().parse_args(argv)
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
