"""Delta commit cost against the checkpoint interval: what a consumer pays per table per commit.

    python bench/delta_commits.py --commits 200 --files 2 --intervals 100 10

For each interval, a fresh local table takes ``--commits`` appends of ``--files`` add actions
each, as the lake writer commits them (refresh, read the app txn, commit with the txn): mean
milliseconds of each step. Opening or refreshing a table replays every commit since the last
checkpoint, so the cost grows with the distance to it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.transaction import AddAction, RemoveAction

from lake.location import LakeLocation
from lake.tables import EVENTS, TABLE_PROPERTIES, ensure_table


def measure(root: Path, interval: int, commits: int, files: int) -> dict[str, float]:
    table: DeltaTable = ensure_table(LakeLocation(uri=str(root)), EVENTS)
    key = next(iter(TABLE_PROPERTIES))
    table.alter.set_table_properties({key: str(interval)})
    spent = {"refresh": 0.0, "txn version": 0.0, "commit": 0.0}
    for version in range(1, commits + 1):
        started = time.perf_counter()
        table.update_incremental()
        refreshed = time.perf_counter()
        table.transaction_version("bench")
        read = time.perf_counter()
        actions = [
            AddAction(
                f"date=2026-12-03/hour={h:02d}/part-{version}.parquet",
                1000,
                {"date": "2026-12-03", "hour": f"{h:02d}"},
                int(time.time() * 1000),
                True,
                '{"numRecords":1}',
            )
            for h in range(files)
        ]
        txn = CommitProperties(app_transactions=[Transaction("bench", version, 0)])
        table.create_write_transaction(
            list[AddAction | RemoveAction](actions),
            "append",
            table.schema(),
            partition_by=["date", "hour"],
            commit_properties=txn,
        )
        ended = time.perf_counter()
        spent["refresh"] += refreshed - started
        spent["txn version"] += read - refreshed
        spent["commit"] += ended - read
    return {step: seconds * 1000 / commits for step, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--files", type=int, default=2, help="add actions a commit")
    parser.add_argument("--intervals", type=int, nargs="+", default=[100, 10])
    args = parser.parse_args()
    print("| checkpoint interval | refresh ms | txn version ms | commit ms |")
    print("|---|---|---|---|")
    for interval in args.intervals:
        with tempfile.TemporaryDirectory(prefix="adevents-commits-") as root:
            ms = measure(Path(root), interval, args.commits, args.files)
        steps = " | ".join(f"{ms[step]:.1f}" for step in ("refresh", "txn version", "commit"))
        print(f"| {interval} | {steps} |")


if __name__ == "__main__":
    main()
