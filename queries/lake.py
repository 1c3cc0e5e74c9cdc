"""The lake as DuckDB sees it: consistent Delta snapshots, per-file log statistics, answer caching.

Every query in ``queries/`` reads through a :class:`View` from :meth:`Lake.view`: each Delta
table (``events``, ``quarantine``, ``ledger``; see :mod:`lake.tables`) pinned at one version,
as the pyarrow dataset :mod:`lake.snapshot` builds. A query names its tables as ``{events}``,
``{ledger}``, ... and DuckDB scans the pinned datasets, pushing filters and projections into
them: each file's fragment carries its partition values (``date``, ``hour``) and its min/max
statistics from the log, so a file that cannot match a time range or a campaign is never
opened. Values from users are always bound parameters.

Consistency comes from Delta, not from us: a version lists exactly the committed files, so a
Parquet file no commit names (an orphan of a crashed writer) is never read, and a file that a
later optimize or retention removes stays on disk until ``vacuum`` deletes it after its
retention (at least an hour), far longer than any query holds its view.

Refresh and caches, all exact. Opening a view asks each table for newer log entries
(``DeltaTable.update_incremental``: one listing of ``_delta_log``) and builds the table's
dataset and file index again only when the version moved. Answers are remembered by (query,
parameters, the versions of the tables it read and, when it read part of a table, the files):
a version never changes, so an answer stays exact until a commit moves the version.

The jobs' own tables (``rollups_<granularity>``, ``alerts``, the ``campaigns`` dimension) are
Parquet files on local disk under DATA_DIR that their jobs replace atomically; they are read as
they are at query time, and answers that read them are not remembered.
"""

from __future__ import annotations

import calendar
import os
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import unquote

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from cachetools import LRUCache
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from lake import changes
from lake.fragments import FragmentCache
from lake.location import LakeLocation
from lake.snapshot import table_dataset
from lake.tables import EVENTS, TableSpec, open_table
from lake.tables import TABLES as DELTA_TABLES
from pipeline.schema import (
    ALERT_SCHEMA,
    CAMPAIGN_SCHEMA,
    DAY_MS,
    HOUR_MS,
    LOW_CARDINALITY_COLUMNS,
    ROLLUP_SCHEMA,
    Layout,
)
from pipeline.settings import QuerySettings, Settings
from queries.event_sums import MinuteSums
from queries.ordered import ORDER_BYTES_PER_ROW, OrderedRows
from queries.rollup_rows import RollupRows
from queries.row_groups import RowGroups

T = TypeVar("T")

_TABLE_REF: Final = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_GLOB: Final = re.compile(r"[*?\[\]{}]")
#: Answers remembered per Lake (small ones only), most recently used kept.
ANSWERS: Final = 512
MAX_ANSWER_ROWS: Final = 5_000
#: Pinned (time-travel) table versions kept open per Lake.
PINNED: Final = 8
#: Versions whose change-feed rows (of a small table: the ledger) a Lake remembers.
FEED_VERSIONS: Final = 4096
#: Files at most this big are read once into memory and kept while they are live: the
#: uncompacted tail of one-commit-a-second writing (compaction turns them into big files
#: within COMPACT_INTERVAL). Scanning a file costs milliseconds per question whatever its size,
#: so without this a question's cost would grow with the number of commits since compaction.
SMALL_FILE_BYTES: Final = 8 * 1024**2
# The most memory (Arrow bytes, not file bytes: rows take 10-20x their zstd size; for events,
# plus the campaign order and running totals questions build, ORDER_BYTES_PER_ROW) that small
# files of one table may hold is QUERY_SMALL_FILES_BYTES: the newest are kept, older ones are
# scanned per question. A minute of events at 50k/s (COMPACT_INTERVAL's worth) takes ~400 MB.
#: Arrow bytes per file byte assumed before a table's first small file is read.
_FIRST_RATIO: Final = 12.0
#: String columns with few distinct values, read as dictionaries (half the memory).
_DICTIONARY_COLUMNS: Final = (
    *LOW_CARDINALITY_COLUMNS,
    "advertiser_id",
    "campaign_name",
    "batch_id",
    "reason",
    "source_file",
    "status",
)


@dataclass(frozen=True)
class FileStats:
    """What the log says of a file: rows, and the range of the table's time column (epoch ms)."""

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


# -- Delta tables ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableState:
    """One Delta table at one version: its dataset and the log's add actions (one per file).

    ``version`` is -1 for a table that does not exist yet (no rows). Immutable, so threads
    share it freely.
    """

    spec: TableSpec
    version: int
    dataset: pads.Dataset
    actions: pl.DataFrame = field(repr=False)
    #: Rows of the small files, by path (see :class:`_Files`); ``dataset`` has the others.
    small: Mapping[str, pa.Table] = field(default_factory=dict, repr=False)
    #: Small files' rows in campaign order, built on first use and shared across versions.
    orders: MutableMapping[str, OrderedRows] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def stats(self) -> dict[str, FileStats]:
        """Each file's rows and time range (the spec's ``partition_time`` column)."""
        frame = self.actions
        column = self.spec.partition_time
        rows = frame["num_records"].fill_null(-1).to_list()
        lows = _epoch_ms(frame, f"min.{column}")
        highs = _epoch_ms(frame, f"max.{column}")
        return {
            p: FileStats(n if n >= 0 else 1, lo, hi)  # rows unknown: it may hold some
            for p, n, lo, hi in zip(frame["path"].to_list(), rows, lows, highs, strict=True)
        }

    def bounds(self, column: str) -> dict[str, tuple[str | None, str | None]]:
        """(min, max) of a string column in each file (None where the log does not say)."""
        frame = self.actions
        paths = frame["path"].to_list()
        lows, highs = (
            frame[c].to_list() if c in frame.columns else [None] * len(paths)
            for c in (f"min.{column}", f"max.{column}")
        )
        return dict(zip(paths, zip(lows, highs, strict=True), strict=True))

    @cached_property
    def _fragments(self) -> dict[str, pads.Fragment]:
        if not isinstance(self.dataset, pads.FileSystemDataset):
            return {}
        return {unquote(f.path): f for f in self.dataset.get_fragments()}

    @cached_property
    def local_root(self) -> str | None:
        """The table's directory when its files are on local disk (None elsewhere)."""
        ds = self.dataset
        fs = ds.filesystem if isinstance(ds, pads.FileSystemDataset) else None
        if isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.LocalFileSystem):
            return str(fs.base_path.rstrip("/"))
        return None

    def ordered(self, path: str) -> OrderedRows:
        """The small file ``path``'s rows in (campaign_id, event_time, event_id) order."""
        found = self.orders.get(path)
        if found is None:
            # Two threads may both build it; either result is the same.
            found = self.orders[path] = OrderedRows(self.small[path])
        return found

    @cached_property
    def in_memory(self) -> pa.Table | None:
        """Every small file's rows as one table (None when there are none)."""
        return pa.concat_tables(self.small.values()) if self.small else None

    def parts(self, paths: Iterable[str] | None) -> tuple[pa.Table | None, pads.Dataset | None]:
        """What to scan for these files (None: every file): (rows in memory, files on storage).

        Small files come from memory, the others as fragments carrying the log's statistics,
        which DuckDB's pushed-down filters use to skip whole files.
        """
        ds = self.dataset
        if paths is None:
            on_disk = ds if self._fragments else None
            return self.in_memory, on_disk
        chosen = list(paths)
        cached = [self.small[p] for p in chosen if p in self.small]
        fragments = [self._fragments[p] for p in chosen if p in self._fragments]
        memory = pa.concat_tables(cached) if cached else None
        if not fragments or not isinstance(ds, pads.FileSystemDataset):
            return memory, None
        return memory, pads.FileSystemDataset(fragments, ds.schema, ds.format, ds.filesystem)

    def relation(
        self, cur: duckdb.DuckDBPyConnection, alias: str, paths: Iterable[str] | None = None
    ) -> str:
        """Register this table's files (or ``paths`` of them) in ``cur``; the SQL to read them."""
        memory, on_disk = self.parts(paths)
        if memory is None and on_disk is None:
            memory = self.spec.schema.empty_table()
        names = []
        if memory is not None:
            cur.register(alias + "_mem", memory)
            names.append(f"SELECT * FROM {alias}_mem")
        if on_disk is not None:
            names.append(self._disk_relation(cur, alias, on_disk))
        if len(names) == 1 and memory is not None:
            return f"{alias}_mem"
        return "(" + " UNION ALL ".join(names) + ")"

    def _disk_relation(
        self, cur: duckdb.DuckDBPyConnection, alias: str, on_disk: pads.Dataset
    ) -> str:
        """A query over the files of ``on_disk``, in the table's column order.

        On local disk DuckDB's own Parquet reader reads them: it prunes row groups by their
        statistics and keeps footers cached (``parquet_metadata_cache``), where a pyarrow
        dataset costs a Python-side scan setup per question (measured: a campaign's newest
        events 2-4x faster on a 50M-event hour). Elsewhere (S3; DuckDB's S3 reader is an
        extension downloaded at run time) the dataset is scanned through Arrow.
        """
        fs = on_disk.filesystem if isinstance(on_disk, pads.FileSystemDataset) else None
        local = isinstance(fs, pafs.SubTreeFileSystem) and isinstance(
            fs.base_fs, pafs.LocalFileSystem
        )
        root = fs.base_path.rstrip("/") if isinstance(fs, pafs.SubTreeFileSystem) else ""
        # read_parquet takes * ? [ in a path for a glob: such a DATA_DIR is read through Arrow.
        if local and not _GLOB.search(root):
            assert isinstance(on_disk, pads.FileSystemDataset)
            paths = [f"{root}/{f}" for f in on_disk.files]
            hive = [(p, "VARCHAR") for p in self.spec.partition_by]
            columns = ", ".join(f'"{n}"' for n in self.spec.schema.names)
            return f"SELECT {columns} FROM {read_parquet(paths, hive)}"
        cur.register(alias + "_disk", on_disk)
        return f"SELECT * FROM {alias}_disk"

    def rows(self) -> int | None:
        """Rows in this version from the log alone; None when a file's count is unknown."""
        counts = self.actions["num_records"]
        return None if counts.null_count() else int(counts.sum())


def _epoch_ms(frame: pl.DataFrame, column: str) -> list[int | None]:
    if column not in frame.columns:
        return [None] * len(frame)
    return frame[column].dt.epoch("ms").to_list()


def _actions(table: DeltaTable) -> pl.DataFrame:
    frame = pl.from_arrow(pa.table(table.get_add_actions(flatten=True)))
    assert isinstance(frame, pl.DataFrame)
    if not frame["path"].str.contains("%", literal=True).any():
        return frame  # nothing escaped (our partition values never are): no per-path call
    return frame.with_columns(pl.col("path").map_elements(unquote, return_dtype=pl.String))


class _Files:
    """One table's files as scan inputs, kept from version to version.

    Guarantee: for a table version, :meth:`sync` gives exactly that version's files: the newest
    small ones as rows read once into memory (with their partition values; files never change,
    so a path read once stays right), up to ``tail_bytes`` of memory, and every other file as a
    dataset of fragments carrying the log's statistics, each built once per file
    (:class:`lake.fragments.FragmentCache`): the set changes with nearly every commit, once the
    oldest small file leaves the tail.
    """

    def __init__(self, tail_bytes: int) -> None:
        self.tail_bytes = tail_bytes
        self.small: dict[str, pa.Table] = {}
        #: ``nbytes`` of each table in ``small``: Arrow sums every buffer of it again per call,
        #: which for a few hundred files was a tenth of a request's time.
        self.nbytes: dict[str, int] = {}
        #: Small files' campaign orders (:meth:`TableState.ordered`), forgotten with the file.
        self.orders: dict[str, OrderedRows] = {}
        self.large: frozenset[str] | None = None
        self.dataset: pads.Dataset | None = None
        self.fragments: FragmentCache | None = None
        #: Arrow bytes per file byte of the small files read so far (a guess until one is).
        self.ratio = _FIRST_RATIO
        self.learned = False

    def _kept(self, actions: pl.DataFrame) -> pl.DataFrame:
        """The small files to hold in memory: the newest, while their memory fits."""
        if "size_bytes" not in actions.columns:
            return actions.clear()
        small = actions.filter(pl.col("size_bytes") <= SMALL_FILE_BYTES)
        if "modification_time" in small.columns:
            small = small.sort("modification_time", descending=True, nulls_last=True)
        used, keep = 0.0, 0
        for path, size in zip(small["path"], small["size_bytes"], strict=True):
            known = self.nbytes.get(path)
            used += known if known is not None else size * self.ratio
            if used > self.tail_bytes:
                break
            keep += 1
        if keep == 0 and not self.learned and self.tail_bytes > 0:
            # The guess alone must not decide: under a budget below 12x the newest file's
            # size, nothing would ever be read, so the ratio would never be learned and a
            # budget that holds many files would hold none. Read the newest once to learn it;
            # the next sync keeps it only if it fits.
            keep = 1
        return small.head(keep)

    def sync(
        self, location: LakeLocation, spec: TableSpec, table: DeltaTable, actions: pl.DataFrame
    ) -> tuple[pads.Dataset, dict[str, pa.Table], dict[str, OrderedRows]]:
        kept = self._kept(actions)
        live = set(kept["path"].to_list())
        large = frozenset(p for p in actions["path"].to_list() if p not in live)
        if large != self.large or self.dataset is None:
            if self.fragments is None:
                schema = pa.schema(table.schema().to_arrow())
                self.fragments = FragmentCache(location, spec, schema)
            order = [p for p in actions["path"].to_list() if p in large]
            self.dataset = self.fragments.dataset(actions, order)
            self.large = large
        self.small = {p: t for p, t in self.small.items() if p in live}
        self.nbytes = {p: n for p, n in self.nbytes.items() if p in live}
        for gone in list(self.orders):  # a copy: request threads add orders meanwhile
            if gone not in live:
                self.orders.pop(gone, None)
        missing = kept.filter(~pl.col("path").is_in(list(self.small)))
        if len(missing):
            read = _read_small(location, spec, missing)
            # An events file's questions build its campaign order and running totals too.
            extra = ORDER_BYTES_PER_ROW if spec.name == EVENTS.name else 0
            held = {p: t.nbytes + extra * t.num_rows for p, t in read.items()}
            file_bytes = int(missing["size_bytes"].sum())
            if file_bytes:
                self.ratio = max(1.0, sum(held.values()) / file_bytes)
                self.learned = True
            self.small.update(read)
            self.nbytes.update(held)
        return self.dataset, dict(self.small), self.orders


def _read_small(
    location: LakeLocation, spec: TableSpec, files: pl.DataFrame
) -> dict[str, pa.Table]:
    """Each file's rows with its partition values as columns, in the table's schema."""
    root = location.table_filesystem(spec.name)
    paths = files["path"].to_list()
    dictionaries = [c for c in _DICTIONARY_COLUMNS if c in spec.schema.names]
    parquet = pads.ParquetFileFormat(
        read_options=pads.ParquetReadOptions(dictionary_columns=dictionaries)
    )
    read = pads.dataset(paths, filesystem=root, format=parquet)
    # The table's types (the files hold microsecond times), the dictionaries kept as read.
    target = pa.schema(
        pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if f.name in dictionaries else f
        for f in spec.schema
    )
    batches: dict[str, list[pa.RecordBatch]] = {p: [] for p in paths}
    for tagged in read.scanner().scan_batches():
        batches[tagged.fragment.path].append(tagged.record_batch)
    out = {}
    for row in files.iter_rows(named=True):
        data = pa.Table.from_batches(batches[row["path"]], schema=read.schema)
        for column in spec.partition_by:
            value = row[f"partition.{column}"]
            data = data.append_column(column, pa.repeat(pa.scalar(value, pa.string()), len(data)))
        out[row["path"]] = data.select(spec.schema.names).cast(target)
    return out


def _empty_state(spec: TableSpec) -> TableState:
    actions = pl.DataFrame(schema={"path": pl.String, "num_records": pl.Int64})
    return TableState(spec, -1, pads.dataset(spec.schema.empty_table()), actions)


# -- the jobs' local tables ----------------------------------------------------------------------
@dataclass(frozen=True)
class LocalTable:
    """A table a job keeps as Parquet files under DATA_DIR (one file, or Hive partitions).

    ``partitions`` are the Hive keys with their DuckDB types, outermost first; ``date`` and
    ``hour`` let :meth:`View.local_files` skip partitions outside a time window.
    """

    name: str
    path: str
    schema: pl.Schema
    partitions: tuple[tuple[str, str], ...] = ()

    @property
    def single_file(self) -> bool:
        return self.path.endswith(".parquet")


_DATE_HOUR: Final = (("date", "DATE"), ("hour", "INTEGER"))
LOCAL_TABLES: Final[Mapping[str, LocalTable]] = {
    t.name: t
    for t in (
        LocalTable("campaigns", "dimensions/campaigns.parquet", CAMPAIGN_SCHEMA),
        # Written by jobs/rollup.py: one file per hour (minute) or per date (hour, day).
        LocalTable("rollups_minute", "rollups/minute", ROLLUP_SCHEMA, _DATE_HOUR),
        LocalTable("rollups_hour", "rollups/hour", ROLLUP_SCHEMA, (("date", "DATE"),)),
        LocalTable("rollups_day", "rollups/day", ROLLUP_SCHEMA, (("date", "DATE"),)),
        # Written by jobs/alerts.py; started_at (the first column) orders it.
        LocalTable("alerts", "alerts/alerts.parquet", ALERT_SCHEMA),
    )
}
#: Every table a query or ``adevents sql`` can name.
TABLE_NAMES: Final = (*DELTA_TABLES, *LOCAL_TABLES)


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


def empty_relation(table: LocalTable) -> str:
    """A relation with ``table``'s columns and no rows, for a table with no files yet."""
    cols = [f'CAST(NULL AS {duckdb_type(t)}) AS "{n}"' for n, t in table.schema.items()]
    cols += [f'CAST(NULL AS {t}) AS "{k}"' for k, t in table.partitions]
    return f"(SELECT {', '.join(cols)} WHERE false)"


def local_relation(table: LocalTable, files: Sequence[str]) -> str:
    """``read_parquet`` over ``files`` (paths under DATA_DIR, embedded as literals: DuckDB
    cannot bind parameters in a view) or an empty relation when there are none."""
    if not files:
        return empty_relation(table)
    return read_parquet(files, table.partitions)


def read_parquet(paths: Sequence[str], partitions: Sequence[tuple[str, str]] = ()) -> str:
    """``read_parquet`` over ``paths`` (trusted local paths, embedded as literals), with the
    Hive ``partitions`` (key, DuckDB type) read from the paths."""
    options = ""
    if partitions:
        types = ", ".join(f"{quote_literal(k)}: {t}" for k, t in partitions)
        options = f", hive_partitioning = true, hive_types = {{{types}}}"
    listed = ", ".join(map(quote_literal, paths))
    return f"read_parquet([{listed}]{options})"


@lru_cache(maxsize=4096)
def _date_start(value: str) -> int:
    """Epoch ms of a ``date=`` directory's day (parsed once: every stats question lists them)."""
    return calendar.timegm(time.strptime(value, "%Y-%m-%d")) * 1000


def _partition_window(key: str, value: str, parent_start: int | None) -> tuple[int, int] | None:
    """Epoch-ms [start, end) that a ``date=`` or ``hour=`` directory can hold, if known."""
    try:
        if key == "date":
            start = _date_start(value)
            return start, start + DAY_MS
        if key == "hour" and parent_start is not None:
            start = parent_start + int(value) * HOUR_MS
            return start, start + HOUR_MS
    except (ValueError, OverflowError):
        return None
    return None


def list_local(
    root: Path, table: LocalTable, since_ms: int | None = None, until_ms: int | None = None
) -> list[str]:
    """The table's files under ``root`` (DATA_DIR), sorted, skipping partitions that cannot
    hold rows in [since, until)."""
    base = root / table.path
    if table.single_file:
        return [str(base)] if base.is_file() else []
    out: list[str] = []

    def visit(directory: Path, depth: int, start: int | None) -> None:
        try:
            names = sorted(p.name for p in directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return
        if depth == len(table.partitions):
            out.extend(str(directory / n) for n in names if n.endswith(".parquet"))
            return
        key = table.partitions[depth][0]
        for name in names:
            if not name.startswith(f"{key}="):
                continue
            window = _partition_window(key, name[len(key) + 1 :], start)
            if window is not None and (
                (until_ms is not None and window[0] >= until_ms)
                or (since_ms is not None and window[1] <= since_ms)
            ):
                continue
            visit(directory / name, depth + 1, window[0] if window else None)

    visit(base, 0, None)
    return out


# -- answers -------------------------------------------------------------------------------------
class _Answers:
    """A small LRU of answers, shared by threads (cachetools' LRU under a lock)."""

    def __init__(self, size: int = ANSWERS) -> None:
        self._items: LRUCache[Hashable, Any] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bool, Any]:
        with self._lock:
            if key not in self._items:
                return False, None
            return True, self._items[key]  # a read counts as a use

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value


def _identities(paths: Sequence[str]) -> tuple[tuple[str, int, int, int, int], ...] | None:
    """Each local file's (path, device, inode, mtime, size); None when one is gone (the
    answer is then not remembered: the file was replaced meanwhile)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        out.append((path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _hashable(key: Hashable) -> bool:
    try:
        hash(key)
    except TypeError:  # a list parameter
        return False
    return True


# -- views -------------------------------------------------------------------------------------
class View:
    """One consistent read of the lake: each Delta table at one version (:attr:`versions`).

    Everything asked of a view (files, statistics, queries) answers for those versions, however
    many commits land meanwhile. Cheap to make; use one per question and let it go.
    """

    def __init__(self, lake: Lake, states: Mapping[str, TableState]) -> None:
        self.lake = lake
        self.states = dict(states)

    @property
    def versions(self) -> dict[str, int]:
        return {name: s.version for name, s in self.states.items()}

    def table(self, name: str) -> TableState:
        return self.states[name]

    def files(
        self, name: str, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[str]:
        """Files of a Delta table that can hold rows of its time column in [since, until)."""
        stats = self.table(name).stats
        return sorted(p for p, s in stats.items() if s.overlaps(since_ms, until_ms))

    def count(self, name: str) -> int:
        """Rows of a Delta table, from the log (no data read when every file says)."""
        rows = self.table(name).rows()
        if rows is not None:
            return rows
        return int(self.query(f"SELECT count(*) FROM {{{name}}}")[0][0])

    def local_files(
        self, name: str, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[str]:
        """Files of a job's local table that can hold rows in [since, until), as listed now."""
        root = self.lake.data_dir
        return [] if root is None else list_local(root, LOCAL_TABLES[name], since_ms, until_ms)

    def query(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        files: Mapping[str, Sequence[str]] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run ``sql`` with each ``{table}`` reading this view's version of it.

        ``files[name]`` narrows a table to some of its files (paths from :meth:`files` or
        :meth:`local_files`); a Delta table not named there is read whole, with DuckDB's filters
        pruning its files. A small answer is remembered by (sql, params, and per table: its
        version and the files read, or for a job's local table the identity of each file read:
        device, inode, mtime and size; jobs replace their files by rename, never in place).
        """
        files = dict(files or {})
        names = sorted(set(_TABLE_REF.findall(sql)))
        parts: list[tuple[Any, ...]] = []
        for n in names:
            if n in self.states:
                parts.append((n, self.states[n].version, tuple(files[n]) if n in files else None))
            elif n in LOCAL_TABLES:
                files[n] = files[n] if n in files else self.local_files(n)
                identities = _identities(files[n])
                if identities is not None:
                    parts.append((n, identities))
        key: Hashable | None = ("query", sql, tuple(sorted((params or {}).items())), tuple(parts))
        if len(parts) < len(names) or not _hashable(key):
            key = None  # an unknown table (an error below) or a file replaced meanwhile
        if key is not None:
            found, known = self.lake.answers.get(key)
            if found:
                return list(known)
        rows = self._execute(sql, params, names, files).fetchall()
        if key is not None and len(rows) <= MAX_ANSWER_ROWS:
            self.lake.answers.put(key, rows)
        return list(rows)

    def remember(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, remembered by ``key`` and this view's versions: ``key`` must name
        everything else the answer depends on."""
        full = ("remember", key, tuple(sorted(self.versions.items())))
        found, known = self.lake.answers.get(full)
        if found:
            value: T = known
            return value
        value = compute()
        self.lake.answers.put(full, value)
        return value

    def _execute(
        self,
        sql: str,
        params: Mapping[str, Any] | None,
        names: Sequence[str],
        files: Mapping[str, Sequence[str]],
    ) -> duckdb.DuckDBPyConnection:
        cur = self.lake.cursor()
        relations: dict[str, str] = {}
        for name in names:
            if name in self.states:
                state = self.states[name]
                chosen = files.get(name)
                # Registered on this thread's own cursor: other threads' names are their own.
                relations[name] = state.relation(cur, f"__{name}", chosen)
            elif name in LOCAL_TABLES:
                listed = files.get(name)
                chosen = self.local_files(name) if listed is None else listed
                relations[name] = local_relation(LOCAL_TABLES[name], chosen)
            else:
                raise KeyError(f"no table named {name!r}")
        text = _TABLE_REF.sub(lambda m: relations[m.group(1)], sql)
        return cur.execute(text, dict(params or {}))

    def create_views(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        """One view per table over this view's versions in ``con``; returns their names."""
        for name, state in self.states.items():
            body = state.relation(con, f"__{name}")
            con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT * FROM {body}')
        for name, table in LOCAL_TABLES.items():
            body = local_relation(table, self.local_files(name))
            con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT * FROM {body}')
        return list(TABLE_NAMES)


# -- the lake ----------------------------------------------------------------------------------
class Lake:
    """Reads of one lake (``LAKE_URI``) and the jobs' tables under ``data_dir``; thread-safe.

    One Lake per process: it keeps each Delta table open, refreshes it incrementally, and
    remembers answers (see the module's docstring). Each thread gets its own DuckDB cursor.
    """

    def __init__(
        self,
        location: LakeLocation,
        *,
        data_dir: str | Path | None = None,
        specs: Mapping[str, TableSpec] = DELTA_TABLES,
        memory: QuerySettings | None = None,
    ) -> None:
        memory = memory or QuerySettings()
        self.location = location
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.specs = dict(specs)
        self.answers = _Answers()
        #: Footers and decoded row groups of local files, for a campaign's newest events.
        self.row_groups = RowGroups(memory.query_row_groups_bytes)
        #: A campaign's events of a row group within a minute, for stats' partial minutes.
        self.minute_sums = MinuteSums(memory.query_minute_sums_bytes)
        #: Rollup files' rows by campaign, for stats' whole buckets and minutes.
        self.rollup_rows = RollupRows(memory.query_rollups_bytes)
        self._tail = memory.query_small_files_bytes
        self._db = duckdb.connect(":memory:")
        self._db.execute("SET TimeZone = 'UTC'")
        # Delta data files never change once written (a path is never reused): their
        # footers can be cached across questions.
        self._db.execute("SET parquet_metadata_cache = true")
        self._local = threading.local()
        #: Open tables and the state of their latest version, refreshed under ``_lock``.
        self._tables: dict[str, DeltaTable] = {}
        self._latest: dict[str, TableState] = {}
        self._pinned: LRUCache[tuple[str, int], TableState] = LRUCache(maxsize=PINNED)
        self._feed: LRUCache[tuple[str, int, tuple[str, ...]], tuple[tuple[Any, ...], ...]] = (
            LRUCache(maxsize=FEED_VERSIONS)
        )
        self._files: dict[str, _Files] = {}
        self._fs = location.filesystem()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Lake:
        """The lake LAKE_URI names, with the jobs' tables under DATA_DIR."""
        location = LakeLocation.from_settings(settings)
        return cls(location, data_dir=settings.data_dir, memory=settings.query)

    @cached_property
    def layout(self) -> Layout | None:
        """DATA_DIR's layout, where the jobs' tables are (None when the Lake has none); built
        once: a stats question asked for it three times, at ~30 us a build."""
        return None if self.data_dir is None else Layout(str(self.data_dir))

    def close(self) -> None:
        self._db.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's connection to the lake's database."""
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._db.cursor()
            self._local.cursor = cur
        return cur

    # -- snapshots ---------------------------------------------------------------------------
    def view(self, *names: str, versions: Mapping[str, int] | None = None) -> View:
        """A consistent view of the named Delta tables (all of them by default), each at its
        latest version or at ``versions[name]`` (time travel)."""
        wanted = names or tuple(self.specs)
        pinned = versions or {}
        states = {
            n: self._pinned_state(n, pinned[n]) if n in pinned else self._latest_state(n)
            for n in wanted
        }
        return View(self, states)

    def _latest_state(self, name: str) -> TableState:
        """The table's latest version, built again only when the log moved."""
        spec = self.specs[name]
        with self._lock:
            table = self._tables.get(name)
            if table is None:
                try:
                    table = open_table(self.location, spec)
                except TableNotFoundError:
                    return _empty_state(spec)
                self._tables[name] = table
            elif self._log_moved(name, table.version()):
                table.update_incremental()
            known = self._latest.get(name)
            if known is not None and known.version == table.version():
                return known
            files = self._files.get(name)
            if files is None:
                files = self._files[name] = _Files(self._tail)
            state = self._state(spec, table, files)
            self._latest[name] = state
            return state

    def _log_moved(self, name: str, version: int) -> bool:
        """Whether table ``name`` has a version after ``version``: whether the next commit's
        file exists. One stat (one HEAD on S3), where ``update_incremental`` lists the whole
        log (1.5 ms for three tables of 250 commits here; a LIST request per table on S3)."""
        path = self.location.path(name, "_delta_log", f"{version + 1:020d}.json")
        return bool(self._fs.get_file_info(path).type != pafs.FileType.NotFound)

    def _pinned_state(self, name: str, version: int) -> TableState:
        key = (name, version)
        with self._lock:
            known = self._pinned.get(key)
            if known is not None:
                return known
        table = DeltaTable(
            self.location.table_uri(name),
            version=version,
            storage_options=self.location.storage_options(),
        )
        state = self._state(self.specs[name], table)
        with self._lock:
            self._pinned[key] = state
        return state

    def _state(self, spec: TableSpec, table: DeltaTable, files: _Files | None = None) -> TableState:
        """A version's state; with ``files`` (kept across versions), small files from memory."""
        actions = _actions(table)
        if files is None:
            return TableState(
                spec, table.version(), table_dataset(self.location, spec, table), actions
            )
        dataset, small, orders = files.sync(self.location, spec, table, actions)
        return TableState(spec, table.version(), dataset, actions, small, orders)

    def inserted(
        self, name: str, after: int, upto: int, columns: Sequence[str]
    ) -> list[tuple[Any, ...]]:
        """``columns`` of the rows that versions (after, upto] of table ``name`` inserted (its
        change feed, :mod:`lake.changes`; compactions insert none). For small tables (the
        ledger): each version is read once and remembered, since a committed version never
        changes, so a caller asking after every commit reads only the new commits.

        Raises :class:`lake.changes.FeedUnavailableError` when a version can no longer be read.
        """
        wanted = tuple(columns)
        with self._lock:
            rows = {
                v: self._feed.get((name, v, wanted)) for v in range(max(after, 0) + 1, upto + 1)
            }
            missing = [v for v, known in rows.items() if known is None]
            if missing:
                fresh: dict[int, list[tuple[Any, ...]]] = {v: [] for v in missing}
                table = self._feed_table(name, upto)
                for frame in changes.inserted(table, missing[0] - 1, missing[-1], wanted):
                    for row in frame.iter_rows():
                        if row[-1] in fresh:
                            fresh[row[-1]].append(row[:-1])
                for version, found in fresh.items():
                    rows[version] = self._feed[(name, version, wanted)] = tuple(found)
        return [row for version in sorted(rows) for row in rows[version] or ()]

    def _feed_table(self, name: str, version: int) -> DeltaTable:
        """The open table ``name`` if it has ``version``, else a fresh one (under ``_lock``)."""
        table = self._tables.get(name)
        if table is None or table.version() < version:
            table = open_table(self.location, self.specs[name])
        return table

    # -- ad-hoc SQL ----------------------------------------------------------------------------
    def sql(
        self, text: str, *, versions: Mapping[str, int] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run ad-hoc SQL (trusted: the operator's own) over views of every table at one
        snapshot (or at ``versions``); (columns, rows)."""
        con = self.cursor()
        self.view(versions=versions).create_views(con)
        result = con.execute(text)
        columns = [d[0] for d in result.description] if result.description else []
        return columns, result.fetchall() if result.description else []
