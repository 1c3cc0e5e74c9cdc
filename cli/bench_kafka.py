"""``adevents bench --source kafka``: the same spool files published to a fresh topic of
librdkafka's mock cluster in this process while ``adevents consume --source kafka``, a process
of its own as the spool's consumer is, lands it into a fresh lake with a fresh key cache of the
same kind. Timed from the first publish to the last commit (the consumer's group join before it
is not: a one-time cost, reported apart), reconciled the same way as the spool run, and reported
next to it with their ratio.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
from pyarrow import ipc

from cli.bench import (
    BenchResult,
    ChildUsage,
    _child_env,
    commit_groups,
    kafka_prefix,
    read_ledger,
    refuse_tables,
)
from lake.location import LakeLocation
from pipeline.reconcile import ReconcileError, reconcile
from pipeline.schema import Layout
from pipeline.settings import KafkaSettings, Settings

if TYPE_CHECKING:
    from pipeline.kafka import Publisher

#: What librdkafka's mock cluster keeps of a partition: it cuts each partition's log to 5 MiB,
#: oldest messages first, read or not (hard-coded in rdkafka_mock.c), where a broker would keep
#: days. The bench's producer must not run further ahead of the lander than that.
MOCK_PARTITION_BYTES: Final = 5 * 1024 * 1024
#: How much of it the producer may fill ahead of the lander (the rest is for a message's
#: compressed size varying from the one measured).
MOCK_FILL: Final = 0.75
#: The bench topic's partitions: room for 16 x 5 MiB ahead of the lander.
KAFKA_PARTITIONS: Final = 16
#: The producer's compression, the one most producers use: the mock keeps 5 MiB a partition, so
#: what it holds ahead of the consumer is bytes, and lz4 (1.7-2.8x smaller; ~10 messages a
#: partition here, over a million events ahead) keeps the lander fed. No compression did not
#: (0.34x the spool, the lander waiting for room). zstd level 1 holds more for more CPU on the
#: two cores the producer shares with the consumer: 3 alternating runs of 2M events on 12-03,
#: lz4 0.67-0.70x the spool, producer and brokers 0.75-0.77 CPU-s; zstd 0.61-0.69x, 0.89-0.91.
KAFKA_COMPRESSION: Final = "lz4"
#: The lander's client: the mock answers a fetch that found nothing only after
#: fetch.wait.max.ms (500 ms) even when messages arrive meanwhile, where a broker answers at
#: once (measured: a message acknowledged by the mock reached a waiting consumer in a median
#: 364 ms, 10 ms with this); a producer kept close behind the lander meets that wait often.
MOCK_CONSUMER: Final[dict[str, Any]] = {"fetch.wait.max.ms": 10}


class MockFeed:
    """Publishes the spool's tables to the mock one message at a time, round robin over the
    partitions (as keys spread them, but counted exactly), each only once its partition holds
    room for it ahead of what the consumer has landed there (its group's committed offsets: it
    commits them after each group's Delta commits): a producer as fast as it can be without the
    mock deleting what the consumer has not read."""

    def __init__(
        self, publisher: Publisher, kafka: KafkaSettings, alive: Callable[[], bool]
    ) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.publisher = publisher
        self.alive = alive  #: whether the consumer still runs (else nothing makes room)
        self.partitions = [TopicPartition(kafka.kafka_topic, p) for p in range(KAFKA_PARTITIONS)]
        # Reads the group's offsets only: it never joins the group.
        self._offsets = Consumer(
            {
                "bootstrap.servers": kafka.kafka_bootstrap_servers,
                "group.id": kafka.kafka_group_id,
                "enable.auto.commit": False,
            }
        )
        self.budget = 0  #: messages a partition may hold ahead of the consumer
        self.sent = [0] * KAFKA_PARTITIONS  #: messages published to each partition
        self._next = 0  #: the round robin's next turn
        self.waited = 0.0  #: seconds the producer waited for the consumer

    def landed(self, partition: int) -> int:
        """The next offset the consumer will land of ``partition`` (0 before its first commit)."""
        (committed,) = self._offsets.committed([self.partitions[partition]], timeout=10.0)
        return max(committed.offset, 0)

    def _wait_for_room(self, partition: int) -> None:
        """Offsets are dense from 0 on a fresh topic: ``sent - landed`` is what waits there."""
        waiting = time.perf_counter()
        while self.sent[partition] - self.landed(partition) >= self.budget:
            if not self.alive():
                raise SystemExit("adevents bench: the Kafka consumer stopped")
            self.publisher.raise_refused()  # also serves the delivery reports
            time.sleep(0.01)
        self.waited += time.perf_counter() - waiting

    def publish(self, table: pa.Table) -> None:
        """Queue ``table``'s messages (as ``Publisher.publish_table`` splits it), paced."""
        from pipeline.kafka import arrow_message, split_batch

        for part in split_batch(table):
            if not self.budget:  # from the first message, as the producer will compress it
                stored = len(pa.Codec(KAFKA_COMPRESSION).compress(arrow_message(part)))
                self.budget = max(1, int(MOCK_FILL * MOCK_PARTITION_BYTES / stored))
            partition = self._next % KAFKA_PARTITIONS
            self._next += 1
            if self.sent[partition] >= self.budget:  # no commit can have made room before
                self._wait_for_room(partition)
            self.sent[partition] += self.publisher.publish_table(part, partition=partition)

    @property
    def published(self) -> int:
        return sum(self.sent)

    def close(self) -> None:
        self._offsets.close()


@dataclass(frozen=True)
class KafkaFeedRun:
    """What ``_land_kafka`` measured around the consumer."""

    #: Seconds from starting the consumer to its first assignment (its group join).
    joined: float
    #: Wall-clock time of the first publish.
    started: float
    #: Seconds from the first publish to the brokers' acknowledging the last message.
    publishing: float
    messages: int
    #: Seconds the producer waited for the consumer to land more.
    waited: float
    used: ChildUsage
    #: CPU seconds of this process meanwhile: the producer, its compression, the mock brokers.
    brokers_cpu_seconds: float


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _kafka_consumer(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """``adevents consume --source kafka`` as its own process, as the spool's consumer runs,
    with the bench's mock-cluster client setting (``MOCK_CONSUMER``)."""
    kafka = settings.kafka
    env = _child_env(
        settings,
        CONSUMER_SOURCE="kafka",
        KAFKA_BOOTSTRAP_SERVERS=kafka.kafka_bootstrap_servers,
        KAFKA_TOPIC=kafka.kafka_topic,
        KAFKA_GROUP_ID=kafka.kafka_group_id,
        KAFKA_BATCH_EVENTS=str(kafka.kafka_batch_events),
        KAFKA_CONFIG=",".join(f"{k}={v}" for k, v in MOCK_CONSUMER.items()),
    )
    cmd = [sys.executable, "-m", "cli", "consume", "--source", "kafka", "--log-level", "INFO"]
    with log_path.open("wb") as log_file:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_file)


def _wait_for_assignment(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Producing starts once the consumer holds its partitions, as a consumer that joined long
    ago would see the stream (the join is a one-time cost, reported apart)."""
    deadline = time.perf_counter() + 120
    while "assigned partitions" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.perf_counter() > deadline:
            proc.kill()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"adevents bench: the Kafka consumer got no partitions:\n{tail}")
        time.sleep(0.05)


def _land_kafka(settings: Settings, files: list[Path]) -> KafkaFeedRun:
    """Publish ``files`` (in order) while a consumer process lands the topic, past its join;
    then tell it the producer is done (``DRAIN_SIGNAL``: it lands the rest and exits)."""
    from pipeline.kafka import Publisher
    from pipeline.signals import DRAIN_SIGNAL

    log_path = Path(settings.data_dir) / "kafka-consumer.log"
    joining = time.perf_counter()
    proc = _kafka_consumer(settings, log_path)
    try:
        _wait_for_assignment(proc, log_path)
        joined = time.perf_counter() - joining
        publisher = Publisher(settings.kafka, **{"compression.type": KAFKA_COMPRESSION})
        feed = MockFeed(publisher, settings.kafka, lambda: proc.poll() is None)
        started, cpu_before = time.time(), _own_cpu_seconds()
        try:
            for path in files:
                with pa.memory_map(str(path)) as source:
                    feed.publish(ipc.open_file(source).read_all())
            publisher.flush()
            acknowledged = time.time()
        finally:
            feed.close()
        messages, waited = feed.published, feed.waited
        del feed, publisher  # the producer's threads go now, not after the cluster
        proc.send_signal(DRAIN_SIGNAL)
        # wait4 rather than wait(): it also reports the child's peak RSS.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        brokers_cpu = _own_cpu_seconds() - cpu_before
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"adevents bench: the Kafka consumer failed ({proc.returncode}):\n{tail}")
    return KafkaFeedRun(
        joined, started, acknowledged - started, messages, waited, ChildUsage.of(usage), brokers_cpu
    )


def measure_kafka(settings: Settings, files: list[Path], truth: Path, result: BenchResult) -> None:
    """The Kafka source on the same files: a mock cluster in this process, a fresh topic, a
    fresh DATA_DIR, lake and key cache of the same kind, the spool run's group sizes; events/s
    from the first publish to the last commit, then reconciled with the generator's truth."""
    from pipeline.kafka_testing import MockCluster

    with MockCluster() as cluster:
        topic = f"adevents-bench-{uuid.uuid4().hex[:8]}"
        cluster.create_topic(topic, KAFKA_PARTITIONS)
        kafka = cluster.settings(
            topic, f"{topic}-group", kafka_batch_events=settings.kafka.kafka_batch_events
        )
        lake_uri = settings.lake_uri.rstrip("/")
        run_settings = settings.replace(
            data_dir=str(Path(settings.data_dir) / "kafka"),
            lake_uri=f"{lake_uri}/kafka-source" if lake_uri else "",
            redis_key_prefix=kafka_prefix(settings),
            consumer_source="kafka",
            kafka=kafka,
        )
        location = LakeLocation.from_settings(run_settings)
        refuse_tables(location)
        layout = Layout(run_settings.data_dir)
        layout.ensure()
        campaigns = Layout(settings.data_dir).campaigns
        if campaigns.exists():  # the same enrichment as the spool run
            layout.campaigns.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(campaigns, layout.campaigns)
        fed = _land_kafka(run_settings, files)
    ledger = read_ledger(location)
    last_commit = ledger["committed_at"].dt.epoch("ms").max()
    assert isinstance(last_commit, int)
    result.kafka_compression = KAFKA_COMPRESSION
    result.kafka_join_seconds = fed.joined
    result.kafka_messages = fed.messages
    result.kafka_producer_wait_seconds = fed.waited
    result.kafka_publish_seconds = fed.publishing
    result.kafka_peak_rss_mb = fed.used.peak_rss_mb
    result.kafka_consumer_cpu_seconds = fed.used.cpu_seconds
    result.kafka_producer_brokers_cpu_seconds = fed.brokers_cpu_seconds
    result.kafka_seconds = last_commit / 1000 - fed.started
    result.kafka_events = int(ledger["rows_in"].sum())
    result.kafka_groups = len(commit_groups(ledger))
    result.kafka_duplicates_dropped = int(ledger["duplicates"].sum())
    result.kafka_events_per_second = result.kafka_events / max(result.kafka_seconds, 1e-9)
    result.kafka_timing = (
        "Kafka source timed from the first publish to the last commit; the consumer's start "
        f"before it (joining its group: {fed.joined:.1f} s, a one-time cost) is excluded"
    )
    try:
        reconcile(location, truth)
    except ReconcileError as exc:
        raise SystemExit(f"adevents bench: the Kafka source's lake is not exact: {exc}") from exc
    result.kafka_reconciled = True


def kafka_rows(result: BenchResult) -> list[tuple[str, str]]:
    """``--source kafka``: the Kafka source's rows of the table, beside the spool's."""
    if result.source != "kafka":
        return []
    return [
        (
            "Kafka source events/s (first publish → last commit)",
            f"{result.kafka_events_per_second:,.0f}",
        ),
        ("spool source events/s (same events, same run)", f"{result.events_per_second:,.0f}"),
        ("ratio Kafka to spool", f"{result.kafka_ratio_to_spool:.2f} ×"),
        (
            f"Kafka seconds (group join of {result.kafka_join_seconds:.1f} s excluded)",
            f"{result.kafka_seconds:.2f}",
        ),
        (
            "Kafka messages / commit groups",
            f"{result.kafka_messages:,} / {result.kafka_groups:,}",
        ),
        (
            f"Kafka producer waits for the lander ({result.kafka_compression}, mock keeps 5 MiB"
            " a partition) (s)",
            f"{result.kafka_producer_wait_seconds:.2f}",
        ),
        (
            "Kafka producer seconds (first publish → last acknowledged)",
            f"{result.kafka_publish_seconds:.2f}",
        ),
        ("Kafka consumer peak RSS (MB)", f"{result.kafka_peak_rss_mb:,.0f}"),
        (
            "Kafka / spool consumer CPU seconds (process, start to exit)",
            f"{result.kafka_consumer_cpu_seconds:.2f} / {result.consumer_cpu_seconds:.2f}",
        ),
        (
            "Kafka producer + mock brokers CPU seconds (same cores)",
            f"{result.kafka_producer_brokers_cpu_seconds:.2f}",
        ),
        ("Kafka duplicates dropped", f"{result.kafka_duplicates_dropped:,}"),
        (
            "Kafka source reconciled with ground truth",
            "yes: every event exactly once" if result.kafka_reconciled else "NO",
        ),
    ]
