"""Signals as ``threading.Event``s: SIGINT/SIGTERM is how every long-running command learns to
stop, and SIGUSR1 how a Kafka consumer learns that its producers are done (drain, then exit)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType

log = logging.getLogger("adevents")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: ``adevents consume --source kafka``: land what the assigned partitions hold, then exit.
DRAIN_SIGNAL = signal.SIGUSR1


@contextlib.contextmanager
def event_on_signals(
    signals: Iterable[signal.Signals], event: threading.Event | None = None, *, what: str
) -> Iterator[threading.Event]:
    """Yield an event (``event``, or a new one) that ``signals`` set; restore the handlers after.

    The handler sets the event from a helper thread: ``Event.set`` inside a handler deadlocks
    when the signal lands while the main thread holds the event's lock (in ``stop.wait()``).
    Off the main thread (where Python cannot install handlers) the event is yielded untouched.
    ``what`` ends the log line, e.g. "stopping after the current batch".
    """
    event = threading.Event() if event is None else event
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: %s", signum, what)
        threading.Thread(target=event.set, name="event-on-signal", daemon=True).start()

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_on_signals(
    stop: threading.Event | None = None, *, what: str = "stopping"
) -> contextlib.AbstractContextManager[threading.Event]:
    """SIGINT/SIGTERM set ``stop`` (or a new event): see :func:`event_on_signals`."""
    return event_on_signals(SIGNALS, stop, what=what)
