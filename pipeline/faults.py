"""Crash points for fault-injection tests: ``ADEVENTS_CRASH_AT=<point>[:<nth>]`` kills the process.

The consumer calls :func:`point` between the steps of a batch; tests set the variable in a real
consumer process and check that a restart lands every batch exactly once. Unset (the normal
case) it costs one dictionary lookup per step. ``ADEVENTS_STOP_AT=<point>[:<nth>]`` stops the
process there instead (SIGSTOP, as a long GC pause would); the test sends SIGCONT.
"""

from __future__ import annotations

import os
import signal


def _parse(variable: str) -> dict[str, int]:
    name, _, nth = os.environ.get(variable, "").partition(":")
    return {name: int(nth or "1")} if name else {}


_visits_left = _parse("ADEVENTS_CRASH_AT")
_stops_left = _parse("ADEVENTS_STOP_AT")

POINTS = (
    "after_read",
    "after_intent",
    "after_claim",
    "after_events_parquet",
    "after_events_commit",
    "after_quarantine_parquet",
    "after_quarantine_commit",
    "after_ledger_parquet",
    "after_ledger_commit",
    "after_finish",
    "after_quarantine_sidecar",
    "after_retire",
)


def point(name: str) -> None:
    """Die with SIGKILL here if this is the configured crash point (on its nth visit); stop
    with SIGSTOP here if this is the configured stop point."""
    if name in _stops_left:
        _stops_left[name] -= 1
        if _stops_left[name] == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
    if name not in _visits_left:
        return
    _visits_left[name] -= 1
    if _visits_left[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
