"""SIGINT and SIGTERM as a cooperative stop: a flag the sync checks, never an exception mid-write.

Python's default SIGINT raises KeyboardInterrupt wherever the program happens to be, and the
default SIGTERM kills it outright. Both are safe for the store (SQLite rolls an unfinished
transaction back) but neither lets a sync say what happened. Here the first signal only sets
an event: ``run_sync`` abandons its walk and records the run as stopped, or finishes the
apply it is in. The first signal also restores the previous handlers, so a second one acts
as it normally would: an impatient operator can always force the exit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(
    on_signal: Callable[[signal.Signals], None] | None = None,
) -> Iterator[threading.Event]:
    """Within the block, the first SIGINT or SIGTERM sets the yielded event (and calls
    ``on_signal`` with it, in the main thread); the previous handlers come back after it and
    on leaving the block. Must be entered from the main thread.
    """
    stop = threading.Event()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def handle(signum: int, frame: FrameType | None) -> None:
        restore()
        stop.set()
        if on_signal is not None:
            on_signal(signal.Signals(signum))

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    try:
        yield stop
    finally:
        restore()


def leave_stop_signals_to_the_main_thread() -> None:
    """Block SIGINT and SIGTERM in the calling (non-main) thread, and in threads it starts.

    The kernel delivers a process's signal to any thread that does not block it. If a worker
    thread gets it, Python's handler still only runs in the main thread, and only once that
    thread runs Python again: a main thread asleep in a long wait (the scheduler's, up to the
    next tick) would not notice the stop for an hour. Every other thread blocking them makes
    the kernel interrupt the main thread's wait instead.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
