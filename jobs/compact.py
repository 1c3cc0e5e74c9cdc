"""Compaction: delta-rs ``optimize`` on every lake table, clustering of closed hours, checkpoints.

One run, table by table (events, quarantine, ledger):

1. **Compact** the small files of every partition, the open hour included, into files of about
   COMPACT_TARGET_BYTES: delta-rs's ``optimize`` for quarantine and the ledger
   (:func:`lake.maintenance.optimize`); for events, each hour's small files merged with their
   row groups copied as they are (:func:`lake.cluster.merge_small_files`), each sorted by
   campaign as the consumer wrote it. ``optimize`` re-cuts the concatenated rows into row
   groups that straddle the consumer's files and span every campaign: inside a compacted open
   hour of 10M events, a campaign's stats question read ~100 of 601 row groups (API p99 1 s,
   against 20 ms before the compaction). Either is safe while the
   consumer commits: the rewrite is one Delta commit that removes its inputs in the log only (a
   reader keeps its snapshot; the files stay on disk until ``vacuum``), and an append never
   conflicts with it. Compact partitions are left alone (a lone file is not rewritten), so a
   run after a run changes nothing and the job is cheap to repeat.
2. **Cluster** each events hour whose end is COMPACT_MIN_AGE in the past: rewrite it sorted by
   (campaign_id, event_time, event_id), once (:mod:`lake.cluster`; why not delta-rs's Z-order:
   docs/decisions/0006-clustered-hours.md). The hours done are kept in
   ``DATA_DIR/state/clustered.json``, written after each hour: a crash or a lost file only
   makes an hour clustered again (same rows, same order), never skipped. Late events of a
   clustered hour are compacted by step 1.
3. **Checkpoint** each table at its current version and delete log files past the log
   retention, so readers replay few JSON commits.

A commit that does conflict (retention deleting the partition being rewritten) fails the
optimize, never the other writer: the optimize is tried again on a fresh snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import duckdb
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from jobs.storage import job_lock, read_json, write_json_atomic
from lake import cluster, maintenance
from lake.cluster import ClusterResult
from lake.location import LakeLocation
from lake.tables import EVENTS, TABLES, TableSpec, open_table
from pipeline.schema import Layout
from pipeline.settings import JobSettings

log = logging.getLogger("adevents.jobs.compact")

#: Tries of one optimize that loses commit races (each on a fresh snapshot).
ATTEMPTS: Final = 5
#: How long an hour whose clustering did not fit in COMPACT_MEMORY_BYTES waits before the next try.
DEFER_AFTER_MEMORY_S: Final = 3600

T = TypeVar("T")


class CompactionError(RuntimeError):
    """Some tables or hours could not be compacted (the others were; the log has details)."""


# -- the pure part: which hours to cluster ------------------------------------------------------
def hour_key(date: str, hour: str) -> str:
    """The name of an hour partition: ``date=YYYY-MM-DD/hour=HH``."""
    return f"date={date}/hour={hour}"


def hours_to_cluster(
    partitions: Iterable[Mapping[str, str]], done: set[str], *, now: datetime, min_age_s: float
) -> list[tuple[str, str]]:
    """(date, hour) of the partitions whose hour ended ``min_age_s`` before ``now`` and that
    are not in ``done``, oldest first."""
    limit = now - timedelta(seconds=min_age_s)
    out = []
    for p in partitions:
        start = datetime.strptime(f"{p['date']} {p['hour']}", "%Y-%m-%d %H").replace(tzinfo=UTC)
        if start + timedelta(hours=1) <= limit and hour_key(p["date"], p["hour"]) not in done:
            out.append((p["date"], p["hour"]))
    return sorted(set(out))


# -- the job -----------------------------------------------------------------------------------
@dataclass
class TableReport:
    """One table in one run: its live files before and after, and what optimize did."""

    table: str
    files_before: int
    files_after: int
    files_removed: int = 0
    files_added: int = 0


@dataclass
class CompactReport:
    """What one compaction run did."""

    tables: list[TableReport] = field(default_factory=list)
    clustered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        before = sum(t.files_before for t in self.tables)
        after = sum(t.files_after for t in self.tables)
        return (
            f"compacted tables={len(self.tables)} files_before={before} files_after={after} "
            f"clustered_hours={len(self.clustered)}"
        )


def _no_step(name: str) -> None:
    return None


def cluster_state(layout: Layout) -> Path:
    """The file naming the events hours already clustered."""
    return layout.state / "clustered.json"


def _load_state(layout: Layout) -> tuple[set[str], dict[str, float]]:
    """The hours clustered, and those deferred (epoch seconds before which not to try again)."""
    raw = read_json(cluster_state(layout))
    if not isinstance(raw, dict):
        return set(), {}
    deferred = raw.get("deferred")
    return {str(k) for k in raw.get("hours", ())}, (
        {str(k): float(v) for k, v in deferred.items()} if isinstance(deferred, dict) else {}
    )


def _retrying(table: DeltaTable, what: str, action: Callable[[], T]) -> T:
    """``action`` on a fresh snapshot of ``table``, again while a concurrent commit conflicts."""
    for attempt in range(1, ATTEMPTS + 1):
        table.update_incremental()
        try:
            return action()
        except CommitFailedError as exc:
            if attempt == ATTEMPTS:
                raise
            log.info("%s lost a commit race (%s); trying again on a fresh snapshot", what, exc)
    raise AssertionError("unreachable")


def _metric(metrics: Mapping[str, Any], name: str) -> int:
    return sum(int(step.get(name, 0)) for step in metrics.values())


def _compact_table(
    table: DeltaTable, spec: TableSpec, jobs: JobSettings, on_step: Callable[[str], None]
) -> TableReport:
    before = len(table.file_uris())

    def compact_once() -> dict[str, Any]:
        on_step(f"compact:{spec.name}")
        return maintenance.optimize(
            table,
            target_size=jobs.compact_target_bytes,
            row_group_rows=jobs.compact_row_group_rows,
        )

    metrics = _retrying(table, f"compaction of {spec.name}", compact_once)
    table.update_incremental()
    return TableReport(
        spec.name,
        files_before=before,
        files_after=len(table.file_uris()),
        files_removed=_metric(metrics, "numFilesRemoved"),
        files_added=_metric(metrics, "numFilesAdded"),
    )


@dataclass
class _ClusterPlan:
    """The events hours clustered so far and those deferred (both as of the table's partitions,
    from ``clustered.json``), and the closed hours this run clusters."""

    done: set[str]
    deferred: dict[str, float]
    due: list[tuple[str, str]]


def _cluster_plan(
    layout: Layout, partitions: list[dict[str, str]], *, now: datetime, min_age_s: float
) -> _ClusterPlan:
    present = {hour_key(p["date"], p["hour"]) for p in partitions}
    # Hours gone by retention are forgotten, so the state stays as small as the table.
    done, deferred = _load_state(layout)
    done &= present
    deferred = {k: t for k, t in deferred.items() if k in present and t > now.timestamp()}
    due = hours_to_cluster(partitions, done | set(deferred), now=now, min_age_s=min_age_s)
    return _ClusterPlan(done, deferred, due)


def _compact_events(
    layout: Layout,
    location: LakeLocation,
    table: DeltaTable,
    jobs: JobSettings,
    report: CompactReport,
    *,
    now: datetime,
    durable: bool,
    on_step: Callable[[str], None],
) -> TableReport:
    """Merge the small files of each hour this run does not cluster, then cluster the closed
    hours due (a whole rewrite of the hour: merging them first would be work thrown away)."""
    before = len(table.file_uris())
    partitions = table.partitions()
    plan = _cluster_plan(layout, partitions, now=now, min_age_s=jobs.compact_min_age)
    hours = {(p["date"], p["hour"]) for p in partitions} - set(plan.due)
    removed, added = _merge_hours(location, table, jobs, sorted(hours, reverse=True), on_step)
    _cluster_closed_hours(
        layout, location, table, jobs, report, plan=plan, now=now, durable=durable, on_step=on_step
    )
    return TableReport(EVENTS.name, before, len(table.file_uris()), removed, added)


def _merge_hours(
    location: LakeLocation,
    table: DeltaTable,
    jobs: JobSettings,
    hours: list[tuple[str, str]],
    on_step: Callable[[str], None],
) -> tuple[int, int]:
    """Each hour's small files merged, their row groups kept as the consumer cut them
    (:func:`lake.cluster.merge_small_files`); the files removed and added."""
    removed = added = 0
    for date, hour in hours:  # newest first: the open hour, which readers ask most

        def merge_once(date: str = date, hour: str = hour) -> ClusterResult:
            return cluster.merge_small_files(
                location,
                table,
                date,
                hour,
                target_bytes=jobs.compact_target_bytes,
                row_group_rows=jobs.compact_row_group_rows,
                before_commit=lambda: on_step(f"compact:{EVENTS.name}"),
            )

        result = _retrying(table, f"compaction of events {hour_key(date, hour)}", merge_once)
        removed, added = removed + result.files_removed, added + result.files_added
    return removed, added


def _cluster_closed_hours(
    layout: Layout,
    location: LakeLocation,
    table: DeltaTable,
    jobs: JobSettings,
    report: CompactReport,
    *,
    plan: _ClusterPlan,
    now: datetime,
    durable: bool,
    on_step: Callable[[str], None],
) -> None:
    done, deferred = plan.done, plan.deferred

    def save() -> None:
        state = {"hours": sorted(done), "deferred": deferred}
        write_json_atomic(state, cluster_state(layout), durable=durable)

    spill = layout.state / "cluster-spill"
    spill.mkdir(parents=True, exist_ok=True)
    for date, hour in plan.due:
        key = hour_key(date, hour)

        def cluster_once(date: str = date, hour: str = hour, key: str = key) -> ClusterResult:
            on_step(f"cluster:{key}")
            return cluster.cluster_hour(
                location,
                table,
                date,
                hour,
                target_bytes=jobs.compact_target_bytes,
                memory_bytes=jobs.compact_memory_bytes,
                row_group_rows=jobs.compact_row_group_rows,
                temp_dir=str(spill),
            )

        try:
            _retrying(table, f"clustering of {key}", cluster_once)
        except duckdb.OutOfMemoryException:
            # The sort spills, but too small a bound still fails it, and would again every run
            # (minutes of CPU each), so the hour waits.
            deferred[key] = now.timestamp() + DEFER_AFTER_MEMORY_S
            save()
            log.error(
                "clustering of events %s needs more than COMPACT_MEMORY_BYTES=%d bytes of "
                "memory; raise it. It is tried again in %d minutes",
                key,
                jobs.compact_memory_bytes,
                DEFER_AFTER_MEMORY_S // 60,
            )
            report.failed.append(f"events/{key}")
            continue
        except Exception:
            # One bad hour must not keep the others from being clustered.
            log.exception("clustering of events %s failed; it is tried again next run", key)
            report.failed.append(f"events/{key}")
            continue
        done.add(key)
        save()
        report.clustered.append(key)
        log.info("clustered events %s by %s", key, ", ".join(cluster.CLUSTER_KEYS))


def compact(
    layout: Layout,
    location: LakeLocation,
    jobs: JobSettings,
    *,
    now: datetime,
    durable: bool = True,
    specs: Sequence[TableSpec] = tuple(TABLES.values()),
    on_step: Callable[[str], None] = _no_step,
) -> CompactReport:
    """Compact every table of ``location``, cluster closed events hours, write checkpoints.

    Sizes and the age at which an hour counts as closed are COMPACT_* of ``jobs``; the job's
    lock and its clustering state are under ``layout`` (DATA_DIR). ``on_step`` is called with
    ``compact:<table>`` before each optimize attempt (for events: before each merge's commit,
    its snapshot read and its files written) and with ``cluster:<hour>`` before each clustering
    attempt (tests commit there).
    """
    report = CompactReport()
    with job_lock(layout, "compact"):
        for spec in specs:
            try:
                table = open_table(location, spec)
            except TableNotFoundError:
                continue  # nothing committed to it yet
            try:
                if spec.name == EVENTS.name:
                    done = _compact_events(
                        layout,
                        location,
                        table,
                        jobs,
                        report,
                        now=now,
                        durable=durable,
                        on_step=on_step,
                    )
                else:
                    done = _compact_table(table, spec, jobs, on_step)
                maintenance.checkpoint(table)
                maintenance.cleanup_logs(table)
            except Exception:
                # One bad table must not keep the others from being compacted.
                log.exception("compaction of %s failed; it is tried again next run", spec.name)
                report.failed.append(spec.name)
                continue
            report.tables.append(done)
            if done.files_removed:
                log.info(
                    "compacted %s: %d files -> %d",
                    spec.name,
                    done.files_removed,
                    done.files_added,
                )
    if report.failed:
        raise CompactionError(f"compaction failed for {', '.join(report.failed)} ({report.line()})")
    return report
