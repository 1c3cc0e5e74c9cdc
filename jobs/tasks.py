"""Each job as one call from settings: what the scheduler runs on a tick and the CLI runs once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from jobs.alerts import Thresholds, check_alerts
from jobs.compact import CompactConfig
from jobs.compact import compact as run_compact
from jobs.retention import RetentionConfig, run_retention
from jobs.rollup import run_rollup
from jobs.webhook import deliver
from pipeline.schema import Layout
from pipeline.settings import JobSettings, Settings

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def rollup(settings: Settings, cfg: JobSettings, *, rebuild: bool = False) -> str:
    return run_rollup(Layout(settings.data_dir), durable=settings.fsync, rebuild=rebuild).line()


def compact_config(settings: Settings, cfg: JobSettings) -> CompactConfig:
    return CompactConfig(
        target_rows=cfg.compact_target_rows,
        target_bytes=cfg.compact_target_bytes,
        row_group_rows=cfg.compact_row_group_rows,
        min_age_s=cfg.compact_min_age,
        durable=settings.fsync,
    )


def compact(settings: Settings, cfg: JobSettings, *, now: Clock = utc_now) -> str:
    config = compact_config(settings, cfg)
    return run_compact(Layout(settings.data_dir), config, now=now()).line()


def alerts(settings: Settings, cfg: JobSettings, *, now: Clock = utc_now) -> str:
    report = check_alerts(
        Layout(settings.data_dir),
        Thresholds.from_settings(cfg),
        now=now(),
        history_days=cfg.alert_history_days,
        webhook=cfg.alert_webhook_url is not None,
        durable=settings.fsync,
    )
    return report.line()


def webhook(settings: Settings, cfg: JobSettings, *, now: Clock = utc_now) -> str:
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


def retention_config(settings: Settings, cfg: JobSettings) -> RetentionConfig:
    return RetentionConfig(
        events_days=cfg.retention_days,
        minute_days=cfg.rollup_minute_retention_days,
        hour_days=cfg.rollup_hour_retention_days,
        day_days=cfg.rollup_day_retention_days,
        durable=settings.fsync,
    )


def retention(settings: Settings, cfg: JobSettings, *, now: Clock = utc_now) -> str:
    config = retention_config(settings, cfg)
    return run_retention(Layout(settings.data_dir), config, now=now()).line()


@dataclass(frozen=True)
class JobSpec:
    """A scheduled job: its name, its period, and the call that runs it once."""

    name: str
    interval_s: float
    run: Callable[[], str]


def job_specs(settings: Settings, cfg: JobSettings, *, now: Clock = utc_now) -> list[JobSpec]:
    """Every job ``adevents scheduler`` runs (the webhook one only with ALERT_WEBHOOK_URL)."""
    specs = [
        JobSpec("rollup", cfg.rollup_interval, lambda: rollup(settings, cfg)),
        JobSpec("compact", cfg.compact_interval, lambda: compact(settings, cfg, now=now)),
        JobSpec("alerts", cfg.alert_interval, lambda: alerts(settings, cfg, now=now)),
        JobSpec("retention", cfg.retention_interval, lambda: retention(settings, cfg, now=now)),
    ]
    if cfg.alert_webhook_url:
        specs.append(
            JobSpec("webhook", cfg.alert_webhook_interval, lambda: webhook(settings, cfg, now=now))
        )
    return specs
