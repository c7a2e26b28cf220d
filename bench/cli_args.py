"""The ``ifbench`` command line's grammar: one parser, a function per subcommand (the commands are in :mod:`bench.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench import cli_published
from bench.config import BUILTIN_SUITES, DEVICES


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ifbench")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ifbench", description="Benchmark training-data influence estimators "
                                     "against leave-out-and-retrain ground truth.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_published.add_export_parser(sub)
    _add_run_parser(sub)
    _add_list_parser(sub)
    _add_leaderboard_parser(sub)
    _add_throughput_parser(sub)
    _add_profile_parser(sub)
    _add_peers_parser(sub)
    _add_check_estimator_parser(sub)
    return parser


def _add_run_parser(sub: Any) -> None:
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


def _add_list_parser(sub: Any) -> None:
    lst = sub.add_parser("list", help="list registered estimators, tasks and protocols")
    lst.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE")


def _add_leaderboard_parser(sub: Any) -> None:
    board = sub.add_parser("leaderboard", help="render the markdown leaderboard from a results folder")
    board.add_argument("--results", type=Path, required=True)
    board.add_argument("--out", type=Path, help="markdown file to write, figures beside it (default: RESULTS/leaderboard.md)")
    board.add_argument("--no-figures", action="store_true")
    board.add_argument("--records", action="store_true",
                       help="also write the records shown (latest per cell) as records.jsonl beside --out "
                       "(and the profile's and peers' measurements, profile.json and peers.json, where there are some)")


def _add_throughput_parser(sub: Any) -> None:
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


def _add_profile_parser(sub: Any) -> None:
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


def _add_peers_parser(sub: Any) -> None:
    peers = sub.add_parser("peers", help="ifbench's estimators beside the peers' implementations (ifbench[peers])")
    peers.add_argument("--results", type=Path, default=Path("results") / "peers",
                       help="folder for peers.json (and its leaderboard section; default: results/peers)")
    peers.add_argument("--peers", nargs="+", default=["all"], help="peer adapters to compare (default: all)")
    peers.add_argument("--task", default="mnist-logreg", help="the cell's task (default: mnist-logreg)")
    peers.add_argument("--preset", default="default", help="task size preset (default: default)")
    peers.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is kept (default: 3)")
    peers.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    peers.add_argument("--merge", action="store_true",
                       help="keep peers.json's rows for the pairs not compared now (each row names its commit)")


def _add_check_estimator_parser(sub: Any) -> None:
    check = sub.add_parser("check-estimator", help="conformance check of an estimator on a tiny exact problem")
    check.add_argument("name")
    check.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE")
    check.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="an estimator option, as in a suite file (TOML value; repeatable): --option damping=0.01")
    check.add_argument("--no-progress", action="store_true", help="hide the progress bar")
