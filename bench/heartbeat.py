"""Progress lines that stay alive: work that reports no steps of its own (training θ̂, loading a task's data)
shows the seconds elapsed, and a bar whose steps are long (a cell's fit) keeps its clock moving."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

#: seconds between refreshes of a line
INTERVAL_S = 1.0


@contextlib.contextmanager
def refreshing(bar: Any, interval_s: float = INTERVAL_S) -> Iterator[None]:
    """Redraw ``bar`` (a tqdm bar) every ``interval_s`` until the block ends, so its elapsed time moves
    between updates. A disabled bar is left alone."""
    if getattr(bar, "disable", True):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            bar.refresh()

    thread = threading.Thread(target=beat, name="ifbench-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def heartbeat(desc: str, *, enabled: bool = True, interval_s: float = INTERVAL_S) -> Iterator[None]:
    """Show ``desc`` with the seconds elapsed, refreshed every ``interval_s`` until the block ends; a line
    saying how long it took once it took that long."""
    if not enabled:
        yield
        return
    bar = tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", leave=False)
    started = time.monotonic()
    try:
        with refreshing(bar, interval_s):
            yield
    finally:
        bar.close()
    if time.monotonic() - started >= interval_s:  # only when the work finished (not on an exception)
        tqdm.write(f"{desc}: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
