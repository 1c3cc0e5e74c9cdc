"""Where the consumer's time goes: cProfile of ``adevents consume --once`` on a generated spool.

    .venv/bin/python bench/consumer_profile.py --events 2000000 [--redis-url URL] [--top 25]

The spool is generated first (not profiled) into a scratch DATA_DIR; then one consumer runs in
this process exactly as ``adevents consume --once`` does, with three profiles, since cProfile
sees only the thread it is enabled in: the main thread (gathering, reading, deciding:
validate, dedupe, enrich), the writing thread (``Lander.write``: Parquet files) and the
committing thread (``Lander.complete``: Delta commits, the claim finished, inputs retired). Each
profile prints its top functions by own time and by cumulative time (``--dump`` keeps them).
LAKE_URI and the AWS_* variables are honoured, so the same profile can be taken on S3.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from generator.runner import generate
from pipeline.factory import make_consumer
from pipeline.landing import Lander
from pipeline.settings import Settings


def report(title: str, profile: cProfile.Profile, top: int) -> None:
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(top)
        body = out.getvalue()
        start = body.find("   ncalls")
        print(f"\n## {title}, by {order}\n{body[start:] if start >= 0 else body}")


def _profile_on_its_thread(owner: type, name: str, profile: cProfile.Profile) -> None:
    """Profile every call of ``owner.name`` (each runs on a thread of its own)."""
    method = getattr(owner, name)

    def profiled(*args: Any, **kwargs: Any) -> Any:
        profile.enable()
        try:
            return method(*args, **kwargs)
        finally:
            profile.disable()

    setattr(owner, name, profiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--redis-url", help="profile with the Redis key cache (default embedded)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--dump", type=Path, help="also save main.prof and writer.prof here (for pstats, snakeviz)"
    )
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="adevents-profile-")
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "REDIS_URL")}
    settings = Settings.from_env(env).replace(
        data_dir=data_dir,
        redis_url=args.redis_url,
        redis_key_prefix=f"adevents-profile-{os.getpid()}",
        max_events_per_second=0,
    )
    try:
        generate(
            settings,
            events=args.events,
            rate=0,
            batch_size=args.batch_size,
            seed=1,
            truth=Path(data_dir) / "truth.parquet",
        )
        writer, committer = cProfile.Profile(), cProfile.Profile()
        _profile_on_its_thread(Lander, "write", writer)
        _profile_on_its_thread(Lander, "complete", committer)
        consumer = make_consumer(settings)
        consumer.start(resume=False)
        main_thread = cProfile.Profile()
        started = time.perf_counter()
        main_thread.enable()
        try:
            totals = consumer.run(once=True)
        finally:
            main_thread.disable()
            consumer.close()
        wall = time.perf_counter() - started
        print(totals.line(wall))
        report("main thread (gather, read, decide)", main_thread, args.top)
        report("writing thread (Lander.write: Parquet files)", writer, args.top)
        report("committing thread (Lander.complete: commits, claim, retire)", committer, args.top)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            main_thread.dump_stats(args.dump / "main.prof")
            writer.dump_stats(args.dump / "writer.prof")
            committer.dump_stats(args.dump / "committer.prof")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if args.redis_url:
            from cli.bench import drop_prefix

            drop_prefix(args.redis_url, settings.redis_key_prefix)


if __name__ == "__main__":
    main()
