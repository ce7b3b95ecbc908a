"""Signal handling, in one place: SIGTERM behaves as Ctrl-C everywhere, and long runs (sync, replicate) turn the
first of either into a request to stop at the next checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from dmrepl.errors import Interrupted


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted()


def install() -> None:
    """A service manager's SIGTERM unwinds like Ctrl-C (exit 130) instead of killing dmrepl mid-write."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def graceful_stop(announce: Callable[[], None]) -> Iterator[threading.Event]:
    """First Ctrl-C or SIGTERM sets the event (the run stops at its next checkpoint); a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        announce()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
