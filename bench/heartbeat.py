"""A progress line for work that reports no steps of its own (training θ̂, loading a task's data)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

from tqdm.auto import tqdm

#: seconds between refreshes of the line
INTERVAL_S = 1.0


@contextlib.contextmanager
def heartbeat(desc: str, *, enabled: bool = True, interval_s: float = INTERVAL_S) -> Iterator[None]:
    """Show ``desc`` with the seconds elapsed, refreshed every ``interval_s`` until the block ends."""
    if not enabled:
        yield
        return
    bar = tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", leave=False)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            bar.refresh()

    thread = threading.Thread(target=beat, name="ifbench-heartbeat", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
        if time.monotonic() - started >= interval_s:
            tqdm.write(f"{desc}: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
