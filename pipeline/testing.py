"""Helpers for tests of adevents and of users' producers: build contract tables, read the lake."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.schema import EVENT_SCHEMA


def event_table(
    event_ids: Sequence[str | None], *, time_ms: int | Sequence[int | None], **columns: Any
) -> pa.Table:
    """A contract-shaped table of valid impressions; ``columns`` override any column's values."""
    n = len(event_ids)
    times = [time_ms] * n if isinstance(time_ms, int) else list(time_ms)
    values: dict[str, Any] = {
        "event_id": list(event_ids),
        "event_type": ["impression"] * n,
        "event_time": times,
        "campaign_id": ["cmp-0001"] * n,
        "ad_id": ["ad-1"] * n,
        "publisher_id": ["pub-1"] * n,
        "user_id": [f"user-{i}" for i in range(n)],
        "device_type": ["mobile"] * n,
        "country": ["US"] * n,
        "cost_micros": [1500] * n,
        "revenue_micros": [0] * n,
    }
    extra = {k: v for k, v in columns.items() if k not in values}
    values.update({k: v for k, v in columns.items() if k in values})
    arrays = [pa.array(values[f.name], type=f.type) for f in EVENT_SCHEMA]
    schema = pa.schema([pa.field(f.name, f.type) for f in EVENT_SCHEMA])
    table = pa.Table.from_arrays(arrays, schema=schema)
    for name, col in extra.items():
        table = table.append_column(name, pa.array(col))
    return table


def read_parquet_dir(directory: Path, *, drop: Sequence[str] = ()) -> pl.DataFrame:
    """All Parquet rows under ``directory`` in a canonical order (empty frame when none)."""
    files = sorted(directory.rglob("*.parquet"))
    if not files:
        return pl.DataFrame()
    frame = pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed")
    frame = frame.drop([c for c in drop if c in frame.columns])
    return frame.sort(frame.columns, nulls_last=True)


def lake_contents(data_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events, quarantine rows) without per-run columns, for comparing two runs."""
    per_run = ("ingested_at", "batch_id")
    root = Path(data_dir)
    quarantine = root / "quarantine"
    rows = [
        f for f in quarantine.rglob("*.parquet") if "files" not in f.relative_to(quarantine).parts
    ]
    q = (
        pl.concat([pl.read_parquet(f) for f in sorted(rows)]).drop(list(per_run))
        if rows
        else pl.DataFrame()
    )
    if len(q):
        q = q.sort(q.columns, nulls_last=True)
    return read_parquet_dir(root / "events", drop=per_run), q
