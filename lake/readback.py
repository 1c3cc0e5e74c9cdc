"""What a writer reads back of the events it committed: the dedupe window, a group's events.

Each read is of one Delta snapshot, so a concurrent commit, optimize or vacuum never makes it
miss or double a row, on local disk and on S3 alike. The newest event time comes from the
log's file statistics (no data read); the rows from the files whose event times reach into
the window (partition and statistics pruning), reading only event_id and event_time.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Final

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from lake.location import LakeLocation
from lake.snapshot import table_dataset
from lake.tables import EVENTS, open_table

#: The columns a read-back returns: what a key of the dedupe window is made of.
KEY_COLUMNS: Final = ["event_id", "event_time"]


def key_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame``'s key columns, event_time as UTC milliseconds (the read-backs' shape)."""
    return frame.select(KEY_COLUMNS).with_columns(
        pl.col("event_time").cast(pl.Datetime("ms", "UTC"))
    )


def _events(location: LakeLocation) -> DeltaTable | None:
    try:
        return open_table(location, EVENTS)
    except TableNotFoundError:
        return None


def _read(dataset: pads.Dataset, predicate: pc.Expression | None) -> pl.DataFrame:
    frame = pl.from_arrow(dataset.to_table(columns=KEY_COLUMNS, filter=predicate))
    assert isinstance(frame, pl.DataFrame)
    return key_frame(frame)


def _add_actions(table: DeltaTable, added_since_ms: int | None) -> pl.DataFrame:
    """The snapshot's files with their event_time bounds (optionally only files added since)."""
    frame = pl.from_arrow(pa.table(table.get_add_actions(flatten=True)))
    assert isinstance(frame, pl.DataFrame)
    if not len(frame):
        return pl.DataFrame(schema={"path": pl.String, "max_ms": pl.Int64})
    frame = frame.select(
        "path",
        pl.col("modification_time").cast(pl.Int64),
        pl.col("max.event_time").dt.epoch("ms").alias("max_ms"),
    )
    if added_since_ms is not None:
        frame = frame.filter(pl.col("modification_time") >= added_since_ms)
    return frame


def empty_keys_frame() -> pl.DataFrame:
    return pl.DataFrame(schema={"event_id": pl.String, "event_time": pl.Datetime("ms", "UTC")})


def recent_events(
    location: LakeLocation, window_ms: int, added_since_ms: int | None = None
) -> tuple[pl.DataFrame, int | None]:
    """Keys of the stored events within ``window_ms`` of the newest, and that newest time.

    With ``added_since_ms``, only files added since then count: the catch-up of a key-cache
    rebuild after commits that raced its first read.
    """
    table = _events(location)
    if table is None:
        return empty_keys_frame(), None
    actions = _add_actions(table, added_since_ms)
    top = actions["max_ms"].max()
    if top is None:
        return empty_keys_frame(), None
    newest = int(str(top))
    cutoff_ms = newest - window_ms
    paths = actions.filter(pl.col("max_ms") >= cutoff_ms)["path"].to_list()
    dataset = pads.dataset(
        [location.path(EVENTS.name, p) for p in paths],
        filesystem=location.filesystem(),
        format="parquet",
    )
    cutoff = datetime.fromtimestamp(cutoff_ms / 1000, UTC)
    return _read(dataset, pc.field("event_time") >= cutoff), newest


def batch_events(
    location: LakeLocation, batch_ids: Collection[str], span_ms: tuple[int, int]
) -> pl.DataFrame:
    """Keys of the committed events of ``batch_ids`` (event times within ``span_ms``)."""
    table = _events(location)
    if table is None or not batch_ids:
        return empty_keys_frame()
    low, high = (datetime.fromtimestamp(ms / 1000, UTC) for ms in span_ms)
    dataset = table_dataset(location, EVENTS, table)
    predicate = (
        (pc.field("event_time") >= low)
        & (pc.field("event_time") <= high)
        & pc.field("batch_id").isin(list(batch_ids))
    )
    return _read(dataset, predicate)
