"""``adevents scheduler``: the jobs on APScheduler, each on its own period, never overlapping.

Every job runs at start and then every period, in a thread pool with one thread per job (a
slow or hanging job never delays another). ``max_instances=1`` and ``coalesce=True``: a tick
that comes while the previous run is still going is skipped, and runs missed while the process
was busy collapse into one. A job that raises is logged and runs again at its next tick; a job
another process is running (e.g. a cron ``--once``) is skipped (a file lock per job).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from jobs.storage import JobBusyError
from jobs.tasks import JobSpec

log = logging.getLogger("adevents.jobs.scheduler")


def guarded(spec: JobSpec) -> Callable[[], None]:
    """``spec.run`` with its outcome logged; an exception never reaches the scheduler."""

    def run() -> None:
        started = time.perf_counter()
        try:
            line = spec.run()
        except JobBusyError as exc:
            log.info("%s skipped: %s", spec.name, exc)
            return
        except Exception:
            log.exception("%s failed; it runs again at its next tick", spec.name)
            return
        log.info("%s: %s (%.2fs)", spec.name, line, time.perf_counter() - started)

    return run


def build_scheduler(specs: Sequence[JobSpec], *, run_at_start: bool = True) -> BackgroundScheduler:
    """A scheduler (not started) with one interval job per spec."""
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=max(1, len(specs)))},
        timezone=UTC,
    )
    first = datetime.now(UTC) if run_at_start else None
    for spec in specs:
        kwargs = {"next_run_time": first} if first is not None else {}
        scheduler.add_job(
            guarded(spec),
            IntervalTrigger(seconds=spec.interval_s, timezone=UTC),
            id=spec.name,
            name=spec.name,
            max_instances=1,
            coalesce=True,
            # A run that starts late (its thread was busy) still runs, once.
            misfire_grace_time=max(1, int(spec.interval_s)),
            **kwargs,
        )
    return scheduler


def serve(specs: Sequence[JobSpec], stop: threading.Event) -> int:
    """Run ``specs`` until ``stop`` is set, then wait for running jobs to finish."""
    # Our own line per run says what each job did; APScheduler's per-run INFO lines add nothing.
    aps = logging.getLogger("apscheduler")
    aps.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    scheduler = build_scheduler(specs)
    scheduler.start()
    log.info(
        "scheduler started: %s",
        ", ".join(f"{s.name} every {s.interval_s:g}s" for s in specs),
    )
    try:
        stop.wait()
    finally:
        log.info("scheduler stopping: waiting for running jobs")
        scheduler.shutdown(wait=True)
    return 0
