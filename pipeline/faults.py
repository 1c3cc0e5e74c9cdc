"""Crash points for fault-injection tests: ``ADEVENTS_CRASH_AT=<point>[:<nth>]`` kills the process.

The consumer calls :func:`point` between the steps of a batch; tests set the variable in a real
consumer process and check that a restart lands every batch exactly once. Unset (the normal
case) it costs one dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("ADEVENTS_CRASH_AT", "")
_name, _, _nth = _spec.partition(":")
_visits_left = {_name: int(_nth or "1")} if _name else {}

POINTS = (
    "after_read",
    "after_claim",
    "after_stage",
    "after_commit",
    "mid_publish",
    "after_publish",
    "after_finish",
    "after_ledger",
    "after_retire",
    "after_quarantine_sidecar",
)


def point(name: str) -> None:
    """Die with SIGKILL here if this is the configured crash point (on its nth visit)."""
    if name not in _visits_left:
        return
    _visits_left[name] -= 1
    if _visits_left[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
