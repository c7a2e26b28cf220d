"""Cells in a worker process: an estimator that exits, crashes, hangs or outgrows its memory fails its cell.

The runner hands a job (a picklable object whose ``messages()`` yields ``("start", cell)`` before each cell
and ``("record", cell, record)`` after it) to a *spawned* process (a forked one would inherit torch's
OpenMP pool and hang). This module relays the messages and watches the worker: no message in time, a
resident size over the cap, or a dead process ends the relay with ``("died", cell, reason)``, naming the
cell in flight (None if none was). Plug-in files are imported in the worker before the job is unpickled,
so their classes resolve there as in the parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.failures import cause_of
from bench.phase_cost import current_rss_mb

POLL_SECONDS = 0.05
#: how long a worker whose pipe closed may take to exit (a loaded machine takes seconds to tear down torch)
EXIT_WAIT_S = 60.0

Item = TypeVar("Item")


@dataclass(frozen=True)
class CellLimits:
    """Per-cell wall-time limit (seconds) and cap on the worker's resident memory (MB; 0: none); the limits'
    option names, for the message that a cell exceeded one."""

    timeout_s: float
    memory_mb: float = 0.0
    timeout_option: str = "cell_timeout_s"
    memory_option: str = "cell_memory_mb"


def die_with_parent() -> None:
    """Linux: the kernel kills this worker if the run's process dies (even by SIGKILL), so no orphan hangs on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def prepare_worker(plugins: Sequence[str]) -> None:
    """A spawned worker's start: Ctrl-C left to the parent (which stops it), killed with the parent, known
    warnings silenced, and plug-in modules imported under the names the parent's pickles refer to."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    from bench.catalog import default_registries
    from bench.environment import silence_known_warnings

    silence_known_warnings()
    default_registries(plugins)


def _worker_main(conn: Any, plugins: Sequence[str], payload: bytes) -> None:
    try:
        prepare_worker(plugins)
        job = pickle.loads(payload)
        for message in job.messages():
            conn.send(message)
        conn.send(("done",))
    except SystemExit as err:  # the estimator's sys.exit, caught in no cell: say so before the process ends
        conn.send(("exited", exit_code(err)))
        raise
    except Exception as err:  # the harness's own failure in the worker (the job catches estimators' errors)
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}", cause_of(err)))
    finally:
        conn.close()


def exit_code(err: SystemExit) -> int:
    """The process exit status ``sys.exit(err.code)`` gives: None 0, an int modulo 256 (as the OS reports it:
    ``sys.exit(-1)`` is 255), anything else 1."""
    if err.code is None:
        return 0
    return err.code & 0xFF if isinstance(err.code, int) else 1


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return f"the worker closed its pipe and had not exited {EXIT_WAIT_S:g} s later"
    if exitcode >= 0:
        return f"the estimator ended its worker process (exit code {exitcode})"
    name = signal.Signals(-exitcode).name
    if -exitcode == signal.SIGKILL:
        return f"the worker was killed by {name} (the kernel's out-of-memory killer sends it)"
    if -exitcode == signal.SIGSEGV:
        return f"the worker crashed with {name} (segmentation fault)"
    return f"the worker was ended by {name}"


def run_all(remaining: list[Item], job_of: Callable[[tuple[Item, ...]], Any],
            messages: Callable[[Any], Iterator[tuple]], *, started: Callable[[Any], None],
            kept: Callable[[Any, Any], list[Item]], lost: Callable[[Any, str, dict[str, Any]], list[Item]]) -> None:
    """The one relay loop of ``ifbench run`` and ``ifbench profile``: run ``job_of(remaining)`` through
    ``messages`` (:func:`relay`'s worker, or the job in this process) until no item remains.

    ``started(cell)`` sees each ``("start", cell)``; ``kept(cell, payload)`` each ``("record", cell, payload)``
    and returns the items it finished; ``lost(cell_or_None, reason, fields)`` a ``("died", …)`` and returns the
    items the death ends (recorded by it). Items still left go on in a fresh job. ``remaining`` is emptied;
    a job that ends without finishing any item is an error (it would run forever)."""
    while remaining:
        before = len(remaining)
        for message in messages(job_of(tuple(remaining))):
            if message[0] == "start":
                started(message[1])
            elif message[0] in ("record", "died"):
                done = (kept(message[1], message[2]) if message[0] == "record"
                        else lost(message[1], message[2], message[3] if len(message) > 3 else {}))
                for item in done:
                    remaining.remove(item)
        if len(remaining) == before:
            raise RuntimeError(f"a job ended without finishing any of its {before} items (first: {remaining[0]!r})")


def relay(job: Any, plugins: Sequence[str], limits: CellLimits) -> Iterator[tuple]:
    """Run ``job.messages()`` in a spawned worker and yield its messages, ending with ``("done",)`` or
    ``("died", cell_or_None, reason)``. The worker is gone when the generator ends or is closed."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    worker = context.Process(target=_worker_main, args=(send, tuple(plugins), pickle.dumps(job)),
                             name="ifbench-cell-worker", daemon=True)
    worker.start()
    send.close()
    in_flight, deadline = None, None
    try:
        while True:
            if receive.poll(POLL_SECONDS):
                try:
                    message = receive.recv()
                except EOFError:  # closed without a last word: the process ended abruptly
                    worker.join(EXIT_WAIT_S)
                    yield ("died", in_flight, _death(worker.exitcode))
                    return
                if message[0] == "start":
                    in_flight, deadline = message[1], time.monotonic() + limits.timeout_s
                elif message[0] == "record":
                    in_flight, deadline = None, None
                elif message[0] == "exited":
                    yield ("died", in_flight, _death(message[1]))
                    return
                elif message[0] == "error":
                    yield ("died", in_flight, f"the worker failed: {message[1]}", message[2])
                    return
                yield message
                if message[0] == "done":
                    return
                continue
            if not worker.is_alive():
                worker.join()
                yield ("died", in_flight, _death(worker.exitcode))
                return
            if deadline is not None and time.monotonic() > deadline:
                yield ("died", in_flight, f"exceeded the time limit ({limits.timeout_option} = {limits.timeout_s:g} s)")
                return
            rss = current_rss_mb(worker.pid) if limits.memory_mb else None
            if rss is not None and rss > limits.memory_mb:
                yield ("died", in_flight, f"exceeded the memory cap ({limits.memory_option} = {limits.memory_mb:g}; "
                       f"the worker held {rss:.0f} MB)")
                return
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join()
        receive.close()
