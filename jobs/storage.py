"""The jobs' edges: atomic writes and job locks on DATA_DIR, recent ledger rows from the lake."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from lake.location import LakeLocation
from lake.snapshot import snapshot
from lake.tables import LEDGER, TIMESTAMP
from pipeline.schema import LEDGER_SCHEMA, PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL, Layout
from pipeline.spool import atomic_write_bytes, fsync


def tmp_name(path: Path) -> Path:
    """A hidden sibling of ``path``: readers skip names that start with a dot."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_parquet_atomic(
    frame: pl.DataFrame,
    path: Path,
    *,
    durable: bool,
    row_group_size: int | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``frame`` (with ``metadata`` in its footer) to a hidden temporary name, then
    rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    frame.write_parquet(
        tmp,
        compression=PARQUET_COMPRESSION,
        compression_level=PARQUET_COMPRESSION_LEVEL,
        statistics=True,
        row_group_size=row_group_size,
        metadata=metadata,
    )
    if durable:
        fsync(tmp)
    os.replace(tmp, path)
    if durable:
        fsync(path.parent)


def write_json_atomic(value: Any, path: Path, *, durable: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=True).encode(), durable=durable)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class JobBusyError(RuntimeError):
    """Another process (or thread) is running the same job on this DATA_DIR."""


@contextmanager
def job_lock(layout: Layout, name: str, *, wait: bool = False) -> Iterator[None]:
    """Hold ``state/jobs/<name>.lock`` (an flock, freed by the kernel if the holder dies).

    Without ``wait``, raise :class:`JobBusyError` when someone else holds it.
    """
    directory = layout.state / "jobs"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise JobBusyError(f"{name} is already running on {layout.root}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def recent_ledger(location: LakeLocation, now: datetime, window_s: float) -> pl.DataFrame:
    """Ledger rows (LEDGER_SCHEMA) of batches committed in (now - window, now], read from a
    snapshot of the ledger table pruned to the hours of the window (none: no rows)."""
    lo = (now - timedelta(seconds=window_s)).astimezone(UTC)
    hours = pl.datetime_range(
        lo.replace(minute=0, second=0, microsecond=0), now, "1h", time_zone="UTC", eager=True
    )
    prune = " OR ".join(f"(date = '{h:%Y-%m-%d}' AND hour = '{h:%H}')" for h in hours.to_list())
    snap = snapshot(location, {LEDGER.name: LEDGER}, prune={LEDGER.name: prune})
    committed = pc.field("committed_at")
    rows = snap.datasets[LEDGER.name].to_table(
        columns=LEDGER_SCHEMA.names(),
        filter=(committed > pa.scalar(lo, TIMESTAMP)) & (committed <= pa.scalar(now, TIMESTAMP)),
    )
    return arrow_frame(rows, LEDGER_SCHEMA)


def arrow_frame(table: pa.Table, schema: pl.Schema) -> pl.DataFrame:
    """``table`` (read from the lake: microsecond timestamps) as a frame typed by ``schema``."""
    return pl.DataFrame(table).select(schema.names()).cast(dict(schema))  # type: ignore[arg-type]
