"""Helpers for tests of queries and the API: fill a real Delta lake, by hand or by the consumer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.schema import ENRICHED_SCHEMA, Layout
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter
from pipeline.testing import consume_once


def write_campaigns(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Write the campaign dimension (campaign_id, advertiser_id, campaign_name)."""
    layout = Layout(settings.data_dir)
    layout.dimensions.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        rows,
        schema={"campaign_id": pl.String, "advertiser_id": pl.String, "campaign_name": pl.String},
    ).write_parquet(layout.campaigns)


def enriched(
    table: pa.Table,
    *,
    batch_id: str,
    ingested_ms: int,
    campaigns: Mapping[str, tuple[str, str]] | None = None,
) -> pl.DataFrame:
    """A contract table (``pipeline.testing.event_table``) as the consumer stores it: with the
    campaign's (advertiser_id, campaign_name) from ``campaigns``, ``ingested_at`` and
    ``batch_id`` (ENRICHED_SCHEMA)."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    known = campaigns or {}
    ids = frame["campaign_id"].to_list()
    return (
        frame.with_columns(
            advertiser_id=pl.Series([known.get(c, (None, None))[0] for c in ids], dtype=pl.String),
            campaign_name=pl.Series([known.get(c, (None, None))[1] for c in ids], dtype=pl.String),
            ingested_at=pl.lit(ingested_ms),
            batch_id=pl.lit(batch_id),
        )
        .select(ENRICHED_SCHEMA.names())
        .cast(ENRICHED_SCHEMA)
    )


def land(settings: Settings, *tables: pa.Table, producer: str = "test") -> None:
    """Spool each table as one file and run the real consumer until incoming/ is empty."""
    writer = SpoolWriter(Layout(settings.data_dir).incoming, producer)
    for table in tables:
        writer.write(table)
    consume_once(settings)
