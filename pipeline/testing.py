"""Helpers for tests of adevents and of users' producers: build contract tables, read the lake."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from pipeline.schema import EVENT_SCHEMA

if TYPE_CHECKING:
    from lake.location import LakeLocation


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
    """(events, quarantine rows) of the default lake (DATA_DIR/lake) without per-run columns,
    in a canonical order, for comparing two runs."""
    from lake.location import LakeLocation

    return tables_contents(LakeLocation.from_env({}, data_dir=str(data_dir)))


def tables_contents(location: LakeLocation) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events, quarantine rows) of the lake at ``location``; see :func:`lake_contents`."""
    from lake.snapshot import snapshot

    per_run = ("ingested_at", "batch_id", "date", "hour")
    snap = snapshot(location)
    out = []
    for name in ("events", "quarantine"):
        frame = pl.from_arrow(snap.datasets[name].to_table())
        assert isinstance(frame, pl.DataFrame)
        frame = frame.drop([c for c in per_run if c in frame.columns])
        out.append(frame.sort(frame.columns, nulls_last=True))
    return out[0], out[1]
