"""The alert outbox: notifications queued on disk by the alerts job, read by the webhook job.

One JSON file per notification under ``alerts/outbox/``, written atomically and named so that
names sort in the order the notifications were made. An entry is ``{"queued_at": <ISO time>,
"payload": <the JSON the webhook POSTs>}``. An entry stays until it is acknowledged
(:func:`ack`), so a crash between queueing and sending repeats a notification but never loses
one. The alerts job only writes here, so a dead or hanging webhook never holds up alert
evaluation, and neither job imports the other.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.schema import Layout
from pipeline.spool import atomic_write_bytes
from pipeline.tables import Alert


@dataclass(frozen=True)
class Notification:
    """A change to tell someone about: ``fired``, ``escalated``, ``deescalated``, ``resolved``."""

    event: str
    alert: Alert

    def payload(self) -> dict[str, Any]:
        return {"event": self.event, **self.alert.to_json()}


@dataclass(frozen=True)
class Entry:
    """A queued notification: its file, when it was queued and what to POST."""

    path: Path
    queued_at: datetime
    payload: dict[str, Any]


def directory(layout: Layout) -> Path:
    return layout.alerts / "outbox"


def enqueue(
    layout: Layout, notes: Sequence[Notification], *, now: datetime, durable: bool
) -> list[Path]:
    """Store ``notes`` for delivery, in order; returns their outbox files."""
    outbox = directory(layout)
    outbox.mkdir(parents=True, exist_ok=True)
    stamp = int(now.timestamp() * 1000)
    paths = []
    for i, note in enumerate(notes):
        path = outbox / f"{stamp:015d}-{i:04d}-{secrets.token_hex(3)}.json"
        body = {"queued_at": now.isoformat(), "payload": note.payload()}
        atomic_write_bytes(path, json.dumps(body).encode(), durable=durable)
        paths.append(path)
    return paths


def pending(layout: Layout) -> list[Path]:
    """Outbox files waiting for delivery, oldest first."""
    try:
        names = sorted(n for n in os.listdir(directory(layout)) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    return [directory(layout) / n for n in names if not n.startswith(".")]


def read(path: Path) -> Entry | None:
    """The entry in ``path``; None when it is gone or unreadable (then it is dropped)."""
    try:
        body = json.loads(path.read_text())
        return Entry(path, datetime.fromisoformat(body["queued_at"]), body["payload"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        ack(path)
        return None


def ack(path: Path) -> None:
    """Take a delivered (or dropped) entry out of the outbox."""
    path.unlink(missing_ok=True)
