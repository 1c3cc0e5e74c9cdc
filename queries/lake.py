"""The lake as DuckDB sees it: tables, consistent file snapshots, per-file statistics, retries.

Every query in ``queries/`` reads the lake through :class:`Lake`. A query names its tables as
``{events}``, ``{ledger}``, ... and :meth:`Lake.query` replaces each with
``read_parquet($param, ...)`` over a list of files bound as a parameter, or with an empty
relation of the table's schema when there are no files yet (``read_parquet`` refuses an empty
list or a glob that matches nothing). Values from users are always bound parameters.

Consistency. The consumer publishes a batch by renaming its files into place one by one while
``staging/<batch_id>.committed`` exists (see ``pipeline/commit.py``), and files are named
``<batch_id>.parquet``. :meth:`Lake.files` lists in-flight batches, the table, in-flight batches
again and the table again, and keeps only batches that were in flight at neither listing and
gained no file between the two table listings: each batch it keeps is whole (a batch that was
half-published at the first listing either shows up in flight, or had finished, and then has
more files at the second). When a file listed the first time is gone the second time, or
vanishes between listing and reading (compaction), :meth:`Lake.read` retries the whole read on
a fresh snapshot.

A job that replaces files (compaction) keeps readers exact by following the same protocol:
stage its outputs under ``staging/<id>.committed`` with a ``manifest.json`` that has a
``replaces`` key, name them ``<id>.parquet``, rename them into place, only then delete the files
they replace, and remove the staging directory last. While such a unit is in flight and its
outputs are visible, readers take their snapshot again rather than guess.

Extension point: other issues add tables (``rollups/<granularity>/``, ``alerts/``) with
:func:`register_table`; they become views for ``adevents sql`` and ``{name}`` in queries.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import duckdb
import polars as pl

from pipeline.schema import (
    CAMPAIGN_SCHEMA,
    ENRICHED_SCHEMA,
    LEDGER_SCHEMA,
    QUARANTINE_SCHEMA,
    Layout,
)

T = TypeVar("T")

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
_COMMITTED: Final = ".committed"
_PARQUET: Final = ".parquet"
#: DuckDB's messages for a file that was listed but is gone when it is opened.
_MISSING = re.compile(r"No files found|No such file|Cannot open file|could not be opened", re.I)
_TABLE_REF = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class LakeBusyError(RuntimeError):
    """The lake kept changing under a read (files vanished on every attempt)."""


class SnapshotChangedError(FileNotFoundError):
    """Files were replaced while a snapshot was taken; :meth:`Lake.read` takes another."""


@dataclass(frozen=True)
class Table:
    """A table of the lake: Parquet files under ``path`` (or one file), Hive-partitioned.

    ``partitions`` are the Hive keys with their DuckDB types, outermost first; a key named
    ``date`` or ``hour`` lets :meth:`Lake.files` skip partitions outside a time window.
    ``time_column`` is the column whose per-file min/max :meth:`Lake.stats` reports.
    """

    name: str
    path: str
    schema: pl.Schema
    partitions: tuple[tuple[str, str], ...] = ()
    time_column: str | None = None
    #: Files named ``<batch_id>.parquet`` and published by the consumer's staged commit.
    batch_files: bool = False
    #: Sub-directories that hold something else (``quarantine/files/``).
    exclude: frozenset[str] = frozenset()

    @property
    def single_file(self) -> bool:
        return self.path.endswith(_PARQUET)


_DATE_HOUR = (("date", "DATE"), ("hour", "INTEGER"))
TABLES: dict[str, Table] = {}


def register_table(table: Table) -> None:
    """Make ``table`` known to every :class:`Lake` (a view in ``adevents sql``, ``{name}``)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", table.name):
        raise ValueError(f"table name {table.name!r} must be a lower-case SQL identifier")
    TABLES[table.name] = table


for _table in (
    Table("events", "events", ENRICHED_SCHEMA, _DATE_HOUR, "event_time", batch_files=True),
    Table(
        "quarantine",
        "quarantine",
        QUARANTINE_SCHEMA,
        (("date", "DATE"),),
        "ingested_at",
        batch_files=True,
        exclude=frozenset({"files"}),
    ),
    Table("ledger", "ledger", LEDGER_SCHEMA, (("date", "DATE"),), "committed_at"),
    Table("campaigns", "dimensions/campaigns.parquet", CAMPAIGN_SCHEMA),
):
    register_table(_table)


def duckdb_type(dtype: pl.DataType) -> str:
    """The DuckDB type that reads a column Polars wrote with ``dtype``."""
    if dtype == pl.String:
        return "VARCHAR"
    if dtype == pl.Int64:
        return "BIGINT"
    if dtype == pl.Float64:
        return "DOUBLE"
    if dtype == pl.Boolean:
        return "BOOLEAN"
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ" if dtype.time_zone else "TIMESTAMP"
    if dtype == pl.Date:
        return "DATE"
    raise TypeError(f"no DuckDB type for {dtype}")


def quote_literal(text: str) -> str:
    """A SQL string literal; only for trusted text such as paths under DATA_DIR."""
    return "'" + text.replace("'", "''") + "'"


def empty_relation(table: Table) -> str:
    """A relation with ``table``'s columns and no rows, for a table with no files yet."""
    cols = [f'CAST(NULL AS {duckdb_type(t)}) AS "{n}"' for n, t in table.schema.items()]
    cols += [f'CAST(NULL AS {t}) AS "{k}"' for k, t in table.partitions]
    return f"(SELECT {', '.join(cols)} WHERE false)"


def reader(table: Table, files: str) -> str:
    """``read_parquet`` over ``files`` (a ``$parameter`` or a list literal) for ``table``."""
    if not table.partitions:
        return f"read_parquet({files})"
    types = ", ".join(f"{quote_literal(k)}: {t}" for k, t in table.partitions)
    return f"read_parquet({files}, hive_partitioning = true, hive_types = {{{types}}})"


@dataclass(frozen=True)
class FileStats:
    """What a file's footer says: rows, and the range of the table's time column (epoch ms)."""

    rows: int
    min_ms: int | None
    max_ms: int | None

    def overlaps(self, since_ms: int | None, until_ms: int | None) -> bool:
        """Whether the file can hold rows in [since, until) (an unknown bound: it can)."""
        if self.rows == 0:
            return False
        if since_ms is not None and self.max_ms is not None and self.max_ms < since_ms:
            return False
        return not (until_ms is not None and self.min_ms is not None and self.min_ms >= until_ms)


def _partition_window(key: str, value: str, parent_start: int | None) -> tuple[int, int] | None:
    """Epoch-ms [start, end) that a ``date=`` or ``hour=`` directory can hold, if known."""
    try:
        if key == "date":
            start = calendar.timegm(time.strptime(value, "%Y-%m-%d")) * 1000
            return start, start + DAY_MS
        if key == "hour" and parent_start is not None:
            start = parent_start + int(value) * HOUR_MS
            return start, start + HOUR_MS
    except (ValueError, OverflowError):
        return None
    return None


class Lake:
    """Reads of one DATA_DIR through one in-memory DuckDB database, safe to share by threads.

    Each thread gets its own DuckDB cursor. Parquet footers are cached by DuckDB; per-file row
    counts and time ranges by :meth:`stats` (files are immutable once published).
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, attempts: int = 10) -> None:
        self.layout = Layout(str(data_dir))
        self.root = self.layout.root
        self.attempts = attempts
        self._db = duckdb.connect(":memory:")
        self._db.execute("SET TimeZone = 'UTC'")
        self._db.execute("SET parquet_metadata_cache = true")
        self._local = threading.local()
        self._stats: dict[str, FileStats] = {}
        self._stats_lock = threading.Lock()
        self._kinds: dict[str, bool] = {}

    def close(self) -> None:
        self._db.close()

    # -- connections -----------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's connection to the lake's database."""
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._db.cursor()
            self._local.cursor = cur
        return cur

    # -- listing -----------------------------------------------------------------------------
    def _walk(
        self, table: Table, since_ms: int | None, until_ms: int | None
    ) -> dict[str, list[str]]:
        """Files of ``table`` grouped by name (batch id), skipping partitions outside the window."""
        out: dict[str, list[str]] = {}
        base = self.root / table.path
        if table.single_file:
            if base.is_file():
                out[base.stem] = [str(base)]
            return out

        def visit(directory: str, depth: int, start: int | None) -> None:
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue  # a temporary file being written, or hidden
                if depth < len(table.partitions):
                    key = table.partitions[depth][0]
                    if not name.startswith(f"{key}=") or name in table.exclude:
                        continue
                    window = _partition_window(key, name[len(key) + 1 :], start)
                    if window is not None and (
                        (until_ms is not None and window[0] >= until_ms)
                        or (since_ms is not None and window[1] <= since_ms)
                    ):
                        continue
                    visit(entry.path, depth + 1, window[0] if window else None)
                elif name.endswith(_PARQUET):
                    out.setdefault(name[: -len(_PARQUET)], []).append(entry.path)

        visit(str(base), 0, None)
        return out

    def _in_flight(self) -> set[str]:
        """Batch ids whose files are being published right now."""
        try:
            names = os.listdir(self.layout.staging)
        except FileNotFoundError:
            return set()
        return {n[: -len(_COMMITTED)] for n in names if n.endswith(_COMMITTED)}

    def _replaces(self, unit: str) -> bool:
        """Whether an in-flight unit replaces files (compaction) rather than adding a batch."""
        known = self._kinds.get(unit)
        if known is None:
            path = self.layout.staging / f"{unit}{_COMMITTED}" / "manifest.json"
            try:
                known = "replaces" in json.loads(path.read_text())
            except (OSError, ValueError):
                # Finished meanwhile: if it replaced files, some may be gone already.
                return True
            self._kinds[unit] = known
        return known

    def files(
        self, name: str, *, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[str]:
        """The files of a table that make a consistent snapshot (whole batches only), sorted.

        ``since_ms``/``until_ms`` skip partitions that cannot hold rows in [since, until).
        """
        table = TABLES[name]
        if not table.batch_files:
            return sorted(
                p for paths in self._walk(table, since_ms, until_ms).values() for p in paths
            )
        before = self._in_flight()
        first = self._walk(table, since_ms, until_ms)
        after = self._in_flight()
        second = self._walk(table, since_ms, until_ms)
        moving = before | after
        for unit in moving:
            if (unit in first or unit in second) and self._replaces(unit):
                raise SnapshotChangedError(f"{table.name}: {unit} is replacing files right now")
        keep: list[str] = []
        for batch, paths in first.items():
            if batch in moving:
                continue
            now = set(second.get(batch, ()))
            if not set(paths) <= now:
                # Files were removed meanwhile (compaction): what replaced them may or may not
                # be in the first listing, so list again.
                raise SnapshotChangedError(f"{table.name}: files of {batch} vanished while listing")
            if len(now) > len(paths):
                continue  # it was being published during the first listing
            keep.extend(paths)
        keep.sort()
        return keep

    # -- per-file statistics -------------------------------------------------------------------
    def stats(self, name: str, files: Sequence[str]) -> dict[str, FileStats]:
        """Rows and time range of each file, read from footers once and then remembered."""
        table = TABLES[name]
        missing = [f for f in files if f not in self._stats]
        if missing:
            column = table.time_column or next(iter(table.schema))
            fresh: dict[str, FileStats] = dict.fromkeys(missing, FileStats(0, None, None))
            for i in range(0, len(missing), 2048):
                chunk = missing[i : i + 2048]
                rows = (
                    self.cursor()
                    .execute(
                        """
                        SELECT file_name,
                               sum(row_group_num_rows),
                               epoch_ms(min(TRY_CAST(stats_min_value AS TIMESTAMPTZ))),
                               epoch_ms(max(TRY_CAST(stats_max_value AS TIMESTAMPTZ)))
                        FROM parquet_metadata($files)
                        WHERE path_in_schema = $column
                        GROUP BY file_name
                        """,
                        {"files": chunk, "column": column},
                    )
                    .fetchall()
                )
                for file_name, n, lo, hi in rows:
                    fresh[file_name] = FileStats(int(n or 0), lo, hi)
            with self._stats_lock:
                self._stats.update(fresh)
        return {f: self._stats[f] for f in files}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop remembered statistics of files not in ``keep`` (files that were replaced)."""
        wanted = set(keep)
        with self._stats_lock:
            for f in [f for f in self._stats if f not in wanted]:
                del self._stats[f]

    # -- queries -----------------------------------------------------------------------------
    def query(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        sources: Mapping[str, Sequence[str]],
    ) -> list[tuple[Any, ...]]:
        """Run ``sql`` with each ``{table}`` reading the files given for it in ``sources``."""
        bound = dict(params or {})

        def relation(match: re.Match[str]) -> str:
            name = match.group(1)
            table = TABLES[name]
            files = list(sources[name])
            if not files:
                return empty_relation(table)
            bound[f"files_{name}"] = files
            return reader(table, f"$files_{name}")

        text = _TABLE_REF.sub(relation, sql)
        rows: list[tuple[Any, ...]] = self.cursor().execute(text, bound).fetchall()
        return rows

    def records(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        sources: Mapping[str, Sequence[str]],
    ) -> list[dict[str, Any]]:
        """Like :meth:`query`, as one dict per row keyed by column name."""
        rows = self.query(sql, params, sources=sources)
        names = [d[0] for d in self.cursor().description or ()]
        return [dict(zip(names, r, strict=True)) for r in rows]

    def read(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` (which lists and queries), again on a fresh snapshot if a file vanished."""
        delay = 0.002
        for attempt in range(self.attempts):
            try:
                return fn()
            except (duckdb.IOException, FileNotFoundError) as exc:
                if isinstance(exc, duckdb.IOException) and not _MISSING.search(str(exc)):
                    raise
                if attempt == self.attempts - 1:
                    raise LakeBusyError(
                        f"files of the lake kept vanishing while being read: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        raise AssertionError("unreachable")

    # -- views for ad-hoc SQL ----------------------------------------------------------------
    def create_views(self, con: duckdb.DuckDBPyConnection | None = None) -> list[str]:
        """(Re)define one view per table over its current snapshot; returns their names.

        DuckDB cannot bind parameters inside a view, so each file path (which comes from a
        listing of DATA_DIR, never from a user) is embedded as a quoted string literal.
        """
        con = con or self.cursor()
        names = []
        for name, table in TABLES.items():
            files = self.files(name)
            body = (
                f"SELECT * FROM {reader(table, '[' + ', '.join(map(quote_literal, files)) + ']')}"
                if files
                else f"SELECT * FROM {empty_relation(table)}"
            )
            con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS {body}')
            names.append(name)
        return names

    def sql(self, text: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run ad-hoc SQL (trusted: the operator's own) over fresh views; (columns, rows)."""

        def run() -> tuple[list[str], list[tuple[Any, ...]]]:
            con = self.cursor()
            self.create_views(con)
            result = con.execute(text)
            columns = [d[0] for d in result.description] if result.description else []
            return columns, result.fetchall() if result.description else []

        return self.read(run)
