"""Issue 14 on the API side: hostile bodies, input limits, request ids, no internals in answers,
disk pressure, consumer retry state in /health and /metrics, and a bounded fuzz run.

Real uvicorn processes where the behaviour lives in the server (decoding, limits, disk); the
test client where a fault has to be injected. Hypothesis runs with bounded example counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient
from pyarrow import ipc

from api.app import create_app
from api.ingest_testing import Server, arrow_body, body_of, json_rows, running, start_server
from lake.location import LakeLocation
from lake.snapshot import connect
from pipeline.decode import (
    ARROW_FILE,
    ARROW_STREAM,
    JSON,
    NDJSON,
    BodyError,
    TooManyEventsError,
    check,
    decode,
)
from pipeline.json_depth import nesting_depth, too_deep
from pipeline.schema import (
    EVENT_COLUMNS,
    MAX_EVENT_ID_BYTES,
    MAX_ID_BYTES,
    Layout,
)
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter
from pipeline.status import ConsumerStatus, write_status
from pipeline.testing import consume_once, event_table

KEY = "hardening-key-1"
NOW_MS = int(time.time() * 1000)
MAX_DEPTH = 16
MAX_EVENTS = 50
HERE = Path(__file__).resolve().parent.parent


def sample(n: int, prefix: str = "h") -> pa.Table:
    return event_table([f"{prefix}{i}" for i in range(n)], time_ms=NOW_MS - 1000)


def base_event(event_id: str = "e1") -> dict[str, Any]:
    row = json_rows(sample(1))[0]
    row["event_id"] = event_id
    return row


def http(
    url: str,
    body: bytes | None = None,
    media: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers in lower case, JSON body or text) of one request."""
    all_headers = dict(headers or {})
    if media is not None:
        all_headers["Content-Type"] = media
    request = urllib.request.Request(url, data=body, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, h, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        status, h, raw = exc.code, dict(exc.headers), exc.read()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, {k.lower(): v for k, v in h.items()}, parsed


def post(
    server: Server, body: bytes, media: str, **headers: str
) -> tuple[int, dict[str, str], Any]:
    return http(f"{server.url}/ad_events", body, media, {"X-API-Key": KEY, **headers})


def nested(depth: int, kind: str = "list") -> Any:
    """A JSON value nested ``depth`` levels deep (0: a scalar)."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


def deep_text(depth: int) -> str:
    """The JSON text of ``depth`` nested arrays, built without recursing."""
    return "[" * depth + "]" * depth


def body_with(field: str, value_json: str, media: str) -> bytes:
    """One event whose ``field`` holds the JSON text ``value_json``."""
    event = json.dumps({k: v for k, v in base_event().items() if k != field})
    line = event[:-1] + f', "{field}": {value_json}}}'
    return (line + "\n" if media == NDJSON else f"[{line}]").encode()


def spooled(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "incoming").glob("*.arrow"))


# -- a real server, shared by the module -----------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("hardening-data")
    log = tmp_path_factory.mktemp("hardening-log") / "server.log"
    env = {
        "INGEST_API_KEYS": KEY,
        "INGEST_MAX_JSON_DEPTH": str(MAX_DEPTH),
        "INGEST_MAX_EVENTS_PER_REQUEST": str(MAX_EVENTS),
        "DISK_MIN_FREE": "0",
        "BATCH_INTERVAL": "5ms",
    }
    with running(str(data), log, env) as s:
        yield s
    text = log.read_text()
    # Whatever the tests sent, the server never hit a recursion limit or an unhandled error.
    assert "RecursionError" not in text and "Traceback" not in text, text[-3000:]


# -- JSON nesting depth ----------------------------------------------------------------------------
@pytest.mark.parametrize("media", [JSON, NDJSON])
@pytest.mark.parametrize("field", [*EVENT_COLUMNS, "unknown_key"])
def test_deep_json_in_any_field_is_a_400_not_a_500(server: Server, field: str, media: str) -> None:
    """Issue 14 item 3: ~1,000 levels inside a field gave a RecursionError and a 500."""
    for depth in (1_000, 200_000):
        status, headers, body = post(server, body_with(field, deep_text(depth), media), media)
        assert status == 400, (depth, body)
        assert "INGEST_MAX_JSON_DEPTH" in body["detail"]
        assert body["request_id"] == headers["x-request-id"]


def test_deep_json_as_the_whole_body_is_a_400(server: Server) -> None:
    for media in (JSON, NDJSON):
        for text in (deep_text(100_000), "{" * 100_000, '{"a":' * 50_000):
            status, _, body = post(server, text.encode(), media)
            assert status == 400, body
    # An NDJSON line too deep is named.
    lines = json.dumps(base_event()) + "\n" + json.dumps({**base_event("e2"), "x": nested(40)})
    status, _, body = post(server, lines.encode(), NDJSON)
    assert status == 400 and body["detail"].startswith("line 2 ")


@pytest.mark.parametrize("media", [JSON, NDJSON])
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_the_depth_limit_counts_the_event_object_as_level_one(
    server: Server, media: str, kind: str
) -> None:
    """INGEST_MAX_JSON_DEPTH=16: a value nested 15 levels inside an event is taken, 16 is not,
    in a JSON array and in NDJSON alike."""
    ok = body_with("user_id", json.dumps(nested(MAX_DEPTH - 1, kind)), media)
    status, _, body = post(server, ok, media)
    assert status == 202 and body["accepted"] == 1, body
    deep = body_with("user_id", json.dumps(nested(MAX_DEPTH, kind)), media)
    status, _, body = post(server, deep, media)
    assert status == 400 and "INGEST_MAX_JSON_DEPTH" in body["detail"], body


# -- events per request ----------------------------------------------------------------------------
def _arrow_file(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("media", [JSON, NDJSON, ARROW_STREAM, ARROW_FILE])
def test_more_events_than_the_limit_is_a_413(server: Server, media: str) -> None:
    def body(n: int) -> bytes:
        table = sample(n, prefix=f"lim-{media[-4:]}-{n}-")
        return _arrow_file(table) if media == ARROW_FILE else body_of(table, media)

    status, _, answer = post(server, body(MAX_EVENTS), media)
    assert status == 202 and answer["accepted"] == MAX_EVENTS, answer
    status, headers, answer = post(server, body(MAX_EVENTS + 1), media)
    assert status == 413, answer
    assert f"at most {MAX_EVENTS}" in answer["detail"]
    assert "INGEST_MAX_EVENTS_PER_REQUEST" in answer["detail"]
    assert answer["request_id"] == headers["x-request-id"]


# -- string lengths --------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["campaign_id", "ad_id", "publisher_id", "user_id"])
def test_a_150kb_id_is_quarantined_as_field_too_long(server: Server, field: str) -> None:
    """Issue 14: a 150 KB campaign_id was accepted."""
    rows = [
        {**base_event(f"{field}-ok"), field: "x" * MAX_ID_BYTES},
        {**base_event(f"{field}-long"), field: "x" * 150_000},
        {**base_event(f"{field}-utf8"), field: "é" * (MAX_ID_BYTES // 2 + 1)},
    ]
    status, _, answer = post(server, json.dumps(rows).encode(), JSON)
    assert status == 202, answer
    assert answer["accepted"] == 1
    assert answer["rejected"] == [
        {"index": 1, "reason": "field_too_long"},
        {"index": 2, "reason": "field_too_long"},
    ]


def test_a_long_event_id_keeps_its_own_reason(server: Server) -> None:
    rows = [{**base_event("i" * (MAX_EVENT_ID_BYTES + 1)), "campaign_id": "c" * 1000}]
    status, _, answer = post(server, json.dumps(rows).encode(), JSON)
    assert status == 202 and answer["rejected"] == [{"index": 0, "reason": "invalid_event_id"}]


def test_spool_files_with_long_ids_are_quarantined_by_the_consumer(tmp_path: Path) -> None:
    """The limit is the contract's, so it holds for every producer, not only the HTTP ingest."""
    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false", max_events_per_second=0)
    table = event_table(
        ["ok", "long-campaign", "long-user"],
        time_ms=NOW_MS - 1000,
        campaign_id=["c", "c" * 150_000, "c"],
        user_id=["u", "u", "u" * (MAX_ID_BYTES + 1)],
    )
    SpoolWriter(Layout(settings.data_dir).incoming, "gen").write(table)
    consume_once(settings)
    con = connect(LakeLocation.from_settings(settings))
    assert con.execute("SELECT event_id, reason FROM quarantine ORDER BY 1").fetchall() == [
        ("long-campaign", "field_too_long"),
        ("long-user", "field_too_long"),
    ]
    ledger = con.execute("SELECT quarantined_field_too_long, accepted FROM ledger").fetchall()
    assert ledger == [(2, 1)]


# -- MAX_BACKLOG_EVENTS: soft by at most one request ----------------------------------------------
def test_concurrent_requests_overshoot_the_backlog_by_at_most_one_request(tmp_path: Path) -> None:
    """Five requests of 40 events arrive together with MAX_BACKLOG_EVENTS=50, all past the
    route's early check: the check made when their rows are counted lets two through (0 and 40
    waiting, both under 50) and refuses the rest, so the backlog ends at 80, not 200."""
    from api.ingest import BacklogFullError, Ingestor
    from pipeline.settings import IngestSettings

    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false", batch_interval="5ms")
    ingestor = Ingestor(settings, IngestSettings.from_env({}, max_backlog_events="50"))

    async def run() -> list[object]:
        await ingestor.start()
        try:
            bodies = [body_of(sample(40, prefix=f"b{i}-"), JSON) for i in range(5)]
            return await asyncio.gather(
                *(ingestor.take(b, JSON) for b in bodies), return_exceptions=True
            )
        finally:
            await ingestor.close()

    outcomes = asyncio.run(run())
    assert [type(o).__name__ for o in outcomes] == ["IngestResult"] * 2 + [
        BacklogFullError.__name__
    ] * 3
    assert ingestor.backlog_events() == 80


def test_a_400_quotes_the_decoder_briefly_and_without_source_paths() -> None:
    from pipeline.decode import _quoted

    wide = pa.table({f"col{i:05d}": [1] for i in range(5_000)})
    with pytest.raises(BodyError) as caught:
        decode(arrow_body(wide), ARROW_STREAM)
    assert "are missing" in str(caught.value) and len(str(caught.value)) <= 300
    cpp = ValueError("Invalid: /arrow/cpp/src/arrow/ipc/reader.cc:123  bad message\nmore")
    assert _quoted(cpp) == "Invalid: bad message"


# -- request ids and error bodies ------------------------------------------------------------------
def test_every_response_carries_a_request_id(server: Server) -> None:
    answers = [
        http(f"{server.url}/health"),
        http(f"{server.url}/no/such/path"),
        http(f"{server.url}/ad_events", b"[]", JSON),  # no key: 401
        post(server, b"[1,", JSON),
        post(server, b"[]", JSON),
    ]
    assert [a[0] for a in answers] == [503, 404, 401, 400, 202]
    ids = [a[1]["x-request-id"] for a in answers]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
    for status, headers, body in answers[1:4]:
        assert body["request_id"] == headers["x-request-id"], status


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("4bf92f3577b34da6a3ce929d0e0e4736", True),
        ("req-2026.12.02:42_a", True),
        ("has space", False),
        ("x" * 200, False),
        ("<script>", False),
        ("", False),
    ],
)
def test_a_sane_client_request_id_is_echoed(server: Server, sent: str, echoed: bool) -> None:
    status, headers, body = post(server, b"nope", JSON, **{"X-Request-ID": sent})
    assert status == 400
    assert (headers["x-request-id"] == sent) is echoed
    assert body["request_id"] == headers["x-request-id"]


def test_an_unexpected_exception_is_logged_with_its_id_and_the_client_gets_only_the_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from api.ingest import Ingestor

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail at /srv/data/state from redis://10.0.0.7:6379")

    async def broken_async(*args: object, **kwargs: object) -> None:
        broken()

    monkeypatch.setattr(Ingestor, "take", broken_async)
    monkeypatch.setattr("queries.events.count", broken)
    settings = Settings.from_env({}, data_dir=str(tmp_path), ingest_api_keys=KEY)
    # The app's logging set-up may replace the root logger's handlers: listen on ours.
    logger = logging.getLogger("adevents.api")
    logger.addHandler(caplog.handler)
    with TestClient(create_app(settings)) as c:
        logger.addHandler(caplog.handler)
        answers = [
            c.post("/ad_events", content=b"[]", headers={"X-API-Key": KEY, "Content-Type": JSON}),
            c.get("/ad_events/latest"),
        ]
    for r in answers:
        assert r.status_code == 500
        body = r.json()
        rid = r.headers["x-request-id"]
        assert body == {
            "status_code": 500,
            "detail": f"internal error: the request was not completed; give the operator "
            f"request id {rid}",
            "request_id": rid,
        }
        logger.removeHandler(caplog.handler)
        logged = [rec for rec in caplog.records if rid in rec.getMessage()]
        assert logged and logged[0].exc_info is not None
        assert "secret detail" in str(logged[0].exc_info[1])


def test_a_framework_500_is_as_generic_as_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from litestar.exceptions import InternalServerException

    def broken(*args: object, **kwargs: object) -> None:
        raise InternalServerException("dependency failed reading /srv/data/state/x.json")

    monkeypatch.setattr("queries.events.count", broken)
    with TestClient(create_app(Settings.from_env({}, data_dir=str(tmp_path)))) as c:
        r = c.get("/ad_events/latest")
    assert r.status_code == 500 and "/srv" not in r.text
    assert r.json()["detail"].startswith("internal error")


# -- /health: public part, detail behind a key -----------------------------------------------------
def test_health_shows_no_internals_and_its_detail_needs_a_read_key(tmp_path: Path) -> None:
    """Issue 14 item 7: /health showed DATA_DIR and Redis host:port with read keys required."""
    data = tmp_path / "data"
    env = {
        "INGEST_API_KEYS": KEY,
        "API_KEYS_REQUIRED_FOR_READ": "true",
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    with running(str(data), tmp_path / "server.log", env) as s:
        status, _, public = http(f"{s.url}/health")
        denied = http(f"{s.url}/health/detail")
        allowed = http(f"{s.url}/health/detail", headers={"X-API-Key": KEY})
        page = http(f"{s.url}/", headers={"X-API-Key": KEY})
    assert status == 503
    assert set(public) == {"status", "reasons", "checked_at"}
    assert "key_cache_unavailable" in public["reasons"]
    for internal in (str(data), "127.0.0.1", "Connection refused"):
        assert internal not in json.dumps(public)
    assert denied[0] == 401 and denied[2]["request_id"] == denied[1]["x-request-id"]
    assert allowed[0] == 503
    detail = allowed[2]
    assert detail["data_dir"] == str(data.resolve())
    assert "127.0.0.1:1" in detail["key_cache"]["error"]
    assert page[0] == 200 and str(data) not in page[2]  # the dashboard header: no DATA_DIR


def test_open_reads_get_the_detail_without_internals_unless_a_key_is_sent(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path / "d"), ingest_api_keys=KEY, redis_url="redis://127.0.0.1:1/0"
    )
    with TestClient(create_app(settings)) as c:
        anonymous = c.get("/health/detail").json()
        keyed = c.get("/health/detail", headers={"Authorization": f"Bearer {KEY}"}).json()
        page = c.get("/").text
    assert anonymous["data_dir"] is None and anonymous["key_cache"]["error"] is None
    assert "127.0.0.1" not in json.dumps(anonymous)
    assert keyed["data_dir"] and "127.0.0.1:1" in keyed["key_cache"]["error"]
    assert str(tmp_path) not in page


# -- consumers retrying a transient fault ----------------------------------------------------------
def test_a_retrying_consumer_shows_in_health_and_metrics(tmp_path: Path) -> None:
    settings = Settings.from_env({}, data_dir=str(tmp_path))
    state = Layout(settings.data_dir).state
    now = time.time()
    write_status(state, ConsumerStatus("c-ok", 1, "running", since=now - 60, updated_at=now))
    write_status(
        state,
        ConsumerStatus(
            "c-redis",
            2,
            "retrying",
            fault="redis_unavailable",
            detail="Error 111 connecting to 10.0.0.7:6379",
            since=now - 42,
            attempts=5,
            next_retry_at=now + 2,
            updated_at=now,
        ),
    )
    # A consumer that stopped reporting a minute ago while retrying: gone, not retrying.
    write_status(
        state,
        ConsumerStatus(
            "c-gone", 3, "retrying", fault="disk_full", since=now - 600, updated_at=now - 60
        ),
    )
    with TestClient(create_app(settings)) as c:
        public = c.get("/health")
        detail = c.get("/health/detail").json()
        metrics = set(c.get("/metrics").text.splitlines())
    assert public.status_code == 503
    assert "consumer_retrying:redis_unavailable" in public.json()["reasons"]
    assert "consumer_retrying:disk_full" not in public.json()["reasons"]
    by_name = {x["name"]: x for x in detail["consumers"]}
    assert by_name["c-redis"]["state"] == "retrying" and by_name["c-redis"]["attempts"] == 5
    assert by_name["c-redis"]["detail"] is None  # no key: the fault's own words are withheld
    assert by_name["c-gone"]["state"] == "stale" and by_name["c-gone"]["fault"] is None
    assert by_name["c-ok"]["state"] == "running"
    assert any("retrying a transient fault, redis_unavailable" in m for m in detail["messages"])
    for line in [
        'adevents_consumer_retrying{consumer="c-redis",fault="redis_unavailable"} 1.0',
        'adevents_consumer_retrying{consumer="c-redis",fault="disk_full"} 0.0',
        'adevents_consumer_retrying{consumer="c-gone",fault="disk_full"} 0.0',
        'adevents_consumer_retrying{consumer="c-ok",fault="redis_unavailable"} 0.0',
        'adevents_consumer_running{consumer="c-ok"} 1.0',
        'adevents_consumer_running{consumer="c-redis"} 1.0',
        'adevents_consumer_running{consumer="c-gone"} 0.0',
        'adevents_consumer_retry_attempts{consumer="c-redis"} 5.0',
        'adevents_consumer_fault_seconds{consumer="c-ok",fault="redis_unavailable"} 0.0',
    ]:
        assert line in metrics, line
    seconds = next(
        m
        for m in metrics
        if m.startswith('adevents_consumer_fault_seconds{consumer="c-redis",fault="redis_un')
    )
    assert float(seconds.rsplit(" ", 1)[1]) >= 42
    free = next(m for m in metrics if m.startswith("adevents_disk_free_bytes "))
    assert float(free.rsplit(" ", 1)[1]) > 0


def _metric(url: str, prefix: str) -> float | None:
    text = http(f"{url}/metrics")[2]
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_real_consumer_waiting_for_redis_shows_in_health_and_metrics(
    tmp_path: Path, redis_server: Any
) -> None:
    """A real ``adevents consume`` on a private Redis that is stopped: while the consumer waits,
    /health is 503 with ``consumer_retrying:redis_unavailable`` and /metrics says which consumer
    and how long; once Redis is back and the consumer has recovered, both clear."""
    data = tmp_path / "data"
    env = {
        **os.environ,
        "DATA_DIR": str(data),
        "REDIS_URL": redis_server.url,
        "REDIS_KEY_PREFIX": f"hard{os.getpid()}",
        "CONSUMER_NAME": "c1",
        "FSYNC": "false",
        "DISK_MIN_FREE": "0",
        "RETRY_MAX_DELAY": "200ms",
        "LOG_LEVEL": "WARNING",
    }
    consumer_log = open(tmp_path / "consumer.log", "wb")  # noqa: SIM115 - closed below
    consumer = subprocess.Popen(
        [sys.executable, "-m", "cli", "consume"],
        env=env,
        stdout=consumer_log,
        stderr=subprocess.STDOUT,
    )
    api_env = {"REDIS_URL": redis_server.url, "DISK_MIN_FREE": "0"}
    try:
        with running(str(data), tmp_path / "server.log", api_env) as s:

            def state() -> str | None:
                consumers = http(f"{s.url}/health/detail")[2]["consumers"]
                return consumers[0]["state"] if consumers else None

            _wait_for(lambda: state() == "running", "the consumer to report itself running")
            redis_server.stop()
            # Work that needs Redis: the consumer must claim these events' keys.
            SpoolWriter(Layout(str(data)).incoming, "gen").write(sample(10, "r-"))
            _wait_for(
                lambda: (
                    "consumer_retrying:redis_unavailable" in http(f"{s.url}/health")[2]["reasons"]
                ),
                "/health to show the consumer retrying",
            )
            status, _, public = http(f"{s.url}/health")
            assert status == 503 and "127.0.0.1" not in json.dumps(public)
            retrying = 'adevents_consumer_retrying{consumer="c1",fault="redis_unavailable"}'
            assert _metric(s.url, retrying) == 1.0
            redis_server.start()
            _wait_for(lambda: state() == "running", "the consumer to recover", timeout=60)
            _wait_for(
                lambda: (
                    not any(
                        r.startswith("consumer_retrying")
                        for r in http(f"{s.url}/health")[2]["reasons"]
                    )
                ),
                "/health to clear",
            )
            assert _metric(s.url, retrying) == 0.0
            assert consumer.poll() is None  # it rode the fault out
    finally:
        consumer.terminate()
        consumer.wait(timeout=30)
        consumer_log.close()


# -- disk pressure ---------------------------------------------------------------------------------
def test_below_disk_min_free_health_is_503_and_the_ingest_refuses_before_writing(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = {"INGEST_API_KEYS": KEY, "DISK_MIN_FREE": "99999999gib"}  # more than any disk
    with running(str(data), tmp_path / "server.log", env) as s:
        _, _, public = http(f"{s.url}/health")
        status, headers, body = post(s, body_of(sample(3), JSON), JSON)
        _, _, detail = http(f"{s.url}/health/detail")
    assert "disk_low" in public["reasons"]
    assert status == 503 and headers["retry-after"] == "1"
    assert "DISK_MIN_FREE" in body["detail"] and str(data) not in body["detail"]
    assert detail["disk_free_bytes"] > 0 and detail["data_dir_writable"] is True
    assert spooled(data) == []


def test_a_failed_spool_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of writing the Arrow file: 503, nothing acknowledged, no .tmp."""
    import pyarrow.ipc as pipc

    real = pipc.new_file

    class Failing:
        def __init__(self, sink: Any, schema: pa.Schema) -> None:
            self.inner = real(sink, schema)
            self.sink = sink

        def __enter__(self) -> Failing:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

        def write(self, table: pa.Table) -> None:
            self.sink.write(b"x" * 4096)  # something reached the disk before the failure
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipc, "new_file", Failing)
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path), ingest_api_keys=KEY, fsync="false", disk_min_free="0"
    )
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/ad_events",
            content=body_of(sample(3), JSON),
            headers={"X-API-Key": KEY, "Content-Type": JSON},
        )
    assert r.status_code == 503 and "disk is full" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"
    assert os.listdir(tmp_path / "incoming") == []


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /mnt",
        ],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_really_full_disk(tmp_path: Path) -> None:
    """DATA_DIR on a 4 MiB tmpfs of the server's own (a private mount namespace): the ingest
    refuses below DISK_MIN_FREE before the disk fills, a write that does not fit is a 503 that
    leaves no temporary file, /health tells the truth, and all recovers once space is back."""
    if not _unshare_works():
        if os.environ.get("CI") == "true":
            pytest.fail("unshare --user --mount is needed for the full-disk test")
        pytest.skip("unshare --user --mount is not permitted here (set CI=true to fail)")
    data = tmp_path / "data"
    data.mkdir()
    mount = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"',
        str(data),
    ]
    env = {
        "INGEST_API_KEYS": KEY,
        "DISK_MIN_FREE": "1mib",
        "BATCH_INTERVAL": "5ms",
        "INGEST_MAX_EVENTS_PER_REQUEST": "1000000",
    }
    s = start_server(str(data), tmp_path / "server.log", env, prefix=mount)
    try:
        # The server's view of DATA_DIR (its tmpfs), through /proc.
        inside = Path(f"/proc/{s.proc.pid}/root") / str(data).lstrip("/")
        assert shutil.disk_usage(inside).total <= 4 * 1024**2

        status, _, body = post(s, body_of(sample(10, "first-"), JSON), JSON)
        assert status == 202, body
        assert len(spooled(inside)) == 1

        # Bigger than the disk, with 3 MiB still free (above DISK_MIN_FREE): admitted, then
        # ENOSPC while writing.
        n = 20_000
        big = event_table(
            [f"big-{i}" for i in range(n)],
            time_ms=NOW_MS - 1000,
            user_id=[f"{i:0250d}" for i in range(n)],
        )
        status, headers, body = post(s, arrow_body(big), ARROW_STREAM)
        assert status == 503, body
        assert "disk is full" in body["detail"] and headers["retry-after"] == "1"
        assert str(data) not in json.dumps(body)
        names = os.listdir(inside / "incoming")
        assert [n for n in names if n.endswith(".tmp")] == [], names
        assert len(spooled(inside)) == 1  # what was acknowledged is still there, nothing else

        # Fill the disk to below DISK_MIN_FREE: refused before writing, and /health says so.
        filler = inside / "filler"
        free = shutil.disk_usage(inside).free
        filler.write_bytes(b"\0" * (free - 512 * 1024))
        _wait_for(lambda: post(s, b"[]", JSON)[0] == 503, "the ingest to refuse")
        status, headers, body = post(s, body_of(sample(1, "refused-"), JSON), JSON)
        assert status == 503 and "DISK_MIN_FREE" in body["detail"]
        _wait_for(lambda: "disk_low" in http(f"{s.url}/health")[2]["reasons"], "disk_low")

        # Fill it completely: DATA_DIR is no longer writable, and /health says that too.
        with open(filler, "ab") as fh, pytest.raises(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        _wait_for(
            lambda: "data_dir_not_writable" in http(f"{s.url}/health")[2]["reasons"],
            "data_dir_not_writable",
        )
        assert http(f"{s.url}/health/detail")[2]["data_dir_writable"] is False

        filler.unlink()
        _wait_for(lambda: post(s, b"[]", JSON)[0] == 202, "the ingest to take events again")
        status, _, body = post(s, body_of(sample(5, "after-"), JSON), JSON)
        assert status == 202 and body["accepted"] == 5
        assert len(spooled(inside)) == 2
    finally:
        s.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]


# -- property-based: nested and oversized JSON in every field --------------------------------------
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab"\\[]{}é😀\n\t/u'), max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.sampled_from('k"\\[]{'), max_size=4), children, max_size=4
        )
    ),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(value=JSON_VALUES, ascii_only=st.booleans(), spaced=st.booleans())
@settings(max_examples=300, deadline=None, database=None)
def test_the_depth_scan_agrees_with_a_parser(value: Any, ascii_only: bool, spaced: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=1 if spaced else None).encode()
    assert nesting_depth(text) == _depth(value)
    assert too_deep(text, _depth(value)) is False
    if _depth(value):
        assert too_deep(text, _depth(value) - 1) is True


#: The reason of a row whose field holds any string (None: valid), when its length does not
#: matter: the contract's first failing rule. A key outside the contract is ignored.
_STRING_REASON: dict[str, str | None] = {
    "event_type": "invalid_event_type",
    "event_time": "missing_field",  # not an RFC 3339 date-time: as good as missing
    "cost_micros": "invalid_money",
    "revenue_micros": "invalid_money",
    "country": "invalid_country",  # the strategies never make two upper-case letters
    "device_type": "invalid_device_type",
    "extra": None,
}
#: The reason of a row whose field holds a nested array or object (within the depth limit).
_NESTED_REASON: dict[str, str | None] = {
    **_STRING_REASON,
    "event_id": "invalid_event_id",
    "campaign_id": "missing_field",
    "ad_id": "missing_field",
    "publisher_id": "missing_field",
    "user_id": None,  # an optional column keeps the value's JSON text (short here)
}


def _reason_for_string(field: str, value: str) -> str | None:
    size = len(value.encode())
    if field == "event_id":
        return None if 1 <= size <= MAX_EVENT_ID_BYTES else "invalid_event_id"
    if field in ("campaign_id", "ad_id", "publisher_id", "user_id"):
        if size == 0 and field != "user_id":
            return "missing_field"
        return "field_too_long" if size > MAX_ID_BYTES else None
    return _STRING_REASON[field]


FIELDS = st.sampled_from([*EVENT_COLUMNS, "extra"])
MEDIA_JSON = st.sampled_from([JSON, NDJSON])
NESTED = st.tuples(st.just("nested"), st.integers(1, 3_000), st.sampled_from(["list", "dict"]))
LONG = st.tuples(
    st.just("long"), st.integers(0, 200_000), st.sampled_from(["a", "é", "😀", "]", '"', "\\"])
)


def _body(field: str, shape: tuple[str, int, str], media: str) -> bytes:
    kind, size, how = shape
    if kind == "nested":
        opener, closer = ("[", "]") if how == "list" else ('{"k":', "}")
        value_json = opener * size + "1" + closer * size
    else:
        value_json = json.dumps(how * size)
    return body_with(field, value_json, media)


@given(field=FIELDS, shape=st.one_of(NESTED, LONG), media=MEDIA_JSON)
@settings(max_examples=150, deadline=None, database=None)
def test_any_nesting_or_length_in_any_field_is_a_400_or_a_row_reason(
    field: str, shape: tuple[str, int, str], media: str
) -> None:
    """Pure decoders: a value nested deeper than the limit is a BodyError naming the setting;
    anything else decodes, and the row gets exactly the contract's reason."""
    body = _body(field, shape, media)
    kind, size, how = shape
    if kind == "nested" and size > MAX_DEPTH - 1:
        with pytest.raises(BodyError, match="INGEST_MAX_JSON_DEPTH"):
            decode(body, media, max_depth=MAX_DEPTH)
        return
    checked = check(decode(body, media, max_depth=MAX_DEPTH), now_ms=NOW_MS)
    expected = _NESTED_REASON[field] if kind == "nested" else _reason_for_string(field, how * size)
    assert checked.rejections == ([] if expected is None else [(0, expected)])


@given(field=FIELDS, shape=st.one_of(NESTED, LONG), media=MEDIA_JSON)
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_the_server_answers_nested_or_long_values_with_400_or_202(
    server: Server, field: str, shape: tuple[str, int, str], media: str
) -> None:
    status, headers, body = post(server, _body(field, shape, media), media)
    kind, size, _ = shape
    assert status == (400 if kind == "nested" and size > MAX_DEPTH - 1 else 202), body
    assert headers["x-request-id"]


@given(count=st.integers(1, 120), media=st.sampled_from([JSON, NDJSON, ARROW_STREAM]))
@settings(max_examples=40, deadline=None, database=None)
def test_events_per_request_limit_is_exact(count: int, media: str) -> None:
    body = body_of(sample(count), media)
    if count > MAX_EVENTS:
        with pytest.raises(TooManyEventsError, match="INGEST_MAX_EVENTS_PER_REQUEST"):
            decode(body, media, max_events=MAX_EVENTS)
    else:
        assert decode(body, media, max_events=MAX_EVENTS).num_rows == count


# -- the depth scan does not slow the usual body down ----------------------------------------------
def test_the_usual_body_is_not_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat events with the contract's keys are taken by the exact decode, which cannot recurse:
    they pay no depth scan (measured: decode times the same before and after, see
    pipeline/json_depth.py). An unknown key or a value of another type is what makes it run."""
    import pipeline.decode as decoder

    scanned: list[int] = []

    def spy(text: bytes, limit: int) -> bool:
        scanned.append(len(text))
        return too_deep(text, limit)

    monkeypatch.setattr(decoder, "too_deep", spy)
    for media in (JSON, NDJSON):
        assert decode(body_of(sample(200), media), media).num_rows == 200
    assert scanned == []
    for field, value in [("extra", '"x"'), ("user_id", "[1]"), ("cost_micros", '"1"')]:
        assert decode(body_with(field, value, JSON), JSON).num_rows == 1
    assert len(scanned) == 3


# -- the fuzz target -------------------------------------------------------------------------------
def test_fuzzing_the_decoders_finds_no_crash(tmp_path: Path) -> None:
    """``fuzz/ingest_decoders.py`` under libFuzzer for a bounded number of runs from a seed
    corpus of one valid body per format: any exception but BodyError fails it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    table = sample(3)
    seeds = {
        "json": b"\x00" + body_of(table, JSON),
        "ndjson": b"\x01" + body_of(table, NDJSON),
        "stream": b"\x02" + arrow_body(table),
        "file": b"\x03" + _arrow_file(table),
        "deep": b"\x00[{" + b'"x":[' * 20 + b"]" * 20 + b"}]",
    }
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz" / "ingest_decoders.py"),
            str(corpus),
            "-runs=15000",
            "-max_total_time=15",
            f"-artifact_prefix={tmp_path}/",
            "-seed=1",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
