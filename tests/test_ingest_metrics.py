"""The ingest's Prometheus metrics: exact after a mix of answers, and true across API workers.

``adevents_ingest_requests_total{status}``, ``adevents_ingest_events_total{outcome,reason}`` and
the ``adevents_ingest_ack_seconds`` histogram, read through /metrics of the real app, and of a
real ``adevents serve --workers 2`` whose two processes both counted.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.ingest_metrics import (
    ACK_BUCKETS,
    INGEST_REASONS,
    IngestCollector,
    IngestMetrics,
    metrics_dir,
)
from api.ingest_testing import body_of, running, start_server
from api.testing import free_port
from pipeline.decode import JSON
from pipeline.schema import Layout
from pipeline.settings import Settings
from pipeline.testing import event_table

KEY = "metrics-key-0123456789"
NOW_MS = int(time.time() * 1000)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_by_status(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "adevents_ingest_requests_total"
    }


def events_by_outcome(samples: Samples) -> dict[tuple[str, str], float]:
    out = {}
    for (name, labels), v in samples.items():
        if name == "adevents_ingest_events_total":
            d = dict(labels)
            out[(d["outcome"], d["reason"])] = v
    return out


def ack(samples: Samples) -> tuple[dict[str, float], float, float]:
    """The ack histogram's cumulative buckets by ``le``, its count and its sum."""
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in samples.items()
        if name == "adevents_ingest_ack_seconds_bucket"
    }
    count = samples[("adevents_ingest_ack_seconds_count", frozenset())]
    total = samples[("adevents_ingest_ack_seconds_sum", frozenset())]
    return buckets, count, total


def settings_of(data_dir: Path, **overrides: Any) -> Settings:
    return Settings.from_env(
        {},
        data_dir=str(data_dir),
        fsync="false",
        batch_interval="10ms",
        ingest_api_keys=KEY,
        **overrides,
    )


def post(client: TestClient[Litestar], content: bytes, **headers: str) -> int:
    headers = {"content-type": JSON, "x-api-key": KEY, **headers}
    return client.post("/ad_events", content=content, headers=headers).status_code


def events_body(prefix: str, n: int, **columns: Any) -> bytes:
    ids = [f"{prefix}-{i}" for i in range(n)]
    return body_of(event_table(ids, time_ms=NOW_MS - 1000, **columns), JSON)


# -- in one process ------------------------------------------------------------------------------
def test_every_series_is_exposed_at_zero_before_any_request(tmp_path: Path) -> None:
    with TestClient(create_app(settings_of(tmp_path / "data"))) as client:
        samples = parse(client.get("/metrics").text)
    assert requests_by_status(samples) == {"202": 0.0}
    assert events_by_outcome(samples) == {
        ("accepted", ""): 0.0,
        **{("rejected", r): 0.0 for r in INGEST_REASONS},
    }
    buckets, count, total = ack(samples)
    assert set(buckets) == {*(str(b) for b in ACK_BUCKETS), "+Inf"}
    assert set(buckets.values()) == {0.0} and count == 0.0 and total == 0.0


def test_a_mix_of_good_bad_and_rejected_rows_is_counted_exactly(tmp_path: Path) -> None:
    settings = settings_of(tmp_path / "data", ingest_max_events_per_request=20)
    with TestClient(create_app(settings)) as client:
        statuses = [
            post(client, events_body("a", 5)),
            post(client, events_body("b", 5)),
            post(client, gzip.compress(events_body("c", 5)), **{"content-encoding": "gzip"}),
            # 2 accepted, 2 invalid_country, 1 invalid_event_type
            post(
                client,
                events_body(
                    "d",
                    5,
                    country=["FR", "france", "FR", "xx", "US"],
                    event_type=["click", "click", "impression", "click", "nope"],
                ),
            ),
            post(client, b"[{not json"),  # 400
            post(client, gzip.compress(b"[]")[:-6], **{"content-encoding": "gzip"}),  # 400
            post(client, events_body("e", 3), **{"x-api-key": "wrong"}),  # 401
            post(client, events_body("f", 21)),  # 413: too many events
            post(client, gzip.compress(bytes(64 * 1024**2)), **{"content-encoding": "gzip"}),
            post(client, b"[]", **{"content-encoding": "br"}),  # 415
            post(client, b"[]"),  # 202, no rows
        ]
        samples = parse(client.get("/metrics").text)
    assert statuses == [202, 202, 202, 202, 400, 400, 401, 413, 413, 415, 202]
    assert requests_by_status(samples) == {
        "202": 5.0,
        "400": 2.0,
        "401": 1.0,
        "413": 2.0,
        "415": 1.0,
    }
    counted = events_by_outcome(samples)
    assert counted[("accepted", "")] == 5 + 5 + 5 + 2
    assert counted[("rejected", "invalid_country")] == 2
    assert counted[("rejected", "invalid_event_type")] == 1
    others = {k: v for k, v in counted.items() if k[0] == "rejected"}
    assert sum(others.values()) == 3
    buckets, count, total = ack(samples)
    assert count == 5 and buckets["+Inf"] == 5 and total > 0
    ordered = [buckets[str(b)] for b in ACK_BUCKETS] + [buckets["+Inf"]]
    assert ordered == sorted(ordered)  # cumulative


def test_processes_take_separate_slots_and_a_restart_carries_on(tmp_path: Path) -> None:
    """Two writers (as two workers) never share a file; the next one to start takes a freed
    slot and its counts; the collector adds every file up."""
    directory = metrics_dir(Layout(str(tmp_path)))
    first, second = IngestMetrics(directory), IngestMetrics(directory)
    first.open()
    second.open()
    assert (first.slot, second.slot) == (0, 1)
    first.request(202)
    first.events(3, ["invalid_country"])
    first.acknowledged(0.02)
    second.request(202)
    second.request(400)
    second.acknowledged(3.0)
    second.acknowledged(60.0)
    first.close()
    third = IngestMetrics(directory)
    third.request(202)  # opens on first use
    assert third.slot == 0
    second.close()
    third.close()

    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(directory))
    samples = parse(generate_latest(registry).decode())
    assert requests_by_status(samples) == {"202": 3.0, "400": 1.0}
    assert events_by_outcome(samples)[("accepted", "")] == 3
    assert events_by_outcome(samples)[("rejected", "invalid_country")] == 1
    buckets, count, total = ack(samples)
    assert buckets["0.01"] == 0 and buckets["0.025"] == 1 and buckets["2.5"] == 1
    assert buckets["10.0"] == 2 and buckets["+Inf"] == 3 and count == 3
    assert total == pytest.approx(63.02)
    assert sorted(p.name for p in directory.glob("*.db")) == [
        "counter_0.db",
        "counter_1.db",
        "histogram_0.db",
        "histogram_1.db",
    ]


def test_a_data_dir_that_cannot_hold_them_drops_counts_not_requests(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    Layout(str(data_dir)).state.mkdir(parents=True)
    metrics_dir(Layout(str(data_dir))).write_text("a file where the directory should be")
    with TestClient(create_app(settings_of(data_dir))) as client:
        assert post(client, events_body("x", 2)) == 202
        samples = parse(client.get("/metrics").text)
    assert requests_by_status(samples) == {"202": 0.0}


# -- across the workers of a real server ---------------------------------------------------------
@contextmanager
def serve(data_dir: Path, log: Path, workers: int) -> Iterator[str]:
    """``adevents serve --workers N`` (uvicorn's worker processes); its URL once it answers."""
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "INGEST_API_KEYS": KEY,
        "FSYNC": "false",
        "LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "cli", "serve", "--workers", str(workers)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # a safety net; the loop ends when it answers
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except urllib.error.HTTPError:
                break  # it answered
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_post(url: str, content: bytes) -> int:
    req = urllib.request.Request(
        f"{url}/ad_events",
        data=content,
        method="POST",
        headers={"content-type": JSON, "x-api-key": KEY},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def scrape(url: str) -> Samples:
    # A new connection each time, so scrapes reach whichever worker accepts it.
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        return parse(r.read().decode())


def accepted_per_slot(directory: Path) -> dict[str, float]:
    """Accepted events each slot's file holds (which worker counted what)."""
    out = {}
    for f in sorted(directory.glob("counter_*.db")):
        merged = MultiProcessCollector.merge([str(f)], accumulate=True)  # type: ignore[no-untyped-call]
        out[f.name] = sum(
            s.value
            for m in merged
            for s in m.samples
            if s.name == "adevents_ingest_events_total" and s.labels["outcome"] == "accepted"
        )
    return out


def test_a_server_killed_with_sigkill_loses_no_count(tmp_path: Path) -> None:
    """Counts are in the mapped files as soon as they are made: kill -9 keeps them, and the
    next server takes the freed slot and carries on."""
    data_dir = str(tmp_path / "data")
    env = {"INGEST_API_KEYS": KEY, "FSYNC": "false"}
    server = start_server(data_dir, tmp_path / "server.log", env)
    try:
        for i in range(5):
            assert http_post(server.url, events_body(f"k{i}", 3)) == 202
    finally:
        server.kill()
    with running(data_dir, tmp_path / "server.log", env) as again:
        samples = scrape(again.url)
        assert requests_by_status(samples)["202"] == 5
        assert events_by_outcome(samples)[("accepted", "")] == 15
        assert http_post(again.url, events_body("k5", 1)) == 202
        assert requests_by_status(scrape(again.url))["202"] == 6
    assert [p.name for p in metrics_dir(Layout(data_dir)).glob("counter_*.db")] == ["counter_0.db"]


def test_every_worker_answers_the_totals_of_all_and_a_restart_keeps_them(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    directory = metrics_dir(Layout(str(data_dir)))
    sent = 0
    with serve(data_dir, tmp_path / "serve.log", workers=2) as url:
        # Until both workers have taken requests (each connection goes to one of them).
        while len([n for n in accepted_per_slot(directory).values() if n > 0]) < 2:
            assert sent < 500, accepted_per_slot(directory)
            assert http_post(url, events_body(f"w{sent}", 2)) == 202
            sent += 1
        assert sum(accepted_per_slot(directory).values()) == 2 * sent
        for _ in range(20):
            samples = scrape(url)
            assert requests_by_status(samples)["202"] == sent
            assert events_by_outcome(samples)[("accepted", "")] == 2 * sent
            assert ack(samples)[1] == sent
    # A new server (new processes) carries on from the files: nothing resets.
    with serve(data_dir, tmp_path / "serve.log", workers=2) as url:
        assert requests_by_status(scrape(url))["202"] == sent
        assert http_post(url, events_body("after", 2)) == 202
        samples = scrape(url)
        assert requests_by_status(samples)["202"] == sent + 1
        assert events_by_outcome(samples)[("accepted", "")] == 2 * (sent + 1)
    assert len(list(directory.glob("counter_*.db"))) == 2
