"""CPU per event of each step of the consumer's hot path, one thread, beside the ceiling's.

    POLARS_MAX_THREADS=1 python bench/stage_costs.py --events 2000000 --window-keys 10000000

A spool of 100k-event files with hex33 ids and 1 % duplicates is generated first (not timed).
Then, file pair by file pair (a commit group), each step runs as the consumer runs it, on the
consumer's own functions, and its CPU time is summed: normalise, validate, fingerprint, first
copies in the group, claim in the embedded key set (preloaded with ``--window-keys`` keys, the
window a 10M-event run holds, half in the claim's own generation and half in the previous one:
a window's steady state, where a new key misses in both tables), filter, enrich, sort, Parquet
write, footer statistics. The
ceiling (Arrow IPC read + Parquet write of the same files, what ``adevents bench`` measures)
runs on the same files. Run with ``POLARS_MAX_THREADS=1`` so each figure is the step's own
work, not two threads' contention. The table ends with what the sum allows on two cores kept
perfectly busy, the bound that no overlap of the steps can beat, and that bound as a ratio to
the ceiling as ``adevents bench`` measures it (``cli.bench.measure_ceiling``: all Polars
threads, wall clock), run ``--ceiling-rounds`` times on the same files in a child process
without ``POLARS_MAX_THREADS``: the best ratio to the ceiling that any overlap of these steps
could show on this machine today.

Last, the Parquet write is taken apart on the same parts (not counted in the steps): the
contract's input columns alone in 16k-row groups, then in one row group, beside the ceiling's
own write; what the enrichment's columns and the row groups that prune a campaign cost.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc

from generator.runner import generate
from lake.tables import EVENTS
from lake.writer import encode_part, file_stats, partitions, prepare
from pipeline import decide
from pipeline.enrich import load_campaigns
from pipeline.fingerprint import Keys, compute_keys
from pipeline.groups import GroupFile
from pipeline.keytable import KeySet
from pipeline.normalize import normalize
from pipeline.schema import (
    ENRICHED_SCHEMA,
    EVENT_COLUMNS,
    PARQUET_COMPRESSION,
    PARQUET_COMPRESSION_LEVEL,
    LedgerRow,
)
from pipeline.settings import Settings

T = TypeVar("T")
WINDOW_MS = 3_600_000


class Costs:
    """CPU seconds per step, summed over the groups."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, step: str, fn: Callable[[], T]) -> T:
        started = time.process_time()
        result = fn()
        self.seconds[step] = self.seconds.get(step, 0.0) + time.process_time() - started
        return result


def _read(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


def _ceiling(tables: list[pa.Table]) -> None:
    for table in tables:
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        frame.write_parquet(
            io.BytesIO(),
            compression=PARQUET_COMPRESSION,
            compression_level=PARQUET_COMPRESSION_LEVEL,
        )


def _readable(tables: list[pa.Table]) -> list[Any]:
    readable = []
    for index, table in enumerate(tables):
        file = GroupFile(name=f"f{index}.arrow", batch_id=f"batch-{index}")
        inp = decide.FileInput(file=file, arrived_ms=0, table=table)
        ledger = LedgerRow(batch_id=file.batch_id, source_file=file.name)
        outcome = decide.FileOutcome(file, pl.DataFrame(), ledger)
        readable.append(decide._Readable(index, inp, table, outcome))
    return readable


#: The write taken apart (see the module's docstring): timed beside the steps, not summed.
_APART: Final = ("the input columns, 16k-row groups", "the input columns, one row group")


def _write(part: pl.DataFrame, costs: Costs) -> None:
    body = costs.run("Parquet write (zstd, 16k-row groups)", lambda: encode_part(part))
    costs.run("footer statistics", lambda: file_stats(pq.read_metadata(pa.BufferReader(body))))
    inputs = part.drop([c for c in ENRICHED_SCHEMA.names() if c not in EVENT_COLUMNS])
    costs.run(_APART[0], lambda: encode_part(inputs))
    costs.run(_APART[1], lambda: encode_part(inputs, max(part.height, 1)))


def _group(
    tables: list[pa.Table], held: KeySet, campaigns: pl.DataFrame, now: datetime, costs: Costs
) -> None:
    """One commit group's steps, as ``pipeline.decide`` and ``lake.writer`` run them."""
    costs.run("ceiling: IPC → Parquet", lambda: _ceiling(tables))
    normalised = costs.run(
        "normalise", lambda: [normalize(t, dictionaries=True)[0] for t in tables]
    )
    readable = _readable(normalised)
    valid = costs.run(
        "validate (eight rules, lateness)", lambda: decide._split(readable, now, None, WINDOW_MS)
    )
    keys = costs.run(
        "fingerprint (two 64-bit hashes)",
        lambda: compute_keys(valid["event_id"], valid["event_time"], WINDOW_MS),
    )
    first = costs.run("first copies in the group", lambda: decide._first_copies(keys))
    firsts = keys.take(first)
    won = costs.run(
        "claim (embedded key set)",
        lambda: held.add_new(Keys(np.zeros(len(firsts), np.int64), firsts.hi, firsts.lo)),
    )
    is_new = np.zeros(len(keys), dtype=bool)
    is_new[first] = won
    kept = costs.run(
        "filter the new rows", lambda: valid.filter(pl.Series(is_new)).drop(decide._POSITION)
    )
    frame = costs.run("enrich", lambda: decide._enrich(kept, readable, campaigns, now))
    framed = costs.run("sort (campaign, time) in hour partitions", lambda: prepare(EVENTS, frame))
    for _bucket, part in partitions(framed):
        _write(part, costs)


def measure(files: list[Path], campaigns: pl.DataFrame, window_keys: int) -> tuple[Costs, int]:
    costs = Costs()
    held = KeySet()
    rng = np.random.default_rng(0)
    for start in range(0, window_keys, 100_000):  # the window's keys, as earlier batches left them
        n = min(100_000, window_keys - start)
        hi, lo = (rng.integers(0, 2**64, n, dtype=np.uint64) for _ in range(2))
        generation = -1 if start < window_keys // 2 else 0  # the previous one, then the claims'
        held.add_new(Keys(np.full(n, generation, np.int64), hi, lo))
    now = datetime.now(UTC)
    events = 0
    for pair in range(0, len(files) - 1, 2):
        tables = [_read(path) for path in files[pair : pair + 2]]
        events += sum(t.num_rows for t in tables)
        _group(tables, held, campaigns, now, costs)
    return costs, events


#: The ceiling exactly as ``adevents bench`` measures it, in a process of its own (Polars fixes
#: its thread count at import): argv is the scratch directory, then the files.
_CEILING = (
    "import sys; from pathlib import Path; from cli.bench import measure_ceiling; "
    "print(measure_ceiling([Path(p) for p in sys.argv[2:]], Path(sys.argv[1])))"
)


def ceiling_all_threads(files: list[Path], scratch: Path, rounds: int) -> list[float]:
    """Events/s of the bench's ceiling on ``files``, once per round, on every Polars thread."""
    env = {k: v for k, v in os.environ.items() if k != "POLARS_MAX_THREADS"}
    argv = [sys.executable, "-c", _CEILING, str(scratch), *map(str, files)]
    return [
        float(subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout)
        for _ in range(rounds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--window-keys", type=int, default=10_000_000)
    parser.add_argument("--ceiling-rounds", type=int, default=3)
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="adevents-stages-")
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "REDIS_URL")}
    try:
        settings = Settings.from_env(env).replace(data_dir=data_dir)
        generate(settings, events=args.events, rate=0, batch_size=100_000, seed=1, ids="hex33")
        files = sorted((Path(data_dir) / "incoming").glob("*.arrow"))
        campaigns = load_campaigns(Path(data_dir) / "dimensions" / "campaigns.parquet")
        costs, events = measure(files, campaigns, args.window_keys)
        ceilings = ceiling_all_threads(files, Path(data_dir) / "ceiling", args.ceiling_rounds)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    threads = os.environ.get("POLARS_MAX_THREADS", "all")
    print(f"{events:,} events, Polars threads: {threads}\n")
    print("| step | CPU ns an event |")
    print("|---|---|")
    ceiling = costs.seconds.pop("ceiling: IPC → Parquet")
    apart = {step: costs.seconds.pop(step) for step in _APART}
    write = costs.seconds["Parquet write (zstd, 16k-row groups)"]
    for step, seconds in costs.seconds.items():
        print(f"| {step} | {seconds / events * 1e9:.0f} |")
    total = sum(costs.seconds.values()) / events * 1e9
    print(f"| **the hot path's steps** | **{total:.0f}** |")
    ceiling_ns = ceiling / events * 1e9
    print(f"| ceiling: IPC → Parquet | {ceiling_ns:.0f} |")
    print(
        f"\nTwo cores kept busy by these steps alone: at most {2e9 / total:,.0f} events/s; "
        f"the ceiling on one core: {events / ceiling:,.0f}."
    )
    print("\n| the write, taken apart | CPU ns an event |\n|---|---|")
    print(f"| the consumer's (15 columns, 16k-row groups) | {write / events * 1e9:.0f} |")
    for step, seconds in apart.items():
        print(f"| {step} | {seconds / events * 1e9:.0f} |")
    print(f"| the ceiling's (IPC read, 11 columns, Polars' default groups) | {ceiling_ns:.0f} |")
    bench_ceiling = statistics.median(ceilings)
    print(
        f"\nThe ceiling as `adevents bench` measures it (every thread, {len(ceilings)} rounds): "
        f"{min(ceilings):,.0f} – {max(ceilings):,.0f} events/s, median {bench_ceiling:,.0f}. "
        f"These steps alone allow at most {2e9 / total / bench_ceiling:.2f}× that median "
        "on two cores kept perfectly busy, before any commit, fsync or wait."
    )


if __name__ == "__main__":
    main()
