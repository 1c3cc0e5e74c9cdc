"""Readers see a snapshot: each table at one Delta version, as a pyarrow dataset in DuckDB.

A snapshot lists exactly the files of one committed table version, so a reader never sees an
uncommitted or half-written file, a file removed by a concurrent optimize stays readable until
``vacuum`` deletes it (after its retention), and rows added later are not seen. The dataset
prunes by partition values and by the file statistics in the log; DuckDB pushes filters into
it. No DuckDB extension is used (they download at run time), so it works offline, on local
disk and on S3 alike (the files are read through pyarrow's own filesystems).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import duckdb
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from lake.location import LakeLocation
from lake.tables import TABLES, TableSpec


@dataclass(frozen=True)
class Snapshot:
    """Each table's dataset at one version (``-1``: the table does not exist yet: no rows)."""

    datasets: dict[str, pads.Dataset] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)


def table_dataset(
    location: LakeLocation, spec: TableSpec, table: DeltaTable, prune: str | None = None
) -> pads.Dataset:
    """``table``'s current version as a dataset read through the location's native filesystem.

    ``prune`` is a SQL predicate (``"campaign_id = 'c1'"``) evaluated on each file's partition
    values and log statistics: files it excludes are left out of the dataset. Row-group and
    partition pruning inside the dataset happen anyway, from the filters DuckDB pushes down.
    """
    root = location.table_filesystem(spec.name)
    return table.to_pyarrow_dataset(filesystem=root, file_pruning_predicate=prune)


def snapshot(
    location: LakeLocation,
    specs: Mapping[str, TableSpec] = TABLES,
    *,
    versions: Mapping[str, int] | None = None,
    prune: Mapping[str, str] | None = None,
) -> Snapshot:
    """Open each table at its latest version (or at ``versions[name]``, for time travel),
    keeping only the files that may match ``prune[name]`` (see ``table_dataset``)."""
    snap = Snapshot()
    options = location.storage_options()
    for name, spec in specs.items():
        version = (versions or {}).get(name)
        try:
            table = DeltaTable(location.table_uri(name), version=version, storage_options=options)
        except TableNotFoundError:
            snap.datasets[name] = pads.dataset(spec.schema.empty_table())
            snap.versions[name] = -1
            continue
        snap.datasets[name] = table_dataset(location, spec, table, (prune or {}).get(name))
        snap.versions[name] = table.version()
    return snap


def register(con: duckdb.DuckDBPyConnection, snap: Snapshot) -> None:
    """Make each table of ``snap`` a view named after it in ``con`` (replacing older ones)."""
    for name, dataset in snap.datasets.items():
        con.register(name, dataset)


def connect(
    location: LakeLocation, specs: Mapping[str, TableSpec] = TABLES
) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection with a snapshot of every table registered."""
    con = duckdb.connect()
    register(con, snapshot(location, specs))
    return con
