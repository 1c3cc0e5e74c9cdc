"""Two source trees' consumers on one spool, run back to back: CPU, events/s and latency.

    git worktree add /tmp/old <commit>
    python bench/consume_ab.py --trees .,/tmp/old --rounds 3 --events 10000000 [--redis-url URL]

``adevents bench`` times one tree per run, and a run lasts minutes: on a shared VM the
machine's speed drifts between runs by more than a 20 % change in the consumer's cost (its
ceiling, measured in the same runs, went from 2.9M to 4.3M events/s in one morning). Here a
spool of hex33 ids is generated once (not timed), then each round copies it into a fresh
DATA_DIR and runs ``adevents consume --once`` from each tree (``PYTHONPATH``), the order
alternating between rounds, FSYNC on and MAX_EVENTS_PER_SECOND=0. Each run reports the
process's CPU seconds (from wait4), its events/s from the first read to the last commit and
its group latency per 10k events, from its own lake's ledger, as ``adevents bench`` computes
them. With ``--redis-url`` (a server to flush: use a private one) the Redis key cache is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

#: Run in the consumer's tree (its own ``cli.bench``): one JSON line of the run's figures.
LEDGER_FIGURES = """
import json, os
import duckdb, numpy as np
from cli.bench import commit_groups, consumer_seconds
from lake.location import LakeLocation
from lake.snapshot import register, snapshot
con = duckdb.connect()
register(con, snapshot(LakeLocation.from_env(dict(os.environ))))
groups = commit_groups(con.sql("SELECT * FROM ledger").pl())
per_10k = ((groups["processing_ms"] + groups["read_ms"]) / groups["rows_in"] * 10_000).to_numpy()
print(json.dumps({
    "seconds": consumer_seconds(groups),
    "events": int(groups["rows_in"].sum()),
    "p50": float(np.percentile(per_10k, 50)),
    "p99": float(np.percentile(per_10k, 99)),
}))
"""

GENERATE = (
    "import os; from generator.runner import generate; from pipeline.settings import Settings; "
    "generate(Settings.from_env(dict(os.environ)), events={events}, rate=0, "
    "batch_size=100_000, seed=1, ids='hex33')"
)


def _env(base: dict[str, str], tree: str, data_dir: str, redis_url: str | None) -> dict[str, str]:
    env = dict(base, DATA_DIR=data_dir, PYTHONPATH=tree, FSYNC="true")
    env.update(MAX_EVENTS_PER_SECOND="0", KEEP_PROCESSED="true")
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def run_once(base: dict[str, str], tree: str, spool: Path, redis_url: str | None) -> dict[str, Any]:
    """One ``consume --once`` of a copy of ``spool`` with ``tree``'s code, and its figures."""
    data_dir = tempfile.mkdtemp(prefix="adevents-ab-")
    try:
        shutil.copytree(spool, data_dir, dirs_exist_ok=True)
        env = _env(base, tree, data_dir, redis_url)
        if redis_url:
            subprocess.run(
                ["redis-cli", "-u", redis_url, "FLUSHDB"], check=True, capture_output=True
            )
        cmd = [sys.executable, "-m", "cli", "consume", "--once", "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=tree)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"consume --once failed in {tree}")
        read = subprocess.run(
            [sys.executable, "-c", LEDGER_FIGURES],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        )
        figures: dict[str, Any] = json.loads(read.stdout)
        figures["cpu_seconds"] = usage.ru_utime + usage.ru_stime
        figures["cpu_us"] = figures["cpu_seconds"] / figures["events"] * 1e6
        figures["events_per_second"] = figures["events"] / figures["seconds"]
        return figures
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, help="comma-separated source trees")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--redis-url", default=None, help="a private Redis: it is flushed")
    args = parser.parse_args()
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    base = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "REDIS_URL")}
    spool = Path(tempfile.mkdtemp(prefix="adevents-ab-spool-"))
    results: dict[str, list[dict[str, Any]]] = {tree: [] for tree in trees}
    try:
        started = time.perf_counter()
        generate = [sys.executable, "-c", GENERATE.format(events=args.events)]
        subprocess.run(generate, env=dict(base, DATA_DIR=str(spool)), cwd=trees[0], check=True)
        print(f"spool of {args.events:,} events in {time.perf_counter() - started:.0f} s")
        for round_ in range(args.rounds):
            for tree in trees if round_ % 2 == 0 else trees[::-1]:
                m = run_once(base, tree, spool, args.redis_url)
                results[tree].append(m)
                print(
                    f"{tree}: {m['events_per_second']:,.0f} events/s, {m['cpu_us']:.2f} CPU-µs "
                    f"an event, per 10k events p50 {m['p50']:.2f} ms, p99 {m['p99']:.2f} ms",
                    flush=True,
                )
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    print("\n| tree | events/s | CPU-µs an event (median) | p50 per 10k (ms) | p99 per 10k (ms) |")
    print("|---|---|---|---|---|")
    for tree, runs in results.items():

        def spread(key: str, fmt: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r[key] for r in runs]
            return f"{fmt.format(min(values))} – {fmt.format(max(values))}"

        cpu = f"{spread('cpu_us', '{:.2f}')} ({median(r['cpu_us'] for r in runs):.2f})"
        eps, p50, p99 = (
            spread(k, f)
            for k, f in (("events_per_second", "{:,.0f}"), ("p50", "{:.2f}"), ("p99", "{:.2f}"))
        )
        print(f"| {tree} | {eps} | {cpu} | {p50} | {p99} |")


if __name__ == "__main__":
    main()
