"""A real Consumer driven through its Protocols by the in-memory fakes: source, key cache, lake.

The loop, the intents, the redo and the decide step are the real ones; only the edges are
in memory. A failure at each step of a group (before and after each table's commit) is
followed by a restart over the same source and lake, with the key cache kept (a shared Redis)
or lost (rebuilt from what the lake writer reads back): every event lands exactly once.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import polars as pl
import pytest

from lake.testing import MemoryLakeWriter
from lake.writer import LakeWriter, Outcome, Staged, TableCommit
from pipeline.consumer import Consumer, Totals
from pipeline.settings import Settings
from pipeline.spool import PoisonInputError
from pipeline.testing import MemoryKeyCache, MemoryKeyState, MemorySource, event_table

NOW_MS = int(time.time() * 1000)
T = TypeVar("T")


class CrashError(RuntimeError):
    """Stands for the process dying at a step: not transient, so it ends the run."""


class ForwardingLake:
    """A :class:`LakeWriter` that hands every call to ``inner``; subclasses step in where they
    test something."""

    def __init__(self, inner: LakeWriter) -> None:
        self.inner = inner

    def commit(
        self, app_id: str, version: int, frames: Mapping[str, pl.DataFrame]
    ) -> list[TableCommit]:
        return self.inner.commit(app_id, version, frames)

    def stage(self, table: str, version: int, frame: pl.DataFrame) -> Staged:
        return self.inner.stage(table, version, frame)

    def commit_staged(self, app_id: str, version: int, staged: Staged) -> TableCommit:
        return self.inner.commit_staged(app_id, version, staged)

    def committed_version(self, table: str, app_id: str) -> int | None:
        return self.inner.committed_version(table, app_id)

    def committed_versions(self, table: str, app_ids: Collection[str]) -> dict[str, int | None]:
        return self.inner.committed_versions(table, app_ids)

    def recent_events(
        self, window_ms: int, added_since_ms: int | None = None
    ) -> tuple[pl.DataFrame, int | None]:
        return self.inner.recent_events(window_ms, added_since_ms)

    def batch_events(self, batch_ids: Collection[str], span_ms: tuple[int, int]) -> pl.DataFrame:
        return self.inner.batch_events(batch_ids, span_ms)


class CrashingLake(ForwardingLake):
    """A :class:`LakeWriter` that raises CrashError at the nth commit naming ``table`` (whole,
    or of files staged before), before or after handing it to ``inner``."""

    def __init__(self, inner: LakeWriter, table: str, *, after: bool, nth: int = 2) -> None:
        super().__init__(inner)
        self.table, self.after, self.left = table, after, nth

    def _crashing(self, names: Collection[str], version: int, commit: Callable[[], T]) -> T:
        hit = self.table in names and (left := self.left - 1) == 0
        self.left = left if self.table in names else self.left
        if hit and not self.after:
            raise CrashError(f"before the {self.table} commit of group {version}")
        result = commit()
        if hit:
            raise CrashError(f"after the {self.table} commit of group {version}")
        return result

    def commit(
        self, app_id: str, version: int, frames: Mapping[str, pl.DataFrame]
    ) -> list[TableCommit]:
        return self._crashing(frames, version, lambda: self.inner.commit(app_id, version, frames))

    def commit_staged(self, app_id: str, version: int, staged: Staged) -> TableCommit:
        commit = lambda: self.inner.commit_staged(app_id, version, staged)  # noqa: E731
        return self._crashing([staged.table], version, commit)


def _fill(source: MemorySource) -> set[str]:
    """Five batches of 4 rows: duplicates within and across batches, one bad row, one poison
    batch; returns the event ids that must land, once each."""
    ids = [
        ["a1", "a2", "a2", "a3"],
        ["b1", "a1", "b2", "b3"],
        ["c1", "c2", "c3", "b1"],
        ["d1", "d2", "d3", "d4"],
    ]
    for n, batch in enumerate(ids):
        types = ["impression"] * 3 + ["bogus" if n == 3 else "click"]  # d4: invalid type
        source.put(f"{n}.arrow", event_table(batch, time_ms=NOW_MS - n, event_type=types))
    source.put("4.arrow", PoisonInputError("unreadable_file", "not Arrow IPC"))
    return {i for batch in ids for i in batch} - {"d4"}


def _consumer(settings: Settings, state: MemoryKeyState, **edges: Any) -> Consumer:
    window_ms, slice_ms = settings.dedupe_window_ms, settings.dedupe_generation_ms
    cache = MemoryKeyCache(state, window_ms=window_ms, slice_ms=slice_ms)
    consumer = Consumer(settings, cache, **edges)
    consumer.start()
    return consumer


def _run_once(settings: Settings, state: MemoryKeyState, **edges: Any) -> Totals:
    """A consumer over ``edges`` until its source is empty, then closed."""
    consumer = _consumer(settings, state, **edges)
    try:
        return consumer.run(once=True)
    finally:
        consumer.close()


def _check_exactly_once(lake: MemoryLakeWriter, source: MemorySource, expected: set[str]) -> None:
    events = lake.rows("events")
    assert sorted(events["event_id"]) == sorted(expected)
    assert lake.rows("quarantine")["reason"].to_list() == ["invalid_event_type"]
    ledger = lake.rows("ledger")
    assert sorted(ledger["source_file"]) == [f"{n}.arrow" for n in range(5)]
    assert ledger["accepted"].sum() == len(expected)
    assert ledger["duplicates"].sum() == 3  # a2, a1 and b1
    assert source.waiting() == []
    assert source.set_aside == {"4.arrow": ("unreadable_file", source.set_aside["4.arrow"][1])}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(commit_target_rows=6)  # two 4-row batches a group


def test_a_consumer_over_the_fakes_lands_every_event_once(settings: Settings) -> None:
    source, lake = MemorySource(), MemoryLakeWriter()
    expected = _fill(source)
    totals = _run_once(settings, MemoryKeyState(), source=source, lake=lake)
    _check_exactly_once(lake, source, expected)
    assert (totals.files, totals.commits, totals.bad_files) == (5, 3, 1)
    assert lake.committed_version("ledger", source.app_id) == 2


@pytest.mark.parametrize("cache", ["kept", "lost"])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("table", ["events", "quarantine", "ledger"])
def test_a_restart_after_a_crash_at_any_commit_lands_every_event_once(
    settings: Settings, table: str, after: bool, cache: str
) -> None:
    source, lake, state = MemorySource(), MemoryLakeWriter(), MemoryKeyState()
    expected = _fill(source)
    first = _consumer(settings, state, source=source, lake=CrashingLake(lake, table, after=after))
    try:
        with pytest.raises(CrashError):
            first.run(once=True)
    finally:
        first.close()
    assert "2.arrow" in source.waiting()  # group 1 (batches 2 and 3) was cut short
    if cache == "lost":
        state = MemoryKeyState()  # an embedded cache that lost its files: rebuilt from the lake
    _run_once(settings, state, source=source, lake=lake)
    _check_exactly_once(lake, source, expected)


class FailingCommitLake(ForwardingLake):
    """Fails the events commit of group 1 once, with a transient lake fault, after group 2's
    files are written: group 2, queued behind it on the committing thread, must not commit
    before group 1 does. Records the version of every commit, per table."""

    def __init__(self, inner: LakeWriter) -> None:
        super().__init__(inner)
        self.order: dict[str, list[int]] = {}
        self.group_2_written = threading.Event()
        self.failed = False

    def commit(
        self, app_id: str, version: int, frames: Mapping[str, pl.DataFrame]
    ) -> list[TableCommit]:
        results = super().commit(app_id, version, frames)
        self._record(results, version)
        return results

    def stage(self, table: str, version: int, frame: pl.DataFrame) -> Staged:
        staged = super().stage(table, version, frame)
        if version == 2:
            self.group_2_written.set()
        return staged

    def commit_staged(self, app_id: str, version: int, staged: Staged) -> TableCommit:
        if version == 1 and staged.table == "events" and not self.failed:
            assert self.group_2_written.wait(10), "group 2 was not written beside group 1"
            self.failed = True
            raise OSError(errno.EIO, "the lake failed for a while")
        result = super().commit_staged(app_id, version, staged)
        self._record([result], version)
        return result

    def _record(self, results: list[TableCommit], version: int) -> None:
        for result in results:
            if result.outcome is Outcome.COMMITTED:
                self.order.setdefault(result.table, []).append(version)


def test_a_failed_commit_stops_the_groups_behind_it_and_each_table_commits_in_order(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(commit_target_rows=6, retry_max_delay=0.1)
    source, lake = MemorySource(), MemoryLakeWriter()
    expected = _fill(source)
    failing = FailingCommitLake(lake)
    totals = _run_once(settings, MemoryKeyState(), source=source, lake=failing)
    assert failing.failed and failing.group_2_written.is_set()
    _check_exactly_once(lake, source, expected)
    assert failing.order == {table: [0, 1, 2] for table in ("events", "quarantine", "ledger")}
    assert totals.bad_files == 1
