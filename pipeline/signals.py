"""SIGINT/SIGTERM as a ``threading.Event``: how every long-running command learns to stop."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger("adevents")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(
    stop: threading.Event | None = None, *, what: str = "stopping"
) -> Iterator[threading.Event]:
    """Yield an event (``stop``, or a new one) that SIGINT/SIGTERM set; restore the handlers after.

    The handler sets the event from a helper thread: ``Event.set`` inside a handler deadlocks
    when the signal lands while the main thread holds the event's lock (in ``stop.wait()``).
    Off the main thread (where Python cannot install handlers) the event is yielded untouched.
    ``what`` ends the log line, e.g. "stopping after the current batch".
    """
    event = threading.Event() if stop is None else stop
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: %s", signum, what)
        threading.Thread(target=event.set, name="stop-on-signal", daemon=True).start()

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
