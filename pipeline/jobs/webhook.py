"""Alert notifications to ALERT_WEBHOOK_URL: a durable outbox, delivered in order with retries.

The alert job only writes notifications to ``alerts/outbox/`` (atomic files), so a dead or
hanging webhook never holds up alert evaluation; :func:`deliver` sends them, each POST bounded
by a timeout and retried a few times with a short backoff. Delivery is at least once. A
notification the receiver rejects (4xx other than 408/429) or that stays undeliverable longer
than the maximum age is dropped with an error in the log.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from pipeline.jobs.alerts import Notification
from pipeline.jobs.storage import job_lock
from pipeline.schema import Layout
from pipeline.spool import atomic_write_bytes

log = logging.getLogger("adevents.jobs.webhook")

_RETRYABLE_4XX = (408, 429)


def outbox(layout: Layout) -> Path:
    return layout.alerts / "outbox"


def enqueue(
    layout: Layout, notes: Sequence[Notification], *, now: datetime, durable: bool
) -> list[Path]:
    """Store ``notes`` for delivery, in order; returns their outbox files."""
    directory = outbox(layout)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = int(now.timestamp() * 1000)
    paths = []
    for i, note in enumerate(notes):
        path = directory / f"{stamp:015d}-{i:04d}-{secrets.token_hex(3)}.json"
        body = {"queued_at": now.isoformat(), "payload": note.payload()}
        atomic_write_bytes(path, json.dumps(body).encode(), durable=durable)
        paths.append(path)
    return paths


def pending(layout: Layout) -> list[Path]:
    """Outbox files waiting for delivery, oldest first."""
    try:
        names = sorted(n for n in os.listdir(outbox(layout)) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    return [outbox(layout) / n for n in names if not n.startswith(".")]


@dataclass
class DeliveryReport:
    sent: int = 0
    dropped: int = 0
    failed: bool = False
    pending: int = 0

    def line(self) -> str:
        return (
            f"webhook sent={self.sent} dropped={self.dropped} pending={self.pending}"
            f"{' failing=true' if self.failed else ''}"
        )


def _post(
    client: httpx.Client,
    url: str,
    payload: dict[str, object],
    *,
    retries: int,
    sleep: Callable[[float], None],
) -> int | None:
    """POST once plus up to ``retries`` more; the final status code, or None when unreachable."""
    status: int | None = None
    for attempt in range(retries + 1):
        if attempt:
            sleep(min(2.0, 0.25 * 2 ** (attempt - 1)))
        try:
            status = client.post(url, json=payload).status_code
        except httpx.HTTPError as exc:
            log.warning("webhook POST to %s failed (attempt %d): %s", url, attempt + 1, exc)
            status = None
            continue
        if status < 400 or (status < 500 and status not in _RETRYABLE_4XX):
            return status
        log.warning("webhook POST to %s answered %d (attempt %d)", url, status, attempt + 1)
    return status


def deliver(
    layout: Layout,
    url: str,
    *,
    timeout: float,
    retries: int,
    max_age_s: float,
    now: datetime,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryReport:
    """Send what the outbox holds, oldest first; stop at the first failure (order matters)."""
    report = DeliveryReport()
    with job_lock(layout, "webhook"), httpx.Client(timeout=timeout) as client:
        files = pending(layout)
        for i, path in enumerate(files):
            try:
                body = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                path.unlink(missing_ok=True)
                continue
            status = _post(client, url, body["payload"], retries=retries, sleep=sleep)
            if status is not None and status < 300:
                path.unlink(missing_ok=True)
                report.sent += 1
                continue
            queued = datetime.fromisoformat(body["queued_at"])
            too_old = (now - queued).total_seconds() > max_age_s
            rejected = status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX
            if rejected or too_old:
                log.error(
                    "dropping alert notification %s after %s: %s",
                    path.name,
                    f"HTTP {status}" if rejected else f"{max_age_s:.0f}s undelivered",
                    body["payload"],
                )
                path.unlink(missing_ok=True)
                report.dropped += 1
                continue
            report.failed = True
            report.pending = len(files) - i
            return report
    return report
