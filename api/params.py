"""Parsing of query parameters the types cannot check: times, time ranges and cursors."""

from __future__ import annotations

import base64
import binascii
import json
import time
from datetime import UTC, date, datetime

from litestar.exceptions import ValidationException

from queries.events import Position

#: Earliest and latest instants accepted anywhere (years 1970 and 9999), epoch ms.
MIN_MS = 0
MAX_MS = 253_402_300_799_999
TIME_HELP = "a date (2026-11-27), a date-time (2026-11-27T09:30:00Z; no zone means UTC) or epoch ms"


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_time(name: str, text: str | None) -> int | None:
    """Epoch ms of a ``since``/``until`` value, or None when absent; 400 when malformed."""
    if text is None or text == "":
        return None
    value = text.strip()
    try:
        if value.isdigit() and len(value) <= 15:
            ms = int(value)
        elif len(value) == 10:
            ms = (
                int(
                    datetime.combine(
                        date.fromisoformat(value), datetime.min.time(), UTC
                    ).timestamp()
                )
                * 1000
            )
        else:
            parsed = datetime.fromisoformat(value.replace("z", "Z"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            ms = int(parsed.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        raise ValidationException(f"{name}={text[:64]!r} is not {TIME_HELP}") from None
    if not MIN_MS <= ms <= MAX_MS:
        raise ValidationException(f"{name}={text[:64]!r} is outside the years 1970 to 9999")
    return ms


def time_range(
    since: str | None, until: str | None, *, default_span_ms: int | None = None
) -> tuple[int | None, int | None]:
    """(since, until) in epoch ms; with ``default_span_ms``, missing ends are filled in."""
    start, end = parse_time("since", since), parse_time("until", until)
    if default_span_ms is not None:
        if end is None:
            end = now_ms() + 1
        if start is None:
            start = max(MIN_MS, end - default_span_ms)
    if start is not None and end is not None and start >= end:
        raise ValidationException("since must be earlier than until")
    return start, end


def encode_cursor(position: Position) -> str:
    """An opaque cursor: URL-safe base64 of the JSON pair [event_time ms, event_id]."""
    raw = json.dumps([position.time_ms, position.event_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Position | None:
    """The position a cursor stands for; 400 when it is not one this API made."""
    if cursor is None or cursor == "":
        return None
    message = "cursor is malformed: pass back the next_cursor of a previous page unchanged"
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationException(message) from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or type(value[0]) is not int
        or not isinstance(value[1], str)
        or not MIN_MS <= value[0] <= MAX_MS
    ):
        raise ValidationException(message)
    return Position(value[0], value[1])
