"""Reads of the lake the pipeline itself needs: the dedupe window's keys, rebuilt from events/."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipeline.fingerprint import Keys, compute_keys
from pipeline.schema import Layout


def _hour_partitions(events: Path) -> list[tuple[datetime, Path]]:
    """(hour start, directory) of every events partition, oldest first."""
    out: list[tuple[datetime, Path]] = []
    if not events.exists():
        return out
    for date_dir in os.scandir(events):
        if not date_dir.name.startswith("date=") or not date_dir.is_dir():
            continue
        for hour_dir in os.scandir(date_dir.path):
            if not hour_dir.name.startswith("hour="):
                continue
            try:
                start = datetime.strptime(
                    f"{date_dir.name[5:]} {hour_dir.name[5:]}", "%Y-%m-%d %H"
                ).replace(tzinfo=UTC)
            except ValueError:
                continue
            out.append((start, Path(hour_dir.path)))
    out.sort()
    return out


def _files(directory: Path, modified_since: float | None = None) -> list[str]:
    names = [f for f in os.listdir(directory) if f.endswith(".parquet")]
    if modified_since is not None:
        names = [f for f in names if (directory / f).stat().st_mtime >= modified_since]
    return sorted(str(directory / f) for f in names)


def window_keys(
    layout: Layout, window_ms: int, slice_ms: int, modified_since: float | None = None
) -> tuple[Keys, int | None]:
    """Keys of every stored event in the dedupe window, and the watermark (max event_time).

    With ``modified_since`` (epoch seconds), only files written since then are read.
    """
    parts = _hour_partitions(layout.events)
    empty = pl.DataFrame(schema={"event_id": pl.String, "event_time": pl.Datetime("ms", "UTC")})
    watermark = None
    for _, directory in reversed(parts):
        files = _files(directory, modified_since)
        if files:
            top = pl.scan_parquet(files).select(pl.col("event_time").max()).collect().item()
            if top is not None:
                watermark = int(top.timestamp() * 1000)
                break
    if watermark is None:
        return compute_keys(empty["event_id"], empty["event_time"], slice_ms), None
    cutoff_ms = watermark - window_ms
    hour_ms = 3600 * 1000
    wanted = [d for start, d in parts if start.timestamp() * 1000 + hour_ms > cutoff_ms]
    files = [f for d in wanted for f in _files(d, modified_since)]
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
