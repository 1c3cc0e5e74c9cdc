"""POST /ad_events with INGEST_SINK=kafka against librdkafka's mock cluster (the real protocol over
TCP): 202 only once the topic holds the request's rows, accepted and rejected; 503 without
internals when the brokers do not answer; no spool, no backlog guard."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client.core import Metric
from pyarrow import ipc

from api.ingest import Ingestor, IngestPlugin
from api.ingest_metrics import EVENTS, REQUESTS, IngestCollector, metrics_dir
from api.ingest_spool import REJECTED_SCHEMA
from api.ingest_testing import body_of, read_topic
from api.testing import free_port
from pipeline.decode import ARROW_STREAM, JSON
from pipeline.kafka import ARROW_STREAM as MESSAGE_ARROW
from pipeline.kafka import CONTENT_TYPE, KIND, REJECTED, header
from pipeline.kafka_testing import MockCluster
from pipeline.schema import Layout
from pipeline.settings import IngestSettings, Settings, SettingsError
from pipeline.spool import ARRIVED_AT_KEY, SpoolWriter
from pipeline.testing import event_table

KEY = "test-key-0123456789"
NOW_MS = 1_795_000_000_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[MockCluster]:
    with MockCluster() as c:
        yield c


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic of this test's own (the mock creates it on first use)."""
    return f"ingest-{request.node.name}".replace("[", "-").replace("]", "")


@pytest.fixture
def settings(cluster: MockCluster, topic: str, tmp_path: Path) -> Callable[..., Settings]:
    def factory(bootstrap: str | None = None, **overrides: str) -> Settings:
        overrides.setdefault("batch_interval", "10ms")
        return Settings.from_env(
            {},
            data_dir=str(tmp_path / "data"),
            kafka_bootstrap_servers=bootstrap or cluster.bootstrap,
            kafka_topic=topic,
            **overrides,
        )

    return factory


def ingest(**values: str) -> IngestSettings:
    return IngestSettings.from_env({}, ingest_api_keys=KEY, ingest_sink="kafka", **values)


def post(client: TestClient[Litestar], body: bytes, media: str) -> Any:
    return client.post(
        "/ad_events", content=body, headers={"content-type": media, "x-api-key": KEY}
    )


def mixed() -> tuple[pa.Table, list[tuple[int, str]]]:
    """Valid rows around three rejected ones, each with its reason."""
    table = event_table(
        ["ok-1", "bad-type", "ok-2", "bad-money", "bad-country", "ok-3"],
        time_ms=NOW_MS,
        event_type=["click", "view", "click", "click", "click", "impression"],
        cost_micros=[1, 1, 1, -5, 1, 1],
        country=["US", "US", "DE", "US", "usa", "FR"],
    )
    return table, [(1, "invalid_event_type"), (3, "invalid_money"), (4, "invalid_country")]


def accepted_and_rejected(cluster: MockCluster, topic: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The topic's rows: accepted micro-batches, and rejected ones (in REJECTED_SCHEMA)."""
    accepted, rejected = [], []
    for m in read_topic(cluster.bootstrap, topic):
        assert header(m, CONTENT_TYPE) == MESSAGE_ARROW
        value = m.value()
        assert isinstance(value, bytes)
        table = ipc.open_stream(value).read_all()
        if header(m, KIND) == REJECTED:
            assert table.schema.equals(REJECTED_SCHEMA), table.schema
            assert table.schema.metadata[ARRIVED_AT_KEY].decode().isdecimal()
            rejected.append(table)
        else:
            assert header(m, KIND) is None
            accepted.append(table)
        assert m.key() == (table.column("event_id")[0].as_py() or "").encode()

    def frame(tables: list[pa.Table]) -> pl.DataFrame:
        out = pl.from_arrow(pa.concat_tables(tables)) if tables else pl.DataFrame()
        assert isinstance(out, pl.DataFrame)
        return out

    return frame(accepted), frame(rejected)


def counted(data_dir: Path) -> dict[str, dict[tuple[str, ...], float]]:
    """The ingest metrics' samples by metric name and label values."""
    families: list[Metric] = list(IngestCollector(metrics_dir(Layout(str(data_dir)))).collect())
    return {
        f.name: {
            tuple(s.labels.values()): s.value for s in f.samples if s.name == f.name + "_total"
        }
        for f in families
    }


@pytest.mark.parametrize("media", [JSON, ARROW_STREAM])
def test_202_once_the_topic_holds_the_accepted_and_rejected_rows(
    cluster: MockCluster,
    topic: str,
    settings: Callable[..., Settings],
    tmp_path: Path,
    media: str,
) -> None:
    table, reasons = mixed()
    app = Litestar(plugins=[IngestPlugin(settings(), ingest())])
    with TestClient(app) as client:
        r = post(client, body_of(table, media), media)
        assert r.status_code == 202, r.text
        assert r.json() == {
            "received": 6,
            "accepted": 3,
            "rejected": [{"index": i, "reason": why} for i, why in reasons],
        }
        # Read at once: the answer came after the brokers' acknowledgement.
        accepted, rejected = accepted_and_rejected(cluster, topic)
        assert accepted["event_id"].to_list() == ["ok-1", "ok-2", "ok-3"]
        assert accepted["country"].to_list() == ["US", "DE", "FR"]
        assert rejected["event_id"].to_list() == ["bad-type", "bad-money", "bad-country"]
        assert rejected["reason"].to_list() == [why for _, why in reasons]
        assert rejected["cost_micros"].to_list() == [1, -5, 1]  # the values as received
    data_dir = tmp_path / "data"
    assert not (data_dir / "incoming").exists()  # nothing spooled
    metrics = counted(data_dir)
    assert metrics[REQUESTS][("202",)] == 1
    assert metrics[EVENTS][("accepted", "")] == 3
    assert metrics[EVENTS][("rejected", "invalid_money")] == 1


def test_concurrent_requests_share_one_acknowledged_write(
    cluster: MockCluster, topic: str, settings: Callable[..., Settings]
) -> None:
    """Requests waiting together go out as one micro-batch; each is answered once all of it is
    acknowledged, and the topic holds every row."""
    # The micro-batch closes when all 24 requests are in (by size, not by the clock).
    ingestor = Ingestor(settings(batch_interval="30s"), ingest(ingest_batch_events="1200"))
    tables = [event_table([f"r{i}-{j}" for j in range(50)], time_ms=NOW_MS) for i in range(24)]

    async def scenario() -> list[Any]:
        await ingestor.start()
        try:
            bodies = [body_of(t, ARROW_STREAM) for t in tables]
            return list(await asyncio.gather(*(ingestor.take(b, ARROW_STREAM) for b in bodies)))
        finally:
            await ingestor.close()

    answers = asyncio.run(scenario())
    assert [a.accepted for a in answers] == [50] * 24
    assert ingestor.committer.stats.commits == 1 and ingestor.committer.stats.requests == 24
    accepted, rejected = accepted_and_rejected(cluster, topic)
    assert sorted(accepted["event_id"]) == sorted(f"r{i}-{j}" for i in range(24) for j in range(50))
    assert rejected.height == 0


def test_the_spool_backlog_guard_does_not_apply(
    cluster: MockCluster, topic: str, settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A full spool (another producer's files in incoming/) does not stop Kafka-bound events."""
    incoming = Layout(str(tmp_path / "data")).incoming
    SpoolWriter(incoming, "other").write(event_table([f"w{i}" for i in range(100)], time_ms=NOW_MS))
    app = Litestar(plugins=[IngestPlugin(settings(), ingest(max_backlog_events="10"))])
    with TestClient(app) as client:
        for _ in range(2):
            assert post(client, body_of(mixed()[0], JSON), JSON).status_code == 202
    assert accepted_and_rejected(cluster, topic)[0].height == 6


def test_unacknowledged_writes_are_503_without_internals(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    port = free_port()
    unreachable = settings(f"127.0.0.1:{port}", kafka_config="message.timeout.ms=1000")
    app = Litestar(plugins=[IngestPlugin(unreachable, ingest())])
    with TestClient(app) as client:
        for _ in range(2):  # the producer made again after a failure fails the same way
            r = post(client, body_of(mixed()[0], JSON), JSON)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            body = r.json()
            assert set(body) == {"status_code", "detail", "request_id"}
            assert "send the request again later" in body["detail"]
            for internal in ("127.0.0.1", str(port), "Kafka", "Message timed out", "rdkafka"):
                assert internal not in r.text
    metrics = counted(tmp_path / "data")
    assert metrics[REQUESTS][("503",)] == 2
    assert metrics[EVENTS][("accepted", "")] == 0


def test_kafka_sink_needs_bootstrap_servers(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="KAFKA_BOOTSTRAP_SERVERS"):
        Ingestor(Settings.from_env({}, data_dir=str(tmp_path)), ingest())
    bad = Settings.from_env(
        {},
        data_dir=str(tmp_path),
        kafka_bootstrap_servers="h:1",
        kafka_config="message.timeout.ms=1s",
    )
    with pytest.raises(SettingsError, match=r"message\.timeout\.ms"):
        Ingestor(bad, ingest())
