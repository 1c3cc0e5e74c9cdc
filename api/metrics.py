"""Prometheus metrics: pipeline totals from the ledger table, lag (spool age, Kafka partitions),
the lake's tables, key-cache size, API latency, and the HTTP ingest's counters of every API
process (``api.ingest_metrics``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any, Final

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from api.disk import DiskSpace
from api.health import REDIS_TIMEOUT_S, consumer_health
from api.ingest_metrics import IngestCollector, metrics_dir
from pipeline.redis_client import Client, connect, used_memory
from pipeline.schema import Layout
from pipeline.settings import Settings
from pipeline.spool import list_incoming, oldest_waiting_age
from pipeline.status import FAULTS, ConsumerStatus, kafka_lags, read_statuses
from queries import ops
from queries.lake import Lake

REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def _dir_bytes(path: str) -> int:
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for e in entries:
        try:
            total += e.stat().st_size if e.is_file() else 0
        except FileNotFoundError:
            continue
    return total


class LakeCollector(Collector):
    """Computes the pipeline metrics at scrape time from the lake's tables and DATA_DIR."""

    def __init__(self, settings: Settings, lake: Lake) -> None:
        self.settings = settings
        self.lake = lake
        self.layout = Layout(settings.data_dir)
        self._redis: Client | None = None
        self.disk = DiskSpace(self.layout.root, settings.disk_min_free)

    def _key_cache_bytes(self) -> tuple[str, float]:
        if self.settings.redis_url:
            try:
                if self._redis is None:
                    self._redis = connect(self.settings.redis_url, timeout=REDIS_TIMEOUT_S)
                return "redis", float(used_memory(self._redis))
            except Exception:  # an unreachable Redis shows as NaN, /health says why
                return "redis", float("nan")
        return "embedded", float(_dir_bytes(str(self.layout.state / "embedded")))

    def collect(self) -> Iterator[Any]:
        t = ops.ledger_totals(self.lake)
        yield CounterMetricFamily(
            "adevents_events_in", "Events read from spool files (ledger rows_in)", value=t.rows_in
        )
        yield CounterMetricFamily(
            "adevents_events_accepted", "Events stored in the events table", value=t.accepted
        )
        yield CounterMetricFamily(
            "adevents_events_duplicates", "Events dropped as duplicates", value=t.duplicates
        )
        quarantined = CounterMetricFamily(
            "adevents_events_quarantined", "Events quarantined, by reason", labels=["reason"]
        )
        for reason, n in t.quarantined_by_reason.items():
            quarantined.add_metric([reason], n)
        yield quarantined
        batches = CounterMetricFamily(
            "adevents_batches", "Batches committed, by status", labels=["status"]
        )
        for status, n in sorted(t.batches_by_status.items()):
            batches.add_metric([status], n)
        yield batches
        cumulative, buckets = 0, []
        for bound, n in zip(
            [*(str(b) for b in ops.LATENCY_BUCKETS_S), "+Inf"], t.latency_counts, strict=True
        ):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "adevents_batch_processing_seconds",
            "Time from reading a spool file to its ledger row",
            buckets=buckets,
            sum_value=t.latency_sum_s,
        )
        incoming = self.layout.incoming
        yield GaugeMetricFamily(
            "adevents_consumer_lag_seconds",
            "Age of the oldest file waiting in incoming/",
            value=oldest_waiting_age(incoming),
        )
        yield GaugeMetricFamily(
            "adevents_spool_files_waiting",
            "Files waiting in incoming/",
            value=len(list_incoming(incoming)),
        )
        kind, size = self._key_cache_bytes()
        cache = GaugeMetricFamily(
            "adevents_key_cache_bytes",
            "Key cache size: Redis used_memory, or the embedded cache's state on disk",
            labels=["cache"],
        )
        cache.add_metric([kind], size)
        yield cache
        yield from self._consumers()
        free = self.disk.free()
        yield GaugeMetricFamily(
            "adevents_disk_free_bytes",
            "Free bytes on DATA_DIR's filesystem (NaN when unknown)",
            value=float("nan") if free is None else free,
        )
        yield GaugeMetricFamily(
            "adevents_disk_min_free_bytes",
            "DISK_MIN_FREE: below it the ingest answers 503 and consumers pause (0 = no check)",
            value=self.disk.min_free,
        )
        last = ops.last_commit_ms(self.lake)
        yield GaugeMetricFamily(
            "adevents_last_commit_timestamp_seconds",
            "When the newest batch was committed (Unix time; 0 when none)",
            value=(last or 0) / 1000,
        )
        yield from self._tables()

    def _tables(self) -> Iterator[Any]:
        """Each Delta table's version and data files (small files slow every reader)."""
        view = self.lake.view()
        version = GaugeMetricFamily(
            "adevents_lake_table_version",
            "The Delta version of each lake table (-1 until it is created)",
            labels=["table"],
        )
        files = GaugeMetricFamily(
            "adevents_lake_table_files",
            "Data files in the latest version of each lake table",
            labels=["table"],
        )
        for name, v in view.versions.items():
            version.add_metric([name], v)
            files.add_metric([name], len(view.table(name).stats))
        yield from (version, files)

    def _consumers(self) -> Iterator[Any]:
        """Each consumer's state from ``state/consumers/``: retrying which fault, since when.
        A consumer that stopped reporting counts as not running and retrying nothing."""
        now = time.time()
        statuses = read_statuses(self.layout.state)
        consumers = [consumer_health(s, now) for s in statuses]
        running = GaugeMetricFamily(
            "adevents_consumer_running",
            "1 while a consumer reports itself running or retrying; 0 when stopped or silent",
            labels=["consumer"],
        )
        retrying = GaugeMetricFamily(
            "adevents_consumer_retrying",
            "1 while a consumer waits out this transient fault, else 0",
            labels=["consumer", "fault"],
        )
        seconds = GaugeMetricFamily(
            "adevents_consumer_fault_seconds",
            "How long a consumer has been retrying this fault (0 when it is not)",
            labels=["consumer", "fault"],
        )
        attempts = GaugeMetricFamily(
            "adevents_consumer_retry_attempts",
            "Retries of the current fault so far (0 when none)",
            labels=["consumer"],
        )
        for c in consumers:
            alive = c.state in ("running", "retrying")
            running.add_metric([c.name], 1.0 if alive else 0.0)
            faults = dict.fromkeys(FAULTS, False)
            if c.state == "retrying":
                faults[c.fault or "unknown"] = True
            for fault, on in faults.items():
                retrying.add_metric([c.name, fault], 1.0 if on else 0.0)
                seconds.add_metric([c.name, fault], max(0.0, now - c.since / 1000) if on else 0.0)
            attempts.add_metric([c.name], c.attempts if c.state == "retrying" else 0)
        yield from (running, retrying, seconds, attempts)
        yield from _kafka_lag(statuses, now)


def _kafka_lag(statuses: list[ConsumerStatus], now: float) -> Iterator[Any]:
    """Each Kafka partition's lag while a running consumer reports it.

    A consumer that stopped or fell silent leaves no series behind: a gauge is a value now, and
    its last lag would be drawn (and alerted on) as if measured. Its partitions are counted
    instead, and /health/detail keeps their last known lag.
    """
    lags = kafka_lags(statuses, now)
    current = [lag for lag in lags if lag.current]
    per_partition = GaugeMetricFamily(
        "adevents_kafka_consumer_lag_messages",
        "Messages between a Kafka consumer's position and its partition's end, per partition a "
        "running consumer holds",
        labels=["consumer", "topic", "partition"],
    )
    for lag in current:
        per_partition.add_metric([lag.consumer, lag.topic, str(lag.partition)], lag.messages)
    yield per_partition
    yield GaugeMetricFamily(
        "adevents_kafka_consumer_lag_max_messages",
        "The largest lag of any Kafka partition a running consumer reports (NaN when none does)",
        value=max((lag.messages for lag in current), default=float("nan")),
    )
    yield GaugeMetricFamily(
        "adevents_kafka_partitions_unreported",
        "Kafka partitions last reported by a consumer that stopped or fell silent, and by no "
        "running one since: their lag is unknown",
        value=len(lags) - len(current),
    )


class Metrics:
    """One registry per app: the lake collector, the ingest's counters (summed over every API
    process on DATA_DIR) and the API's request latency histogram."""

    def __init__(self, settings: Settings, lake: Lake) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = LakeCollector(settings, lake)
        self.registry.register(self.collector)
        self.registry.register(IngestCollector(metrics_dir(Layout(settings.data_dir))))
        self.requests = Histogram(
            "adevents_api_request_duration_seconds",
            "API request latency, by route template",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class RequestLatency(ASGIMiddleware):
    """Observes each HTTP request's duration under its route template (bounded labels)."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, capture)
        finally:
            route = scope.get("path_template") or "unmatched"
            method = str(scope.get("method", "GET"))
            self.histogram.labels(method, route, str(status)).observe(time.perf_counter() - started)
