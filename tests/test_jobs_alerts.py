"""Alerts: every rule firing and resolving, the lifecycle, the store, and the webhook."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from jobs.alerts import (
    Observation,
    advance,
    budget_rules,
    check_alerts,
    lag_rule,
    latency_per_10k,
    ops_rules,
)
from jobs.outbox import enqueue, pending
from jobs.rollup import run_rollup
from jobs.scheduler import build_scheduler
from jobs.tasks import JobSpec
from jobs.testing import commit_batches, wait_for, webhook_server, write_ledger
from jobs.webhook import DeliveryReport, deliver
from lake.location import LakeLocation
from pipeline.schema import CAMPAIGN_SCHEMA, LEDGER_SCHEMA, Layout
from pipeline.settings import JobSettings, Settings
from pipeline.spool import SpoolWriter
from pipeline.tables import Alert, list_alerts, load_alerts
from pipeline.testing import event_table

T = JobSettings()  # the documented defaults: 100k/50k ev/s, 50/100 ms, 1 %/5 %, 30s/5m lag


def ledger(rows_in: int, quarantined: int = 0, ms: list[float] | None = None) -> pl.DataFrame:
    ms = ms or [10.0]
    n = len(ms)
    return pl.DataFrame(
        {
            "rows_in": [rows_in // n] * n,
            "quarantined": [quarantined // n] * n,
            "processing_ms": ms,
        },
        schema={k: LEDGER_SCHEMA[k] for k in ("rows_in", "quarantined", "processing_ms")},
    )


def grades(observations: list[Observation]) -> dict[str, str]:
    return {o.rule: o.severity for o in observations}


# -- rules (pure) ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("per_second", "expected"), [(120_000, None), (80_000, "warning"), (40_000, "critical")]
)
def test_throughput_is_judged_only_with_a_backlog(per_second: int, expected: str | None) -> None:
    frame = ledger(per_second * 60)
    busy = grades(ops_rules(frame, backlog_age_s=61, t=T)).get("throughput")
    idle = grades(ops_rules(frame, backlog_age_s=5, t=T)).get("throughput")
    assert (busy, idle) == (expected, None)
    stuck = ops_rules(ledger(0).clear(), backlog_age_s=600, t=T)
    assert [(o.rule, o.severity, o.value) for o in stuck] == [("throughput", "critical", 0.0)]


@pytest.mark.parametrize(
    ("ms", "expected"), [([10.0] * 20, None), ([60.0] * 20, "warning"), ([150.0] * 20, "critical")]
)
def test_latency_p95(ms: list[float], expected: str | None) -> None:
    frame = ledger(10_000 * len(ms), ms=ms)  # groups of 10k events: per 10k, the raw time
    assert grades(ops_rules(frame, backlog_age_s=0, t=T)).get("latency_p95") == expected


def test_latency_p95_is_the_95th_percentile_not_the_mean() -> None:
    ms = [5.0] * 90 + [500.0] * 10  # the mean is 54.5 ms, the p95 500 ms
    (obs,) = ops_rules(ledger(100 * 10_000, ms=ms), backlog_age_s=0, t=T)
    assert (obs.severity, obs.value, obs.threshold) == ("critical", 500.0, 100.0)


def test_latency_is_per_10k_events_and_small_groups_are_not_judged() -> None:
    def latency(rows: int, ms: float) -> str | None:
        frame = ledger(20 * rows, ms=[ms] * 20)
        return grades(ops_rules(frame, backlog_age_s=0, t=T)).get("latency_p95")

    assert latency(50_000, 150.0) is None  # 30 ms per 10k events: a healthy pipeline
    assert latency(50_000, 750.0) == "critical"  # 150 ms per 10k
    # A demo at 5k events/s: 5k-event groups take 350 ms, mostly three table commits.
    assert latency(5_000, 350.0) is None


def test_a_groups_files_count_together() -> None:
    """Files of one commit group (same consumer and commit time) share its processing time:
    the group's rows, not each file's, are what the time is divided by."""
    files = pl.DataFrame(
        {
            "consumer": ["c1"] * 4,
            "committed_at": [1, 1, 2, 2],
            "rows_in": [30_000, 30_000, 4_000, 4_000],
            "processing_ms": [120.0, 120.0, 900.0, 900.0],
        }
    )
    assert latency_per_10k(files).to_list() == [20.0]  # 120 ms for 60k; the 10k group is out


@pytest.mark.parametrize(
    ("quarantined", "expected"), [(50, None), (200, "warning"), (600, "critical")]
)
def test_error_rate(quarantined: int, expected: str | None) -> None:
    obs = ops_rules(ledger(10_000, quarantined), backlog_age_s=0, t=T)
    assert grades(obs).get("error_rate") == expected


def test_consumer_lag() -> None:
    assert lag_rule(10, T) == []
    assert [o.severity for o in lag_rule(60, T)] == ["warning"]
    assert [(o.severity, o.threshold) for o in lag_rule(400, T)] == [("critical", 300.0)]


def test_budget_pacing_and_overspend() -> None:
    spend = pl.DataFrame(
        {
            "campaign_id": ["slow", "fast", "over", "nobudget", "zero"],
            "spend_micros": [70, 85, 120, 10**9, 5],
        }
    )
    budgets = pl.DataFrame(
        {
            "campaign_id": ["slow", "fast", "over", "nobudget", "zero"],
            "daily_budget_micros": [100, 100, 100, None, 0],
        },
        schema={"campaign_id": pl.String, "daily_budget_micros": pl.Int64},
    )
    morning = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)  # 42 % of the day
    evening = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)  # 83 %: spending 85 % is on pace
    early = {o.subject: o.severity for o in budget_rules(spend, budgets, now=morning, t=T)}
    late = {o.subject: o.severity for o in budget_rules(spend, budgets, now=evening, t=T)}
    assert early == {"fast": "warning", "over": "critical"}
    assert late == {"over": "critical"}


# -- lifecycle (pure) --------------------------------------------------------------------------
def obs(severity: str, value: float = 1.0, subject: str = "pipeline") -> Observation:
    return Observation("latency_p95", subject, severity, value, 50.0, f"{severity} {value}")


def test_an_alert_fires_once_changes_severity_in_place_and_resolves() -> None:
    t0 = datetime(2026, 11, 27, 9, tzinfo=UTC)
    ticks: list[list[Observation]] = [
        [obs("warning", 60)],
        [obs("warning", 70)],
        [obs("critical", 150), obs("warning", 60)],  # the worst of one rule/subject wins
        [obs("warning", 55)],
        [],
        [],
        [obs("warning", 80)],
    ]
    alerts: list[Alert] = []
    events = []
    for i, observations in enumerate(ticks):
        alerts, notes = advance(alerts, observations, now=t0 + timedelta(seconds=15 * i))
        events += [n.event for n in notes]
        assert sum(a.open for a in alerts) <= 1
    assert events == ["fired", "escalated", "deescalated", "resolved", "fired"]
    first, second = sorted(alerts, key=lambda a: a.started_at)
    assert (first.status, first.started_at, first.ended_at) == (
        "resolved",
        t0,
        t0 + timedelta(seconds=60),
    )
    assert (first.severity, first.value) == ("warning", 55)
    assert second.open and second.alert_id != first.alert_id
    later, _ = advance(alerts, [obs("warning")], now=t0 + timedelta(days=31))
    assert [a.alert_id for a in later] == [second.alert_id]  # old history forgotten


def test_one_open_alert_per_rule_and_subject() -> None:
    now = datetime(2026, 11, 27, 9, tzinfo=UTC)
    alerts, notes = advance(
        [], [obs("warning", subject="a"), obs("critical", subject="b")], now=now
    )
    assert sorted(a.subject for a in alerts) == ["a", "b"] and len(notes) == 2
    alerts, notes = advance(alerts, [obs("critical", subject="b")], now=now + timedelta(seconds=1))
    assert [(n.event, n.alert.subject) for n in notes] == [("resolved", "a")]


# -- through the real edges --------------------------------------------------------------------
@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def open_rules(layout: Layout) -> dict[tuple[str, str], str]:
    return {(a.rule, a.subject): a.severity for a in list_alerts(layout, open_only=True)}


def test_every_rule_fires_and_resolves_on_a_real_data_dir(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adevents.jobs.alerts")
    layout = Layout(settings.data_dir)
    layout.ensure()
    now = datetime.now(UTC).replace(hour=6, minute=0, microsecond=0)  # 25 % of the UTC day
    # budget: two campaigns with budgets, spend from real events and the rollup job
    pl.DataFrame(
        {
            "campaign_id": ["cmp-0000", "cmp-0001"],
            "advertiser_id": ["adv-1", "adv-1"],
            "campaign_name": ["A", "B"],
            "daily_budget_micros": [1_000_000_000, 200_000_000],
        },
        schema=CAMPAIGN_SCHEMA,
    ).write_parquet(layout.campaigns)
    today = int(now.timestamp() * 1000)
    location = LakeLocation.from_settings(settings)
    spend = event_table(
        ["s1", "s2"],
        time_ms=today - 60_000,
        cost_micros=[900_000_000, 300_000_000],
        campaign_id=["cmp-0000", "cmp-0001"],
    )
    commit_batches(location, [spend], at=now - timedelta(minutes=5))
    run_rollup(layout, location, durable=False)
    # a slow, failing, stuck consumer: 1 % of the throughput floor, 120 ms batches, 10 % bad
    write_ledger(
        location,
        [
            {
                "batch_id": f"b{i}",
                "status": "ok",
                "rows_in": 10_000,
                "accepted": 9_000,
                "quarantined": 1_000,
                "processing_ms": 120.0,
                "committed_at": now - timedelta(seconds=5 + i),
            }
            for i in range(10)
        ],
    )
    spool = SpoolWriter(layout.incoming, "stuck").write(event_table(["w"], time_ms=today))
    os.utime(spool, (now.timestamp() - 400, now.timestamp() - 400))

    report = check_alerts(layout, location, T, now=now, durable=False)
    assert open_rules(layout) == {
        ("throughput", "pipeline"): "critical",
        ("latency_p95", "pipeline"): "critical",
        ("error_rate", "pipeline"): "critical",
        ("consumer_lag", "pipeline"): "critical",
        ("budget", "cmp-0000"): "warning",  # 90 % spent with 25 % of the day gone
        ("budget", "cmp-0001"): "critical",  # 150 % spent
    }
    assert report.fired == 6
    again = check_alerts(layout, location, T, now=now + timedelta(seconds=15), durable=False)
    assert (again.fired, again.resolved, again.open) == (0, 0, 6)  # no repeat per tick
    stored = load_alerts(layout)
    assert len(stored) == 6 and all(a.started_at == now for a in stored)
    assert any("alert fired: [critical] budget/cmp-0001" in r.message for r in caplog.records)

    # the backlog drains, batches stop (the window moves on), a new day starts
    spool.unlink()
    tomorrow = now + timedelta(days=1)
    done = check_alerts(layout, location, T, now=tomorrow, durable=False)
    assert (done.resolved, done.open) == (6, 0)
    assert all(a.ended_at == tomorrow for a in list_alerts(layout))
    assert list_alerts(layout, open_only=True) == []
    assert sum("alert resolved" in r.message for r in caplog.records) == 6


def test_list_alerts_puts_open_ones_first_by_severity(settings: Settings) -> None:
    layout = Layout(settings.data_dir)
    t0 = datetime(2026, 11, 27, 9, tzinfo=UTC)
    alerts, _ = advance([], [obs("warning", subject="x")], now=t0)
    alerts, _ = advance(alerts, [], now=t0 + timedelta(minutes=1))
    alerts, _ = advance(
        alerts,
        [obs("warning", subject="w"), obs("critical", subject="c")],
        now=t0 + timedelta(minutes=2),
    )
    from jobs.alerts import save_alerts

    save_alerts(layout, alerts, durable=False)
    got = list_alerts(layout)
    assert [(a.subject, a.status) for a in got] == [
        ("c", "firing"),
        ("w", "firing"),
        ("x", "resolved"),
    ]
    assert [a.subject for a in list_alerts(layout, open_only=True, limit=1)] == ["c"]
    assert got[0].to_json()["started_at"] == (t0 + timedelta(minutes=2)).isoformat()


# -- the webhook -------------------------------------------------------------------------------
def fire(layout: Layout, n: int = 1) -> None:
    """Queue ``n`` notifications as the alert job does."""
    spool = SpoolWriter(layout.incoming, "w").write(event_table(["x"], time_ms=0))
    now = datetime.now(UTC)
    for i in range(n):
        os.utime(
            spool, (now.timestamp() - 60 - 400 * (i % 2), now.timestamp() - 60 - 400 * (i % 2))
        )
        # (a window longer than the backlog: only the lag rule fires)
        lag_only = dataclasses.replace(T, alert_window=10**6, alert_webhook_url="http://unused/")
        location = LakeLocation.from_env({"LAKE_URI": str(layout.root / "lake")})
        check_alerts(layout, location, lag_only, now=now + timedelta(seconds=i), durable=False)


def deliver_now(layout: Layout, url: str, **kw: Any) -> DeliveryReport:
    """``deliver`` now, with an hour's maximum age unless ``kw`` says otherwise."""
    kw.setdefault("max_age_s", 3600)
    return deliver(layout, url, now=datetime.now(UTC), **kw)


def test_webhook_delivers_in_order_and_empties_the_outbox(settings: Settings) -> None:
    layout = Layout(settings.data_dir)
    layout.ensure()
    fire(layout, 3)  # lag fires warning, escalates to critical, de-escalates
    assert len(pending(layout)) == 3
    with webhook_server("ok") as server:
        report = deliver_now(layout, server.url, timeout=2, retries=1)
    assert (report.sent, report.failed) == (3, False)
    assert [p["event"] for p in server.received] == ["fired", "escalated", "deescalated"]
    assert {p["rule"] for p in server.received} == {"consumer_lag"}
    assert server.received[0]["severity"] == "warning" and "started_at" in server.received[0]
    assert pending(layout) == []


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_a_dead_webhook_is_retried_bounded_in_time_and_delivered_later(
    settings: Settings, mode: str
) -> None:
    layout = Layout(settings.data_dir)
    layout.ensure()
    fire(layout)
    waits: list[float] = []
    with webhook_server(mode) as server:
        started = time.monotonic()
        report = deliver_now(layout, server.url, timeout=0.3, retries=2, sleep=waits.append)
        elapsed = time.monotonic() - started
        assert report.failed and report.pending == 1
        assert server.attempts == 3  # one try and two retries
        assert waits == [0.25, 0.5]  # the backoff between them
        assert elapsed < 3 * 0.3 + 1.0  # each try bounded by the timeout, never a hang
        assert len(pending(layout)) == 1  # kept for the next tick
        server.mode = "ok"
        report = deliver_now(layout, server.url, timeout=0.3, retries=0)
    assert report.sent == 1 and pending(layout) == []
    assert [p["event"] for p in server.received] == ["fired"]


def test_rejected_or_too_old_notifications_are_dropped(settings: Settings) -> None:
    layout = Layout(settings.data_dir)
    layout.ensure()
    fire(layout)
    with webhook_server("reject") as server:
        report = deliver_now(layout, server.url, timeout=1, retries=3)
        assert (report.dropped, server.attempts) == (1, 1)  # a 400 is not retried
    # a notification queued two hours ago, to a webhook that still fails
    _, notes = advance([], [obs("warning")], now=datetime.now(UTC))
    enqueue(layout, notes, now=datetime.now(UTC) - timedelta(hours=2), durable=False)
    with webhook_server("fail") as server:
        report = deliver_now(layout, server.url, timeout=1, retries=0)
    assert report.dropped == 1 and pending(layout) == []


def test_a_hanging_webhook_never_holds_up_the_other_jobs(settings: Settings) -> None:
    layout = Layout(settings.data_dir)
    layout.ensure()
    fire(layout)
    ticks: list[float] = []
    lock = threading.Lock()

    def other_job() -> str:
        with lock:
            ticks.append(time.monotonic())
        return "ok"

    with webhook_server("hang") as server:
        specs = [
            JobSpec(
                "webhook",
                0.2,
                lambda: deliver_now(layout, server.url, timeout=1.5, retries=0).line(),
            ),
            JobSpec("alerts", 0.1, other_job),
        ]
        scheduler = build_scheduler(specs)
        scheduler.start()
        try:
            assert wait_for(lambda: len(ticks) >= 8, timeout=5)
            assert server.attempts >= 1
        finally:
            scheduler.shutdown(wait=True)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 1.0  # the alert job kept its rhythm while the webhook hung
