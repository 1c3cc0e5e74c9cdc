"""Frames for tests and benches (enriched events, quarantine rows and ledger rows, in schema),
and :class:`MemoryLakeWriter`, an in-memory fake of the lake writer.

Frames are deterministic for a seed, built column-wise with NumPy (no per-row Python), so a
bench can make 100k-row frames cheaply and a test can reconcile exact counts. The fake passes
the same contract tests as ``lake.writer.DeltaLakeWriter`` (``tests/test_lake_writer.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import numpy as np
import polars as pl
from deltalake import DeltaTable

from lake.cluster import cluster_hour
from lake.location import LakeLocation
from lake.readback import empty_keys_frame, key_frame
from lake.tables import EVENTS, TABLES, TableSpec
from lake.writer import (
    Outcome,
    Staged,
    TableCommit,
    TxnOverlapError,
    commit_batch,
    names_txn,
    with_partition_columns,
)
from pipeline.schema import ENRICHED_SCHEMA, HOUR_MS, LEDGER_SCHEMA, QUARANTINE_SCHEMA, UTC_MS
from pipeline.settings import JobSettings

#: 2026-12-02T00:00:00Z, the default start of generated event times.
START_MS: Final = int(datetime(2026, 12, 2, tzinfo=UTC).timestamp() * 1000)


def enriched_frame(
    rows: int,
    *,
    seed: int = 0,
    start_ms: int = START_MS,
    span_ms: int = HOUR_MS,
    campaigns: int = 200,
    batch_id: str = "b0",
    id_prefix: str = "",
) -> pl.DataFrame:
    """``rows`` accepted events (ENRICHED_SCHEMA) with times in ``[start_ms, start_ms+span_ms)``."""
    rng = np.random.default_rng(seed)
    ids = pl.Series("event_id", np.arange(rows)).cast(pl.String)
    campaign = rng.zipf(1.3, rows) % campaigns
    cost = rng.integers(0, 5_000, rows)
    frame = pl.DataFrame(
        {
            "event_id": (f"{id_prefix}{seed}-" + ids) if rows else ids,
            "event_type": pl.Series(rng.choice(["impression", "click", "conversion"], rows)),
            "event_time": pl.Series(start_ms + rng.integers(0, span_ms, rows)).cast(UTC_MS),
            "campaign_id": pl.Series(campaign).cast(pl.String).str.zfill(5),
            "ad_id": pl.Series(rng.integers(0, 5_000, rows)).cast(pl.String),
            "publisher_id": pl.Series(rng.integers(0, 500, rows)).cast(pl.String),
            "user_id": pl.Series(rng.integers(0, 1_000_000, rows)).cast(pl.String),
            "device_type": pl.Series(rng.choice(["mobile", "desktop", "tablet", "ctv"], rows)),
            "country": pl.Series(rng.choice(["US", "DE", "FR", "GB", "JP"], rows)),
            "cost_micros": pl.Series(cost, dtype=pl.Int64),
            "revenue_micros": pl.Series(cost * 3, dtype=pl.Int64),
            "advertiser_id": pl.Series(campaign // 10).cast(pl.String),
            "campaign_name": pl.Series(campaign).cast(pl.String),
            "ingested_at": pl.Series([start_ms + span_ms] * rows).cast(UTC_MS),
            "batch_id": pl.Series([batch_id] * rows, dtype=pl.String),
        }
    )
    return frame.cast(dict(ENRICHED_SCHEMA))  # type: ignore[arg-type]


def quarantine_frame(rows: int, *, seed: int = 0, at_ms: int = START_MS) -> pl.DataFrame:
    """``rows`` rejected rows (QUARANTINE_SCHEMA), quarantined at ``at_ms``."""
    events = enriched_frame(rows, seed=seed, start_ms=at_ms, id_prefix="q")
    return events.with_columns(
        reason=pl.lit("invalid_country"),
        source_file=pl.lit("test.arrow"),
    ).select(list(QUARANTINE_SCHEMA))


def ledger_frame(batch_id: str, *, rows_in: int, at_ms: int = START_MS) -> pl.DataFrame:
    """One ledger row (LEDGER_SCHEMA) for a batch committed at ``at_ms``."""
    row: dict[str, object] = dict.fromkeys(LEDGER_SCHEMA)
    row.update(
        batch_id=batch_id,
        source_file=f"{batch_id}.arrow",
        status="ok",
        rows_in=rows_in,
        accepted=rows_in,
        duplicates=0,
        quarantined=0,
        committed_at=datetime.fromtimestamp(at_ms / 1000, UTC),
    )
    return pl.DataFrame([row], schema=LEDGER_SCHEMA)


def append(
    location: LakeLocation, frames: Mapping[str, pl.DataFrame], *, fsync: bool = False
) -> None:
    """Commit ``frames`` (by table name) as one fresh writer's batch: how tests fill a lake."""
    commit_batch(location, f"test:{uuid.uuid4().hex}", 0, frames, fsync=fsync)


@dataclass(frozen=True)
class StagedFrame(Staged):
    """:class:`MemoryLakeWriter`'s staged part: the rows themselves."""

    frame: pl.DataFrame


class MemoryLakeWriter:
    """An in-memory :class:`lake.writer.LakeWriter`: frames kept per table, txns per app_id."""

    def __init__(self, specs: Mapping[str, TableSpec] = TABLES) -> None:
        self.specs = specs
        self._frames: dict[str, list[pl.DataFrame]] = {name: [] for name in specs}
        self._txns: dict[tuple[str, str], int] = {}
        self._metadata: dict[str, list[dict[str, str]]] = {}
        #: When each of the events frames was committed (epoch ms), for ``added_since_ms``.
        self._added: list[int] = []

    def rows(self, table: str) -> pl.DataFrame:
        """Every row committed to ``table``, in commit order."""
        empty = pl.from_arrow(self.specs[table].columns.empty_table())
        assert isinstance(empty, pl.DataFrame)
        return pl.concat([empty, *self._frames[table]], how="vertical_relaxed")

    def committed_version(self, table: str, app_id: str) -> int | None:
        return self._txns.get((table, app_id))

    def committed_versions(self, table: str, app_ids: Collection[str]) -> dict[str, int | None]:
        return {app_id: self._txns.get((table, app_id)) for app_id in app_ids}

    def commit(
        self, app_id: str, version: int, frames: Mapping[str, pl.DataFrame]
    ) -> list[TableCommit]:
        return self.commit_group({app_id: version}, frames)

    def commit_group(
        self,
        txns: Mapping[str, int],
        frames: Mapping[str, pl.DataFrame],
        metadata: Mapping[str, str] | None = None,
    ) -> list[TableCommit]:
        unknown = set(frames) - set(self.specs)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}; known: {sorted(self.specs)}")
        results = []
        for name, spec in self.specs.items():
            if name not in frames:
                continue
            done = [
                (seen := self._txns.get((name, app))) is not None and seen >= version
                for app, version in txns.items()
            ]
            if all(done):
                results.append(TableCommit(name, Outcome.SKIPPED))
                continue
            if any(done):
                raise TxnOverlapError(f"{name}: another writer committed part of {dict(txns)}")
            # The real writer's checks (columns present, partition time set) and file count (one
            # per partition).
            framed = with_partition_columns(spec, frames[name])
            files = framed.select(spec.partition_by).n_unique() if framed.height else 0
            # As a reader of the files sees them: categoricals are strings there.
            stored = framed.select(spec.columns.names)
            self._frames[name].append(stored.with_columns(pl.col(pl.Categorical).cast(pl.String)))
            if name == EVENTS.name:
                self._added.append(int(time.time() * 1000))
            for app, version in txns.items():
                self._txns[name, app] = version
            self._metadata.setdefault(name, []).append(dict(metadata or {}))
            results.append(TableCommit(name, Outcome.COMMITTED, framed.height, files))
        return results

    def stage(self, table: str, version: int, frame: pl.DataFrame) -> Staged:
        if table not in self.specs:
            raise ValueError(f"unknown table {table!r}; known: {sorted(self.specs)}")
        return StagedFrame(table, frame)

    def commit_staged(self, app_id: str, version: int, staged: Staged) -> TableCommit:
        assert isinstance(staged, StagedFrame), staged
        (result,) = self.commit(app_id, version, {staged.table: staged.frame})
        return result

    def group_metadata(self, table: str, key: str, app_id: str, version: int) -> str | None:
        for metadata in reversed(self._metadata.get(table, [])):
            value = metadata.get(key)
            if value is not None and names_txn(value, app_id, version):
                return value
        return None

    def recent_events(
        self, window_ms: int, added_since_ms: int | None = None
    ) -> tuple[pl.DataFrame, int | None]:
        frames = [
            frame
            for frame, added in zip(self._frames[EVENTS.name], self._added, strict=True)
            if added_since_ms is None or added >= added_since_ms
        ]
        if not any(len(f) for f in frames):
            return empty_keys_frame(), None
        keys = key_frame(pl.concat(frames))
        newest = int(str(keys["event_time"].dt.epoch("ms").max()))
        return keys.filter(pl.col("event_time").dt.epoch("ms") >= newest - window_ms), newest

    def batch_events(self, batch_ids: Collection[str], span_ms: tuple[int, int]) -> pl.DataFrame:
        events = self.rows(EVENTS.name)
        millis = pl.col("event_time").dt.epoch("ms")
        return key_frame(
            events.filter(pl.col("batch_id").is_in(list(batch_ids)), millis.is_between(*span_ms))
        )


def cluster_every_hour(location: LakeLocation, table: DeltaTable) -> int:
    """Cluster every events hour of ``table`` as the compaction job does a closed one (with its
    default row groups); the number of hours rewritten."""
    done = 0
    for partition in table.partitions():
        result = cluster_hour(
            location,
            table,
            partition["date"],
            partition["hour"],
            target_bytes=128 * 1024**2,
            memory_bytes=256 * 1024**2,
            row_group_rows=JobSettings().compact_row_group_rows,
        )
        done += result.files_added > 0
    return done
