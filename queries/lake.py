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
more files at the second).

Compaction (``jobs/compact.py``) swaps an hour's small files for a few large ones in
phases recorded under ``staging/compact/``, with a generation counter bumped at every phase
change. For ``events``, the four listings above run inside
:func:`pipeline.livefiles.consistent` (generation, units, listings, generation again; taken
again if the generation moved) and every file its :class:`~pipeline.livefiles.View` hides
(a committed unit's outputs, a swapped unit's replaced files) is dropped from both table
listings, so each row is listed exactly once. A file that still vanishes (retention, or a swap
between listing and reading) makes :meth:`Lake.read` retry the whole read on a fresh snapshot.

Caches, all exact. Each directory's listing is reused while its mtime is unchanged (and was
not in the same clock tick as the listing); a table's snapshot while none of the directories it
listed (nor the compaction generation) changed; per-file footer statistics forever (files are
never rewritten). A query's answer is reused for the same SQL, parameters and files: the events,
quarantine and ledger files never change once published, and a file replaced in place
(rollups, alerts, campaigns) is keyed by its inode, size and mtime. New data means new files, so
nothing is ever stale; on a lake that is not changing, repeated questions cost no I/O.

Tables other issues add (``rollups_<granularity>`` under ``rollups/<granularity>/`` and
``alerts``) are registered here with :func:`register_table`; they become views for ``adevents
sql`` and ``{name}`` in queries. Their files are replaced in place by atomic renames.
"""

from __future__ import annotations

import calendar
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import duckdb
import polars as pl

from pipeline import livefiles
from pipeline.livefiles import LakeBusyError
from pipeline.schema import (
    ALERT_SCHEMA,
    CAMPAIGN_SCHEMA,
    DAY_MS,
    ENRICHED_SCHEMA,
    HOUR_MS,
    LEDGER_SCHEMA,
    QUARANTINE_SCHEMA,
    ROLLUP_SCHEMA,
    Layout,
)

T = TypeVar("T")

_COMMITTED: Final = ".committed"
_PARQUET: Final = ".parquet"
#: DuckDB's messages for a file that was listed but is gone when it is opened.
_MISSING = re.compile(r"No files found|No such file|Cannot open file|could not be opened", re.I)
_TABLE_REF = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
#: A directory listing is reused only if it began this long after the directory's mtime.
_RACY_NS: Final = 50_000_000
#: Answers remembered per Lake (small ones only), most recently used kept.
ANSWERS: Final = 512
SNAPSHOTS: Final = 64
_GENERATION: Final = "compaction generation"
MAX_ANSWER_ROWS: Final = 5_000


class SnapshotChangedError(FileNotFoundError):
    """Files vanished while a snapshot was taken; :meth:`Lake.read` takes another."""


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
    #: A path, once published, always holds the same bytes (never rewritten in place), so an
    #: answer over the same files is the same answer.
    immutable: bool = False
    #: Columns are added over time (a new reason code adds a ``quarantined_<reason>`` ledger
    #: column): files are read by column name, and a column an older file lacks reads as null.
    grows: bool = False

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
    Table(
        "events",
        "events",
        ENRICHED_SCHEMA,
        _DATE_HOUR,
        "event_time",
        batch_files=True,
        immutable=True,
    ),
    Table(
        "quarantine",
        "quarantine",
        QUARANTINE_SCHEMA,
        (("date", "DATE"),),
        "ingested_at",
        batch_files=True,
        exclude=frozenset({"files"}),
        immutable=True,
    ),
    Table(
        "ledger",
        "ledger",
        LEDGER_SCHEMA,
        (("date", "DATE"),),
        "committed_at",
        immutable=True,
        grows=True,
    ),
    Table("campaigns", "dimensions/campaigns.parquet", CAMPAIGN_SCHEMA),
    # Written by jobs/rollup.py: one file per hour (minute) or per date (hour, day).
    Table("rollups_minute", "rollups/minute", ROLLUP_SCHEMA, _DATE_HOUR, "bucket"),
    Table("rollups_hour", "rollups/hour", ROLLUP_SCHEMA, (("date", "DATE"),), "bucket"),
    Table("rollups_day", "rollups/day", ROLLUP_SCHEMA, (("date", "DATE"),), "bucket"),
    # Written by jobs/alerts.py; started_at (the first column) orders it.
    Table("alerts", "alerts/alerts.parquet", ALERT_SCHEMA),
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


def reader(table: Table, files: str, *, by_name: bool = False) -> str:
    """``read_parquet`` over ``files`` (a ``$parameter`` or a list literal) for ``table``;
    ``by_name`` matches columns by name across files whose columns differ."""
    options = ", union_by_name = true" if by_name else ""
    if table.partitions:
        types = ", ".join(f"{quote_literal(k)}: {t}" for k, t in table.partitions)
        options += f", hive_partitioning = true, hive_types = {{{types}}}"
    return f"read_parquet({files}{options})"


def grown_reader(table: Table, current: str | None, older: str | None) -> str:
    """A table that gained columns, over files with every column (``current``) and files from
    before some were added (``older``; None when there are none, the usual case).

    Older files are read by name, and the union with the empty relation adds, as nulls, the
    columns none of them has. Only they pay for ``union_by_name``, which reads every file's
    schema first (measured: 2-3x slower over 3,000 ledger files).
    """
    if older is None:
        assert current is not None
        return reader(table, current)
    parts = [f"SELECT * FROM {empty_relation(table)}"]
    if current is not None:
        parts.append(f"SELECT * FROM {reader(table, current)}")
    parts.append(f"SELECT * FROM {reader(table, older, by_name=True)}")
    return "(" + " UNION ALL BY NAME ".join(parts) + ")"


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


@dataclass
class _Listing:
    """A directory's names as listed at ``listed_at`` (epoch ns), when its mtime was ``mtime``."""

    directory: str
    mtime: int
    listed_at: int
    names: list[str]
    _parquet: list[tuple[str, str]] | None = None

    def parquet(self) -> list[tuple[str, str]]:
        """(stem, path) of the published Parquet files in it (hidden temporary ones left out)."""
        if self._parquet is None:
            self._parquet = [
                (n[: -len(_PARQUET)], os.path.join(self.directory, n))
                for n in self.names
                if n.endswith(_PARQUET) and not n.startswith(".")
            ]
        return self._parquet


def _without(listing: dict[str, list[str]], hidden: frozenset[str]) -> dict[str, list[str]]:
    """``listing`` less the paths in ``hidden`` (and the names left with no path)."""
    out: dict[str, list[str]] = {}
    for name, paths in listing.items():
        kept = [p for p in paths if p not in hidden]
        if kept:
            out[name] = kept
    return out


def _answer_key(
    sql: str, params: Mapping[str, Any] | None, sources: Mapping[str, Sequence[str]]
) -> Hashable | None:
    """What an answer is remembered by: the query, its parameters and its files, each file of a
    table that is rewritten in place with its inode, size and mtime. None when it must not be
    remembered (no table, a list parameter, a file gone or changed too recently to tell)."""
    if not sources:
        return None
    now = time.time_ns()
    files: list[tuple[str, tuple[Any, ...]]] = []
    for name, paths in sorted(sources.items()):
        if TABLES[name].immutable:
            files.append((name, tuple(paths)))
            continue
        stamped = []
        for path in paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            if now - st.st_mtime_ns <= _RACY_NS:
                return None
            stamped.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
        files.append((name, tuple(stamped)))
    key = (sql, tuple(sorted((params or {}).items())), tuple(files))
    try:
        hash(key)
    except TypeError:  # a list parameter
        return None
    return key


class Lake:
    """Reads of one DATA_DIR through one in-memory DuckDB database, safe to share by threads.

    Each thread gets its own DuckDB cursor. Parquet footers are cached by DuckDB; per-file row
    counts and time ranges by :meth:`stats`; listings, snapshots and small answers as the
    module's docstring says. One Lake per process: its caches are its own.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, attempts: int = 10) -> None:
        self.layout = Layout(str(data_dir))
        self.root = self.layout.root
        self.attempts = attempts
        self._db = duckdb.connect(":memory:")
        self._db.execute("SET TimeZone = 'UTC'")
        self._db.execute("SET parquet_metadata_cache = true")
        self._local = threading.local()
        #: column -> file -> what its footer says about the column.
        self._stats: dict[str, dict[str, FileStats]] = {}
        self._bounds: dict[str, dict[str, tuple[str | None, str | None]]] = {}
        #: table -> file -> whether it has every column, for tables that gain columns.
        self._complete: dict[str, dict[str, bool]] = {}
        self._mtimes: dict[str, float] = {}
        #: What each directory held when last listed; see :meth:`_listing`.
        self._listings: dict[str, _Listing] = {}
        #: Answers of queries over immutable files, by (sql, params, files); see :meth:`query`.
        self._answers: OrderedDict[Hashable, Any] = OrderedDict()
        self._answers_lock = threading.Lock()
        #: Snapshots of immutable tables by (table, since, until), with what they depend on.
        self._snapshots: OrderedDict[
            tuple[str, int | None, int | None],
            tuple[tuple[tuple[str, int | None, int], ...], tuple[str, ...]],
        ] = OrderedDict()
        self._stats_lock = threading.Lock()

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
                listing = self._listing(directory)
            except (FileNotFoundError, NotADirectoryError):
                return
            if depth == len(table.partitions):
                for stem, path in listing.parquet():
                    out.setdefault(stem, []).append(path)
                return
            key = table.partitions[depth][0]
            for name in listing.names:
                if not name.startswith(f"{key}=") or name in table.exclude:
                    continue
                window = _partition_window(key, name[len(key) + 1 :], start)
                if window is not None and (
                    (until_ms is not None and window[0] >= until_ms)
                    or (since_ms is not None and window[1] <= since_ms)
                ):
                    continue
                visit(os.path.join(directory, name), depth + 1, window[0] if window else None)

        visit(str(base), 0, None)
        return out

    def _listing(self, directory: str) -> _Listing:
        """What ``directory`` holds: from memory while its mtime shows no change since it was
        listed, listed again otherwise.

        A directory's mtime changes whenever an entry is added, removed or renamed. The kernel
        stamps it from a coarse clock, so a change just after a listing could carry the same
        mtime as one just before: a listing is only reused when it began at least
        ``_RACY_NS`` after the mtime it saw (git's "racily clean" rule).
        """
        try:
            mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            self._listings.pop(directory, None)
            self._stamp(directory, None, 0)
            raise
        known = self._listings.get(directory)
        if known is None or known.mtime != mtime or known.listed_at - mtime <= _RACY_NS:
            known = _Listing(directory, mtime, time.time_ns(), os.listdir(directory))
            self._listings[directory] = known
        self._stamp(directory, mtime, known.listed_at)
        return known

    def listdir(self, directory: str | os.PathLike[str]) -> list[str]:
        """The names in a directory under DATA_DIR (see :meth:`_listing`); [] when it is gone."""
        try:
            return list(self._listing(str(directory)).names)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _in_flight(self) -> set[str]:
        """Batch ids whose files are being published right now."""
        try:
            names = self._listing(str(self.layout.staging)).names
        except FileNotFoundError:
            return set()
        return {n[: -len(_COMMITTED)] for n in names if n.endswith(_COMMITTED)}

    def files(
        self, name: str, *, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[str]:
        """The files of a table that make a consistent snapshot (whole batches only), sorted.

        ``since_ms``/``until_ms`` skip partitions that cannot hold rows in [since, until).
        For an immutable table the snapshot is remembered with the mtime of every directory it
        listed (and the compaction generation): while none of them changed, it is still exact.
        """
        table = TABLES[name]
        # Partitions are whole hours or days: a window widened to whole hours prunes the same
        # ones, and stays the same key for an hour.
        if since_ms is not None:
            since_ms -= since_ms % HOUR_MS
        if until_ms is not None:
            until_ms += -until_ms % HOUR_MS
        if not table.immutable:
            return self._snapshot(table, since_ms, until_ms)
        key = (name, since_ms, until_ms)
        known = self._snapshots.get(key)
        if known is not None and self._unchanged(known[0]):
            return list(known[1])
        stamps: list[tuple[str, int | None, int]] = []
        self._local.stamps = stamps
        try:
            files = self._snapshot(table, since_ms, until_ms)
        finally:
            self._local.stamps = None
        with self._answers_lock:
            self._snapshots[key] = (tuple(stamps), tuple(files))
            self._snapshots.move_to_end(key)
            while len(self._snapshots) > SNAPSHOTS:
                self._snapshots.popitem(last=False)
        return files

    def _unchanged(self, stamps: Sequence[tuple[str, int | None, int]]) -> bool:
        """Whether every stamped directory (or the generation) is as it was when listed."""
        for what, value, listed_at in stamps:
            if what == _GENERATION:
                if livefiles.read_generation(self.layout) != value:
                    return False
                continue
            try:
                mtime: int | None = os.stat(what).st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime != value or (mtime is not None and listed_at - mtime <= _RACY_NS):
                return False
        return True

    def _stamp(self, what: str, value: int | None, listed_at: int) -> None:
        stamps: list[tuple[str, int | None, int]] | None = getattr(self._local, "stamps", None)
        if stamps is not None:
            stamps.append((what, value, listed_at))

    def _snapshot(self, table: Table, since_ms: int | None, until_ms: int | None) -> list[str]:
        if not table.batch_files:
            return sorted(
                p for paths in self._walk(table, since_ms, until_ms).values() for p in paths
            )

        def listing() -> tuple[set[str], dict[str, list[str]], set[str], dict[str, list[str]]]:
            before = self._in_flight()
            first = self._walk(table, since_ms, until_ms)
            after = self._in_flight()
            return before, first, after, self._walk(table, since_ms, until_ms)

        if table.name == "events":
            (before, first, after, second), view = livefiles.consistent(self.layout, listing)
            self._stamp(_GENERATION, view.generation, 0)
            hidden = view.hidden_paths(self.layout.events)
            if hidden:
                first, second = _without(first, hidden), _without(second, hidden)
        else:
            before, first, after, second = listing()
        moving = before | after
        keep: list[str] = []
        for batch, paths in first.items():
            if batch in moving:
                continue
            now = set(second.get(batch, ()))
            if not set(paths) <= now:
                # Files were removed meanwhile (retention): list again.
                raise SnapshotChangedError(f"{table.name}: files of {batch} vanished while listing")
            if len(now) > len(paths):
                continue  # it was being published during the first listing
            keep.extend(paths)
        keep.sort()
        return keep

    # -- per-file statistics -------------------------------------------------------------------
    def stats(
        self, name: str, files: Sequence[str], *, column: str | None = None
    ) -> dict[str, FileStats]:
        """Rows and range of a timestamp column (default: the table's time column) of each file,
        read from footers once and then remembered (only for files that are never rewritten)."""
        table = TABLES[name]
        column = column or table.time_column or next(iter(table.schema))
        known = self._stats.setdefault(column, {})
        missing = [f for f in files if f not in known]
        if missing:
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
                known.update(fresh)
        return {f: known[f] for f in files}

    def bounds(
        self, name: str, files: Sequence[str], column: str
    ) -> dict[str, tuple[str | None, str | None]]:
        """(min, max) of a string column in each file, from footers once and then remembered
        (None where unknown): which files can hold a value (only for files never rewritten)."""
        known = self._bounds.setdefault(column, {})
        missing = [f for f in files if f not in known]
        if missing:
            fresh: dict[str, tuple[str | None, str | None]] = dict.fromkeys(missing, (None, None))
            for i in range(0, len(missing), 2048):
                rows = (
                    self.cursor()
                    .execute(
                        """
                        SELECT file_name, min(stats_min_value), max(stats_max_value),
                               count(*) = count(stats_min_value)
                                   AND count(*) = count(stats_max_value)
                        FROM parquet_metadata($files)
                        WHERE path_in_schema = $column
                        GROUP BY file_name
                        """,
                        {"files": missing[i : i + 2048], "column": column},
                    )
                    .fetchall()
                )
                for file_name, low, high, complete in rows:
                    # A row group without statistics could hold anything.
                    fresh[file_name] = (low, high) if complete else (None, None)
            with self._stats_lock:
                known.update(fresh)
        return {f: known[f] for f in files}

    def split_by_columns(self, table: Table, files: Sequence[str]) -> tuple[list[str], list[str]]:
        """(files with every column of ``table``, files without some), from each file's footer
        once and then remembered (only for files never rewritten)."""
        known = self._complete.setdefault(table.name, {})
        missing = [f for f in files if f not in known]
        if missing:
            wanted = frozenset(table.schema.names())
            names: dict[str, set[str]] = {f: set() for f in missing}
            for i in range(0, len(missing), 2048):
                rows = (
                    self.cursor()
                    .execute(
                        "SELECT file_name, name FROM parquet_schema($files)",
                        {"files": missing[i : i + 2048]},
                    )
                    .fetchall()
                )
                for file_name, column in rows:
                    names.setdefault(file_name, set()).add(column)
            with self._stats_lock:
                known.update({f: wanted <= n for f, n in names.items()})
        current: list[str] = []
        older: list[str] = []
        for f in files:
            (current if known[f] else older).append(f)
        return current, older

    def mtimes(self, files: Sequence[str]) -> dict[str, float]:
        """Modification time (epoch s) of each file, read once and then remembered (for files
        that are never rewritten); a file that is gone is left out."""
        out: dict[str, float] = {}
        for f in files:
            known = self._mtimes.get(f)
            if known is None:
                try:
                    known = os.stat(f).st_mtime
                except FileNotFoundError:
                    continue
                self._mtimes[f] = known
            out[f] = known
        return out

    # -- queries -----------------------------------------------------------------------------
    def query(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        sources: Mapping[str, Sequence[str]],
    ) -> list[tuple[Any, ...]]:
        """Run ``sql`` with each ``{table}`` reading the files given for it in ``sources``.

        A small answer is remembered by (sql, params, files; see :func:`_answer_key`): the same
        question over the same files has the same answer, and new data means new files (or, for
        a file replaced in place, a new inode).
        """
        key = _answer_key(sql, params, sources)
        if key is not None:
            with self._answers_lock:
                known = self._answers.get(key)
                if known is not None:
                    self._answers.move_to_end(key)
                    return list(known)
        rows: list[tuple[Any, ...]] = self._execute(sql, params, sources).fetchall()
        if key is not None and len(rows) <= MAX_ANSWER_ROWS:
            with self._answers_lock:
                self._answers[key] = rows
                while len(self._answers) > ANSWERS:
                    self._answers.popitem(last=False)
        return list(rows)

    def remember(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, remembered by ``key`` among the answers of :meth:`query`. The key must
        name everything the answer depends on, files included (immutable ones only)."""
        with self._answers_lock:
            if key in self._answers:
                self._answers.move_to_end(key)
                known: T = self._answers[key]
                return known
        value = compute()
        with self._answers_lock:
            self._answers[key] = value
            while len(self._answers) > ANSWERS:
                self._answers.popitem(last=False)
        return value

    def _execute(
        self, sql: str, params: Mapping[str, Any] | None, sources: Mapping[str, Sequence[str]]
    ) -> duckdb.DuckDBPyConnection:
        bound = dict(params or {})

        def relation(match: re.Match[str]) -> str:
            name = match.group(1)
            table = TABLES[name]
            files = list(sources[name])
            if not files:
                return empty_relation(table)
            if not table.grows:
                bound[f"files_{name}"] = files
                return reader(table, f"$files_{name}")
            current, older = self.split_by_columns(table, files)
            refs = []
            for key, group in ((f"files_{name}", current), (f"older_{name}", older)):
                if group:
                    bound[key] = group
                refs.append(f"${key}" if group else None)
            return grown_reader(table, *refs)

        text = _TABLE_REF.sub(relation, sql)
        return self.cursor().execute(text, bound)

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

        def literal(files: list[str]) -> str | None:
            return "[" + ", ".join(map(quote_literal, files)) + "]" if files else None

        for name, table in TABLES.items():
            files = self.files(name)
            if not files:
                body = f"SELECT * FROM {empty_relation(table)}"
            elif table.grows:
                current, older = self.split_by_columns(table, files)
                body = f"SELECT * FROM {grown_reader(table, literal(current), literal(older))}"
            else:
                body = f"SELECT * FROM {reader(table, literal(files) or '[]')}"
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
