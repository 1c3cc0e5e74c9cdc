"""Reads of the lake the pipeline itself needs: the dedupe window's keys from the events table.

Each read is of one Delta snapshot, so a concurrent commit, optimize or vacuum never makes it
miss or double a row, on local disk and on S3 alike. The watermark comes from the log's file
statistics (no data read); the keys from the files whose event times reach into the window
(partition and statistics pruning), reading only event_id and event_time.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from lake.location import LakeLocation
from lake.snapshot import table_dataset
from lake.tables import EVENTS, open_table
from pipeline.fingerprint import Keys, compute_keys, empty_keys

_COLUMNS = ["event_id", "event_time"]


def _events(location: LakeLocation) -> DeltaTable | None:
    try:
        return open_table(location, EVENTS)
    except TableNotFoundError:
        return None


def _keys(frame: pl.DataFrame, slice_ms: int) -> tuple[Keys, int | None]:
    if not len(frame):
        return empty_keys(), None
    top = frame["event_time"].dt.epoch("ms").max()
    return compute_keys(frame["event_id"], frame["event_time"], slice_ms), int(str(top))


def _read(dataset: pads.Dataset, predicate: pc.Expression | None) -> pl.DataFrame:
    table = dataset.to_table(columns=_COLUMNS, filter=predicate)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col("event_time").cast(pl.Datetime("ms", "UTC")))


def _add_actions(table: DeltaTable, modified_since_ms: int | None) -> pl.DataFrame:
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
    if modified_since_ms is not None:
        frame = frame.filter(pl.col("modification_time") >= modified_since_ms)
    return frame


def window_keys(
    location: LakeLocation, window_ms: int, slice_ms: int, modified_since: float | None = None
) -> tuple[Keys, int | None]:
    """Keys of every stored event in the dedupe window, and the watermark (max event_time).

    With ``modified_since`` (epoch seconds), only files added since then are read: the
    catch-up of a Redis rebuild after commits that raced its first read. The watermark comes
    from the log's statistics; only files whose newest event reaches into the window are read.
    """
    table = _events(location)
    if table is None:
        return empty_keys(), None
    since_ms = None if modified_since is None else int(modified_since * 1000)
    actions = _add_actions(table, since_ms)
    top = actions["max_ms"].max()
    if top is None:
        return empty_keys(), None
    watermark = int(str(top))
    cutoff_ms = watermark - window_ms
    paths = actions.filter(pl.col("max_ms") >= cutoff_ms)["path"].to_list()
    dataset = pads.dataset(
        [location.path(EVENTS.name, p) for p in paths],
        filesystem=location.filesystem(),
        format="parquet",
    )
    cutoff = datetime.fromtimestamp(cutoff_ms / 1000, UTC)
    keys, _ = _keys(_read(dataset, pc.field("event_time") >= cutoff), slice_ms)
    return keys, watermark


def batch_keys(
    location: LakeLocation,
    batch_ids: Collection[str],
    span_ms: tuple[int, int],
    slice_ms: int,
) -> tuple[Keys, int | None]:
    """Keys of the committed events of ``batch_ids`` (event times within ``span_ms``)."""
    table = _events(location)
    if table is None or not batch_ids:
        return empty_keys(), None
    low, high = (datetime.fromtimestamp(ms / 1000, UTC) for ms in span_ms)
    dataset = table_dataset(location, EVENTS, table)
    predicate = (
        (pc.field("event_time") >= low)
        & (pc.field("event_time") <= high)
        & pc.field("batch_id").isin(list(batch_ids))
    )
    return _keys(_read(dataset, predicate), slice_ms)
