"""Maintenance through delta-rs while writers commit and readers read: every read is exact.

Readers open a fresh snapshot and count every batch's rows during optimize (compact), during
the clustering of the open hour by campaign and time, during vacuum and during concurrent
commits; a batch is always seen whole (exactly its rows) or not at all, never twice. Then
retention (delete by partition + vacuum), checkpoints and log cleanup keep the table readable
and exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import duckdb
import pytest
from deltalake import DeltaTable

from lake import maintenance, snapshot
from lake.cluster import ClusterResult, cluster_hour
from lake.location import LakeLocation
from lake.tables import EVENTS, ensure_table, ensure_tables
from lake.testing import HOUR_MS, START_MS, enriched_frame
from lake.writer import commit_batch, committed_version

ROWS = 300
TIMEOUT_S = 120.0


def commit(
    location: LakeLocation, app: str, version: int, tables: Mapping[str, DeltaTable]
) -> None:
    """Batch ``version`` of ``app``: ROWS events over two hours, tagged with their batch id."""
    frame = enriched_frame(
        ROWS, seed=version, id_prefix=app, span_ms=2 * HOUR_MS, batch_id=f"{app}-{version}"
    )
    commit_batch(location, app, version, {"events": frame}, tables=tables)


def per_batch(location: LakeLocation) -> dict[str, int]:
    """Rows per batch in a fresh snapshot of events."""
    con = duckdb.connect()
    snapshot.register(con, snapshot.snapshot(location))
    rows = con.sql("SELECT batch_id, count(*) FROM events GROUP BY 1").fetchall()
    return {str(b): int(n) for b, n in rows}


class Readers:
    """Threads that read until stopped, recording any read that is not exact."""

    def __init__(self, location: LakeLocation, initial: set[str], n: int = 2) -> None:
        self.location, self.initial = location, initial
        self.stop = threading.Event()
        self.bad: list[str] = []
        self.reads = 0
        self.epoch = 0
        self.done = [-1] * n  # per thread: the epoch in which its last finished read began
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        last = 0
        while not self.stop.is_set():
            began = self.epoch
            try:
                seen = per_batch(self.location)
            except Exception as exc:
                self.bad.append(f"read failed: {exc}")
                return
            self.reads += 1
            self.done[i] = began
            wrong = {b: n for b, n in seen.items() if n != ROWS}
            if wrong or not self.initial <= set(seen) or len(seen) < last:
                self.bad.append(f"inexact read: {wrong}, {len(seen)} batches, last {last}")
            last = len(seen)

    def new_epoch(self) -> None:
        """Return once every reader has finished a read that began after this call."""
        self.epoch += 1
        deadline = time.monotonic() + TIMEOUT_S
        while min(self.done) < self.epoch and not self.bad:
            assert time.monotonic() < deadline, "readers stalled"
            time.sleep(0.01)

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(TIMEOUT_S)


def while_committing(
    location: LakeLocation, app: str, versions: range, work: Callable[[], None]
) -> None:
    """Run ``work`` while another thread commits ``versions`` of ``app``."""
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            tables = ensure_tables(location)
            for v in versions:
                commit(location, app, v, tables)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    work()
    thread.join(TIMEOUT_S)
    assert not errors


def test_readers_exact_during_optimize_vacuum_and_commits(location: LakeLocation) -> None:
    tables = ensure_tables(location)
    for v in range(1, 9):
        commit(location, "seed", v, tables)
    initial = set(per_batch(location))
    assert len(initial) == 8
    table = tables["events"]
    with Readers(location, initial) as readers:
        # Compact the first hour, then cluster the open one, while a writer appends to both.
        metrics: list[dict[str, Any]] = []
        clustered: list[ClusterResult] = []

        def optimize() -> None:
            closed = maintenance.hour_filter("2026-12-02", "00")
            metrics.append(maintenance.optimize(table, closed))
            clustered.append(
                cluster_hour(
                    location,
                    table,
                    "2026-12-02",
                    "01",
                    target_bytes=1 << 20,
                    memory_bytes=64 << 20,
                    row_group_rows=100,
                )
            )

        while_committing(location, "live", range(1, 6), optimize)
        # Once no reader holds a pre-optimize snapshot, vacuum deletes the rewritten files
        # (with retention 0: in production the retention is what protects older snapshots).
        readers.new_epoch()
        removed: list[str] = []
        while_committing(
            location,
            "late",
            range(1, 4),
            lambda: removed.extend(
                maintenance.vacuum(table, 0, full=False, allow_short_retention=True)
            ),
        )
    assert not readers.bad, readers.bad[:3]
    assert readers.reads > 0
    assert removed  # the files optimize replaced
    assert metrics[0]["compact"]["numFilesRemoved"] >= 8
    assert clustered[0].files_added >= 1 and clustered[0].files_removed >= 8
    final = per_batch(location)
    assert len(final) == 8 + 5 + 3 and set(final.values()) == {ROWS}
    assert committed_version(ensure_table(location, EVENTS), "live") == 5


def test_retention_checkpoint_and_log_cleanup(location: LakeLocation) -> None:
    tables = ensure_tables(location)
    table = tables["events"]
    day = 24 * HOUR_MS
    for v, start in enumerate((START_MS - 2 * day, START_MS - day, START_MS), start=1):
        frame = enriched_frame(ROWS, seed=v, start_ms=start)
        commit_batch(location, "r", v, {"events": frame}, tables=tables)
    maintenance.checkpoint(table)
    metrics = maintenance.delete_before(table, "2026-12-01")
    assert metrics["num_removed_files"] == 1
    assert sum(per_batch(location).values()) == 2 * ROWS
    removed = maintenance.vacuum(table, 0, allow_short_retention=True)
    assert [p.split("/")[0] for p in removed] == ["date=2026-11-30"]
    maintenance.cleanup_logs(table)
    assert committed_version(table, "r") == 3  # the txn survives checkpoints and cleanup
    assert sum(per_batch(location).values()) == 2 * ROWS
    with pytest.raises(ValueError, match="retention_hours"):
        maintenance.vacuum(table, 0)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        maintenance.delete_before(table, "2026-12-01' OR true --")
