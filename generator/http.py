"""Send the generator's micro-batches to ``POST /ad_events`` instead of writing spool files."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import httpx
import pyarrow as pa
from pyarrow import ipc

ARROW_STREAM: Final = "application/vnd.apache.arrow.stream"
#: Requests in flight at once: each waits for the server's group commit (up to BATCH_INTERVAL),
#: so one at a time would cap the rate at one batch per interval.
DEFAULT_CONCURRENCY: Final = 4
#: How long a batch is retried (429, 503, connection errors) before the run fails.
RETRY_FOR_SECONDS: Final = 120.0


class IngestError(RuntimeError):
    """The server refused a batch for good (a 4xx other than 413/429), or kept failing."""


def endpoint(url: str) -> str:
    """``http://host:port`` or a full URL: the POST /ad_events URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    path = parts.path if parts.path not in ("", "/") else "/ad_events"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def stream_bytes(table: pa.Table) -> bytes:
    """``table`` as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


@dataclass
class SendTotals:
    """What the server said about everything sent."""

    requests: int = 0
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    retries: int = 0

    def line(self, url: str) -> str:
        return (
            f"sent {self.received} events to {url} in {self.requests} requests: "
            f"{self.accepted} accepted, {self.rejected} rejected (quarantined), "
            f"{self.retries} retries"
        )


class HttpSender:
    """Posts each table as an Arrow IPC stream, ``concurrency`` requests in flight at most.

    :meth:`write` has SpoolWriter's shape and blocks while all slots are busy. At-least-once:
    a batch is retried on 429 (after Retry-After), 503 and connection errors, so the server may
    get a batch twice; the consumer drops the second copy as duplicates. A 413 halves the batch.
    A failure is raised by the next :meth:`write` or by :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = 60.0,
        retry_for: float = RETRY_FOR_SECONDS,
    ) -> None:
        self.url = endpoint(url)
        headers = {"content-type": ARROW_STREAM}
        if api_key:
            headers["x-api-key"] = api_key
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="generator-http")
        self._slots = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.retry_for = retry_for
        self.totals = SendTotals()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, table: pa.Table) -> None:
        """Queue one batch for sending."""
        self._raise()
        self._slots.acquire()
        future = self._pool.submit(self._send, table)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        self._slots.release()
        exc = future.exception()
        if exc is not None:
            with self._lock:
                self._error = self._error or exc

    def _send(self, table: pa.Table) -> None:
        if self._error is not None:
            return  # the run is failing: do not keep sending
        body = stream_bytes(table)
        deadline = time.monotonic() + self.retry_for
        delay = 0.1
        while True:
            wait: float | None = None
            try:
                response = self._client.post(self.url, content=body)
            except httpx.TransportError as exc:
                wait, why = delay, f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 202:
                    self._count(response.json())
                    return
                if status == 413 and table.num_rows > 1:
                    half = table.num_rows // 2
                    self._send(table.slice(0, half))
                    self._send(table.slice(half))
                    return
                why = f"HTTP {status}: {response.text[:300]}"
                if status == 429:
                    wait = float(response.headers.get("retry-after") or 1)
                elif status in (502, 503, 504):
                    wait = delay
            if wait is None or time.monotonic() + wait > deadline:
                raise IngestError(f"{self.url} refused a batch of {table.num_rows} events: {why}")
            with self._lock:
                self.totals.retries += 1
            time.sleep(wait)
            delay = min(delay * 2, 5.0)

    def _count(self, answer: dict[str, object]) -> None:
        rejected = answer.get("rejected")
        with self._lock:
            self.totals.requests += 1
            self.totals.received += int(str(answer.get("received", 0)))
            self.totals.accepted += int(str(answer.get("accepted", 0)))
            self.totals.rejected += len(rejected) if isinstance(rejected, list) else 0

    def close(self) -> None:
        """Wait for every queued batch; raise the first failure."""
        self._pool.shutdown(wait=True)
        self._client.close()
        self._raise()
