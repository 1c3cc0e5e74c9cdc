"""The ``generate`` command: its flags, and running it with the settings the CLI read."""

from __future__ import annotations

import argparse
import sys

from generator import ID_SHAPES
from pipeline.settings import Settings, parse_duration

#: Flags that override a setting of the same name; absent unless given, so they never clobber
#: a value the CLI already parsed into the namespace.
SETTING_FLAGS = ("dup_rate", "late_rate", "invalid_rate", "restamp_rate")


def _count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _positive_count(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction between 0 and 1")
    return value


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than 0")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the generator's flags to ``parser``."""
    parser.add_argument("--events", type=_count, metavar="N", help="stop after N events")
    parser.add_argument(
        "--duration", type=_duration, metavar="SECONDS", help="stop after this long (e.g. 30s, 5m)"
    )
    parser.add_argument(
        "--rate",
        type=_non_negative,
        metavar="R",
        help="events per second (default EVENTS_PER_SECOND); 0 = as fast as possible",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_count,
        metavar="N",
        help="events per file (default rate x BATCH_INTERVAL; 100000 at rate 0)",
    )
    parser.add_argument(
        "--truth", metavar="FILE", help="write the ground truth (event_id, copies, ...) as Parquet"
    )
    parser.add_argument("--seed", type=_count, metavar="N", help="random seed, for repeatable runs")
    parser.add_argument(
        "--producer", default="gen", metavar="NAME", help="producer name in file names and ids"
    )
    parser.add_argument(
        "--campaigns",
        type=_positive_count,
        default=1000,
        metavar="N",
        help="campaigns in a dimension created because none exists (default 1000)",
    )
    parser.add_argument(
        "--ids",
        choices=ID_SHAPES,
        default="sequential",
        help="event_id shape: sequential (<producer>-<seed>-<seq>, default) or hex33 "
        "(33 random-looking hex digits, as SDKs send)",
    )
    destination = parser.add_mutually_exclusive_group()
    destination.add_argument(
        "--http",
        metavar="URL",
        help="POST the events to this server's /ad_events instead of writing spool files",
    )
    destination.add_argument(
        "--kafka",
        action="store_true",
        help="publish the micro-batches to KAFKA_TOPIC at KAFKA_BOOTSTRAP_SERVERS (idempotent "
        "producer, acks=all) instead of writing spool files; exits once all are acknowledged",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key for --http (default: the first of INGEST_API_KEYS)",
    )
    for name in SETTING_FLAGS:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=_fraction,
            default=argparse.SUPPRESS,
            metavar="FRACTION",
            help=f"override {name.upper()}",
        )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Generate events as ``args`` say; print a one-line summary; return the exit code."""
    from generator.http import IngestError
    from generator.kafka import KafkaPublishError
    from generator.runner import generate

    overrides = {n: getattr(args, n) for n in SETTING_FLAGS if getattr(args, n, None) is not None}
    http, api_key = getattr(args, "http", None), getattr(args, "api_key", None)
    kafka = bool(getattr(args, "kafka", False))
    if http is not None and api_key is None:
        keys = settings.ingest.ingest_api_keys
        api_key = keys[0] if keys else None
    try:
        summary = generate(
            settings.replace(**overrides),
            events=args.events,
            duration=args.duration,
            rate=args.rate,
            batch_size=args.batch_size,
            seed=args.seed,
            truth=args.truth,
            producer=args.producer,
            campaigns=args.campaigns,
            http=http,
            api_key=api_key,
            ids=args.ids,
            kafka=kafka,
        )
    except ValueError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    except (IngestError, KafkaPublishError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    if summary.sent is not None and http is not None:
        print(summary.sent.line(http))
    if summary.published is not None:
        print(summary.published.line(settings.kafka.kafka_topic))
    return 0
