"""Each job as one call on the settings: what the scheduler runs on a tick and the CLI runs once.

Every job reads its knobs from ``settings.jobs`` (:class:`pipeline.settings.JobSettings`) and
fsyncs its writes when ``settings.fsync`` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from jobs.alerts import check_alerts
from jobs.compact import compact as run_compact
from jobs.retention import run_retention
from jobs.rollup import run_rollup
from jobs.webhook import deliver
from pipeline.schema import Layout
from pipeline.settings import Settings

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def rollup(settings: Settings, *, rebuild: bool = False) -> str:
    return run_rollup(Layout(settings.data_dir), durable=settings.fsync, rebuild=rebuild).line()


def compact(settings: Settings, *, now: Clock = utc_now) -> str:
    layout = Layout(settings.data_dir)
    return run_compact(layout, settings.jobs, now=now(), durable=settings.fsync).line()


def alerts(settings: Settings, *, now: Clock = utc_now) -> str:
    layout = Layout(settings.data_dir)
    return check_alerts(layout, settings.jobs, now=now(), durable=settings.fsync).line()


def webhook(settings: Settings, *, now: Clock = utc_now) -> str:
    cfg = settings.jobs
    if cfg.alert_webhook_url is None:
        return "webhook not configured"
    return deliver(
        Layout(settings.data_dir),
        cfg.alert_webhook_url,
        timeout=cfg.alert_webhook_timeout,
        retries=cfg.alert_webhook_retries,
        max_age_s=cfg.alert_webhook_max_age,
        now=now(),
    ).line()


def retention(settings: Settings, *, now: Clock = utc_now) -> str:
    return run_retention(Layout(settings.data_dir), settings.jobs, now=now()).line()


@dataclass(frozen=True)
class JobSpec:
    """A scheduled job: its name, its period, and the call that runs it once."""

    name: str
    interval_s: float
    run: Callable[[], str]


def job_specs(settings: Settings, *, now: Clock = utc_now) -> list[JobSpec]:
    """Every job ``adevents scheduler`` runs (the webhook one only with ALERT_WEBHOOK_URL)."""
    cfg = settings.jobs
    specs = [
        JobSpec("rollup", cfg.rollup_interval, lambda: rollup(settings)),
        JobSpec("compact", cfg.compact_interval, lambda: compact(settings, now=now)),
        JobSpec("alerts", cfg.alert_interval, lambda: alerts(settings, now=now)),
        JobSpec("retention", cfg.retention_interval, lambda: retention(settings, now=now)),
    ]
    if cfg.alert_webhook_url:
        specs.append(
            JobSpec("webhook", cfg.alert_webhook_interval, lambda: webhook(settings, now=now))
        )
    return specs
