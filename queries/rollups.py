"""What the rollup tables answer exactly: every minute but those new batches touched, since when.

The rollup job (``jobs/rollup.py``) recomputes each minute a batch touched from the live
events, and records in ``rollups/_state.json`` which ledger files it has seen: every file
modified before ``cursor - LEDGER_LAG_S`` and the batch ids in ``recent``. So a minute row of a
rollup equals the events of that minute unless a batch the job has not seen yet touched it.
:func:`coverage` lists those *dirty* minutes: the [min, max] event_time minutes of every batch
that is published but unseen (a ledger file modified since ``cursor - LEDGER_LAG_S`` and not in
``recent``, exactly the job's own rule) or being published right now. The state is read before
anything else, so rollup files written meanwhile only hold more, never less.

Retention deletes old rollups partition by partition, oldest first, so each level answers from
the start of its earliest partition on (:attr:`Coverage.since_ms`).
"""

from __future__ import annotations

import bisect
import calendar
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.schema import HOUR_MS, MINUTE_MS
from pipeline.tables import LEDGER_LAG_S
from pipeline.tables import RollupPaths as Paths
from queries.lake import Lake

LEVELS: Final = ("minute", "hour", "day")
#: A ledger file is written just after its batch's committed_at: files whose committed_at is
#: older than the job's cursor by more than this are not even stat-ed.
_LEDGER_WRITE_SLACK_MS: Final = HOUR_MS


@dataclass(frozen=True)
class Coverage:
    """Which minutes the rollups answer exactly.

    ``dirty``: sorted starts (epoch ms) of the minutes that batches the job has not rolled up
    touched. ``since_ms``: per level, the start of its earliest partition (None: no partition).
    """

    dirty: tuple[int, ...] = ()
    since_ms: dict[str, int | None] = field(default_factory=dict)

    def any_dirty(self, start_ms: int, end_ms: int) -> bool:
        """Whether a dirty minute starts in [start, end)."""
        i = bisect.bisect_left(self.dirty, start_ms)
        return i < len(self.dirty) and self.dirty[i] < end_ms

    def answers(self, level: str, start_ms: int, end_ms: int) -> bool:
        """Whether rollups of ``level`` hold [start, end) exactly (both on minute boundaries)."""
        since = self.since_ms.get(level)
        return since is not None and start_ms >= since and not self.any_dirty(start_ms, end_ms)


def _minutes(ranges: Iterable[tuple[int | None, int | None]]) -> tuple[int, ...]:
    """Sorted minute starts spanned by [min, max] event-time ranges (epoch ms, inclusive)."""
    out: set[int] = set()
    for lo, hi in ranges:
        if lo is None or hi is None:
            continue
        out.update(range(lo - lo % MINUTE_MS, hi - hi % MINUTE_MS + 1, MINUTE_MS))
    return tuple(sorted(out))


def _in_flight(lake: Lake) -> list[tuple[int | None, int | None]]:
    """[min, max] event_time of the batches the consumer is publishing (its staged ledger row)."""
    out = []
    for name in lake.listdir(lake.layout.staging):
        if not name.endswith(".committed"):
            continue
        try:
            manifest = json.loads((lake.layout.staging / name / "manifest.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue  # finished meanwhile: its ledger file is listed next
        row: dict[str, Any] = manifest.get("ledger") or {}
        out.append((row.get("min_event_time"), row.get("max_event_time")))
    return out


def _unseen(lake: Lake, cursor: float | None, recent: set[str]) -> list[str]:
    """Ledger files the job has not seen (or may not have: over-counting only costs speed)."""
    since = None if cursor is None else cursor - LEDGER_LAG_S
    if since is None:
        return lake.files("ledger")
    floor_ms = int(since * 1000) - _LEDGER_WRITE_SLACK_MS
    files = lake.files("ledger", since_ms=floor_ms)
    stats = lake.stats("ledger", files)
    files = [f for f in files if (stats[f].max_ms or floor_ms) >= floor_ms]
    return [
        f
        for f, mtime in lake.mtimes(files).items()
        if mtime >= since and os.path.basename(f)[: -len(".parquet")] not in recent
    ]


def _earliest(lake: Lake, level: str) -> int | None:
    """Start (epoch ms) of the earliest partition of a rollup level, None when it has none."""
    root = Paths(lake.layout).level(level)
    for date_dir in sorted(n for n in lake.listdir(root) if n.startswith("date=")):
        try:
            start = calendar.timegm(time.strptime(date_dir[5:], "%Y-%m-%d")) * 1000
        except ValueError:
            continue
        if level != "minute":
            return start
        hours = sorted(n for n in lake.listdir(root / date_dir) if n.startswith("hour="))
        for hour in hours:
            if hour[5:].isdigit() and int(hour[5:]) < 24:
                return start + int(hour[5:]) * HOUR_MS
    return None


def has_rollups(lake: Lake) -> bool:
    """Whether the rollup job has finished a run on this lake."""
    return Paths(lake.layout).state.exists()


def coverage(lake: Lake) -> Coverage | None:
    """What the rollups answer right now; None when the rollup job has never finished a run.

    Call it inside :meth:`Lake.read` (it lists the lake).
    """
    try:
        state = json.loads(Paths(lake.layout).state.read_text())
    except FileNotFoundError:
        return None
    if not isinstance(state, dict):
        return None
    cursor = state.get("cursor")
    recent = set(state.get("recent") or ())
    ranges = _in_flight(lake)
    unseen = _unseen(lake, None if cursor is None else float(cursor), recent)
    if unseen:
        lows = lake.stats("ledger", unseen, column="min_event_time")
        highs = lake.stats("ledger", unseen, column="max_event_time")
        ranges += [(lows[f].min_ms, highs[f].max_ms) for f in unseen]
    return Coverage(_minutes(ranges), {level: _earliest(lake, level) for level in LEVELS})
