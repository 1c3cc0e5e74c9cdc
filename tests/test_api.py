"""The API through Litestar's test client, over a real Delta lake filled by hand."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from deltalake.exceptions import DeltaError
from litestar import Litestar
from litestar.testing import TestClient

from api.app import create_app
from api.testing import running_server
from jobs.alerts import check_alerts, save_alerts
from jobs.rollup import run_rollup
from lake.location import LakeLocation
from lake.testing import append, ledger_frame, quarantine_frame
from pipeline.schema import Layout
from pipeline.settings import QuerySettings, Settings
from pipeline.tables import Alert
from pipeline.testing import event_table
from queries import campaigns, events
from queries.testing import enriched, write_campaigns

HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)
H = NOW_MS - NOW_MS % HOUR_MS - HOUR_MS  # start of the previous hour
USD = 1_000_000

#: (event_id, type, time, campaign, cost micros, revenue micros)
ROWS = [
    ("a1", "impression", H + 1000, "cmp-a", 2 * USD, 0),
    ("a2", "impression", H + 2000, "cmp-a", 2 * USD, 0),
    ("a3", "click", H + 3000, "cmp-a", USD // 2, 0),
    ("a4", "conversion", H + 4000, "cmp-a", 0, 10 * USD),
    ("b1", "impression", H + 5000, "cmp-b", 0, 0),
    ("b2", "impression", H + 6000, "cmp-b", 0, 0),
    ("a5", "impression", H + HOUR_MS + 1000, "cmp-a", USD, 0),
    ("a6", "click", H + HOUR_MS + 2000, "cmp-a", USD // 2, 0),
]
NEWEST = ["a6", "a5", "b2", "b1", "a4", "a3", "a2", "a1"]


def table(rows: list[tuple[Any, ...]], **extra: Any) -> Any:
    return event_table(
        [r[0] for r in rows],
        time_ms=[r[2] for r in rows],
        event_type=[r[1] for r in rows],
        campaign_id=[r[3] for r in rows],
        cost_micros=[r[4] for r in rows],
        revenue_micros=[r[5] for r in rows],
        **extra,
    )


CAMPAIGNS = {"cmp-a": ("adv-1", "Alpha <launch>")}


def store(settings: Settings, rows: list[tuple[Any, ...]], batch_id: str, **ledger: int) -> None:
    """Commit ``rows`` as the consumer would store one batch: its events (enriched), its
    quarantined rows (``quarantined`` of them) and its ledger row (``ledger`` overrides)."""
    location = LakeLocation.from_settings(settings)
    now = int(time.time() * 1000)
    frame = enriched(table(rows), batch_id=batch_id, ingested_ms=now, campaigns=CAMPAIGNS)
    row = ledger_frame(batch_id, rows_in=len(rows), at_ms=now)
    values: dict[str, Any] = {"accepted": len(rows), "processing_ms": 20.0, **ledger}
    if rows:
        values |= {
            "min_event_time": frame["event_time"].min(),
            "max_event_time": frame["event_time"].max(),
        }
    row = row.with_columns(**{k: pl.lit(v).cast(row.schema[k]) for k, v in values.items()})
    frames = {"events": frame, "ledger": row}
    if ledger.get("quarantined"):
        frames["quarantine"] = quarantine_frame(ledger["quarantined"], at_ms=now)
    append(location, frames)
    Layout(settings.data_dir).state.joinpath("embedded").mkdir(parents=True, exist_ok=True)


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values = {"data_dir": str(data_dir), "fsync": "false", "dedupe_window": "3h", **overrides}
    return Settings.from_env({}, **values)


@pytest.fixture(scope="module")
def lake_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Two batches: cmp-a and cmp-b in the previous hour, then cmp-a in the current one, whose
    spool file also held a duplicate of a1 and a row with a bad country."""
    settings = make_settings(tmp_path_factory.mktemp("api-lake"))
    write_campaigns(
        settings,
        [{"campaign_id": "cmp-a", "advertiser_id": "adv-1", "campaign_name": "Alpha <launch>"}],
    )
    store(settings, ROWS[:6], "batch-1")
    store(
        settings,
        ROWS[6:],
        "batch-2",
        rows_in=4,
        duplicates=1,
        quarantined=1,
        quarantined_invalid_country=1,
    )
    return settings


@pytest.fixture(scope="module")
def app(lake_settings: Settings) -> Litestar:
    return create_app(lake_settings)


@pytest.fixture(scope="module")
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    with TestClient(app) as c:
        yield c


def ok(client: TestClient[Litestar], url: str) -> Any:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return response.json()


# -- /ad_events/latest ---------------------------------------------------------------------------
def test_latest_events_newest_first(client: TestClient[Litestar]) -> None:
    body = ok(client, "/ad_events/latest?limit=3")
    assert [e["event_id"] for e in body["events"]] == NEWEST[:3]
    assert body["total_count"] == 8
    assert isinstance(body["processing_rate_per_sec"], float)
    first = body["events"][0]
    assert first == {
        "event_id": "a6",
        "event_type": "click",
        "timestamp": H + HOUR_MS + 2000,
        "campaign_id": "cmp-a",
        "ad_id": "ad-1",
        "publisher_id": "pub-1",
        "advertiser_id": "adv-1",
        "device_type": "mobile",
        "country": "US",
        "cost_usd": 0.5,
        "revenue_usd": 0.0,
        "processed": True,
    }
    assert [e["event_id"] for e in ok(client, "/ad_events/latest")["events"]] == NEWEST
    assert len(ok(client, "/ad_events/latest?limit=1000")["events"]) == 8


def test_questions_run_on_query_threads_threads_and_no_more(lake_settings: Settings) -> None:
    """QUERY_THREADS bounds the threads the (sync) question handlers run on: with 3, three
    questions are answered at once and a fourth waits for a thread, on adevents-query threads."""
    settings = dataclasses.replace(lake_settings, query=QuerySettings(query_threads=3))
    running: list[str] = []
    changed = threading.Condition()
    release = threading.Event()
    real = events.count

    def held(lake: Any) -> int:
        with changed:
            running.append(threading.current_thread().name)
            changed.notify_all()
        release.wait(timeout=60)
        return real(lake)

    with (
        pytest.MonkeyPatch.context() as patch,
        TestClient(create_app(settings)) as client,
        ThreadPoolExecutor(4) as callers,
    ):
        patch.setattr(events, "count", held)
        answers = [callers.submit(client.get, "/ad_events/latest?limit=1") for _ in range(4)]
        try:
            with changed:
                assert changed.wait_for(lambda: len(running) == 3, timeout=60)
                # Not a race the fourth could win late: with a fourth thread it would be
                # running within this second; with three it never is while they are held.
                assert not changed.wait_for(lambda: len(running) > 3, timeout=1.0)
        finally:
            release.set()
        assert [a.result(timeout=60).status_code for a in answers] == [200] * 4
    assert len(running) == 4 and len(set(running)) == 3
    assert all(name.startswith("adevents-query") for name in running)


# -- /ad_events/by_campaign ----------------------------------------------------------------------
def test_by_campaign_pages_with_a_cursor(client: TestClient[Litestar]) -> None:
    pages, url = [], "/ad_events/by_campaign/cmp-a?limit=2"
    while True:
        body = ok(client, url)
        pages.append([e["event_id"] for e in body["events"]])
        if body["next_cursor"] is None:
            break
        url = f"/ad_events/by_campaign/cmp-a?limit=2&cursor={body['next_cursor']}"
    assert pages == [["a6", "a5"], ["a4", "a3"], ["a2", "a1"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("event_type=click", ["a6", "a3"]),
        (f"since={H + HOUR_MS}", ["a6", "a5"]),
        (f"until={H + HOUR_MS}", ["a4", "a3", "a2", "a1"]),
        (f"since={H + 2000}&until={H + 4000}", ["a3", "a2"]),
    ],
)
def test_by_campaign_filters(client: TestClient[Litestar], query: str, expected: list[str]) -> None:
    body = ok(client, f"/ad_events/by_campaign/cmp-a?{query}")
    assert [e["event_id"] for e in body["events"]] == expected
    assert body["next_cursor"] is None


def test_dates_are_accepted_in_iso_form(client: TestClient[Litestar]) -> None:
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((H + HOUR_MS) / 1000))
    body = ok(client, f"/ad_events/by_campaign/cmp-a?since={iso}")
    assert [e["event_id"] for e in body["events"]] == ["a6", "a5"]
    day = time.strftime("%Y-%m-%d", time.gmtime(H / 1000))
    assert ok(client, f"/ad_events/by_campaign/cmp-b?since={day}")["events"]


def test_unknown_campaigns_are_empty_not_errors(client: TestClient[Litestar]) -> None:
    assert ok(client, "/ad_events/by_campaign/nope") == {
        "campaign_id": "nope",
        "events": [],
        "next_cursor": None,
    }
    stats = ok(client, "/campaigns/nope/stats")
    assert stats["series"] == [] and stats["total"]["impressions"] == 0


# -- /campaigns/{id}/stats -----------------------------------------------------------------------
def test_campaign_stats_by_hour(client: TestClient[Litestar]) -> None:
    body = ok(client, f"/campaigns/cmp-a/stats?since={H}&granularity=hour")
    assert body["granularity"] == "hour" and body["since"] == H
    first, second = body["series"]
    assert first == {
        "bucket_start": H,
        "impressions": 2,
        "clicks": 1,
        "conversions": 1,
        "spend_usd": 4.5,
        "revenue_usd": 10.0,
        "ctr": 0.5,
        "cvr": 1.0,
        "cpm_usd": 2250.0,
        "cpc_usd": 4.5,
        "cpa_usd": 4.5,
        "roas": pytest.approx(10 / 4.5),
    }
    assert (second["bucket_start"], second["impressions"], second["clicks"]) == (H + HOUR_MS, 1, 1)
    assert second["conversions"] == 0 and second["cvr"] == 0.0 and second["cpa_usd"] is None
    assert second["roas"] == 0.0
    total = body["total"]
    assert (total["impressions"], total["clicks"], total["conversions"]) == (3, 2, 1)
    assert total["spend_usd"] == 6.0 and total["cpm_usd"] == 2000.0
    assert total["ctr"] == pytest.approx(2 / 3) and total["roas"] == pytest.approx(10 / 6)


def test_campaign_stats_by_minute_and_day(client: TestClient[Litestar]) -> None:
    minutes = ok(client, f"/campaigns/cmp-a/stats?since={H}&until={H + 120_000}&granularity=minute")
    assert [p["bucket_start"] for p in minutes["series"]] == [H]
    days = ok(client, f"/campaigns/cmp-a/stats?since={H}&granularity=day")
    assert sum(p["impressions"] for p in days["series"]) == 3


def test_zero_denominators_give_null_ratios(client: TestClient[Litestar]) -> None:
    total = ok(client, f"/campaigns/cmp-b/stats?since={H}")["total"]
    assert (total["impressions"], total["clicks"], total["spend_usd"]) == (2, 0, 0.0)
    assert total["ctr"] == 0.0 and total["cpm_usd"] == 0.0
    assert total["cvr"] is None and total["cpc_usd"] is None
    assert total["cpa_usd"] is None and total["roas"] is None


STATS_QUERIES = [
    f"since={H}&until={H + 2 * HOUR_MS}&granularity=hour",
    f"since={H}&until={H + HOUR_MS + 1500}&granularity=hour",
    f"since={H - HOUR_MS}&until={H + HOUR_MS + 90_000}&granularity=minute",
    f"since={H + 4500}&until={H + 150_500}&granularity=minute",
    f"since={H}&until={H + 120_000}&granularity=minute",
    f"since={H - 86_400_000}&until={H + 2 * HOUR_MS}&granularity=day",
    f"since={H}&until={H + HOUR_MS + 2001}&granularity=day",
]


def test_stats_from_rollups_are_the_same_json_as_from_events(
    lake_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same query answered from rollups and from raw events gives the same JSON, to the
    micro: right after a rollup run, and with batches (one of them late) it has not seen."""
    data = tmp_path / "lake"
    shutil.copytree(lake_settings.data_dir, data)
    settings = make_settings(data)
    plans: list[campaigns.Plan] = []
    read_plan = campaigns.read_plan

    def spy(*args: Any) -> list[campaigns.Bucket]:
        plans.append(args[-1])
        return read_plan(*args)

    monkeypatch.setattr(campaigns, "read_plan", spy)

    def answers(client: TestClient[Litestar], source: type) -> list[Any]:
        with monkeypatch.context() as m:
            m.setattr(campaigns, "stats_source", lambda lake: source())
            return [
                ok(client, f"/campaigns/{cid}/stats?{query}")
                for cid in ("cmp-a", "cmp-b", "nope")
                for query in STATS_QUERIES
            ]

    with TestClient(create_app(settings)) as client:
        run_rollup(Layout(str(data)), LakeLocation.from_settings(settings), durable=False)
        rolled = answers(client, campaigns.RollupSource)
        assert rolled == answers(client, campaigns.RawEventsSource)
        assert any(p.rollup for p in plans)
        assert sum(len(body["series"]) for body in rolled) > 10
        store(settings, [("c1", "click", H + 2500, "cmp-a", 123_457, 0)], "late")  # old minute
        store(
            settings,
            [
                ("c2", "conversion", H + HOUR_MS + 1200, "cmp-a", 0, 7_654_321),
                ("c3", "impression", H + HOUR_MS + 61_000, "cmp-b", 11, 0),
            ],
            "fresh",
        )
        plans.clear()
        fresh = answers(client, campaigns.RollupSource)
        assert fresh == answers(client, campaigns.RawEventsSource)
        assert fresh != rolled
        assert any(p.rollup and p.raw for p in plans)
        hourly = ok(client, f"/campaigns/cmp-a/stats?since={H}&until={H + 2 * HOUR_MS}")
        assert hourly["total"]["spend_usd"] == 6.123457  # to the micro


# -- /campaigns/top ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "order"),
    [
        ("spend", ["cmp-a", "cmp-b"]),
        ("revenue", ["cmp-a", "cmp-b"]),
        ("clicks", ["cmp-a", "cmp-b"]),
        ("conversions", ["cmp-a", "cmp-b"]),
        ("ctr", ["cmp-a", "cmp-b"]),
        ("roas", ["cmp-a", "cmp-b"]),
    ],
)
def test_top_campaigns(client: TestClient[Litestar], metric: str, order: list[str]) -> None:
    body = ok(client, f"/campaigns/top?metric={metric}")
    assert [c["campaign_id"] for c in body["campaigns"]] == order
    assert [c["rank"] for c in body["campaigns"]] == [1, 2]
    a = body["campaigns"][0]
    assert a["campaign_name"] == "Alpha <launch>" and a["spend_usd"] == 6.0


def test_top_since_and_limit(client: TestClient[Litestar]) -> None:
    body = ok(client, f"/campaigns/top?since={H + HOUR_MS}&limit=5")
    assert [c["campaign_id"] for c in body["campaigns"]] == ["cmp-a"]
    assert body["campaigns"][0]["spend_usd"] == 1.5 and body["since"] == H + HOUR_MS
    assert len(ok(client, "/campaigns/top?limit=1")["campaigns"]) == 1


# -- /alerts ------------------------------------------------------------------------------------
def stored_alert(rule: str, severity: str, minutes_ago: int, *, resolved: bool = False) -> Alert:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    started = now - timedelta(minutes=minutes_ago)
    return Alert(
        alert_id=f"{rule}:pipeline:{int(started.timestamp() * 1000)}",
        rule=rule,
        subject="pipeline",
        severity=severity,
        status="resolved" if resolved else "firing",
        value=0.25,
        threshold=0.05,
        message=f"{rule} <crossed>",
        started_at=started,
        updated_at=now,
        ended_at=now - timedelta(minutes=minutes_ago // 2) if resolved else None,
    )


def test_alerts_open_first_with_filters(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings)) as c:
        assert ok(c, "/alerts") == {"alerts": []}
        save_alerts(
            Layout(settings.data_dir),
            [
                stored_alert("consumer_lag", "warning", 90, resolved=True),
                stored_alert("latency_p95", "warning", 2),
                stored_alert("error_rate", "critical", 10),
                stored_alert("throughput", "critical", 300, resolved=True),
            ],
            durable=False,
        )
        body = ok(c, "/alerts")
        rules = [a["rule"] for a in body["alerts"]]
        assert rules == ["error_rate", "latency_p95", "consumer_lag", "throughput"]
        first = body["alerts"][0]
        started = int(datetime(2026, 11, 27, 11, 50, tzinfo=UTC).timestamp() * 1000)
        assert first == {
            "alert_id": f"error_rate:pipeline:{started}",
            "rule": "error_rate",
            "subject": "pipeline",
            "severity": "critical",
            "status": "firing",
            "value": 0.25,
            "threshold": 0.05,
            "message": "error_rate <crossed>",
            "started_at": started,
            "updated_at": started + 600_000,
            "ended_at": None,
        }
        assert body["alerts"][2]["ended_at"] == started + 600_000 - 45 * 60_000
        assert [a["rule"] for a in ok(c, "/alerts?open=true")["alerts"]] == rules[:2]
        assert [a["rule"] for a in ok(c, "/alerts?open=1&limit=1")["alerts"]] == ["error_rate"]
        assert len(ok(c, "/alerts?open=false&limit=3")["alerts"]) == 3


def test_a_real_alert_fires_and_is_listed(tmp_path: Path) -> None:
    """The alert job's own evaluation over a real ledger: 2 of 4 rows quarantined."""
    settings = make_settings(tmp_path)
    store(settings, ROWS[:2], "ok-rows")
    store(settings, [], "bad-rows", rows_in=2, quarantined=2, quarantined_invalid_country=2)
    location = LakeLocation.from_settings(settings)
    check_alerts(
        Layout(settings.data_dir), location, settings.jobs, now=datetime.now(UTC), durable=False
    )
    with TestClient(create_app(settings)) as c:
        (alert,) = [a for a in ok(c, "/alerts?open=true")["alerts"] if a["rule"] == "error_rate"]
    assert (alert["severity"], alert["status"], alert["value"]) == ("critical", "firing", 0.5)
    assert "50.00% of 4 rows quarantined" in alert["message"]


# -- bad input -------------------------------------------------------------------------------
def cursor_of(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


NEGATIVE_CURSOR = cursor_of(b'[-1,"x"]')


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("/ad_events/latest?limit=0", "limit"),
        ("/ad_events/latest?limit=-5", "limit"),
        ("/ad_events/latest?limit=1001", "limit"),
        ("/ad_events/latest?limit=99999999999999999999", "limit"),
        ("/ad_events/latest?limit=ten", "limit"),
        ("/ad_events/by_campaign/cmp-a?limit=5000", "limit"),
        ("/ad_events/by_campaign/cmp-a?since=yesterday", "since='yesterday' is not a date"),
        ("/ad_events/by_campaign/cmp-a?until=2026-02-30", "until='2026-02-30' is not a date"),
        ("/ad_events/by_campaign/cmp-a?since=2026-01-02&until=2026-01-01", "since must be earlier"),
        ("/ad_events/by_campaign/cmp-a?event_type=view", "event_type"),
        ("/ad_events/by_campaign/cmp-a?cursor=not-a-cursor!", "cursor is malformed"),
        (f"/ad_events/by_campaign/cmp-a?cursor={cursor_of(b'[1,2,3]')}", "cursor is malformed"),
        (f"/ad_events/by_campaign/cmp-a?cursor={cursor_of(b'{}')}", "cursor is malformed"),
        (f"/ad_events/by_campaign/cmp-a?cursor={NEGATIVE_CURSOR}", "cursor is malformed"),
        ("/campaigns/cmp-a/stats?granularity=week", "granularity"),
        ("/campaigns/cmp-a/stats?since=99999999999999999", "since="),
        ("/campaigns/cmp-a/stats?since=2020-01-01&granularity=minute", "at most 10,080"),
        ("/campaigns/top?metric=impressions", "metric"),
        ("/campaigns/top?limit=1001", "limit"),
        ("/campaigns/top?since=0000-00-00", "since="),
        ("/alerts?open=maybe", "open"),
        ("/alerts?limit=0", "limit"),
        ("/alerts?limit=1001", "limit"),
        ("/alerts?limit=all", "limit"),
    ],
)
def test_bad_input_is_a_400_that_says_why(
    client: TestClient[Litestar], url: str, says: str
) -> None:
    response = client.get(url)
    assert response.status_code == 400, response.text
    body = response.json()
    text = body["detail"] + " ".join(str(x) for x in body.get("extra", []))
    assert says in text


@pytest.mark.parametrize(
    "error",
    [
        DeltaError("Generic S3 error: GET s3://bucket/srv/data/events/_delta_log/3.json"),
        __import__("duckdb").IOException(
            'IO Error: Could not open file "/srv/data/events/date=2026-01-01/x.parquet": '
            "SELECT * FROM read_parquet($files_events) WHERE campaign_id = $1"
        ),
    ],
    ids=["delta", "duckdb"],
)
def test_an_unreadable_lake_is_a_503_without_internals(
    client: TestClient[Litestar],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr("queries.events.newest", broken)
    response = client.get("/ad_events/latest", headers={"X-Request-ID": "trace-123"})
    assert response.status_code == 503
    body = response.json()
    assert "could not be read right now" in body["detail"]
    assert body["request_id"] == response.headers["x-request-id"] == "trace-123"
    assert response.headers["retry-after"] == "1"
    for internal in ("/srv", "parquet", "SELECT", "read_parquet", "Error"):
        assert internal not in response.text, internal
    # ... and the operator finds the details under the same id.
    logged = [r.getMessage() for r in caplog.records]
    assert any("trace-123" in m and "/srv/data" in m for m in logged)


# -- /health ------------------------------------------------------------------------------------
def test_health_reports_its_checks(client: TestClient[Litestar]) -> None:
    public = ok(client, "/health")
    assert public == {"status": "ok", "reasons": [], "checked_at": public["checked_at"]}
    body = ok(client, "/health/detail")
    assert body["status"] == "ok" and body["reasons"] == [] and body["messages"] == []
    assert body["key_cache"]["kind"] == "embedded" and body["key_cache"]["ok"]
    assert body["data_dir_writable"] is True
    assert body["disk_free_bytes"] > 0 and body["disk_min_free_bytes"] == 1024**3
    assert body["consumer_lag_seconds"] == 0.0 and body["files_waiting"] == 0
    assert body["last_commit"] and 0 <= body["seconds_since_last_commit"] < 600
    assert body["consumers"] == []
    # No API key configured, none presented: no path in the detail either.
    assert body["data_dir"] is None
    assert client.get("/health").json()["checked_at"] == body["checked_at"]  # cached


def test_health_is_503_with_reasons(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    layout = Layout(settings.data_dir)
    layout.incoming.mkdir(parents=True)
    old = layout.incoming / "000000000000001-x-000000001.arrow"
    old.write_bytes(b"")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    with TestClient(create_app(settings)) as c:
        response = c.get("/health")
        detail = c.get("/health/detail").json()
    assert response.status_code == 503
    assert response.json()["reasons"] == ["key_cache_missing", "consumer_lag"]
    assert str(tmp_path) not in response.text
    messages = " | ".join(detail["messages"])
    assert "no consumer has run" in messages
    assert "consumer lag" in messages and "waited 36" in messages


def test_health_pings_redis(tmp_path: Path, redis_url: str) -> None:
    with TestClient(create_app(make_settings(tmp_path, redis_url=redis_url))) as c:
        body = c.get("/health/detail").json()
    assert body["key_cache"] == {
        "kind": "redis",
        "ok": True,
        "detail": "Redis answered PING",
        "consumer_running": None,
        "error": None,
    }
    dead = make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(dead)) as c:
        response = c.get("/health")
        detail = c.get("/health/detail").json()
    assert response.status_code == 503
    assert response.json()["reasons"] == ["key_cache_unavailable"]
    assert "127.0.0.1" not in response.text
    assert detail["messages"] == ["key cache: Redis did not answer PING"]
    assert detail["key_cache"]["error"] is None  # no key presented: the error text is withheld
    assert "127.0.0.1" not in str(detail)


# -- /metrics ---------------------------------------------------------------------------------
def test_metrics_exposition(client: TestClient[Litestar]) -> None:
    client.get("/ad_events/latest")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = set(response.text.splitlines())
    for line in [
        "adevents_events_in_total 10.0",
        "adevents_events_accepted_total 8.0",
        "adevents_events_duplicates_total 1.0",
        'adevents_events_quarantined_total{reason="invalid_country"} 1.0',
        'adevents_events_quarantined_total{reason="late_event"} 0.0',
        'adevents_batches_total{status="ok"} 2.0',
        'adevents_batch_processing_seconds_bucket{le="+Inf"} 2.0',
        "adevents_batch_processing_seconds_count 2.0",
        "adevents_consumer_lag_seconds 0.0",
        "adevents_spool_files_waiting 0.0",
    ]:
        assert line in lines, line
    assert any(x.startswith('adevents_key_cache_bytes{cache="embedded"} ') for x in lines)
    assert any(
        x.startswith("adevents_api_request_duration_seconds_count{")
        and 'route="/ad_events/latest"' in x
        and 'status="200"' in x
        for x in lines
    )


# -- /docs -----------------------------------------------------------------------------------
def test_openapi_schema_and_ui(client: TestClient[Litestar]) -> None:
    schema = ok(client, "/docs/openapi.json")
    paths = schema["paths"]
    for path in [
        "/health",
        "/ad_events/latest",
        "/ad_events/by_campaign/{campaign_id}",
        "/campaigns/{campaign_id}/stats",
        "/campaigns/top",
        "/metrics",
    ]:
        assert path in paths, path
    latest = paths["/ad_events/latest"]["get"]["responses"]["200"]["content"]["application/json"]
    assert latest["schema"]["$ref"].endswith("/LatestEvents")
    assert "AdEvent" in schema["components"]["schemas"]
    limit = next(p for p in paths["/ad_events/latest"]["get"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)
    assert "/alerts" in paths
    alerts = paths["/alerts"]["get"]["parameters"]
    assert {p["name"] for p in alerts} == {"open", "limit"}


def test_docs_load_nothing_from_the_internet(client: TestClient[Litestar]) -> None:
    """/docs is Swagger UI whose every script, style and icon this server serves itself."""
    ui = client.get("/docs")
    assert ui.status_code == 200 and "SwaggerUIBundle(" in ui.text
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", ui.text)
    assert len(urls) == 4, urls
    assert not [u for u in urls if not u.startswith("/") or u.startswith("//")]
    assert not re.search(r"https?://", ui.text.split("spec:")[0])  # nothing remote in <head>
    kinds = {}
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert "immutable" in asset.headers["cache-control"]
        kinds[url.split("?")[0].rsplit(".", 1)[1]] = (asset.headers["content-type"], asset.content)
    assert kinds["js"][0].startswith("text/javascript") and b"SwaggerUI" in kinds["js"][1]
    assert kinds["css"][0].startswith("text/css") and b".swagger-ui" in kinds["css"][1]
    assert kinds["png"][1].startswith(b"\x89PNG")
    assert client.get("/docs/assets/swagger-ui.js.map").status_code == 404
    assert client.get("/docs/assets/..%2Fcore.py").status_code == 404


def test_dashboard_is_served(client: TestClient[Litestar]) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="chart-throughput"' in page.text and 'id="top-campaigns"' in page.text
    assert "Alpha &lt;launch&gt;" in page.text and "<launch>" not in page.text
    panel = client.get("/dashboard/panel")
    assert panel.status_code == 200 and "<html" not in panel.text


# -- schemathesis ------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(lake_settings: Settings, tmp_path: Path) -> None:
    """Every operation fuzzed from /docs/openapi.json against a running server (valid and invalid
    input): never a 5xx, always a documented status and response shape."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    with running_server(lake_settings.data_dir, tmp_path / "server.log") as url:
        schema = schemathesis.openapi.from_url(f"{url}/docs/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        # The read side: GETs (writes such as HTTP ingest have tests of their own).
        operations = [op for op in operations if op.method.upper() == "GET"]
        assert {op.path for op in operations} >= {
            "/health",
            "/ad_events/latest",
            "/ad_events/by_campaign/{campaign_id}",
            "/campaigns/{campaign_id}/stats",
            "/campaigns/top",
            "/alerts",
            "/metrics",
        }
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=40,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: Any) -> None:
                case.call_and_validate(base_url=url, checks=checks)

            fuzz()
