"""Each job as one call on the settings: what the scheduler runs on a tick and the CLI runs once.

Every job reads its knobs from ``settings.jobs`` (:class:`pipeline.settings.JobSettings`),
fsyncs its local writes when ``settings.fsync`` says so, and reaches the lake through the one
:class:`~lake.location.LakeLocation` its entry point built from the settings.
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
from lake.location import LakeLocation
from pipeline.schema import Layout
from pipeline.settings import Settings

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def rollup(settings: Settings, location: LakeLocation, *, rebuild: bool = False) -> str:
    layout = Layout(settings.data_dir)
    return run_rollup(layout, location, durable=settings.fsync, rebuild=rebuild).line()


def compact(settings: Settings, location: LakeLocation, *, now: Clock = utc_now) -> str:
    layout = Layout(settings.data_dir)
    return run_compact(layout, location, settings.jobs, now=now(), durable=settings.fsync).line()


def alerts(settings: Settings, location: LakeLocation, *, now: Clock = utc_now) -> str:
    layout = Layout(settings.data_dir)
    return check_alerts(layout, location, settings.jobs, now=now(), durable=settings.fsync).line()


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


def retention(settings: Settings, location: LakeLocation, *, now: Clock = utc_now) -> str:
    layout = Layout(settings.data_dir)
    return run_retention(layout, location, settings.jobs, now=now()).line()


@dataclass(frozen=True)
class JobSpec:
    """A scheduled job: its name, its period, and the call that runs it once."""

    name: str
    interval_s: float
    run: Callable[[], str]


def job_specs(settings: Settings, location: LakeLocation, *, now: Clock = utc_now) -> list[JobSpec]:
    """Every job ``adevents scheduler`` runs (the webhook one only with ALERT_WEBHOOK_URL)."""
    cfg = settings.jobs
    specs = [
        JobSpec("rollup", cfg.rollup_interval, lambda: rollup(settings, location)),
        JobSpec("compact", cfg.compact_interval, lambda: compact(settings, location, now=now)),
        JobSpec("alerts", cfg.alert_interval, lambda: alerts(settings, location, now=now)),
        JobSpec(
            "retention", cfg.retention_interval, lambda: retention(settings, location, now=now)
        ),
    ]
    if cfg.alert_webhook_url:
        specs.append(
            JobSpec("webhook", cfg.alert_webhook_interval, lambda: webhook(settings, now=now))
        )
    return specs
