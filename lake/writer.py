"""The lake's commit path: Parquet written by us, committed as Delta add actions with an app txn.

Exactly once through the Delta log (the kafka-delta-ingest design). A source names itself with
an ``app_id`` (a spool's id, later a Kafka group-topic-partition) and numbers its batches, or
groups of batches, with a ``version`` that only grows. A batch's commit to a table carries the
application transaction ``(app_id, version)`` in the same Delta commit as its add actions, so
"the rows are in the table" and "the table has seen version" become true together, atomically.

Protocol, per table, in a fixed order (events, quarantine, ledger: the ledger last):

1. Read the table's txn version for ``app_id`` (``committed_version``). If it is ≥ ``version``
   the batch is already in this table: skip it. On start and after any failure the caller just
   redoes the batches after the lowest committed version; each table skips what it has.
2. Write the table's Parquet files under its partition directories with unique names. A crash
   here leaves orphan files: not in the log, so no reader sees them, and ``vacuum(full=True)``
   removes them once older than its retention.
3. Commit the add actions with ``CommitProperties(app_transactions=[Transaction(app_id,
   version)])``. A commit is a put-if-absent of the next log file (an atomic create on local
   disk, ``If-None-Match: *`` on S3), so exactly one writer gets each table version; losers
   re-read the log and retry.

Steps 1 and 2 may also come in the other order (``LakeWriter.stage``, then
``commit_staged``): the files are written while an earlier batch commits, and the check comes
right before the commit; files of a version found committed then stay orphans.

Two writers with the same ``(app_id, version)`` (a stalled consumer and its successor): delta-rs's
conflict checker fails a commit when a commit that landed after its snapshot carries a txn
for the same ``app_id`` (verified in ``tests/test_lake_writer.py``, locally and on S3), and
the snapshot is refreshed at step 1, so the second commit either sees the version at step 1 and
skips, or fails at step 3. On any commit failure the log is read again: if it now holds
``version`` for ``app_id`` the outcome is ``CONCEDED`` (the rows are in, once; our files are
orphans, unless the failure was an I/O error after our own put landed), else the error
propagates and the caller retries the batch (new files; the old ones become orphans).

Not guaranteed, and the caller's job: one writer per ``app_id`` at a time in the normal case;
versions committed in increasing order (delta-rs accepts a lower version and the txn then goes
backwards); a redo of ``version`` carrying the same rows as the first attempt (tables that
have the version skip it, so a batch must not be regrouped); and a vacuum retention longer than
any write-to-commit time (``vacuum(full=True)`` deletes unreferenced files by age).
A ``DeltaTable`` handle is refreshed before each skip check and after each commit: a stale
handle's commit would conflict with its own previous commit's app txn.
"""

from __future__ import annotations

import enum
import io
import json
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction

from lake import readback
from lake.location import LakeLocation
from lake.tables import PARTITION_FORMATS, TABLES, TableSpec, ensure_table
from pipeline.schema import PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL

#: Rows per Parquet row group. Rows are sorted by campaign then time, so a group whose
#: campaign_id min/max exclude a campaign is skipped; 16k rows keep a campaign of a 100k-row
#: batch inside a few groups (see docs/decisions/0001-delta-lake.md for the measurement).
ROW_GROUP_ROWS: Final = 16_384
#: Rows sorted together. Each chunk's row groups stay narrow in the sort keys (pruning holds),
#: and sorting stays linear in a commit's size: one sort of 1M rows on a string key costs ~20x
#: one of 100k (measured), so a big commit is sorted in chunks.
SORT_CHUNK_ROWS: Final = 131_072
_TS_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%f"
_MS: Final = timedelta(milliseconds=1)
_BUCKET: Final = "__partition_bucket"
_FLOATS: Final = frozenset({"FLOAT", "DOUBLE"})
_PER_SECOND: Final = {"ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class Outcome(enum.Enum):
    """What a commit of ``(app_id, version)`` to one table did."""

    COMMITTED = "committed"  # our files are in the table with the txn
    SKIPPED = "skipped"  # the table already had the version: nothing written
    CONCEDED = "conceded"  # another writer committed the version first: our files are orphans


@dataclass(frozen=True)
class TableCommit:
    """One table's part of a batch commit."""

    table: str
    outcome: Outcome
    rows: int = 0
    files: int = 0


@dataclass
class WrittenFiles:
    """Parquet files written for one table and not committed yet."""

    actions: list[AddAction] = field(default_factory=list)
    rows: int = 0


@dataclass(frozen=True)
class Staged:
    """One table's part of a batch, staged by :meth:`LakeWriter.stage` and not committed; each
    writer's subclass holds what it needs to commit it."""

    table: str


@dataclass(frozen=True)
class StagedFiles(Staged):
    """The Delta writer's staged part: the Parquet files written."""

    files: WrittenFiles


def committed_version(table: DeltaTable, app_id: str) -> int | None:
    """The latest version ``app_id`` committed to ``table`` (refreshed to the latest log)."""
    table.update_incremental()
    return table.transaction_version(app_id)


def prepare(spec: TableSpec, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame``'s table columns plus its partition bucket (the UTC hour or day), sorted by
    bucket then sort keys (an integer bucket sorts faster than the partitions' strings).

    A frame this returned is returned as it is, so a caller may prepare on one thread what
    ``write_files`` (which prepares what it is given) writes on another."""
    if _BUCKET in frame.columns:
        return frame
    missing = [c for c in spec.columns.names if c not in frame.columns]
    if missing:
        raise ValueError(f"frame for table {spec.name} lacks columns {missing}")
    every = "1h" if "hour" in spec.partition_by else "1d"
    utc = pl.col(spec.partition_time).dt.convert_time_zone("UTC")
    framed = frame.select(*spec.columns.names, utc.dt.truncate(every).alias(_BUCKET))
    if framed[_BUCKET].null_count():
        raise ValueError(f"{spec.partition_time} is null in rows for table {spec.name}")
    order = _packed_order(spec, framed, every)
    if order is not None:
        # A gather from a frame of several chunks (a group's files, concatenated) cost ~5x one
        # from a single chunk: one copy first is far cheaper (712 → 146 ns an event).
        return framed.rechunk()[order]
    keys = [_BUCKET, *spec.sort_keys]
    if framed.height <= SORT_CHUNK_ROWS:
        return framed.sort(keys)
    return pl.concat([chunk.sort(keys) for chunk in framed.iter_slices(SORT_CHUNK_ROWS)])


def _packed_order(spec: TableSpec, framed: pl.DataFrame, every: str) -> pl.Series | None:
    """The row order of a sort by (bucket, text key, time key) as one sort of one unsigned
    64-bit number per row: the bucket's offset from the first bucket, the text's rank among the
    frame's distinct values, the time within its bucket. The same order as the sort on three
    keys, one a string, for less (the sort step of ``bench/stage_costs.py``, one thread:
    435 → 326 ns an event, of which the single-chunk gather is 146). None, for the general
    sort, unless the keys are a string and the partition time (the events table's campaign_id,
    event_time) and the three parts fit in 64 bits."""
    if len(spec.sort_keys) != 2 or spec.sort_keys[1] != spec.partition_time or not framed.height:
        return None
    text, times = framed[spec.sort_keys[0]], framed[spec.sort_keys[1]]
    textual = text.dtype in (pl.String, pl.Categorical)
    if not textual or not isinstance(times.dtype, pl.Datetime) or text.null_count():
        return None
    unit = times.dtype.time_unit or "us"
    bucket_len = (3_600 if every == "1h" else 86_400) * _PER_SECOND[unit]
    bucket = framed[_BUCKET].dt.epoch(unit).to_numpy()
    first = int(bucket.min())
    ranks = _text_ranks(text)
    time_bits = bucket_len.bit_length()
    code_bits = int(ranks.max()).bit_length()
    offset_bits = ((int(bucket.max()) - first) // bucket_len).bit_length()
    if time_bits + code_bits + offset_bits > 64:
        return None
    key = ranks << np.uint64(time_bits)
    key |= (times.dt.epoch(unit).to_numpy() - bucket).astype(np.uint64)
    if offset_bits:
        offset = ((bucket - first) // bucket_len).astype(np.uint64)
        key |= offset << np.uint64(time_bits + code_bits)
    row_bits = (framed.height - 1).bit_length()
    if time_bits + code_bits + offset_bits + row_bits > 64:
        return pl.Series(key).arg_sort()
    # With the row number in the low bits, keys are distinct and sorting them is the order
    # (ties in input order): numpy's vectorised sort of the numbers themselves, 12 ns an
    # event where Polars' arg_sort of (row, key) pairs took 65.
    key <<= np.uint64(row_bits)
    key |= np.arange(framed.height, dtype=np.uint64)
    key.sort()
    return pl.Series(key & np.uint64((1 << row_bits) - 1))


def _text_ranks(text: pl.Series) -> npt.NDArray[np.uint64]:
    """Each row's rank, in byte order, among the distinct values of ``text`` (no nulls). A
    categorical is ranked by its codes, never decoded: only its few distinct values are."""
    distinct = text.unique()
    order = distinct.cast(pl.String).arg_sort()
    rank = pl.Series(np.empty(len(distinct), np.uint64))
    rank[order] = pl.int_range(len(distinct), eager=True, dtype=pl.UInt64)
    if text.dtype == pl.Categorical:
        text, distinct = text.to_physical(), distinct.to_physical()
    return text.replace_strict(distinct, rank, return_dtype=pl.UInt64).to_numpy()


def with_partition_columns(spec: TableSpec, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` prepared as for ``write_files``, with the partition columns as strings."""
    return prepare(spec, frame).drop(_BUCKET).with_columns(spec.partition_exprs())


def _iso(value: datetime, *, up: bool) -> str:
    # Delta stats keep milliseconds: round a max up so the range still covers every value.
    micros = value.microsecond % 1000
    if up and micros:
        value = value.replace(microsecond=value.microsecond - micros) + _MS
    else:
        value = value.replace(microsecond=value.microsecond - micros)
    return value.strftime(_TS_FORMAT)[:-3] + "Z"


def _json_value(value: Any, *, up: bool) -> Any:
    if isinstance(value, datetime):
        return _iso(value, up=up)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_stats(metadata: pq.FileMetaData) -> str:
    """Delta ``stats`` JSON (numRecords; per column min, max, null count) from a file's footer.

    Read from the row-group statistics pyarrow wrote, not from the data: a few dozen footer
    entries per file instead of a second pass over every column.
    """
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    uncounted: set[str] = set()  # a group without a null count: no nullCount for the column
    unknown: set[str] = set()  # a group without bounds (but with values): no min/max
    for r in range(metadata.num_row_groups):
        group = metadata.row_group(r)
        for c in range(group.num_columns):
            column = group.column(c)
            name, st = column.path_in_schema, column.statistics
            if st is None or not st.has_null_count:
                uncounted.add(name)
                unknown.add(name)
                continue
            nulls[name] = nulls.get(name, 0) + st.null_count
            if column.physical_type in _FLOATS:
                # Parquet bounds leave NaN out, while Spark orders NaN above every number:
                # no float bounds, so no engine skips a file that holds a NaN it wants.
                unknown.add(name)
                continue
            if not st.has_min_max:
                if st.null_count < group.num_rows:
                    unknown.add(name)  # values but no bounds (e.g. all NaN)
                continue
            mins[name] = st.min if name not in mins else min(mins[name], st.min)
            maxs[name] = st.max if name not in maxs else max(maxs[name], st.max)
    stats = {
        "numRecords": metadata.num_rows,
        "minValues": {n: _json_value(v, up=False) for n, v in mins.items() if n not in unknown},
        "maxValues": {n: _json_value(v, up=True) for n, v in maxs.items() if n not in unknown},
        "nullCount": {n: v for n, v in nulls.items() if n not in uncounted},
    }
    return json.dumps(stats, separators=(",", ":"))


def write_files(
    location: LakeLocation,
    spec: TableSpec,
    frame: pl.DataFrame,
    *,
    version: int = 0,
    filesystem: pafs.FileSystem | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
    fsync: bool = True,
) -> WrittenFiles:
    """Write ``frame`` as one zstd Parquet file per partition; return their add actions."""
    fs = filesystem or location.filesystem()
    written = WrittenFiles()
    if frame.height == 0:
        return written
    framed = prepare(spec, frame)
    for bucket, part in partitions(framed):
        values = {p: bucket.strftime(PARTITION_FORMATS[p]) for p in spec.partition_by}
        relative = "/".join([*(f"{p}={values[p]}" for p in spec.partition_by), _file_name(version)])
        body = encode_part(part, row_group_rows)
        # The statistics come from the footer read back, not from a second pass over the data.
        footer = pq.read_metadata(pa.BufferReader(body))
        _put(fs, location.path(spec.name, relative), body, local=not location.is_s3, fsync=fsync)
        now_ms = int(time.time() * 1000)
        written.actions.append(
            AddAction(relative, body.size, values, now_ms, True, file_stats(footer))
        )
        written.rows += part.height
    return written


def partitions(framed: pl.DataFrame) -> Iterator[tuple[datetime, pl.DataFrame]]:
    """A prepared frame's partitions, in order: (bucket, its rows). The frame is sorted by
    bucket, so each is one run of rows, a slice, not a copy (``partition_by`` copied every
    column: 30 ns an event)."""
    start = 0
    for length, bucket in framed.select(pl.col(_BUCKET).rle()).unnest(_BUCKET).iter_rows():
        assert isinstance(bucket, datetime)
        yield bucket, framed.slice(start, length)
        start += length


def encode_part(part: pl.DataFrame, row_group_rows: int = ROW_GROUP_ROWS) -> pa.Buffer:
    """One partition of a prepared frame as a zstd Parquet file's bytes, without the bucket.

    Polars writes Parquet ~2.5x faster than pyarrow's writer here (and smaller files). Delta
    timestamps are microseconds."""
    data = part.drop(_BUCKET).with_columns(pl.col(pl.Datetime).dt.cast_time_unit("us"))
    buffer = io.BytesIO()
    data.write_parquet(
        buffer,
        compression=PARQUET_COMPRESSION,
        compression_level=PARQUET_COMPRESSION_LEVEL,
        statistics=True,
        row_group_size=row_group_rows,
    )
    return pa.py_buffer(buffer.getbuffer())


def _put(fs: pafs.FileSystem, path: str, body: pa.Buffer, *, local: bool, fsync: bool) -> None:
    """Store one whole file: one stream on S3; locally a plain write, fsynced if asked."""
    if not local:
        with fs.open_output_stream(path) as out:
            out.write(body)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as out:
        out.write(memoryview(body))
        if fsync:
            out.flush()
            os.fsync(out.fileno())


def _file_name(version: int) -> str:
    return f"part-{version:015d}-{uuid.uuid4().hex}.parquet"


def names_txn(value: str, app_id: str, version: int) -> bool:
    """Whether group metadata (JSON with ``txns``: app id -> version) holds the txn."""
    try:
        txns = json.loads(value).get("txns", {})
    except (ValueError, AttributeError):
        return False
    return isinstance(txns, dict) and txns.get(app_id) == version


class TxnOverlapError(RuntimeError):
    """Some of a group's app ids are committed at or past their versions in a table and others
    are not: another writer committed part of it (a partition moved to another consumer).
    Nothing was written; the group must be formed again from what the tables hold."""


class _TxnMemo:
    """App txn versions read from, or committed to, one table version, per open handle.

    delta-rs answers ``transaction_version`` one app id at a time (~0.8 ms each), and a Kafka
    group commits one app id per partition to each table, checked before every commit: 16
    partitions cost ~25 ms per group on the writer thread. A table version is immutable, so
    what was read at version v holds while the table is at v; and a commit of ours that made
    version v + 1 changed only its own txns. Any other step (another writer's commit, a retry
    that landed further on) moves the version elsewhere and the memo is read again."""

    def __init__(self) -> None:
        # By handle identity (a DeltaTable is unhashable), dropped when the handle goes.
        self._memo: dict[int, tuple[weakref.ref[DeltaTable], int, dict[str, int | None]]] = {}
        self._guard = threading.Lock()

    def _known(self, table: DeltaTable, version: int) -> dict[str, int | None]:
        key = id(table)
        entry = self._memo.get(key)
        if entry is not None and entry[0]() is table and entry[1] == version:
            return entry[2]
        gone = weakref.ref(table, lambda _: self._memo.pop(key, None))
        known: dict[str, int | None] = {}
        self._memo[key] = (gone, version, known)
        return known

    def read(self, table: DeltaTable, app_ids: Collection[str]) -> dict[str, int | None]:
        """Each app id's version at ``table``'s current version (refresh it first)."""
        with self._guard:
            known = self._known(table, table.version())
            for app_id in app_ids:
                if app_id not in known:
                    known[app_id] = table.transaction_version(app_id)
            return {app_id: known[app_id] for app_id in app_ids}

    def committed(self, table: DeltaTable, before: int, txns: Mapping[str, int]) -> None:
        """Our commit of ``txns`` went in on ``table`` at version ``before`` (now refreshed)."""
        with self._guard:
            known = dict(self._known(table, before))
            if table.version() == before + 1:
                self._known(table, before + 1).update({**known, **txns})


_TXNS = _TxnMemo()


def committed_versions(table: DeltaTable, app_ids: Collection[str]) -> dict[str, int | None]:
    """Each app id's latest committed version in ``table`` (refreshed to the latest log)."""
    table.update_incremental()
    return _TXNS.read(table, app_ids)


def _all_seen(table: DeltaTable, txns: Mapping[str, int]) -> bool | None:
    """True when every txn is committed at or past its version, False when none is, None when
    some are (see TxnOverlapError)."""
    seen = committed_versions(table, txns)
    done = [(v := seen[app]) is not None and v >= version for app, version in txns.items()]
    return True if all(done) else (False if not any(done) else None)


def commit_files(
    table: DeltaTable,
    spec: TableSpec,
    files: WrittenFiles,
    txns: Mapping[str, int],
    metadata: Mapping[str, str] | None = None,
) -> TableCommit:
    """Commit ``files`` with the app transactions ``txns`` (app id -> version) and ``metadata``
    in the commit info; see the module docstring for races."""
    now_ms = int(time.time() * 1000)
    properties = CommitProperties(
        app_transactions=[Transaction(app, version, now_ms) for app, version in txns.items()],
        custom_metadata=dict(metadata or {}),
    )
    before = table.version()
    try:
        table.create_write_transaction(
            list(files.actions),
            "append",
            table.schema(),
            partition_by=list(spec.partition_by),
            commit_properties=properties,
        )
    except (DeltaError, OSError) as exc:
        # Conflict with a commit carrying one of our app ids, or an I/O error after which the
        # put may have landed: the log decides.
        seen = _all_seen(table, txns)
        if seen:
            return TableCommit(spec.name, Outcome.CONCEDED)
        if seen is None:
            overlap = f"{spec.name}: another writer committed part of {dict(txns)}"
            raise TxnOverlapError(overlap) from exc
        raise
    table.update_incremental()
    _TXNS.committed(table, before, txns)
    return TableCommit(spec.name, Outcome.COMMITTED, files.rows, len(files.actions))


def commit_table(
    location: LakeLocation,
    table: DeltaTable,
    spec: TableSpec,
    frame: pl.DataFrame,
    *,
    txns: Mapping[str, int],
    metadata: Mapping[str, str] | None = None,
    fsync: bool = True,
    after_write: Callable[[str], None] | None = None,
) -> TableCommit:
    """Steps 1-3 of the protocol for one table: skip if done, else write and commit.

    ``txns`` holds one app id per source in the commit (a spool slot; each Kafka partition of
    a group): the table has the commit when it has every one of them, and none when it has
    none; part of them raises TxnOverlapError. ``after_write(table name)`` runs between the
    Parquet write and the commit (crash tests).
    """
    if _skip(table, spec, txns):
        return TableCommit(spec.name, Outcome.SKIPPED)
    files = write_files(location, spec, frame, version=max(txns.values()), fsync=fsync)
    if after_write is not None:
        after_write(spec.name)
    return commit_files(table, spec, files, txns, metadata)


def commit_staged(
    table: DeltaTable,
    spec: TableSpec,
    files: WrittenFiles,
    *,
    txns: Mapping[str, int],
    after_write: Callable[[str], None] | None = None,
) -> TableCommit:
    """Step 3 for files written earlier (steps 1 and 2 in the other order): skip if the table
    has ``txns`` by now (the files stay orphans), else commit them."""
    if after_write is not None:
        after_write(spec.name)
    if _skip(table, spec, txns):
        return TableCommit(spec.name, Outcome.SKIPPED)
    return commit_files(table, spec, files, txns)


def _skip(table: DeltaTable, spec: TableSpec, txns: Mapping[str, int]) -> bool:
    """Step 1: whether ``table`` has every txn of ``txns`` already (raises when it has part)."""
    seen = _all_seen(table, txns)
    if seen is None:
        raise TxnOverlapError(f"{spec.name}: another writer committed part of {dict(txns)}")
    return seen


def commit_batch(
    location: LakeLocation,
    app_id: str,
    version: int,
    frames: Mapping[str, pl.DataFrame],
    *,
    tables: Mapping[str, DeltaTable] | None = None,
    specs: Mapping[str, TableSpec] = TABLES,
    fsync: bool = True,
    after_write: Callable[[str], None] | None = None,
) -> list[TableCommit]:
    """Commit a batch (or group of batches) of one source: :func:`commit_tables` with the one
    transaction ``(app_id, version)``."""
    return commit_tables(
        location,
        {app_id: version},
        frames,
        tables=tables,
        specs=specs,
        fsync=fsync,
        after_write=after_write,
    )


def commit_tables(
    location: LakeLocation,
    txns: Mapping[str, int],
    frames: Mapping[str, pl.DataFrame],
    *,
    metadata: Mapping[str, str] | None = None,
    tables: Mapping[str, DeltaTable] | None = None,
    specs: Mapping[str, TableSpec] = TABLES,
    fsync: bool = True,
    after_write: Callable[[str], None] | None = None,
) -> list[TableCommit]:
    """Commit to each table of ``frames``, in ``specs`` order, with every app transaction of
    ``txns`` (and ``metadata`` in the commit info).

    Every named table gets a commit, even an empty one, so that afterwards every table's txn
    versions are ≥ ``txns``'. Pass ``tables`` (open ``DeltaTable`` objects, refreshed here) to
    save re-reading the log between batches.
    """
    unknown = set(frames) - set(specs)
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; known: {sorted(specs)}")
    results = []
    for name, spec in specs.items():
        if name not in frames:
            continue
        table = tables[name] if tables is not None else ensure_table(location, spec)
        results.append(
            commit_table(
                location,
                table,
                spec,
                frames[name],
                txns=txns,
                metadata=metadata,
                fsync=fsync,
                after_write=after_write,
            )
        )
    return results


def lowest_committed(tables: Mapping[str, DeltaTable], app_id: str) -> int | None:
    """The lowest committed version of ``app_id`` over ``tables``: redo every batch after it.

    ``None`` when some table has never committed for ``app_id``: redo from the first batch.
    """
    versions = [committed_version(t, app_id) for t in tables.values()]
    if any(v is None for v in versions):
        return None
    return min(v for v in versions if v is not None)


class LakeWriter(Protocol):
    """Appends batches to the lake's tables, exactly once per ``(app_id, version)``, and reads
    back the keys of the events it holds.

    Guarantees: when :meth:`commit` returns, every table named in ``frames`` (an empty frame
    too) has :meth:`committed_version` ≥ ``version`` for ``app_id`` and holds the batch's rows
    exactly once, however often the batch is redone or by whom (a table that already has the
    version skips it); tables are committed in ``TABLES`` order, the ledger last, and each
    table's rows become visible at once or not at all, also when the process dies between
    writing a table's files and committing them. A caller that needs a step between two tables
    commits them one call each. The read-backs (:meth:`recent_events`, :meth:`batch_events`)
    see every commit that returned before them. Not guaranteed, the caller's job: versions
    committed in increasing order, and a redo carrying the same rows.
    """

    def committed_version(self, table: str, app_id: str) -> int | None:
        """The latest version ``app_id`` committed to ``table``, or None."""

    def committed_versions(self, table: str, app_ids: Collection[str]) -> dict[str, int | None]:
        """:meth:`committed_version` of each of ``app_ids``, read together."""

    def commit(
        self, app_id: str, version: int, frames: Mapping[str, pl.DataFrame]
    ) -> list[TableCommit]:
        """Commit ``frames`` (by table name) as batch ``version`` of ``app_id``; see above."""

    def commit_group(
        self,
        txns: Mapping[str, int],
        frames: Mapping[str, pl.DataFrame],
        metadata: Mapping[str, str] | None = None,
    ) -> list[TableCommit]:
        """Commit ``frames`` with every app transaction of ``txns`` in each table's commit (a
        Kafka group: one per partition), ``metadata`` in its commit info. A table holding
        part of ``txns`` raises ``TxnOverlapError``."""

    def stage(self, table: str, version: int, frame: pl.DataFrame) -> Staged:
        """Write ``frame``'s files for batch ``version`` of ``table``, and commit nothing: no
        reader sees them until :meth:`commit_staged`. Safe on another thread than the commits
        (the files are named by ``version`` and a random id, and the log is not read)."""

    def commit_staged(self, app_id: str, version: int, staged: Staged) -> TableCommit:
        """Commit ``staged`` as batch ``version`` of ``app_id``, as :meth:`commit` would have
        (the table skips a version it has, and the files stay orphans)."""

    def group_metadata(self, table: str, key: str, app_id: str, version: int) -> str | None:
        """The commit-info value ``key`` of the newest commit of ``table`` that carries the
        app transaction ``(app_id, version)``, if any (read from the log's history)."""

    def recent_events(
        self, window_ms: int, added_since_ms: int | None = None
    ) -> tuple[pl.DataFrame, int | None]:
        """(event_id, event_time) of the events within ``window_ms`` of the newest one, and
        that newest time; with ``added_since_ms``, of the commits since then only."""

    def batch_events(self, batch_ids: Collection[str], span_ms: tuple[int, int]) -> pl.DataFrame:
        """(event_id, event_time) of the events of ``batch_ids`` with times in ``span_ms``."""


class DeltaLakeWriter:
    """The :class:`LakeWriter` on the Delta tables at ``location`` (opened, or created, once).

    ``after_write(table name)`` runs between writing a table's Parquet files and committing
    them: the consumer's crash point there.
    """

    def __init__(
        self,
        location: LakeLocation,
        *,
        specs: Mapping[str, TableSpec] = TABLES,
        fsync: bool = True,
        after_write: Callable[[str], None] | None = None,
    ) -> None:
        self.location = location
        self.specs = specs
        self.fsync = fsync
        self.after_write = after_write
        self._tables: dict[str, DeltaTable] = {}

    def _table(self, name: str) -> DeltaTable:
        if name not in self._tables:
            self._tables[name] = ensure_table(self.location, self.specs[name])
        return self._tables[name]

    def committed_version(self, table: str, app_id: str) -> int | None:
        return committed_version(self._table(table), app_id)

    def committed_versions(self, table: str, app_ids: Collection[str]) -> dict[str, int | None]:
        return committed_versions(self._table(table), app_ids)

    def commit(
        self, app_id: str, version: int, frames: Mapping[str, pl.DataFrame]
    ) -> list[TableCommit]:
        return self.commit_group({app_id: version}, frames)

    def commit_group(
        self,
        txns: Mapping[str, int],
        frames: Mapping[str, pl.DataFrame],
        metadata: Mapping[str, str] | None = None,
    ) -> list[TableCommit]:
        tables = {name: self._table(name) for name in frames if name in self.specs}
        return commit_tables(
            self.location,
            txns,
            frames,
            metadata=metadata,
            tables=tables,
            specs=self.specs,
            fsync=self.fsync,
            after_write=self.after_write,
        )

    def stage(self, table: str, version: int, frame: pl.DataFrame) -> Staged:
        if table not in self.specs:
            raise ValueError(f"unknown table {table!r}; known: {sorted(self.specs)}")
        spec = self.specs[table]
        files = write_files(self.location, spec, frame, version=version, fsync=self.fsync)
        return StagedFiles(table, files)

    def commit_staged(self, app_id: str, version: int, staged: Staged) -> TableCommit:
        assert isinstance(staged, StagedFiles), staged
        return commit_staged(
            self._table(staged.table),
            self.specs[staged.table],
            staged.files,
            txns={app_id: version},
            after_write=self.after_write,
        )

    def group_metadata(self, table: str, key: str, app_id: str, version: int) -> str | None:
        handle = self._table(table)
        handle.update_incremental()
        # A group is redone right after its owner died: its commit is among the last ones.
        for limit in (100, None):
            for info in handle.history(limit):
                value = info.get(key)
                if isinstance(value, str) and names_txn(value, app_id, version):
                    return value
        return None

    def recent_events(
        self, window_ms: int, added_since_ms: int | None = None
    ) -> tuple[pl.DataFrame, int | None]:
        return readback.recent_events(self.location, window_ms, added_since_ms)

    def batch_events(self, batch_ids: Collection[str], span_ms: tuple[int, int]) -> pl.DataFrame:
        return readback.batch_events(self.location, batch_ids, span_ms)
