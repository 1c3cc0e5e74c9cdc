"""Compaction: rewrite a closed hour's many small event files into few large sorted ones.

Swapping N files for M by renames cannot be atomic for a plain glob, so compaction works in
*units* with a phase that readers consult, and a generation counter that tells a reader whether
a phase changed while it listed (the reader rule: :mod:`pipeline.livefiles`).

A unit (one partition) lives under ``staging/compact/`` — outside the consumer's own
``staging/*.committed`` namespace, which its crash recovery owns — and goes through:

1. ``<unit>.partial/``: outputs are written (sorted by campaign_id, event_time) with a
   ``manifest.json`` naming the partition, the ``outputs`` and the files it ``replaces``.
2. rename to ``<unit>.committed`` (the commit point), bump the generation; then the outputs
   are renamed into the partition. Readers ignore the unit's outputs in this phase.
3. rename to ``<unit>.swapped`` (all outputs are in place), bump; then the replaced files are
   deleted. Readers ignore the replaced files in this phase.
4. remove ``<unit>.swapped``, bump.

The partition's files change only in phases 2 and 3, each begun after its bump, so a reader
that reads the generation, lists the units, lists the partition and reads the generation again
gets one phase for the whole listing when both reads agree. A crash leaves a unit in one phase;
readers stay exact meanwhile and the next run rolls it forward (a ``.partial`` is discarded).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow.parquet as pq

from jobs.storage import EVENTS_LOCK, job_lock
from pipeline import faults
from pipeline.livefiles import (
    COMMITTED,
    GENERATION,
    MANIFEST,
    OUTPUT_PREFIX,
    PARTIAL,
    SWAPPED,
    HourPartition,
    consistent,
    hour_partitions,
    parquet_names,
    phase_of,
    read_generation,
    units_dir,
)
from pipeline.schema import ENRICHED_SCHEMA, PARQUET_COMPRESSION, SORT_KEYS, Layout
from pipeline.settings import JobSettings
from pipeline.spool import atomic_write_bytes, fsync

log = logging.getLogger("adevents.jobs.compact")

#: Crash points (``ADEVENTS_CRASH_AT=<point>[:<nth>]``, see :mod:`pipeline.faults`).
POINTS: Final = (
    "compact_after_stage",
    "compact_after_commit",
    "compact_mid_place",
    "compact_after_place",
    "compact_after_swap",
    "compact_mid_delete",
    "compact_after_delete",
)
#: Rows are sorted by these; event_id breaks ties so a rewrite is deterministic.
ORDER: Final = (*SORT_KEYS, "event_id")


class CompactionError(RuntimeError):
    """Some partitions could not be compacted (the others were; the details are in the log)."""


# -- the writer side: units and their phases --------------------------------------------------
def _bump(layout: Layout, *, durable: bool) -> None:
    directory = units_dir(layout)
    directory.mkdir(parents=True, exist_ok=True)
    value = read_generation(layout) + 1
    atomic_write_bytes(directory / GENERATION, str(value).encode(), durable=durable)


# -- the pure part: what to rewrite and how to cut it ------------------------------------------
@dataclass(frozen=True)
class FileInfo:
    """A file of a partition: name, size, and row count (known for compaction outputs)."""

    name: str
    bytes: int
    rows: int | None = None

    @property
    def compacted(self) -> bool:
        return self.name.startswith(OUTPUT_PREFIX)


def plan(files: Sequence[FileInfo], *, target_rows: int, target_bytes: int) -> list[FileInfo]:
    """The files to rewrite together: [] when the partition is already compact.

    Every file the consumer wrote (new since the last compaction, e.g. late events) is merged
    with the compaction outputs that are small (under half a target), so a run after a run
    changes nothing and a trickle of late events never rewrites a partition's big files.
    """
    fresh = [f for f in files if not f.compacted]
    small = [
        f
        for f in files
        if f.compacted
        and (f.rows is None or f.rows < target_rows // 2)
        and f.bytes < target_bytes // 2
    ]
    chosen = fresh + small
    if not fresh or len(chosen) < 2:
        return []
    return sorted(chosen, key=lambda f: f.name)


def rows_per_output(
    total_rows: int, total_bytes: int, *, target_rows: int, target_bytes: int
) -> int:
    """Rows per output file: targets split evenly, so no output is a small remainder."""
    if total_rows <= 0:
        return 1
    by_bytes = max(1, int(target_bytes * total_rows / max(1, total_bytes)))
    cap = max(1, min(target_rows, by_bytes))
    outputs = -(-total_rows // cap)
    return -(-total_rows // outputs)


def assign_bins(counts: pl.DataFrame, per_output: int) -> pl.DataFrame:
    """Cut (campaign_id, minute, len) counts, in sort order, into consecutive output bins.

    Bins are contiguous ranges of (campaign_id, minute), so outputs in bin order are sorted by
    (campaign_id, event_time) as a whole; a bin holds about ``per_output`` rows (more when one
    campaign-minute alone is bigger than that: it is never split).
    """
    ordered = counts.sort("campaign_id", "minute")
    before = ordered["len"].cum_sum() - ordered["len"]
    # Dense: a (campaign, minute) bigger than a whole output must not leave an empty bin.
    bins = ((before // per_output).rank("dense") - 1).cast(pl.Int32)
    return ordered.with_columns(_bin=bins).select("campaign_id", "minute", "_bin")


# -- the writer side ---------------------------------------------------------------------------
@dataclass
class PartitionReport:
    partition: str
    files_before: int
    files_after: int
    rows: int
    seconds: float


@dataclass
class CompactReport:
    """What one compaction run did."""

    partitions: list[PartitionReport] = field(default_factory=list)
    recovered: int = 0
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        before = sum(p.files_before for p in self.partitions)
        after = sum(p.files_after for p in self.partitions)
        rows = sum(p.rows for p in self.partitions)
        return (
            f"compacted partitions={len(self.partitions)} files_before={before} "
            f"files_after={after} rows={rows} recovered_units={self.recovered}"
        )


def _no_step(name: str) -> None:
    return None


@dataclass(frozen=True)
class Run:
    """One compaction run: the job settings (sizes, when an hour is closed), whether writes are
    fsynced, and a hook called at each crash point (tests hold a phase open with it)."""

    jobs: JobSettings
    durable: bool = True
    on_step: Callable[[str], None] = _no_step

    def step(self, name: str) -> None:
        faults.point(name)
        self.on_step(name)


def _consumer_in_flight(layout: Layout) -> set[str]:
    """Batches the consumer is publishing: their files are not ours to touch yet.

    Its crash recovery re-reads a committed batch's events files, so they must stay in place.
    """
    try:
        names = os.listdir(layout.staging)
    except FileNotFoundError:
        return set()
    return {n[: -len(COMMITTED)] for n in names if n.endswith(COMMITTED)}


def _scan(files: Sequence[Path]) -> pl.LazyFrame:
    return pl.scan_parquet(list(files), hive_partitioning=False, schema=ENRICHED_SCHEMA)


def _write_output(frame: pl.DataFrame, path: Path, run: Run) -> int:
    frame.sort(list(ORDER)).write_parquet(
        path,
        compression=PARQUET_COMPRESSION,
        statistics=True,
        row_group_size=run.jobs.compact_row_group_rows,
    )
    if run.durable:
        fsync(path)
    return len(frame)


def _stage_outputs(
    files: Sequence[Path], unit_dir: Path, unit_id: str, run: Run, total_bytes: int
) -> list[str]:
    """Write the sorted outputs of ``files`` into ``unit_dir``; return their names."""
    minute = pl.col("event_time").dt.truncate("1m").alias("minute")
    counts = _scan(files).group_by("campaign_id", minute).len().collect()
    total = int(counts["len"].sum())
    per_output = rows_per_output(
        total,
        total_bytes,
        target_rows=run.jobs.compact_target_rows,
        target_bytes=run.jobs.compact_target_bytes,
    )
    bins = assign_bins(counts, per_output)
    n_bins = int(bins["_bin"].n_unique()) if len(bins) else 1  # dense: 0 .. n_bins - 1
    names = [f"{unit_id}-{k:04d}.parquet" for k in range(n_bins)]
    written = 0
    if n_bins == 1:
        written += _write_output(_scan(files).collect(), unit_dir / names[0], run)
    else:
        # Route rows to their bins in one streaming pass, then sort one bin at a time: memory
        # stays at about one output whatever the size of the partition.
        spill = unit_dir / "spill"
        _scan(files).with_columns(minute).join(bins.lazy(), on=["campaign_id", "minute"]).drop(
            "minute"
        ).sink_parquet(pl.PartitionBy(spill, key="_bin", include_key=False), mkdir=True)
        for k, name in enumerate(names):
            parts = sorted((spill / f"_bin={k}").glob("*.parquet"))
            frame = (
                pl.read_parquet(parts, hive_partitioning=False)
                .select(ENRICHED_SCHEMA.names())
                .cast(ENRICHED_SCHEMA)
                if parts
                else pl.DataFrame(schema=ENRICHED_SCHEMA)
            )
            written += _write_output(frame, unit_dir / name, run)
        shutil.rmtree(spill)
    if written != total:
        raise RuntimeError(f"compaction wrote {written} rows of {total}; the unit is discarded")
    return names


def _rename(src: Path, dst: Path) -> None:
    if src.exists():
        os.replace(src, dst)


def _finish(layout: Layout, unit_dir: Path, run: Run) -> None:
    """Roll a committed or swapped unit forward to the end (idempotent)."""
    durable = run.durable
    manifest = json.loads((unit_dir / MANIFEST).read_text())
    partition = layout.events / manifest["partition"]
    if unit_dir.name.endswith(COMMITTED):
        partition.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(manifest["outputs"]):
            _rename(unit_dir / name, partition / name)
            if i == 0:
                run.step("compact_mid_place")
        if durable:
            fsync(partition)
        run.step("compact_after_place")
        swapped = unit_dir.with_name(unit_dir.name[: -len(COMMITTED)] + SWAPPED)
        os.replace(unit_dir, swapped)
        if durable:
            fsync(swapped.parent)
        _bump(layout, durable=durable)
        run.step("compact_after_swap")
        unit_dir = swapped
    for i, name in enumerate(manifest["replaces"]):
        (partition / name).unlink(missing_ok=True)
        if i == 0:
            run.step("compact_mid_delete")
    if durable and partition.exists():
        fsync(partition)
    run.step("compact_after_delete")
    shutil.rmtree(unit_dir)
    _bump(layout, durable=durable)


def recover(layout: Layout, run: Run) -> int:
    """Finish units a crash interrupted and discard unfinished stagings; how many were finished."""
    directory = units_dir(layout)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return 0
    finished = 0
    for name in names:
        path = directory / name
        if name.endswith(PARTIAL):
            shutil.rmtree(path, ignore_errors=True)
        elif phase_of(name) is not None:
            log.info("finishing compaction unit %s interrupted by a crash", name)
            # The crash may have come between a phase change and its bump: bump first.
            _bump(layout, durable=run.durable)
            _finish(layout, path, run)
            finished += 1
    return finished


def _file_infos(directory: Path, names: Sequence[str]) -> list[FileInfo]:
    infos = []
    for name in names:
        path = directory / name
        size = path.stat().st_size
        rows = pq.read_metadata(path).num_rows if name.startswith(OUTPUT_PREFIX) else None
        infos.append(FileInfo(name, size, rows))
    return infos


def compact_partition(
    layout: Layout, partition: HourPartition, run: Run, *, unit_id: str | None = None
) -> PartitionReport | None:
    """Rewrite one partition's small files as one unit; None when it is already compact."""
    started = time.perf_counter()

    def listing() -> tuple[list[str], set[str]]:
        names = parquet_names(partition.path)
        # Listed after the partition: a batch file seen there is either still in flight here
        # or its batch is finished.
        return names, _consumer_in_flight(layout)

    (names, in_flight), view = consistent(layout, listing)
    names = [
        n for n in view.visible(partition.key, names) if n[: -len(".parquet")] not in in_flight
    ]
    chosen = plan(
        _file_infos(partition.path, names),
        target_rows=run.jobs.compact_target_rows,
        target_bytes=run.jobs.compact_target_bytes,
    )
    if not chosen:
        return None
    unit_id = unit_id or f"{OUTPUT_PREFIX}{int(time.time() * 1000)}-{secrets.token_hex(3)}"
    partial = units_dir(layout) / f"{unit_id}{PARTIAL}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    inputs = [partition.path / f.name for f in chosen]
    try:
        outputs = _stage_outputs(inputs, partial, unit_id, run, sum(f.bytes for f in chosen))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest = {
        "unit": unit_id,
        "partition": partition.key,
        "outputs": outputs,
        "replaces": [f.name for f in chosen],
    }
    (partial / MANIFEST).write_text(json.dumps(manifest))
    if run.durable:
        fsync(partial / MANIFEST)
        fsync(partial)
    run.step("compact_after_stage")
    committed = partial.with_name(f"{unit_id}{COMMITTED}")
    os.replace(partial, committed)
    if run.durable:
        fsync(committed.parent)
    _bump(layout, durable=run.durable)
    run.step("compact_after_commit")
    _finish(layout, committed, run)
    rows = sum(pq.read_metadata(partition.path / n).num_rows for n in outputs)
    return PartitionReport(
        partition.key,
        files_before=len(names),
        files_after=len(names) - len(chosen) + len(outputs),
        rows=rows,
        seconds=time.perf_counter() - started,
    )


def closed_partitions(layout: Layout, now: datetime, min_age_s: float) -> list[HourPartition]:
    """Hour partitions whose hour ended at least ``min_age_s`` before ``now``."""
    limit_ms = now.timestamp() * 1000 - min_age_s * 1000
    return [p for p in hour_partitions(layout.events) if p.end_ms <= limit_ms]


def compact(
    layout: Layout,
    jobs: JobSettings,
    *,
    now: datetime,
    durable: bool = True,
    on_step: Callable[[str], None] = _no_step,
) -> CompactReport:
    """Finish interrupted units, then compact every closed partition that needs it.

    Sizes and the age at which an hour counts as closed are COMPACT_* of ``jobs``.
    """
    run = Run(jobs, durable, on_step)
    report = CompactReport()
    with job_lock(layout, "compact"):
        with job_lock(layout, EVENTS_LOCK, wait=True):
            report.recovered = recover(layout, run)
        for partition in closed_partitions(layout, now, jobs.compact_min_age):
            # Retention deletes whole partitions: never both on one partition at once.
            with job_lock(layout, EVENTS_LOCK, wait=True):
                if not partition.path.exists():
                    continue
                try:
                    done = compact_partition(layout, partition, run)
                except Exception:
                    # One bad partition must not keep the others from being compacted.
                    log.exception(
                        "compaction of %s failed; it is tried again next run", partition.key
                    )
                    report.failed.append(partition.key)
                    continue
            if done is not None:
                log.info(
                    "compacted %s: %d files -> %d (%d rows, %.2fs)",
                    done.partition,
                    done.files_before,
                    done.files_after,
                    done.rows,
                    done.seconds,
                )
                report.partitions.append(done)
    if report.failed:
        raise CompactionError(f"compaction failed for {', '.join(report.failed)} ({report.line()})")
    return report
