"""Kafka consumer lag per partition, from the consumers' published statuses to /metrics, /health,
the dashboard and the consumer-lag alert.

Statuses are written the way a consumer writes them (``StatusBoard``, ``write_status``) into a
real DATA_DIR, and read back by a real API (``TestClient``) or the alert job. A consumer that is
meant to be alive runs its heartbeat (as ``consume`` does) and one meant to be gone reported a
minute ago, so no assertion depends on how fast the test runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from litestar.testing import TestClient

from api.app import create_app
from jobs.alerts import check_alerts, kafka_lag_rule
from lake.location import LakeLocation
from pipeline.retry import StatusBoard
from pipeline.schema import Layout
from pipeline.settings import JobSettings, Settings
from pipeline.status import ConsumerStatus, State, kafka_lags, read_statuses, write_status
from pipeline.tables import list_alerts

T = JobSettings()  # ALERT_KAFKA_LAG_WARNING 100k, ALERT_KAFKA_LAG_CRITICAL 1M messages
NOW = 1_800_000_000.0


def status(
    name: str, lag: dict[str, int] | None, *, age: float = 0.0, state: State = "running"
) -> ConsumerStatus:
    """``name``'s status as published ``age`` seconds before NOW."""
    return ConsumerStatus(name, 1, state, updated_at=NOW - age, kafka_lag=lag)


# -- reading the statuses (pure) ----------------------------------------------------------------
def test_each_partition_once_most_behind_first(tmp_path: Path) -> None:
    for s in [
        status("c1", {"ad-events/0": 5, "ad-events/1": 2_000_000, "not a partition": 7}),
        # c2 held partition 1 before a rebalance and died: c1's current reading wins.
        status("c2", {"ad-events/1": 9, "ad-events/2": 300}, age=60),
        status("spool", None),
    ]:
        assert write_status(tmp_path, s)
    lags = kafka_lags(read_statuses(tmp_path), NOW)
    assert [(x.key, x.messages, x.consumer, x.current) for x in lags] == [
        ("ad-events/1", 2_000_000, "c1", True),
        ("ad-events/2", 300, "c2", False),  # nobody reports it now: its last known lag
        ("ad-events/0", 5, "c1", True),
    ]


def test_a_lag_not_measured_while_a_consumer_waits_out_a_fault_is_not_current() -> None:
    """The heartbeat keeps ``updated_at`` fresh while the consumer retries; the lag it
    measured a minute ago is last known, not current."""
    waiting = ConsumerStatus(
        "c", 1, "retrying", updated_at=NOW, kafka_lag={"t/0": 70}, kafka_lag_at=NOW - 60
    )
    (lag,) = kafka_lags([waiting], NOW)
    assert (lag.messages, lag.current, lag.updated_at) == (70, False, NOW - 60)


def test_a_stopped_consumers_lag_is_last_known_and_a_newer_report_wins() -> None:
    stopped = status("old", {"t/0": 50}, state="stopped")
    assert [x.current for x in kafka_lags([stopped], NOW)] == [False]
    earlier = status("a", {"t/0": 10}, age=4)
    later = status("b", {"t/0": 20}, age=1)
    assert [(x.consumer, x.messages) for x in kafka_lags([later, earlier, stopped], NOW)] == [
        ("b", 20)
    ]


def test_the_status_board_publishes_what_is_read(tmp_path: Path) -> None:
    board = StatusBoard(tmp_path, "k1")
    board.start()
    try:
        board.set_kafka_lag({"ad-events/4": 42})
        (s,) = read_statuses(tmp_path)
        (lag,) = kafka_lags([s], s.updated_at)
        assert (lag.topic, lag.partition, lag.messages, lag.current) == ("ad-events", 4, 42, True)
    finally:
        board.stop()
    assert kafka_lags(read_statuses(tmp_path), time.time())[0].current is False  # stopped


# -- the API: /metrics, /health, the dashboard ---------------------------------------------------
@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    # KAFKA_LAG_MAX 1M: partition 1 (2M behind) is over it, partition 0 is not.
    return make_settings(kafka_lag_max=1_000_000)


def key_cache_state(settings: Settings) -> None:
    """The embedded key cache's directory, as a consumer that ran leaves it: without it /health
    is unhealthy (``key_cache_missing``) whatever the lag."""
    (Layout(settings.data_dir).state / "embedded").mkdir(parents=True, exist_ok=True)


@pytest.fixture
def board(settings: Settings) -> Iterator[StatusBoard]:
    """A live Kafka consumer's status (its heartbeat keeps it fresh), and one that died a
    minute ago holding partition 2 far behind."""
    state = Layout(settings.data_dir).state
    now = time.time()
    dead = ConsumerStatus(
        "k-dead", 2, "running", since=now - 600, updated_at=now - 60, kafka_lag={"ad-events/2": 5}
    )
    write_status(state, dead)
    live = StatusBoard(state, "k-live")
    live.start()
    live.set_kafka_lag({"ad-events/0": 120, "ad-events/1": 2_000_000})
    yield live
    live.stop()


def test_metrics_has_each_running_consumers_partitions(
    settings: Settings, board: StatusBoard
) -> None:
    with TestClient(create_app(settings)) as c:
        lines = set(c.get("/metrics").text.splitlines())
    labels = 'consumer="k-live",partition="{}",topic="ad-events"'
    for line in [
        f"adevents_kafka_consumer_lag_messages{{{labels.format(0)}}} 120.0",
        f"adevents_kafka_consumer_lag_messages{{{labels.format(1)}}} 2e+06",
        "adevents_kafka_consumer_lag_max_messages 2e+06",
        "adevents_kafka_partitions_unreported 1.0",  # partition 2: its consumer is gone
    ]:
        assert line in lines, line
    # The dead consumer's last lag is not shown as a value now.
    assert not [x for x in lines if 'partition="2"' in x]


def test_metrics_without_a_kafka_consumer(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        text = c.get("/metrics").text
    assert "# TYPE adevents_kafka_consumer_lag_messages gauge" in text
    assert "adevents_kafka_consumer_lag_messages{" not in text
    assert "adevents_kafka_consumer_lag_max_messages NaN" in text
    assert "adevents_kafka_partitions_unreported 0.0" in text


def test_health_is_degraded_not_down_and_names_the_partition(
    settings: Settings, board: StatusBoard
) -> None:
    key_cache_state(settings)
    with TestClient(create_app(settings)) as c:
        public = c.get("/health")
        detail = c.get("/health/detail")
        page = c.get("/").text
    assert public.status_code == 200 and detail.status_code == 200
    assert public.json()["status"] == "degraded" and public.json()["reasons"] == ["kafka_lag"]
    body = detail.json()
    (message,) = body["messages"]
    assert "partition ad-events/1 is 2,000,000 messages behind its end" in message
    assert "KAFKA_LAG_MAX (1,000,000)" in message
    assert "k-live" not in message and settings.data_dir not in message
    assert body["kafka_lag_max_messages"] == 1_000_000
    assert [
        (x["topic"], x["partition"], x["consumer"], x["messages"], x["current"])
        for x in body["kafka_lag"]
    ] == [
        ("ad-events", 1, "k-live", 2_000_000, True),
        ("ad-events", 0, "k-live", 120, True),
        ("ad-events", 2, "k-dead", 5, False),
    ]
    # The dashboard says degraded and lists each partition, but no consumer (host) names.
    assert 'id="health-status" class="warn">degraded: Kafka consumer lag' in page
    assert 'id="tile-kafka-lag"' in page and "2,000,000 msgs" in page
    assert 'data-partition="ad-events/1" data-lag="2000000" data-current="true"' in page
    assert 'data-partition="ad-events/2" data-lag="5" data-current="false"' in page
    assert "last known" in page and "k-live" not in page and "k-dead" not in page


def test_a_partition_last_known_over_the_limit_keeps_health_degraded(settings: Settings) -> None:
    key_cache_state(settings)
    now = time.time()
    write_status(
        Layout(settings.data_dir).state,
        ConsumerStatus(
            "k", 1, "stopped", updated_at=now - 120, kafka_lag={"ad-events/7": 3_000_000}
        ),
    )
    with TestClient(create_app(settings)) as c:
        body = c.get("/health/detail").json()
    assert body["status"] == "degraded"
    assert "partition ad-events/7 was 3,000,000 messages behind" in body["messages"][0]
    assert "stopped reporting" in body["messages"][0]


def test_kafka_lag_does_not_hide_an_unhealthy_check(settings: Settings, board: StatusBoard) -> None:
    with TestClient(create_app(settings)) as c:  # no key cache state: unhealthy
        public = c.get("/health")
    assert public.status_code == 503 and public.json()["status"] == "unhealthy"
    assert public.json()["reasons"] == ["key_cache_missing", "kafka_lag"]


def test_within_the_limit_health_is_ok_and_the_dashboard_shows_the_lag(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(kafka_lag_max=5_000_000)
    key_cache_state(settings)
    board = StatusBoard(Layout(settings.data_dir).state, "k")
    board.start()
    try:
        board.set_kafka_lag({"ad-events/1": 2_000_000})
        with TestClient(create_app(settings)) as c:
            public = c.get("/health")
            panel = c.get("/dashboard/panel").text
    finally:
        board.stop()
    assert public.status_code == 200 and public.json()["status"] == "ok"
    assert '<span id="health-status">healthy</span>' in panel
    assert 'id="kafka-lag-table"' in panel and "KAFKA_LAG_MAX 5,000,000" in panel


def test_the_dashboard_has_no_kafka_card_without_kafka(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        panel = c.get("/dashboard/panel").text
    assert "kafka" not in panel.lower()


# -- the consumer-lag alert ------------------------------------------------------------------------
def test_kafka_lag_rule_grades_each_partition() -> None:
    lags = kafka_lags(
        [status("c1", {"t/0": 100_000, "t/1": 100_001, "t/2": 1_000_001}, age=1)], NOW
    )
    got = [(o.rule, o.subject, o.severity, o.threshold) for o in kafka_lag_rule(lags, T)]
    assert got == [
        ("consumer_lag", "t/2", "critical", 1_000_000.0),
        ("consumer_lag", "t/1", "warning", 100_000.0),
    ]


def test_the_alert_job_opens_and_resolves_per_partition(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    layout = Layout(settings.data_dir)
    layout.ensure()
    location = LakeLocation.from_settings(settings)
    t0 = datetime(2026, 11, 27, 9, tzinfo=UTC)

    def tick(at: datetime, *statuses: ConsumerStatus) -> dict[str, tuple[str, str]]:
        for s in statuses:
            write_status(layout.state, s)
        check_alerts(layout, location, T, now=at, durable=False)
        return {
            a.subject: (a.severity, a.message)
            for a in list_alerts(layout, open_only=True)
            if a.rule == "consumer_lag"
        }

    def reported(name: str, at: datetime, lag: dict[str, int]) -> ConsumerStatus:
        return ConsumerStatus(name, 1, "running", updated_at=at.timestamp(), kafka_lag=lag)

    lag = {"ad-events/0": 150_000, "ad-events/1": 10}
    opened = tick(t0, reported("c1", t0, lag), reported("c2", t0, {"ad-events/2": 2_000_000}))
    assert {k: v[0] for k, v in opened.items()} == {
        "ad-events/0": "warning",
        "ad-events/2": "critical",
    }
    assert (
        "Kafka partition ad-events/0 is 150,000 messages behind its end" in opened["ad-events/0"][1]
    )

    # c1 catches up on partition 0: its alert resolves; partition 2's stays.
    t1 = t0 + timedelta(seconds=15)
    later = tick(t1, reported("c1", t1, {"ad-events/0": 50, "ad-events/1": 10}))
    assert set(later) == {"ad-events/2"}

    # c2 dies: partition 2's lag is unknown, not caught up, so its alert stays open and says so.
    t2 = t0 + timedelta(minutes=2)
    dead = tick(t2, reported("c1", t2, {"ad-events/0": 50, "ad-events/1": 10}))
    assert dead["ad-events/2"][0] == "critical" and "stopped reporting" in dead["ad-events/2"][1]

    # c1 takes partition 2 over and reports it caught up: the alert resolves.
    t3 = t2 + timedelta(seconds=15)
    assert (
        tick(t3, reported("c1", t3, {"ad-events/0": 0, "ad-events/1": 0, "ad-events/2": 3})) == {}
    )
    ended = [a for a in list_alerts(layout) if a.subject == "ad-events/2"]
    assert [(a.status, a.ended_at) for a in ended] == [("resolved", t3)]
