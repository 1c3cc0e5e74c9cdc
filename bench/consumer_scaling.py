"""Events/s of 1, 2, 3 ... ``adevents consume --once`` processes sharing one Redis key cache.

    python bench/consumer_scaling.py --redis-url redis://127.0.0.1:6379/0 --events 5000000 \
        --consumers 1 2 3 --work /tmp/scaling

The spool is generated once (``adevents generate --events N --rate 0 --truth ...``, not timed);
each run copies it into a fresh DATA_DIR, starts N consumers at once (CONSUMER_SLOT 0 … N-1:
each claims its own files from the shared incoming/) with FSYNC=false and
MAX_EVENTS_PER_SECOND=0 under a fresh key prefix, and times from the start to the last exit
(process start-up included) and, from the ledger table, from the first read to the last commit.
Every run's Delta tables (DATA_DIR/lake) are reconciled against the ground truth: a lost or
duplicated event fails the benchmark.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from cli.bench import commit_groups, consumer_seconds, read_ledger
from lake.location import LakeLocation
from pipeline.reconcile import reconcile


def adevents(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, stdout=subprocess.PIPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/adevents-scaling"))
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    spool, truth = args.work / "spool", args.work / "truth.parquet"
    if not truth.exists():
        shutil.rmtree(spool, ignore_errors=True)
        env = {**base, "DATA_DIR": str(spool)}
        gen = adevents(
            "generate", "--events", str(args.events), "--rate", "0", "--truth", str(truth),
            "--seed", "1", env=env,
        )  # fmt: skip
        assert gen.wait() == 0
    print("consumers | events | wall s | events/s (wall) | events/s (first read to last commit)")
    for n in args.consumers:
        for _ in range(args.repeat):
            data = args.work / f"run-{n}"
            shutil.rmtree(data, ignore_errors=True)
            shutil.copytree(spool, data)
            env = {
                **base,
                "DATA_DIR": str(data),
                "REDIS_URL": args.redis_url,
                "REDIS_KEY_PREFIX": f"scaling-{uuid.uuid4().hex[:8]}",
                "FSYNC": "false",
                "MAX_EVENTS_PER_SECOND": "0",
                "LOG_LEVEL": "WARNING",
            }
            started = time.perf_counter()
            procs = [
                adevents("consume", "--once", env={**env, "CONSUMER_SLOT": str(slot)})
                for slot in range(n)
            ]
            assert all(p.wait() == 0 for p in procs)
            wall = time.perf_counter() - started
            lake = LakeLocation.from_env({}, data_dir=str(data))
            result = reconcile(lake, truth)
            span = consumer_seconds(commit_groups(read_ledger(lake)))
            rows = result.ledger_rows_in
            print(
                f"{n} | {rows:,} | {wall:.1f} | {rows / wall:,.0f} | {rows / span:,.0f}", flush=True
            )
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
