"""Reads of the lake the pipeline itself needs: the dedupe window's keys, rebuilt from events/.

They follow compaction's reader rule (:func:`pipeline.livefiles.consistent`): each stored
event is read once even while a compaction swaps an hour's files, and a file that a swap deletes
between listing and reading makes the whole read start over.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Final

import polars as pl

from pipeline.fingerprint import Keys, compute_keys
from pipeline.livefiles import HourPartition, consistent, hour_partitions, parquet_names
from pipeline.schema import Layout

#: Reads started over because a file vanished (a compaction swap) before giving up.
ATTEMPTS: Final = 50


def _live_partitions(
    layout: Layout, modified_since: float | None
) -> list[tuple[HourPartition, list[str]]]:
    """Every events partition, oldest first, with the files to read now (sorted).

    With ``modified_since`` (epoch seconds), only files written since then.
    """

    def listing() -> list[tuple[HourPartition, list[str]]]:
        return [(p, parquet_names(p.path)) for p in hour_partitions(layout.events)]

    listed, view = consistent(layout, listing)
    out = []
    for partition, names in listed:
        files = [str(partition.path / n) for n in view.visible(partition.key, names)]
        if modified_since is not None:
            files = [f for f in files if os.stat(f).st_mtime >= modified_since]
        out.append((partition, files))
    return out


def _window_keys(
    layout: Layout, window_ms: int, slice_ms: int, modified_since: float | None
) -> tuple[Keys, int | None]:
    parts = _live_partitions(layout, modified_since)
    empty = pl.DataFrame(schema={"event_id": pl.String, "event_time": pl.Datetime("ms", "UTC")})
    watermark = None
    for _, files in reversed(parts):
        if files:
            top = pl.scan_parquet(files).select(pl.col("event_time").max()).collect().item()
            if top is not None:
                watermark = int(top.timestamp() * 1000)
                break
    if watermark is None:
        return compute_keys(empty["event_id"], empty["event_time"], slice_ms), None
    cutoff_ms = watermark - window_ms
    files = [f for p, names in parts if p.end_ms > cutoff_ms for f in names]
    cutoff = datetime.fromtimestamp(cutoff_ms / 1000, UTC)
    frame = (
        pl.scan_parquet(files)
        .select("event_id", "event_time")
        .filter(pl.col("event_time") >= cutoff)
        .collect()
        if files
        else empty
    )
    return compute_keys(frame["event_id"], frame["event_time"], slice_ms), watermark


def window_keys(
    layout: Layout, window_ms: int, slice_ms: int, modified_since: float | None = None
) -> tuple[Keys, int | None]:
    """Keys of every stored event in the dedupe window, and the watermark (max event_time).

    With ``modified_since`` (epoch seconds), only files written since then are read.
    """
    for attempt in range(ATTEMPTS):
        try:
            return _window_keys(layout, window_ms, slice_ms, modified_since)
        except FileNotFoundError:
            # A compaction swap deleted a listed file before it was read: list again.
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.005)
    raise AssertionError("unreachable")
