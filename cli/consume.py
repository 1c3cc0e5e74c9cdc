"""``adevents consume``: land spool files in the lake, waiting out a key cache that is down."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import TYPE_CHECKING

from pipeline.settings import Settings
from pipeline.signals import DRAIN_SIGNAL, event_on_signals, stop_on_signals

if TYPE_CHECKING:
    from pipeline.consumer import Consumer
    from pipeline.kafka_consumer import KafkaLander


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="process what is waiting, then exit")
    parser.add_argument(
        "--source",
        dest="consumer_source",
        choices=["spool", "kafka"],
        help="read this machine's spool (default) or the Kafka topic (CONSUMER_SOURCE)",
    )
    parser.add_argument("--redis-url", help="Redis key cache URL (overrides REDIS_URL)")
    parser.add_argument("--dedupe-window", help="dedupe window, e.g. 15m, 1h (DEDUPE_WINDOW)")
    parser.add_argument(
        "--max-events-per-second", help="throughput cap, 0 = none (MAX_EVENTS_PER_SECOND)"
    )
    parser.add_argument("--stats", help="at exit, write key-cache statistics as JSON here")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the consumer until SIGINT/SIGTERM (or, with ``--once``, until the spool is empty).
    The Kafka source also takes SIGUSR1: land what the assigned partitions hold, then exit (as
    ``--once`` does from the start), for a caller that knows its producers are done."""
    drains = [DRAIN_SIGNAL] if settings.consumer_source == "kafka" else []
    with (
        stop_on_signals(what="stopping after the current batch") as stop,
        event_on_signals(drains, what="landing what the partitions hold, then exiting") as drain,
    ):
        return _consume(args, settings, stop, drain)


def _consume(
    args: argparse.Namespace, settings: Settings, stop: threading.Event, drain: threading.Event
) -> int:
    from lake.location import LakeConfigError, LakeLocation
    from pipeline.consumer import ConsumerLockedError
    from pipeline.kafka_consumer import KafkaLander
    from pipeline.retry import GaveUpError

    try:
        location = LakeLocation.from_settings(settings)
        location.check()  # a wrong LAKE_URI or AWS_* setting stops here, naming the setting
        if settings.consumer_source == "kafka" and not settings.kafka.kafka_bootstrap_servers:
            raise LakeConfigError(
                "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS is not set (--source kafka)"
            )
    except LakeConfigError as exc:
        print(f"adevents consume: {exc}", file=sys.stderr)
        return 2
    try:
        consumer = _wait_for_consumer(settings, stop, once=args.once)
    except GaveUpError as exc:
        print(f"adevents consume: {exc}", file=sys.stderr)
        return 1
    if consumer is None:  # stopped while waiting
        return 0
    try:
        consumer.start(resume=False)  # run() resumes, waiting out Redis or the disk if need be
    except ConsumerLockedError as exc:
        print(f"adevents consume: {exc}", file=sys.stderr)
        consumer.cache.close()
        return 2
    started = time.perf_counter()
    try:
        try:
            if isinstance(consumer, KafkaLander):
                totals = consumer.run(once=args.once, stop=stop, drain=drain)
            else:
                totals = consumer.run(once=args.once, stop=stop)
        except GaveUpError as exc:
            print(f"adevents consume: {exc}", file=sys.stderr)
            return 1
        stats = _cache_stats(consumer) if args.stats else {}
    finally:
        consumer.close()
    print(totals.line(time.perf_counter() - started))
    if args.stats:
        import json
        from pathlib import Path

        Path(args.stats).write_text(json.dumps(stats))
    return 0


def _cache_stats(consumer: Consumer | KafkaLander) -> dict[str, object]:
    """The key cache's size, or why it could not be read (Redis down at exit is no crash)."""
    from pipeline.retry import classify

    try:
        cache = consumer.cache.stats()
    except Exception as exc:
        if classify(exc) is None:
            raise
        print(f"adevents consume: no key-cache statistics: {classify(exc)}", file=sys.stderr)
        return {"unavailable": classify(exc)}
    return {"keys": cache.keys, "bytes": cache.bytes, "bytes_per_key": cache.bytes_per_key}


def _wait_for_consumer(
    settings: Settings, stop: threading.Event, *, once: bool
) -> Consumer | KafkaLander | None:
    """Build the consumer, waiting out a key cache that cannot be reached yet.

    A single Redis is connected lazily (the consumer's run waits for it); a Redis Cluster's
    client needs a reachable node to be built at all. None when stopped meanwhile.
    """
    import os
    import socket

    from pipeline.factory import make_consumer
    from pipeline.retry import StatusBoard, Supervisor
    from pipeline.schema import Layout

    supervisor: Supervisor | None = None
    while not stop.is_set():
        try:
            return make_consumer(settings)
        except Exception as exc:
            if supervisor is None:
                name = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
                board = StatusBoard(Layout(settings.data_dir).state, name)
                supervisor = Supervisor(
                    board,
                    stop,
                    max_delay=settings.retry_max_delay,
                    give_up_after=settings.once_retry_timeout if once else None,
                )
            supervisor.failed(exc)  # waits, or raises what is not transient
    return None
