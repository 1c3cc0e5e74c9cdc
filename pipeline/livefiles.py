"""Which events files a reader reads now: the hour partitions and compaction's reader rule.

Events live in ``events/date=YYYY-MM-DD/hour=HH/`` (:func:`hour_partitions`). Compaction (the
``jobs.compact`` job) swaps an hour's many small files for a few large ones in *units* under
``staging/compact/``, each with a phase that readers consult, and a generation counter bumped
after every phase change:

- ``<unit>.partial/``: outputs being written; readers ignore it;
- ``<unit>.committed``: the outputs are being renamed into the partition; readers ignore them;
- ``<unit>.swapped``: the outputs are all in place and the replaced files are being deleted;
  readers ignore the replaced files.

A reader that reads the generation, lists the units, lists the partitions and reads the
generation again gets one phase for the whole listing when both reads agree
(:func:`consistent`); :class:`View` says which files that phase hides. Every reader of events
(the consumer's dedupe rebuild, the queries, the rollup job) follows this rule, and only the
compaction job writes units. Imports nothing from the project but :mod:`pipeline.schema`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

from pipeline.schema import HOUR_MS, Layout

T = TypeVar("T")

UNITS: Final = "compact"
GENERATION: Final = "generation"
MANIFEST: Final = "manifest.json"
PARTIAL: Final = ".partial"
COMMITTED: Final = ".committed"
SWAPPED: Final = ".swapped"
#: Compaction outputs are named ``compacted-<unit>-<n>.parquet``; consumer batches never are.
OUTPUT_PREFIX: Final = "compacted-"


class LakeBusyError(RuntimeError):
    """The lake kept changing under a read: the compaction generation moved on every listing,
    or files vanished on every attempt to read them."""


# -- partitions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class HourPartition:
    """One ``date=YYYY-MM-DD/hour=HH`` directory and the hour it holds."""

    date: str
    hour: int
    path: Path

    @property
    def key(self) -> str:
        return f"date={self.date}/hour={self.hour:02d}"

    @property
    def start_ms(self) -> int:
        start = datetime.strptime(self.date, "%Y-%m-%d").replace(tzinfo=UTC)
        return int(start.timestamp() * 1000) + self.hour * HOUR_MS

    @property
    def end_ms(self) -> int:
        return self.start_ms + HOUR_MS


def date_dirs(root: Path) -> list[tuple[str, Path]]:
    """(date, directory) of every ``date=YYYY-MM-DD`` directory under ``root``, oldest first."""
    out: list[tuple[str, Path]] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.name.startswith("date=") and entry.is_dir():
            value = entry.name[5:]
            try:
                datetime.strptime(value, "%Y-%m-%d")
            except ValueError:
                continue
            out.append((value, Path(entry.path)))
    out.sort()
    return out


def hour_partitions(root: Path) -> list[HourPartition]:
    """Every ``date=…/hour=…`` directory under ``root`` (events/, rollups/minute/), oldest first."""
    out: list[HourPartition] = []
    for date, directory in date_dirs(root):
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith("hour=") and entry.is_dir():
                try:
                    hour = int(entry.name[5:])
                except ValueError:
                    continue
                if 0 <= hour < 24:
                    out.append(HourPartition(date, hour, Path(entry.path)))
    out.sort(key=lambda p: (p.date, p.hour))
    return out


def partition_of(time_ms: int) -> tuple[str, int]:
    """(date, hour) of the events partition that holds ``time_ms``."""
    start = datetime.fromtimestamp(time_ms / 1000, UTC)
    return f"{start:%Y-%m-%d}", start.hour


def parquet_names(directory: Path) -> list[str]:
    """Published Parquet files in ``directory`` (not hidden temporary ones), sorted."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".parquet") and not n.startswith("."))


# -- compaction's reader rule ------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """A compaction unit in flight: which files of which partition it swaps, and its phase."""

    unit_id: str
    partition: str
    outputs: tuple[str, ...]
    replaces: tuple[str, ...]
    phase: str  # "committed" or "swapped"

    @property
    def hidden(self) -> tuple[str, ...]:
        """The files readers must ignore in this phase."""
        return self.outputs if self.phase == "committed" else self.replaces


@dataclass(frozen=True)
class View:
    """Compaction state as of one generation: what readers hide in each partition."""

    generation: int
    units: tuple[Unit, ...] = ()

    def hidden(self, partition: str) -> frozenset[str]:
        """File names to ignore in ``partition`` (``date=YYYY-MM-DD/hour=HH``)."""
        return frozenset(n for u in self.units if u.partition == partition for n in u.hidden)

    def visible(self, partition: str, names: Sequence[str]) -> list[str]:
        hidden = self.hidden(partition)
        return [n for n in names if n not in hidden]

    def hidden_paths(self, events: Path) -> frozenset[str]:
        """Paths (as ``str(events / partition / name)``) readers must ignore, for filtering
        a listing of the whole events table."""
        return frozenset(str(events / u.partition / n) for u in self.units for n in u.hidden)


def units_dir(layout: Layout) -> Path:
    return layout.staging / UNITS


def read_generation(layout: Layout) -> int:
    """The compaction generation: bumped after every phase change of every unit."""
    try:
        return int((units_dir(layout) / GENERATION).read_text() or 0)
    except FileNotFoundError:
        return 0


def phase_of(name: str) -> str | None:
    if name.endswith(COMMITTED):
        return "committed"
    if name.endswith(SWAPPED):
        return "swapped"
    return None


def read_units(layout: Layout) -> tuple[Unit, ...]:
    """Units in phase 2 or 3; raises FileNotFoundError if one moves on while being read."""
    try:
        names = sorted(os.listdir(units_dir(layout)))
    except FileNotFoundError:
        return ()
    units = []
    for name in names:
        phase = phase_of(name)
        if phase is None:
            continue
        manifest = json.loads((units_dir(layout) / name / MANIFEST).read_text())
        units.append(
            Unit(
                unit_id=manifest["unit"],
                partition=manifest["partition"],
                outputs=tuple(manifest["outputs"]),
                replaces=tuple(manifest["replaces"]),
                phase=phase,
            )
        )
    return tuple(units)


def consistent(layout: Layout, listing: Callable[[], T], *, attempts: int = 200) -> tuple[T, View]:
    """Run ``listing`` (which lists events/ directories) under one compaction generation.

    Reads the generation, the units, calls ``listing``, reads the generation again, and starts
    over if it changed (a phase flipped meanwhile; phases are short, so this converges fast).
    """
    delay = 0.001
    for _ in range(attempts):
        before = read_generation(layout)
        try:
            units = read_units(layout)
        except FileNotFoundError:
            units = None  # a unit moved on while its manifest was read
        if units is not None:
            result = listing()
            if read_generation(layout) == before:
                return result, View(before, units)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    raise LakeBusyError(f"compaction under {units_dir(layout)} kept changing while listing")


def _partition_key(layout: Layout, partition_dir: Path) -> str:
    rel = Path(partition_dir).resolve().relative_to(layout.events.resolve())
    return rel.as_posix()


def live_files(layout: Layout, partition_dir: Path) -> list[Path]:
    """The files of one events partition a reader should read now: each row exactly once.

    A file listed here may still be deleted before it is opened (by a later swap): a reader
    that gets FileNotFoundError (DuckDB: "No files found"/"Cannot open file") lists again.
    """
    key = _partition_key(layout, partition_dir)
    names, view = consistent(layout, lambda: parquet_names(Path(partition_dir)))
    return [Path(partition_dir) / n for n in view.visible(key, names)]


def live_event_files(
    layout: Layout, *, since_ms: int | None = None, until_ms: int | None = None
) -> list[Path]:
    """Every live events file in partitions that can hold rows in [since, until), sorted."""

    def listing() -> list[tuple[HourPartition, list[str]]]:
        parts = hour_partitions(layout.events)
        return [
            (p, parquet_names(p.path))
            for p in parts
            if (since_ms is None or p.end_ms > since_ms)
            and (until_ms is None or p.start_ms < until_ms)
        ]

    listed, view = consistent(layout, listing)
    return [p.path / n for p, names in listed for n in view.visible(p.key, names)]


def read_live(
    layout: Layout, read: Callable[[list[Path]], T], *, attempts: int = 50, **window: int | None
) -> T:
    """``read(live_event_files(...))``, listed again if a file vanishes before it is read."""
    for attempt in range(attempts):
        files = live_event_files(layout, **window)
        try:
            return read(files)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.005)
    raise AssertionError("unreachable")
