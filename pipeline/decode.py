"""Bodies of ``POST /ad_events`` into contract tables, and the row check shared with the consumer.

Pure: bytes and a media type in, an Arrow table in the contract's types out (or a
:class:`BodyError` saying why not). JSON is decoded by msgspec into typed structs and then into
columns; an Arrow IPC body is read as it is, with no per-row Python. Either way the table goes
through :func:`pipeline.normalize.normalize` and :func:`pipeline.validate.reason_expr`, the
consumer's own implementations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from pipeline.json_depth import too_deep
from pipeline.normalize import SchemaMismatchError, normalize
from pipeline.schema import (
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    MONEY_COLUMNS,
    OPTIONAL_COLUMNS,
    STRING_COLUMNS,
    TIME_COLUMN,
)
from pipeline.validate import reason_expr

JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"
ARROW_STREAM: Final = "application/vnd.apache.arrow.stream"
ARROW_FILE: Final = "application/vnd.apache.arrow.file"
MEDIA_TYPES: Final = (JSON, NDJSON, ARROW_STREAM, ARROW_FILE)
#: Other names clients use for the same formats.
_ALIASES: Final = {
    "application/jsonl": NDJSON,
    "application/x-jsonlines": NDJSON,
    "application/jsonlines": NDJSON,
    "application/vnd.apache.arrow": ARROW_STREAM,
}

_REQUIRED_TEXT: Final = tuple(c for c in STRING_COLUMNS if c not in OPTIONAL_COLUMNS)
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
_TIME_MS: Final = pa.timestamp("ms", tz="UTC")
_TIME_US: Final = pa.timestamp("us", tz="UTC")
#: The contract's schema with every column nullable: what a body is decoded into.
_NULLABLE: Final = pa.schema([pa.field(f.name, f.type) for f in EVENT_SCHEMA])

Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


#: Defaults of the limits :func:`decode` applies (the settings INGEST_MAX_JSON_DEPTH and
#: INGEST_MAX_EVENTS_PER_REQUEST pass their own).
DEFAULT_MAX_DEPTH: Final = 16
DEFAULT_MAX_EVENTS: Final = 100_000


#: The longest library message quoted in a BodyError (a schema can name thousands of columns).
_MAX_QUOTED: Final = 300
#: A C++ source location some Arrow builds append to their messages: internal, not for clients.
_SOURCE_LOCATION: Final = re.compile(r"\S*/\S+\.(?:cc|cpp|h|hpp)(?::\d+)?\s*")


def _quoted(exc: BaseException) -> str:
    """A decoder library's message, fit for a client: first line, no source paths, short."""
    text = _SOURCE_LOCATION.sub("", str(exc).strip().split("\n", 1)[0])
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 1] + "…"


class BodyError(ValueError):
    """The body cannot be read as events at all; the message says why, in words (400).

    The only exception :func:`decode` raises for any body (``fuzz/ingest_decoders.py`` checks
    this); its message never holds more than a short excerpt of the body."""


class TooManyEventsError(BodyError):
    """The body holds more events than one request may carry (413)."""


class UnsupportedMediaTypeError(ValueError):
    """The Content-Type is not one of MEDIA_TYPES (415)."""


class _Event(msgspec.Struct, gc=False):
    """One JSON event in the contract's types; a missing key is null, unknown keys are ignored."""

    event_id: str | None = None
    event_type: str | None = None
    #: Epoch milliseconds, or an RFC 3339 date-time (no offset means UTC).
    event_time: Int64 | datetime | None = None
    campaign_id: str | None = None
    ad_id: str | None = None
    publisher_id: str | None = None
    user_id: str | None = None
    device_type: str | None = None
    country: str | None = None
    cost_micros: Int64 | None = None
    revenue_micros: Int64 | None = None


class _ExactEvent(_Event, forbid_unknown_fields=True):
    """An event with no key outside the contract: the fast path, which never skips a value."""


class _AnyEvent(msgspec.Struct, gc=False):
    """The same keys with any JSON value: the fallback when some value has the wrong type."""

    event_id: Any = None
    event_type: Any = None
    event_time: Any = None
    campaign_id: Any = None
    ad_id: Any = None
    publisher_id: Any = None
    user_id: Any = None
    device_type: Any = None
    country: Any = None
    cost_micros: Any = None
    revenue_micros: Any = None


assert _Event.__struct_fields__ == EVENT_COLUMNS == _AnyEvent.__struct_fields__

_EXACT: Final = msgspec.json.Decoder(list[_ExactEvent])
_STRICT: Final = msgspec.json.Decoder(list[_Event])
_LOOSE: Final = msgspec.json.Decoder(list[_AnyEvent])
_STRICT_ONE: Final = msgspec.json.Decoder(_Event)
_LOOSE_ONE: Final = msgspec.json.Decoder(_AnyEvent)


def media_type(content_type: str | None) -> str:
    """The body format named by a Content-Type header (parameters such as charset ignored)."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    base = _ALIASES.get(base, base)
    if base not in MEDIA_TYPES:
        shown = f"Content-Type {content_type[:100]!r}" if content_type else "a missing Content-Type"
        raise UnsupportedMediaTypeError(
            f"{shown} is not supported: send {JSON} (an array of event objects), {NDJSON} "
            f"(one event object per line) or {ARROW_STREAM} (an Arrow IPC stream)"
        )
    return base


# -- JSON ----------------------------------------------------------------------------------------
def _text(value: Any) -> str | None:
    return value if type(value) is str else None


def _int64(value: Any) -> int | None:
    return value if type(value) is int and INT64_MIN <= value <= INT64_MAX else None


def _time(value: Any) -> int | datetime | None:
    if type(value) is str:
        try:
            parsed: datetime = msgspec.convert(value, datetime)
        except msgspec.ValidationError:
            return None
        return parsed
    return _int64(value)


def _as_text(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    return msgspec.json.encode(value).decode()


def _coerce(events: list[_AnyEvent]) -> list[_Event]:
    """A wrongly typed value fails its row, not the whole body: in a required column it counts
    as missing (a string in cost_micros is ``invalid_money``, a number in event_id
    ``invalid_event_id``); in an optional one it is kept as its JSON text, so ``"country": 44``
    is ``invalid_country`` and a numeric user_id is kept."""
    out = []
    for e in events:
        values: dict[str, Any] = {n: _text(getattr(e, n)) for n in _REQUIRED_TEXT}
        values.update({n: _as_text(getattr(e, n)) for n in OPTIONAL_COLUMNS})
        values.update({n: _int64(getattr(e, n)) for n in MONEY_COLUMNS})
        values[TIME_COLUMN] = _time(e.event_time)
        out.append(_Event(**values))
    return out


def _event_times(values: list[Any]) -> pa.Array:
    """Epoch-ms integers and datetimes (naive = UTC) as one timestamp[ms, UTC] array."""
    if not any(type(v) is datetime for v in values):
        return pa.array(values, pa.int64()).cast(_TIME_MS)
    ints = pa.array([v if type(v) is int else None for v in values], pa.int64())
    stamps = pa.array([v if type(v) is datetime else None for v in values], _TIME_US)
    # Floor to the millisecond as normalize() does for finer units before 1970.
    as_ms = pc.floor_temporal(stamps, unit="millisecond").cast(_TIME_MS).cast(pa.int64())
    return pc.coalesce(ints, as_ms).cast(_TIME_MS)


def _table(events: Sequence[_Event]) -> pa.Table:
    """Columns of the decoded events, in the contract's types."""
    columns = list(zip(*(msgspec.structs.astuple(e) for e in events), strict=True))
    if not columns:
        return _NULLABLE.empty_table()
    arrays: list[pa.Array] = []
    for f, values in zip(_NULLABLE, columns, strict=True):
        if f.name == TIME_COLUMN:
            arrays.append(_event_times(list(values)))
        else:
            arrays.append(pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=_NULLABLE)


def _too_deep(max_depth: int, where: str = "the body") -> BodyError:
    return BodyError(
        f"{where} nests arrays or objects more than {max_depth} levels deep (an event object "
        "is level 1; INGEST_MAX_JSON_DEPTH): send flat event objects"
    )


def _decode_array(text: bytes, max_depth: int) -> Sequence[_Event]:
    """The events of a JSON array, refusing one that nests deeper than ``max_depth`` below it.

    The usual body (known keys, values of the right types) is taken by the exact decode, which
    never descends into a value: a nested value or an unknown key stops it at once. Only then
    can the body nest deeper than its events, so only then is the depth scanned, before the
    decodes that skip unknown values (recursively) or store any value (recursively).
    """
    try:
        return _EXACT.decode(text)
    except msgspec.ValidationError:
        pass  # an unknown key, or a value of another type: it may nest
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BodyError(f"the body is not valid JSON: {_quoted(exc)}") from None
    if too_deep(text, max_depth + 1):
        raise _too_deep(max_depth)
    try:
        return _STRICT.decode(text)
    except msgspec.ValidationError:
        pass  # some value has the wrong type: find out whether the shape at least is right
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # pragma: no cover - decoded above
        raise BodyError(f"the body is not valid JSON: {_quoted(exc)}") from None
    try:
        return _coerce(_LOOSE.decode(text))
    except msgspec.ValidationError as exc:
        raise BodyError(f"the body must be a JSON array of event objects: {_quoted(exc)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # pragma: no cover - decoded above
        raise BodyError(f"the body is not valid JSON: {_quoted(exc)}") from None


def _decode_json_array(body: bytes, max_depth: int) -> Sequence[_Event]:
    return _decode_array(body, max_depth)


def _ndjson_error(body: bytes, max_depth: int) -> BodyError:
    """Which line of an NDJSON body is not one event object, and why."""
    for number, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        if too_deep(line, max_depth):
            return _too_deep(max_depth, f"line {number}")
        try:
            _LOOSE_ONE.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            return BodyError(f"line {number} is not one JSON event object: {_quoted(exc)}")
    return BodyError("the body is not NDJSON: one JSON event object per line")


def _decode_ndjson(body: bytes, max_depth: int) -> Sequence[_Event]:
    lines = [line for line in body.split(b"\n") if line.strip()]
    # One decoder call for the whole body: the lines become the elements of one array.
    joined = b"[" + b",".join(lines) + b"]"
    try:
        events = _decode_array(joined, max_depth)
    except BodyError:
        raise _ndjson_error(body, max_depth) from None
    if len(events) != len(lines):  # a line held two values, e.g. `{...},{...}`
        raise _ndjson_error(body, max_depth)
    return events


# -- Arrow ---------------------------------------------------------------------------------------
def _read_arrow(body: bytes, media: str) -> pa.Table:
    buffer = pa.py_buffer(body)
    try:
        if media == ARROW_FILE:
            table = ipc.open_file(buffer).read_all()
        else:
            table = ipc.open_stream(buffer).read_all()
        # The buffers point into a body from the network: check offsets, lengths and UTF-8
        # before any kernel reads them.
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        hint = ""
        if media == ARROW_STREAM and body[:6] == b"ARROW1":
            hint = f" (this is the Arrow IPC file format: send it as {ARROW_FILE})"
        kind = "file" if media == ARROW_FILE else "stream"
        raise BodyError(f"the body is not a valid Arrow IPC {kind}{hint}: {_quoted(exc)}") from None
    return table


# -- the one entry point -------------------------------------------------------------------------
def _check_count(n: int, max_events: int) -> None:
    if n > max_events:
        raise TooManyEventsError(
            f"the body holds {n} events; one request may carry at most {max_events} "
            "(INGEST_MAX_EVENTS_PER_REQUEST): send them in several requests"
        )


def decode(
    body: bytes,
    media: str,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_events: int = DEFAULT_MAX_EVENTS,
) -> pa.Table:
    """The events of a body in the contract's types (nullable).

    Raises BodyError when the body cannot be read as events, TooManyEventsError (a BodyError)
    when it holds more than ``max_events``. JSON nesting deeper than ``max_depth`` (an event
    object is level 1) is a BodyError, found before any decoder recurses into it.
    """
    if not body or body.isspace():
        raise BodyError("the body is empty: send at least an empty JSON array or Arrow stream")
    if media in (ARROW_STREAM, ARROW_FILE):
        table = _read_arrow(body, media)
        _check_count(table.num_rows, max_events)
    else:
        events = (
            _decode_ndjson(body, max_depth)
            if media == NDJSON
            else _decode_json_array(body, max_depth)
        )
        _check_count(len(events), max_events)
        table = _table(events)
    try:
        normalized, _ignored = normalize(table)
    except SchemaMismatchError as exc:
        raise BodyError(_quoted(exc)) from None
    return normalized


@dataclass(frozen=True)
class Checked:
    """A body's rows split by the consumer's row rules."""

    #: Rows that passed, in input order, in the contract's types.
    accepted: pa.Table
    #: Rows that failed, with their values and a ``reason`` column (None when there are none).
    rejected: pl.DataFrame | None
    #: (index in the body, reason) of every rejected row, in input order.
    rejections: list[tuple[int, str]]

    @property
    def received(self) -> int:
        return int(self.accepted.num_rows) + len(self.rejections)


def check(table: pa.Table, *, now_ms: int) -> Checked:
    """Split ``table`` with the consumer's row rules; late/duplicate checks are the consumer's.

    ``future_event`` is judged against ``now_ms`` (this server's clock); ``late_event`` needs
    the consumer's watermark and is left to it, as is deduplication.
    """
    if table.num_rows == 0:
        return Checked(table, None, [])
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    reasons = frame.select(reason_expr(now_ms=now_ms, watermark_ms=None, window_ms=0)).to_series()
    bad = reasons.is_not_null()
    if not bad.any():
        return Checked(table, None, [])
    rejected = frame.filter(bad).with_columns(reasons.filter(bad))
    accepted = table.filter(pa.array((~bad).to_numpy()))
    rejections = list(zip(bad.arg_true().to_list(), rejected["reason"].to_list(), strict=True))
    return Checked(accepted, rejected, rejections)


def read_arrow_stream(body: bytes) -> pa.Table:
    """An Arrow IPC stream from outside (a Kafka message), validated, as it is (not normalised);
    BodyError when it is not one."""
    return _read_arrow(body, ARROW_STREAM)
