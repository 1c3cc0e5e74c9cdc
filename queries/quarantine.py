"""Rejected rows: the quarantine table by reason and time, its rows, and what a replay sends back.

Reads go through one :class:`queries.lake.View` (the quarantine table at one Delta version),
files pruned by the log's statistics of ``ingested_at`` (when a row was rejected), filters as
bound parameters. A replay rebuilds contract-typed events from the selected rows, optionally
after the operator's correction: one SELECT over a relation named ``rows`` that holds them,
run in a DuckDB of its own that sees nothing else (no lake, no files). Sending the events back
through the spool is the caller's job (``cli.quarantine``), so that they are validated,
deduplicated and enriched like any other input.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import (
    EVENT_SCHEMA,
    MONEY_COLUMNS,
    QUARANTINE_SCHEMA,
    REQUIRED_COLUMNS,
    TIME_COLUMN,
)
from queries.lake import Lake

TABLE: Final = "quarantine"
#: The relation a ``--fix`` reads: the selected quarantined rows, every QUARANTINE_SCHEMA column.
ROWS: Final = "rows"
BUCKETS: Final = ("hour", "day")
#: Columns of :func:`summary`, in order.
SUMMARY_COLUMNS: Final = (
    "bucket",
    "reason",
    "rejected",
    "files",
    "first_at",
    "last_at",
    "min_event_time",
    "max_event_time",
    "first_source",
)
_UTC_MS: Final = pa.timestamp("ms", tz="UTC")


def _arrow_type(dtype: pl.DataType) -> pa.DataType:
    if isinstance(dtype, pl.Datetime):
        return _UTC_MS
    return pa.int64() if dtype == pl.Int64 else pa.string()


#: Quarantine rows as :func:`rows` returns them: the event columns as stored, then why and where.
ROW_SCHEMA: Final = pa.schema([pa.field(n, _arrow_type(t)) for n, t in QUARANTINE_SCHEMA.items()])
#: Events as a replay writes them to the spool: the contract's columns and types, nullable (the
#: consumer judges nulls, as it does for any producer's file).
REPLAY_SCHEMA: Final = pa.schema([pa.field(f.name, f.type) for f in EVENT_SCHEMA])


@dataclass(frozen=True)
class Selection:
    """Which quarantined rows: every field optional. ``since_ms`` inclusive and ``until_ms``
    exclusive bound ``ingested_at`` (epoch ms); ``source`` is a ``source_file`` name, or a
    pattern when it holds ``*``, ``?`` or ``[`` (GLOB: ``*-replay_*``)."""

    reasons: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    source: str | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """The SQL condition and its parameters."""
        clauses = ["true"]
        params: dict[str, Any] = {}
        if self.reasons:
            clauses.append("list_contains($reasons, reason)")
            params["reasons"] = list(self.reasons)
        if self.since_ms is not None:
            clauses.append("ingested_at >= make_timestamptz($since_ms * 1000)")
            params["since_ms"] = self.since_ms
        if self.until_ms is not None:
            clauses.append("ingested_at < make_timestamptz($until_ms * 1000)")
            params["until_ms"] = self.until_ms
        if self.source is not None:
            is_pattern = any(c in self.source for c in "*?[")
            clauses.append("source_file GLOB $source" if is_pattern else "source_file = $source")
            params["source"] = self.source
        return " AND ".join(clauses), params


def summary(lake: Lake, selection: Selection, bucket: str = "hour") -> list[tuple[Any, ...]]:
    """Rejected rows per ``bucket`` (hour or day of ``ingested_at``) and reason: how many, from
    how many files, first and last rejection, their event-time range and the first file
    (columns :data:`SUMMARY_COLUMNS`), oldest bucket first."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {BUCKETS}")
    where, params = selection.where()
    sql = f"""
        SELECT date_trunc($bucket, ingested_at) AS bucket, reason, count(*) AS rejected,
               count(DISTINCT source_file) AS files, min(ingested_at), max(ingested_at),
               min(event_time), max(event_time), arg_min(source_file, ingested_at)
        FROM {{{TABLE}}} WHERE {where}
        GROUP BY ALL ORDER BY bucket, reason"""
    view = lake.view(TABLE)
    files = view.files(TABLE, selection.since_ms, selection.until_ms)
    return view.query(sql, {**params, "bucket": bucket}, files={TABLE: files})


def rows(lake: Lake, selection: Selection, *, limit: int | None = None) -> pa.Table:
    """The selected rows (:data:`ROW_SCHEMA`), oldest rejection first; at most ``limit``."""
    where, params = selection.where()
    view = lake.view(TABLE)
    files = view.files(TABLE, selection.since_ms, selection.until_ms)
    cur = lake.cursor()
    relation = view.table(TABLE).relation(cur, f"__{TABLE}", files)
    columns = ", ".join(f'"{name}"' for name in ROW_SCHEMA.names)
    sql = f"""
        SELECT {columns} FROM {relation} WHERE {where}
        ORDER BY ingested_at, source_file, event_time, event_id"""
    if limit is not None:
        sql += " LIMIT $limit"
        params["limit"] = limit
    table = cur.sql(sql, params=params).to_arrow_table()
    # The lake holds microsecond times and dictionary strings: the contract's types again.
    return table.cast(ROW_SCHEMA, safe=False)


class FixError(ValueError):
    """A ``--fix`` that cannot be used: not one SELECT, fails, or lacks event columns. The
    message is DuckDB's own words or names the columns: the operator's SQL, shown to them."""


@dataclass
class Replay:
    """What a replay sends back: the events, and what it leaves in quarantine and why."""

    #: Contract-typed events (:data:`REPLAY_SCHEMA`) to write to the spool.
    events: pa.Table
    #: Quarantined rows the selection matched.
    selected: int
    #: Rows left out, by the first event column whose (corrected) value does not convert to
    #: the contract's type: they stay in quarantine as they are.
    unfit: dict[str, int] = field(default_factory=dict)
    #: Events whose event_id is not one of the selected rows': the fix changed what the key
    #: cache dedupes on (its event_time does not matter: a re-stamped copy is a duplicate).
    rekeyed: int = 0


def replay(
    lake: Lake, selection: Selection, *, fix: str | None = None, limit: int | None = None
) -> Replay:
    """The selected rows as events to send back, corrected by ``fix`` (see :func:`correct`)."""
    return correct(rows(lake, selection, limit=limit), fix)


def correct(selected: pa.Table, fix: str | None) -> Replay:
    """Rebuild contract-typed events from quarantined rows (:data:`ROW_SCHEMA`), after ``fix``.

    ``fix`` is one SELECT over :data:`ROWS`; its result must have the required event columns
    (optional ones may be left out: null). Each value is converted to the contract's type:
    text as text; money from integers, integral decimals and integer text (a fraction or any
    other text does not convert); event_time from timestamps (naive means UTC), date-time text
    and epoch milliseconds. A row with a value that does not convert is left out and counted
    in :attr:`Replay.unfit`; the contract's rules (enums, lengths, ranges) are the consumer's.
    Raises :class:`FixError`, before anything is produced, for a fix that cannot be used.
    """
    # A database of its own that may not touch files: the fix sees the selected rows only.
    con = duckdb.connect(":memory:", config={"enable_external_access": False})
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register(ROWS, selected)
        types = _create_fixed(con, fix)
        missing = [c for c in REQUIRED_COLUMNS if c not in types]
        if missing:
            raise FixError(
                f"the --fix result lacks the event column(s) {', '.join(missing)}; keep every "
                f"column, e.g. SELECT * REPLACE (upper(country) AS country) FROM {ROWS}"
            )
        converted = _convert(con, types)
        unfit = pc.is_valid(converted["__unfit"])
        reasons = Counter(converted["__unfit"].drop_null().to_pylist())
        events = converted.filter(pc.invert(unfit)).select(REPLAY_SCHEMA.names)
        events = events.cast(REPLAY_SCHEMA, safe=False)  # microseconds to the contract's ms
        con.register("__events", events)
        rekeyed = con.sql(
            f"""SELECT count(*) FROM __events e WHERE NOT EXISTS (
                    SELECT 1 FROM {ROWS} r
                    WHERE r.event_id IS NOT DISTINCT FROM e.event_id)"""
        ).fetchall()[0][0]
    finally:
        con.close()
    return Replay(events, selected.num_rows, dict(reasons), int(rekeyed))


def _create_fixed(con: duckdb.DuckDBPyConnection, fix: str | None) -> dict[str, str]:
    """Create the view ``__fixed`` (``fix`` over :data:`ROWS`, or the rows as they are); its
    column types by name."""
    body = f"SELECT * FROM {ROWS}"
    if fix is not None:
        try:
            statements = con.extract_statements(fix)
        except duckdb.Error as exc:
            raise FixError(f"--fix is not valid SQL: {exc}") from None
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            raise FixError(f"--fix must be exactly one SELECT over the relation {ROWS!r}")
        body = statements[0].query.strip().rstrip(";")
    try:
        con.execute(f"CREATE TEMP VIEW __fixed AS {body}")
        described = con.execute("DESCRIBE __fixed").fetchall()
    except duckdb.Error as exc:
        raise FixError(f"--fix failed: {exc}") from None
    return {str(name): str(kind) for name, kind, *_ in described}


_INTEGER_TYPES: Final = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"}
    | {"UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
)
#: Epoch milliseconds DuckDB's timestamps hold (years 1 to 9999).
_EPOCH_MS_RANGE: Final = (-62_135_596_800_000, 253_402_300_799_999)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _money(col: str, kind: str) -> str:
    if kind in _INTEGER_TYPES:
        return f"TRY_CAST({col} AS BIGINT)"
    if kind == "VARCHAR":
        # DuckDB rounds '1.5' to 2 when casting text to an integer: only integer text converts.
        integer = f"regexp_full_match(trim({col}), '[+-]?[0-9]+')"
        return f"CASE WHEN {integer} THEN TRY_CAST(trim({col}) AS BIGINT) END"
    if kind in ("FLOAT", "DOUBLE") or kind.startswith("DECIMAL"):
        return f"CASE WHEN {col} = trunc({col}) THEN TRY_CAST({col} AS BIGINT) END"
    return f"TRY_CAST({col} AS BIGINT)"


def _event_time(col: str, kind: str) -> str:
    if kind in _INTEGER_TYPES:  # epoch milliseconds, as the HTTP ingest reads JSON
        lo, hi = _EPOCH_MS_RANGE
        return f"CASE WHEN {col} BETWEEN {lo} AND {hi} THEN make_timestamptz({col} * 1000) END"
    return f"TRY_CAST({col} AS TIMESTAMPTZ)"  # the session is UTC: naive times mean UTC


def _conversion(name: str, kind: str) -> str:
    col = _quoted(name)
    if name == TIME_COLUMN:
        return col if kind == "TIMESTAMP WITH TIME ZONE" else _event_time(col, kind)
    if name in MONEY_COLUMNS:
        return col if kind == "BIGINT" else _money(col, kind)
    return col if kind == "VARCHAR" else f"TRY_CAST({col} AS VARCHAR)"


def _convert(con: duckdb.DuckDBPyConnection, types: dict[str, str]) -> pa.Table:
    """The event columns of ``__fixed`` in the contract's types, and ``__unfit``: the first
    column whose value did not convert (null when every value did)."""
    exprs: list[str] = []
    unfit: list[str] = []
    for f in EVENT_SCHEMA:
        if f.name not in types:  # an optional column left out: null, as in a producer's file
            exprs.append(f"NULL AS {_quoted(f.name)}")
            continue
        value = _conversion(f.name, types[f.name])
        exprs.append(f"{value} AS {_quoted(f.name)}")
        if value != _quoted(f.name):
            unfit.append(
                f"WHEN {_quoted(f.name)} IS NOT NULL AND ({value}) IS NULL THEN '{f.name}'"
            )
    flag = f"CASE {' '.join(unfit)} END" if unfit else "NULL::VARCHAR"
    sql = f"SELECT {', '.join(exprs)}, {flag} AS __unfit FROM __fixed"
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:  # an error the fix raises only when it runs (a failing cast)
        raise FixError(f"--fix failed: {exc}") from None
