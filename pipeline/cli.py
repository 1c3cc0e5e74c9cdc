"""The ``adevents`` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings, SettingsError

if TYPE_CHECKING:
    from pipeline.consumer import Consumer

Runner = Callable[[argparse.Namespace, Settings], int]
Configure = Callable[[argparse.ArgumentParser], None]


def _settings_epilog() -> str:
    rows = [
        f"  {name:<24} {help} (default {default})" for name, default, help in Settings.describe()
    ]
    return "environment variables (CLI flags override them):\n" + "\n".join(rows)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM/SIGINT, so loops stop cleanly between batches."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        logging.getLogger("adevents").info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _consume_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="process what is waiting, then exit")
    parser.add_argument("--redis-url", help="Redis key cache URL (overrides REDIS_URL)")
    parser.add_argument("--dedupe-window", help="dedupe window, e.g. 15m, 1h (DEDUPE_WINDOW)")
    parser.add_argument(
        "--max-events-per-second", help="throughput cap, 0 = none (MAX_EVENTS_PER_SECOND)"
    )
    parser.add_argument("--stats", help="at exit, write key-cache statistics as JSON here")


def _consume_run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.consumer import ConsumerLockedError
    from pipeline.retry import GaveUpError

    stop = _stop_on_signals()
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
            totals = consumer.run(once=args.once, stop=stop)
        except GaveUpError as exc:
            print(f"adevents consume: {exc}", file=sys.stderr)
            return 1
        cache = consumer.cache.stats() if args.stats else None
        stats = (
            {}
            if cache is None
            else {"keys": cache.keys, "bytes": cache.bytes, "bytes_per_key": cache.bytes_per_key}
        )
    finally:
        consumer.close()
    print(totals.line(time.perf_counter() - started))
    if args.stats:
        import json
        from pathlib import Path

        Path(args.stats).write_text(json.dumps(stats))
    return 0


def _wait_for_consumer(settings: Settings, stop: threading.Event, *, once: bool) -> Consumer | None:
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


def _generate_configure(parser: argparse.ArgumentParser) -> None:
    from generator.command import configure

    configure(parser)


def _generate_run(args: argparse.Namespace, settings: Settings) -> int:
    from generator.command import run

    return int(run(args, settings))


def _lazy(module: str, configure: str, run: str) -> tuple[Configure, Runner]:
    """configure/run functions of a subcommand that lives in another package, imported lazily."""
    import importlib

    def do_configure(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module), configure)(parser)

    def do_run(args: argparse.Namespace, settings: Settings) -> int:
        return int(getattr(importlib.import_module(module), run)(args, settings))

    return do_configure, do_run


COMMANDS: dict[str, tuple[str, Configure, Runner]] = {
    "generate": (
        "write synthetic ad events into the spool (incoming/)",
        _generate_configure,
        _generate_run,
    ),
    "consume": (
        "validate, deduplicate, enrich and land spool files as Parquet, exactly once",
        _consume_configure,
        _consume_run,
    ),
    "bench": (
        "measure events/s against a ceiling and a naive baseline, and reconcile the output",
        *_lazy("pipeline.bench", "configure", "run"),
    ),
    "sql": (
        "run ad-hoc SQL over the lake's DuckDB views (no query: interactive prompt)",
        *_lazy("queries.command", "configure", "run"),
    ),
    "serve": (
        "serve the API and dashboard (Litestar on uvicorn)",
        *_lazy("api.command", "configure_serve", "run_serve"),
    ),
    "demo": (
        "run generator, consumer, scheduled jobs and API together; print the dashboard URL",
        *_lazy("api.command", "configure_demo", "run_demo"),
    ),
}


def _job_commands() -> dict[str, tuple[str, Configure, Runner]]:
    from pipeline.jobs.command import COMMANDS as JOB_COMMANDS

    return dict(JOB_COMMANDS)


COMMANDS.update(_job_commands())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adevents",
        description="adevents: an exactly-once ad-event pipeline over a Parquet lake.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_settings_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--data-dir", help="data directory (DATA_DIR, default ./ad_event_data)")
        p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)")
        configure(p)
    return parser


#: argparse dests that are also Settings fields: a flag given on the command line overrides env.
def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import fields

    names = {f.name for f in fields(Settings)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(**_overrides(args))
    except SettingsError as exc:
        print(f"adevents: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _, _, runner = COMMANDS[args.command]
    return runner(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
