"""The dedupe window's keys, from what the lake writer reads back of the events table."""

from __future__ import annotations

from collections.abc import Collection

import polars as pl

from lake.writer import LakeWriter
from pipeline.fingerprint import Keys, compute_keys, empty_keys


def _keys(frame: pl.DataFrame, slice_ms: int) -> Keys:
    if not len(frame):
        return empty_keys()
    return compute_keys(frame["event_id"], frame["event_time"], slice_ms)


def window_keys(
    lake: LakeWriter, window_ms: int, slice_ms: int, added_since: float | None = None
) -> tuple[Keys, int | None]:
    """Keys of every stored event in the dedupe window, and the watermark (max event_time).

    With ``added_since`` (epoch seconds), only files added since then are read: the catch-up
    of a Redis rebuild after commits that raced its first read.
    """
    since_ms = None if added_since is None else int(added_since * 1000)
    frame, watermark = lake.recent_events(window_ms, since_ms)
    return _keys(frame, slice_ms), watermark


def batch_keys(
    lake: LakeWriter, batch_ids: Collection[str], span_ms: tuple[int, int], slice_ms: int
) -> tuple[Keys, int | None]:
    """Keys of the committed events of ``batch_ids`` (event times within ``span_ms``), and the
    newest of their times."""
    frame = lake.batch_events(batch_ids, span_ms)
    if not len(frame):
        return empty_keys(), None
    top = frame["event_time"].dt.epoch("ms").max()
    return _keys(frame, slice_ms), int(str(top))
