"""Compaction benchmark: files before/after and DuckDB query times on a micro-batch Delta lake.

``python bench/compaction.py --events 3000000`` draws events with the generator's model
(Zipf campaigns, funnel, prices), commits them as the consumer does (one Delta commit per
batch, one file per hour it touches), then times DuckDB queries over a snapshot of the events
table before and after the compaction job (optimize, then the clustering of the closed hours).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from jobs.compact import compact
from lake.location import LakeLocation
from lake.snapshot import connect
from lake.tables import EVENTS, open_table
from lake.testing import append
from pipeline.enrich import enrich
from pipeline.schema import HOUR_MS, Layout
from pipeline.settings import JobSettings

QUERIES = {
    "by_campaign": """
        SELECT campaign_id,
               count(*) FILTER (WHERE event_type = 'impression') AS impressions,
               count(*) FILTER (WHERE event_type = 'click') AS clicks,
               sum(cost_micros) AS spend_micros
        FROM events GROUP BY campaign_id ORDER BY spend_micros DESC""",
    "one_campaign_series": """
        SELECT date_trunc('minute', event_time) AS m, count(*), sum(cost_micros)
        FROM events WHERE campaign_id = 'cmp-00007'
        GROUP BY m ORDER BY m""",
}


@dataclass
class BenchResult:
    rows: int
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int
    compact_seconds: float
    before_ms: dict[str, float] = field(default_factory=dict)
    after_ms: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"events={self.rows:,} files {self.files_before} -> {self.files_after}, "
            f"bytes {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB, "
            f"compaction {self.compact_seconds:.1f}s"
        ]
        for name in QUERIES:
            b, a = self.before_ms[name], self.after_ms[name]
            out.append(f"{name}: {b:.0f} ms -> {a:.0f} ms ({b / a:.1f}x)")
        return out


def build(root: Path, *, events: int, batch_rows: int, hours: int, seed: int = 7) -> int:
    """A lake of ``events`` in batches of ``batch_rows`` over ``hours`` closed hours."""
    from generator.model import (
        BatchSpec,
        build_campaigns,
        build_population,
        campaign_ids,
        event_id_prefix,
        generate_batch,
    )

    layout = Layout(str(root))
    layout.ensure()
    rng = np.random.default_rng(seed)
    dimension = build_campaigns(rng, 200)
    dimension.write_parquet(layout.campaigns)
    population = build_population(rng, campaign_ids(dimension), users=500_000)
    now = int(time.time() * 1000)
    start = now - now % HOUR_MS - (hours + 1) * HOUR_MS
    batches = max(1, events // batch_rows)
    step = hours * HOUR_MS // batches
    prefix = event_id_prefix("bench", seed)
    ingested = datetime.now(UTC)
    written = 0
    for b in range(batches):
        size = batch_rows if b < batches - 1 else events - batch_rows * (batches - 1)
        lo = start + b * step
        spec = BatchSpec(prefix, b * batch_rows, size, lo, lo + step)
        frame = generate_batch(rng, population, spec).frame.with_columns(
            pl.col(pl.Enum).cast(pl.String)
        )
        enriched, _ = enrich(frame, dimension, batch_id=f"bench-{b:06d}", ingested_at=ingested)
        append(_lake(root), {"events": enriched})
        written += len(enriched)
    return written


def _lake(root: Path) -> LakeLocation:
    return LakeLocation.from_env({"LAKE_URI": str(root / "lake")})


def _files(root: Path) -> tuple[int, int]:
    """(files, bytes) of the events table's current version."""
    actions = pl.DataFrame(open_table(_lake(root), EVENTS).get_add_actions(flatten=True))
    return len(actions), int(actions["size_bytes"].sum())


def _time(con: duckdb.DuckDBPyConnection, sql: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        con.execute(sql).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(root: Path, repeat: int) -> dict[str, float]:
    con = connect(_lake(root))
    con.execute("SET TimeZone = 'UTC'")
    try:
        return {name: _time(con, sql, repeat) for name, sql in QUERIES.items()}
    finally:
        con.close()


def run(root: Path, *, events: int, batch_rows: int, hours: int, repeat: int = 5) -> BenchResult:
    shutil.rmtree(root, ignore_errors=True)
    rows = build(root, events=events, batch_rows=batch_rows, hours=hours)
    files_before, bytes_before = _files(root)
    before_ms = measure(root, repeat)
    started = time.perf_counter()
    compact(
        Layout(str(root)),
        _lake(root),
        JobSettings(compact_min_age=0),
        now=datetime.now(UTC),
        durable=False,
    )
    seconds = time.perf_counter() - started
    files_after, bytes_after = _files(root)
    return BenchResult(
        rows=rows,
        files_before=files_before,
        files_after=files_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        compact_seconds=seconds,
        before_ms=before_ms,
        after_ms=measure(root, repeat),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="/tmp/adevents-bench", help="scratch DATA_DIR")
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--batch-rows", type=int, default=5_000, help="rows per micro-batch")
    parser.add_argument("--hours", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5, help="runs per query (median)")
    args = parser.parse_args()
    result = run(
        Path(args.dir),
        events=args.events,
        batch_rows=args.batch_rows,
        hours=args.hours,
        repeat=args.repeat,
    )
    for line in result.lines():
        print(line)


if __name__ == "__main__":
    main()
