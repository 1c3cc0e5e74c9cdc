"""The jobs' edges on DATA_DIR: atomic writes, job locks and recent ledger rows."""

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

from pipeline.livefiles import date_dirs
from pipeline.schema import LEDGER_SCHEMA, PARQUET_COMPRESSION, Layout
from pipeline.spool import atomic_write_bytes, fsync


def tmp_name(path: Path) -> Path:
    """A hidden sibling of ``path``: readers skip names that start with a dot."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_parquet_atomic(
    frame: pl.DataFrame, path: Path, *, durable: bool, row_group_size: int | None = None
) -> None:
    """Write ``frame`` to a hidden temporary name, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    frame.write_parquet(
        tmp, compression=PARQUET_COMPRESSION, statistics=True, row_group_size=row_group_size
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


#: Held by every job that deletes files from events/ (compaction, retention), so that one never
#: deletes a partition the other is rewriting.
EVENTS_LOCK = "events-maintenance"


def ledger_files_since(layout: Layout, since: float | None) -> list[tuple[str, float, Path]]:
    """(batch_id, mtime, path) of ledger files written at or after ``since`` (epoch s; None = all).

    A ledger file is written under a temporary name and renamed, so its mtime is when the
    consumer wrote it, a moment before it appeared. Date directories are by commit date, so only
    those that can hold such files are listed.
    """
    first_date = None
    if since is not None:
        first_date = f"{datetime.fromtimestamp(since, UTC) - timedelta(days=1):%Y-%m-%d}"
    out: list[tuple[str, float, Path]] = []
    for date, directory in date_dirs(layout.ledger):
        if first_date is not None and date < first_date:
            continue
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.name
            if not name.endswith(".parquet") or name.startswith("."):
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if since is None or mtime >= since:
                out.append((name[: -len(".parquet")], mtime, Path(entry.path)))
    return out


def read_ledger(paths: list[Path], columns: list[str] | None = None) -> pl.DataFrame:
    """Ledger rows of ``paths`` (typed by LEDGER_SCHEMA), skipping files that vanished."""
    cols = columns or LEDGER_SCHEMA.names()
    schema = pl.Schema({c: LEDGER_SCHEMA[c] for c in cols})
    frames = []
    for i in range(0, len(paths), 4096):
        chunk = [p for p in paths[i : i + 4096] if p.exists()]
        if chunk:
            frames.append(
                # Ledger files written before a reason code was added lack its column: read
                # them as null rather than failing on the older files.
                pl.scan_parquet(
                    chunk,
                    hive_partitioning=False,
                    schema=LEDGER_SCHEMA,
                    missing_columns="insert",
                    extra_columns="ignore",
                )
                .select(cols)
                .collect()
                .cast(schema)
            )
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def recent_ledger(layout: Layout, now: datetime, window_s: float) -> pl.DataFrame:
    """Ledger rows of batches committed in (now - window, now]."""
    since = now.timestamp() - window_s
    # A ledger file is written a moment after its committed_at: look a little further back.
    files = ledger_files_since(layout, since - 5.0)
    frame = read_ledger([p for _, _, p in files])
    lo = datetime.fromtimestamp(since, UTC)
    return frame.filter((pl.col("committed_at") > lo) & (pl.col("committed_at") <= now))
