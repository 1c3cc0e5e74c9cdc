"""Helpers for tests of queries and the API: land contract tables in a real lake."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.consumer import Consumer
from pipeline.factory import make_key_cache
from pipeline.schema import Layout
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter


def write_campaigns(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Write the campaign dimension (campaign_id, advertiser_id, campaign_name)."""
    layout = Layout(settings.data_dir)
    layout.dimensions.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        rows,
        schema={"campaign_id": pl.String, "advertiser_id": pl.String, "campaign_name": pl.String},
    ).write_parquet(layout.campaigns)


def land(settings: Settings, *tables: pa.Table, producer: str = "test") -> list[dict[str, Any]]:
    """Spool each table as one file, run a consumer until incoming/ is empty; its ledger rows."""
    writer = SpoolWriter(Layout(settings.data_dir).incoming, producer)
    for table in tables:
        writer.write(table)
    consumer = Consumer(settings, make_key_cache(settings))
    consumer.start()
    rows: list[dict[str, Any]] = []
    try:
        for path in sorted(Layout(settings.data_dir).incoming.glob("*.arrow")):
            row = consumer.process_file(path)
            if row is not None:
                rows.append(row)
    finally:
        consumer.close()
    return rows
