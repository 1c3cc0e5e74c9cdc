"""Clustering an events hour: rewrite its files sorted by (campaign_id, event_time, event_id).

A campaign's questions ("its newest events", "its totals until t") then read the few row
groups whose campaign_id bounds hold it, newest last, instead of every row group of the hour.
Why not delta-rs's Z-order on the same columns: docs/decisions/0006-clustered-hours.md (its
interleaved key is led by time for these values, so every row group spans every campaign).

The rewrite is a Delta maintenance commit, as ``optimize`` makes one:

- the hour's files as of one snapshot are read and sorted by DuckDB, whose external sort
  spills to local temporary files past ``memory_bytes`` (an hour at 50k events/s is 180M rows:
  it never has to fit in memory);
- the sorted rows are written as new Parquet files (zstd, ``row_group_rows`` per group),
  streamed one row group at a time;
- one commit removes exactly the files read and adds the new ones, both with
  ``dataChange = false``: readers keep their snapshot, the change feed (``lake/changes.py``)
  sees no new rows, and a concurrent append (a late event of the hour) is kept, unsorted, as
  its own file. A concurrent commit that removed one of the files read (retention, another
  rewrite) makes this commit fail: nothing is removed twice and no deleted row comes back.

A crash before the commit leaves only orphan files, which ``vacuum`` deletes; after it, the
hour is merely clustered again by the next run (same rows, same order).

An hour not clustered yet (the open one) is compacted by the same commit, its small files
merged with their row groups copied as they are (:func:`merge_small_files`): each stays sorted
by campaign, as the consumer wrote it, so a campaign's questions still prune inside them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction

from lake.location import LakeLocation
from lake.tables import EVENTS, TableSpec
from lake.writer import file_stats
from pipeline.schema import PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL

#: The order a clustered hour's rows are written in: event_id breaks ties, so that a row group
#: is in exactly the order a campaign's newest events are read in (``queries.ordered``), which
#: then need no sort of their own.
CLUSTER_KEYS: Final = ("campaign_id", "event_time", "event_id")
#: Rows DuckDB hands over per fetch (then cut into row groups).
_FETCH_ROWS: Final = 65_536


@dataclass(frozen=True)
class ClusterResult:
    """What one clustering commit did (nothing when the hour had no files)."""

    files_removed: int
    files_added: int
    rows: int


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_copies(
    location: LakeLocation, table: str, paths: Sequence[str], spill: str
) -> list[str]:
    """Local paths of the table's files ``paths``: as they are on a local lake, else fetched."""
    if not location.is_s3:
        return [location.path(table, p) for p in paths]
    fs = location.filesystem()
    local = []
    for n, relative in enumerate(paths):
        target = os.path.join(spill, f"in-{n:06d}.parquet")
        pafs.copy_files(location.path(table, relative), target, source_filesystem=fs)
        local.append(target)
    return local


def _hour_files(table: DeltaTable, date: str, hour: str) -> list[tuple[str, int]]:
    """(relative path, size) of the hour's files in ``table``'s current snapshot."""
    actions = table.get_add_actions(flatten=True)
    paths = actions.column("path").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    dates = actions.column("partition.date").to_pylist()
    hours = actions.column("partition.hour").to_pylist()
    return [
        (p, int(s))
        for p, s, d, h in zip(paths, sizes, dates, hours, strict=True)
        if d == date and h == hour
    ]


class _Files:
    """Sorted record batches cut into row groups and files; the add action of each file."""

    def __init__(
        self,
        location: LakeLocation,
        table_name: str,
        partition: dict[str, str],
        schema: pa.Schema,
        *,
        file_rows: int,
        row_group_rows: int,
        operation: str = "cluster",
    ) -> None:
        self.operation = operation
        self.location, self.table_name, self.partition = location, table_name, partition
        self.schema, self.file_rows, self.row_group_rows = schema, file_rows, row_group_rows
        self.fs = location.filesystem()
        self.actions: list[AddAction] = []
        self.rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.paths: list[str] = []  # every file opened, finished or not
        self._writer: pq.ParquetWriter | None = None
        self._relative = ""
        self._file_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._finish_file()

    def add_group(self, group: pa.Table) -> None:
        """Write ``group`` as a row group of its own, as it is, unless it has fewer than half
        ``row_group_rows``: those are gathered, then cut as :meth:`add` cuts (a trickle of
        events makes files of a few rows, each a group that spans most campaigns anyway, and
        thousands of tiny groups would make every footer slow to read)."""
        if group.num_rows < self.row_group_rows // 2:
            for batch in group.cast(self.schema).to_batches():
                self.add(batch)
            return
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._write(group)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as one row group."""
        table = pa.Table.from_batches(self._pending, self._pending[0].schema)
        group, rest = table.slice(0, rows), table.slice(rows)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows
        self._write(group)

    def _write(self, group: pa.Table) -> None:
        rows = group.num_rows
        if self._writer is None:
            name = f"part-{self.operation}-{uuid.uuid4().hex}.parquet"
            self._relative = "/".join([*(f"{k}={v}" for k, v in self.partition.items()), name])
            self.paths.append(self._relative)
            # Given a path (not a stream), the writer closes what it opened: on S3 that close
            # is what completes the upload.
            self._writer = pq.ParquetWriter(
                self.location.path(self.table_name, self._relative),
                self.schema,
                filesystem=self.fs,
                compression=PARQUET_COMPRESSION,
                compression_level=PARQUET_COMPRESSION_LEVEL,
                write_statistics=True,
            )
        self._writer.write_table(group.cast(self.schema), row_group_size=rows)
        self._file_rows += rows
        if self._file_rows >= self.file_rows:
            self._finish_file()

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        path = self.location.path(self.table_name, self._relative)
        if not self.location.is_s3:
            _fsync(path)  # durable before a commit names it, as the consumer's files are
        metadata = pq.read_metadata(path, filesystem=self.fs)
        size = self.fs.get_file_info(path).size
        assert size is not None
        now_ms = int(time.time() * 1000)
        action = AddAction(
            self._relative, size, dict(self.partition), now_ms, False, file_stats(metadata)
        )
        self.actions.append(action)
        self.rows += self._file_rows
        self._writer, self._file_rows = None, 0

    def discard(self) -> None:
        """Delete what was written when it will never be committed (vacuum would, later)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for relative in self.paths:
            with contextlib.suppress(OSError):  # vacuum takes what is left
                self.fs.delete_file(self.location.path(self.table_name, relative))


def cluster_hour(
    location: LakeLocation,
    table: DeltaTable,
    date: str,
    hour: str,
    *,
    target_bytes: int,
    memory_bytes: int,
    row_group_rows: int,
    keys: Sequence[str] = CLUSTER_KEYS,
    spec: TableSpec = EVENTS,
    temp_dir: str | None = None,
) -> ClusterResult:
    """Rewrite hour ``date``/``hour`` of table ``spec`` sorted by ``keys``; one maintenance
    commit. The sort spills under ``temp_dir`` (local disk; the system's default if None).

    Raises ``CommitFailedError`` when a concurrent commit removed a file read (the files
    written are deleted first; a retry starts from a fresh snapshot). After any other commit
    error the files written are left to ``vacuum``: the commit may have landed.
    """
    table.update_incremental()
    inputs = _hour_files(table, date, hour)
    if not inputs:
        return ClusterResult(0, 0, 0)
    root = spec.name
    partition = {"date": date, "hour": hour}
    with tempfile.TemporaryDirectory(prefix="adevents-cluster-", dir=temp_dir) as spill:
        # DuckDB reads local Parquet within its memory limit; read through a pyarrow dataset
        # it held 8 GB for a 50M-row hour under a 1 GB limit (measured). S3 files are fetched
        # to the local spill directory first (DuckDB's S3 reader is a download-at-run-time
        # extension, which offline machines cannot load).
        local = _local_copies(location, root, [p for p, _ in inputs], spill)
        schema = pq.read_schema(local[0])
        rows_in = sum(pq.read_metadata(f).num_rows for f in local)
        bytes_in = sum(s for _, s in inputs)
        file_rows = max(row_group_rows, int(rows_in * target_bytes / max(bytes_in, 1)))
        out = _Files(
            location, root, partition, schema, file_rows=file_rows, row_group_rows=row_group_rows
        )
        con = duckdb.connect(
            config={
                "memory_limit": f"{max(memory_bytes >> 20, 1)}MB",
                "temp_directory": os.path.join(spill, "duckdb"),
                "preserve_insertion_order": True,
            }
        )
        try:
            con.execute("SET enable_progress_bar = false")  # it would print to the job's stdout
            order = ", ".join(f'"{k}"' for k in keys)
            columns = ", ".join(f'"{n}"' for n in schema.names)
            # A relation streams its result: fetching does not materialise the sorted hour.
            relation = con.sql(
                f"SELECT {columns} FROM read_parquet($files, hive_partitioning = false) "
                f"ORDER BY {order}",
                params={"files": local},
            )
            for batch in relation.to_arrow_reader(_FETCH_ROWS):
                out.add(batch)
            out.close()
        except BaseException:
            out.discard()
            raise
        finally:
            con.close()
    return _commit_rewrite(table, partition, inputs, out, rows_in=rows_in, operation="cluster")


def merge_small_files(
    location: LakeLocation,
    table: DeltaTable,
    date: str,
    hour: str,
    *,
    target_bytes: int,
    row_group_rows: int,
    spec: TableSpec = EVENTS,
    before_commit: Callable[[], None] | None = None,
) -> ClusterResult:
    """Merge the files of hour ``date``/``hour`` smaller than ``target_bytes``, when there are
    two or more, into files of about that size whose row groups are the inputs' own, copied one
    at a time (those under half ``row_group_rows`` gathered into groups of that size): the
    compaction of an hour not clustered yet (the open one). Each consumer file is
    sorted by campaign, so each of its row groups holds a few campaigns; delta-rs's ``optimize``
    re-cut the concatenated rows into groups that straddle two files and span every campaign,
    and a campaign's stats question inside a compacted open hour of 10M events read ~100 of its
    601 row groups (API p99 1 s). Same commit, guarantees and errors as :func:`cluster_hour`;
    ``before_commit`` runs once the files are written, right before the commit."""
    table.update_incremental()
    small = sorted((p, s) for p, s in _hour_files(table, date, hour) if s < target_bytes)
    if len(small) < 2:
        return ClusterResult(0, 0, 0)
    fs = location.filesystem()
    paths = [location.path(spec.name, p) for p, _ in small]
    footers = [pq.read_metadata(path, filesystem=fs) for path in paths]
    rows_in = sum(f.num_rows for f in footers)
    file_rows = max(1, int(rows_in * target_bytes / max(sum(s for _, s in small), 1)))
    partition = {"date": date, "hour": hour}
    schema = footers[0].schema.to_arrow_schema()
    out = _Files(
        location,
        spec.name,
        partition,
        schema,
        file_rows=file_rows,
        row_group_rows=row_group_rows,
        operation="merge",
    )
    try:
        for path, footer in zip(paths, footers, strict=True):
            source = pq.ParquetFile(path, metadata=footer, filesystem=fs)
            for index in range(footer.num_row_groups):
                out.add_group(source.read_row_group(index))
        out.close()
    except BaseException:
        out.discard()
        raise
    if before_commit is not None:
        before_commit()
    return _commit_rewrite(table, partition, small, out, rows_in=rows_in, operation="merge")


def _commit_rewrite(
    table: DeltaTable,
    partition: dict[str, str],
    inputs: Sequence[tuple[str, int]],
    out: _Files,
    *,
    rows_in: int,
    operation: str,
) -> ClusterResult:
    """One commit that removes exactly ``inputs`` and adds ``out``'s files, all with
    ``dataChange = false``; ``out``'s files are deleted when it cannot land."""
    if out.rows != rows_in:
        out.discard()
        where = "/".join(partition.values())
        raise RuntimeError(f"{operation} of {where} wrote {out.rows} rows of {rows_in}")
    now_ms = int(time.time() * 1000)
    removes = [RemoveAction(p, False, now_ms, s, dict(partition)) for p, s in inputs]
    try:
        table.create_write_transaction(
            [*removes, *out.actions],
            "append",
            table.schema(),
            partition_by=list(partition),
            commit_properties=CommitProperties(custom_metadata={"adevents.operation": operation}),
        )
    except CommitFailedError:
        out.discard()  # a conflict: nothing of this attempt is in the log
        raise
    table.update_incremental()
    return ClusterResult(len(inputs), len(out.actions), rows_in)
