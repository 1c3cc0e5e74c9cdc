"""Helpers for tests of the jobs: land batches through a real consumer, ledger rows, a webhook."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.schema import LEDGER_SCHEMA, Layout
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter
from pipeline.testing import event_table

EVENT_TYPES = ("impression", "impression", "impression", "click", "conversion")


def land(
    settings: Settings, tables: Iterable[pa.Table], *, clock: Callable[[], datetime] | None = None
) -> None:
    """Write ``tables`` to the spool and run a real consumer over them once."""
    from pipeline.consumer import Consumer
    from pipeline.factory import make_key_cache

    writer = SpoolWriter(Layout(settings.data_dir).incoming, "jobs")
    for table in tables:
        writer.write(table)
    consumer = (
        Consumer(settings, make_key_cache(settings))
        if clock is None
        else Consumer(settings, make_key_cache(settings), clock=clock)
    )
    consumer.start()
    try:
        consumer.run(once=True)
    finally:
        consumer.close()


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


def write_ledger(layout: Layout, rows: Iterable[dict[str, Any]]) -> list[Path]:
    """Ledger files as the consumer writes them, one per row (missing counts are 0)."""
    paths = []
    for row in rows:
        full: dict[str, Any] = dict.fromkeys(LEDGER_SCHEMA.names())
        for name, dtype in LEDGER_SCHEMA.items():
            if dtype == pl.Int64:
                full[name] = 0
        full.update(row)
        committed: datetime = full["committed_at"]
        path = layout.ledger / f"date={committed:%Y-%m-%d}" / f"{full['batch_id']}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame([full], schema=LEDGER_SCHEMA).write_parquet(path)
        paths.append(path)
    return paths


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
