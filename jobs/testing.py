"""Helpers for tests of the jobs: batches and ledger rows committed to a lake, a webhook."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import polars as pl
import pyarrow as pa

from lake.location import LakeLocation
from lake.testing import append
from pipeline.schema import ENRICHED_SCHEMA, LEDGER_SCHEMA
from pipeline.testing import event_table

EVENT_TYPES = ("impression", "impression", "impression", "click", "conversion")


def enriched(table: pa.Table, *, batch_id: str, at: datetime) -> pl.DataFrame:
    """A spool batch of valid events as the consumer lands it (ENRICHED_SCHEMA), with no
    campaign found in the catalog and no dedupe: the jobs take the events table as it is."""
    frame = pl.DataFrame(table).with_columns(
        advertiser_id=pl.lit(None, pl.String),
        campaign_name=pl.lit(None, pl.String),
        ingested_at=pl.lit(at),
        batch_id=pl.lit(batch_id),
    )
    return frame.select(ENRICHED_SCHEMA.names()).cast(dict(ENRICHED_SCHEMA))  # type: ignore[arg-type]


def ledger_rows(rows: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """Ledger rows (LEDGER_SCHEMA) from partial dicts: missing counts are 0, the rest null."""
    full_rows = []
    for row in rows:
        full: dict[str, Any] = dict.fromkeys(LEDGER_SCHEMA.names())
        for name, dtype in LEDGER_SCHEMA.items():
            if dtype == pl.Int64:
                full[name] = 0
        full.update(row)
        full_rows.append(full)
    return pl.DataFrame(full_rows, schema=LEDGER_SCHEMA)


def commit_batches(
    location: LakeLocation, tables: Sequence[pa.Table], *, at: datetime, prefix: str = "b"
) -> list[str]:
    """Commit ``tables`` (spool batches of valid events) to events and ledger in one commit,
    as of ``at``, one ledger row per batch; returns their batch ids."""
    ids = [f"{prefix}-{uuid.uuid4().hex[:12]}" for _ in tables]
    events = [enriched(t, batch_id=i, at=at) for t, i in zip(tables, ids, strict=True)]
    ledger = ledger_rows(
        {
            "batch_id": batch_id,
            "source_file": f"{batch_id}.arrow",
            "status": "ok",
            "rows_in": len(frame),
            "accepted": len(frame),
            "min_event_time": frame["event_time"].min(),
            "max_event_time": frame["event_time"].max(),
            "committed_at": at,
        }
        for batch_id, frame in zip(ids, events, strict=True)
    )
    append(location, {"events": pl.concat(events), "ledger": ledger})
    return ids


def random_batch(
    rng: random.Random,
    *,
    batch: int,
    rows: int,
    time_ms: int,
    spread_ms: int = 60_000,
    campaigns: int = 4,
    users: int = 200,
    history: list[tuple[str, int]] | None = None,
    dup_rate: float = 0.05,
    late_ms: int = 0,
    late_rate: float = 0.0,
) -> pa.Table:
    """A batch of valid events around ``time_ms``: every event type, null and repeat users, money,
    re-sent copies of earlier events (with their original time) and late events ``late_ms`` back.
    """
    ids: list[str] = []
    times: list[int] = []
    for i in range(rows):
        if history and rng.random() < dup_rate:
            event_id, t = rng.choice(history)
        else:
            event_id = f"b{batch:04d}-{i:05d}"
            t = time_ms + rng.randrange(spread_ms)
            if late_rate and rng.random() < late_rate:
                t = time_ms - rng.randrange(late_ms)
        ids.append(event_id)
        times.append(t)
    if history is not None:
        history.extend(zip(ids, times, strict=True))
    return event_table(
        ids,
        time_ms=times,
        event_type=[rng.choice(EVENT_TYPES) for _ in ids],
        campaign_id=[f"cmp-{rng.randrange(campaigns):04d}" for _ in ids],
        user_id=[None if rng.random() < 0.1 else f"user-{rng.randrange(users)}" for _ in ids],
        cost_micros=[rng.randrange(0, 3_000_000) for _ in ids],
        revenue_micros=[rng.choice((0, 0, 0, rng.randrange(0, 50_000_000))) for _ in ids],
    )


def write_ledger(location: LakeLocation, rows: Iterable[dict[str, Any]]) -> None:
    """Commit ledger rows (see :func:`ledger_rows`) to the lake's ledger table."""
    append(location, {"ledger": ledger_rows(rows)})


class WebhookServer:
    """A real HTTP server on 127.0.0.1 that records JSON POSTs; ``mode`` says how it answers:
    ``ok`` (204), ``fail`` (HTTP 500), ``reject`` (HTTP 400) or ``hang`` (never answers in time).
    """

    def __init__(self, mode: str = "ok", hang_s: float = 30.0) -> None:
        self.mode = mode
        self.hang_s = hang_s
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                server.attempts += 1
                if server.mode == "hang":
                    server._release.wait(server.hang_s)
                    return
                if server.mode == "fail":
                    self.send_response(500)
                elif server.mode == "reject":
                    self.send_response(400)
                else:
                    server.received.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def start(self) -> WebhookServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def webhook_server(mode: str = "ok") -> Iterator[WebhookServer]:
    server = WebhookServer(mode).start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
