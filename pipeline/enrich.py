"""Enrichment: join the campaign dimension and stamp batch metadata; frames in, frames out."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipeline.schema import CAMPAIGN_COLUMNS, CAMPAIGN_SCHEMA, ENRICHED_SCHEMA


def empty_campaigns() -> pl.DataFrame:
    return pl.DataFrame(schema=CAMPAIGN_SCHEMA)


def load_campaigns(path: Path) -> pl.DataFrame:
    """Read the campaign dimension; one row per campaign_id (the first wins). Empty if absent."""
    if not path.exists():
        return empty_campaigns()
    frame = pl.read_parquet(path)
    missing = [c for c in CAMPAIGN_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: the campaign dimension lacks required column(s) {missing}")
    return frame.select([pl.col(c).cast(pl.String) for c in CAMPAIGN_COLUMNS]).unique(
        "campaign_id", keep="first", maintain_order=True
    )


class CampaignFile:
    """The campaign dimension at ``path``, read again whenever the file changes (a consumer
    picks up an edited dimension without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._frame = empty_campaigns()
        self._mtime: float | None = -1.0

    def current(self) -> pl.DataFrame:
        try:
            mtime: float | None = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self._frame = load_campaigns(self.path)
            self._mtime = mtime
        return self._frame


def enrich(
    events: pl.DataFrame,
    campaigns: pl.DataFrame,
    *,
    batch_id: str | pl.Expr,
    ingested_at: datetime,
    keep: Sequence[str] = (),
    schema: pl.Schema = ENRICHED_SCHEMA,
) -> tuple[pl.DataFrame, int]:
    """Add advertiser_id, campaign_name, ingested_at and batch_id (a value, or an expression
    over ``events`` for rows of several batches); count unknown campaigns. The result has
    ``schema``'s columns and types (ENRICHED_SCHEMA's names), then ``keep``'s."""
    # The dimension in the events' and the result's types: a join needs its keys' types equal,
    # and a categorical events column then gathers codes, never strings.
    types = pl.Schema({c: schema[c] for c in CAMPAIGN_COLUMNS})
    types["campaign_id"] = events.schema["campaign_id"]
    dim = campaigns.select(CAMPAIGN_COLUMNS).cast(types)
    joined = events.join(dim, on="campaign_id", how="left", maintain_order="left")
    unknown = int(joined["advertiser_id"].is_null().sum()) if len(joined) else 0
    stamped = joined.with_columns(
        ingested_at=pl.lit(ingested_at.astimezone(UTC)).cast(schema["ingested_at"]),
        batch_id=batch_id if isinstance(batch_id, pl.Expr) else pl.lit(batch_id, pl.String),
    )
    enriched = stamped.select(schema.names()).cast(schema)
    return enriched.hstack(stamped.select(keep).get_columns()) if keep else enriched, unknown
