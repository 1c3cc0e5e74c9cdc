"""What the rollup tables answer exactly: every minute but those that newer batches touched.

The rollup job (``jobs/rollup.py``) records in ``rollups/_state.json``, as ``ledger_version``, a
version of the ``ledger`` Delta table such that every batch with a ledger row up to it is
folded into the rollups (a batch's events commit before its ledger row, and the job reads the
events after opening the ledger). So a minute row of a rollup equals the events of that minute
unless a batch with a ledger row after that version touched it. :func:`coverage` lists those
*dirty* minutes from the [min, max] event time of the ledger rows the view's ledger gained
since that version: the ledger's change feed, which compactions leave out and which each
process reads once per commit (:meth:`queries.lake.Lake.inserted`).

A batch whose events commit lands in a view but whose ledger row is a moment later is not seen
as dirty by that view: its rows then show in events but not yet in a rollup, the answer of a
moment before. Retention deletes old rollups partition by partition, oldest first, so each
level answers from the start of its earliest partition on (:attr:`Coverage.since_ms`).
"""

from __future__ import annotations

import bisect
import calendar
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from lake.changes import FeedUnavailableError
from pipeline.schema import HOUR_MS, MINUTE_MS, Layout
from pipeline.tables import RollupPaths as Paths
from queries.lake import Lake, View

log = logging.getLogger("adevents.queries")

LEVELS: Final = ("minute", "hour", "day")
#: The key of ``_state.json`` naming the ledger version up to which batches are rolled up.
LEDGER_VERSION: Final = "ledger_version"


@dataclass(frozen=True)
class Coverage:
    """Which minutes the rollups answer exactly.

    ``dirty``: sorted starts (epoch ms) of the minutes whose events changed since the rollup
    job's run. ``since_ms``: per level, the start of its earliest partition (None: none).
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


def dirty_minutes(ranges: Iterable[tuple[int | None, int | None]]) -> tuple[int, ...]:
    """Sorted minute starts spanned by [min, max] event-time ranges (epoch ms, inclusive)."""
    out: set[int] = set()
    for lo, hi in ranges:
        if lo is None or hi is None:
            continue
        out.update(range(lo - lo % MINUTE_MS, hi - hi % MINUTE_MS + 1, MINUTE_MS))
    return tuple(sorted(out))


def _earliest(layout: Layout, level: str) -> int | None:
    """Start (epoch ms) of the earliest partition of a rollup level, None when it has none."""
    root = Paths(layout).level(level)
    try:
        dates = sorted(p.name for p in root.iterdir() if p.name.startswith("date="))
    except FileNotFoundError:
        return None
    for date_dir in dates:
        try:
            start = calendar.timegm(time.strptime(date_dir[5:], "%Y-%m-%d")) * 1000
        except ValueError:
            continue
        if level != "minute":
            return start
        try:
            hours = sorted(p.name for p in (root / date_dir).iterdir())
        except FileNotFoundError:
            continue
        for hour in hours:
            if hour.startswith("hour=") and hour[5:].isdigit() and int(hour[5:]) < 24:
                return start + int(hour[5:]) * HOUR_MS
    return None


#: Per state file: the (inode, mtime, size) it was read at and the version it named. The job
#: replaces the file whole (a new inode), so a stat tells whether it changed: every stats
#: question asked, and reading and parsing it took ~9 % of a worker's time under load.
_read: dict[str, tuple[tuple[int, int, int], int | None]] = {}


def rolled_up_version(lake: Lake) -> int | None:
    """The ledger version up to which batches are rolled up; None when none is."""
    layout = lake.layout
    if layout is None:
        return None
    path = Paths(layout).state
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    known = _read.get(str(path))
    if known is not None and known[0] == key:
        return known[1]
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    version = state.get(LEDGER_VERSION) if isinstance(state, dict) else None
    version = version if isinstance(version, int) and version >= 0 else None
    _read[str(path)] = (key, version)
    return version


def has_rollups(lake: Lake) -> bool:
    """Whether the rollup job has rolled up some batch on this lake."""
    return rolled_up_version(lake) is not None


_RANGES: Final = ("min_event_time", "max_event_time")


def _epoch_ms(value: object) -> int | None:
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else None


def coverage(lake: Lake, view: View) -> Coverage | None:
    """What the rollups answer for ``view`` (which holds ``ledger``); None when they answer
    nothing: no batch rolled up yet, or the ledger since their version can no longer be read."""
    version = rolled_up_version(lake)
    layout = lake.layout
    if version is None or layout is None:
        return None
    ledger = view.table("ledger")
    ranges: list[tuple[int | None, int | None]] = []
    if version < ledger.version:
        try:
            rows = lake.inserted("ledger", version, ledger.version, _RANGES)
        except FeedUnavailableError as exc:  # vacuumed or cleaned up: read events instead
            log.warning("rollups are at ledger version %d, which cannot be read: %s", version, exc)
            return None
        ranges = [(_epoch_ms(lo), _epoch_ms(hi)) for lo, hi in rows]
    return Coverage(dirty_minutes(ranges), {level: _earliest(layout, level) for level in LEVELS})
