"""Key-set layouts for the embedded key cache: the generation sets it runs on
(``pipeline.keycache.KeySet``, one generation a window long, partitioned runs) against the
whole-window set with Bloom filters (``pipeline.keyset.FingerprintSet``), on the same keys in
one run.

    python bench/keyset_layouts.py --keys 10000000 --batch 100000

Keys arrive as the consumer claims them: fresh random 128-bit fingerprints, event times at
``--rate`` events per second of event time, a one-hour window. For each layout: milliseconds
per batch to test membership and to add the batch, nanoseconds per key in all, the slowest
batch, and bytes per key held. Both find a copy wherever its event_time falls in the window.
Each layout runs in its own process, so their memory peaks do not mix.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np

from pipeline.fingerprint import Keys
from pipeline.keycache import KeySet
from pipeline.keyset import FingerprintSet

WINDOW_MS = 3_600_000
SLICE_MS = 1_000
T0_MS = 1_700_000_000_000


def run(layout: str, keys: int, batch: int, rate: int, out: mp.Queue[str]) -> None:
    rng = np.random.default_rng(0)
    held: KeySet | FingerprintSet = (
        KeySet() if layout == "generation" else FingerprintSet(WINDOW_MS, SLICE_MS)
    )
    look = add = slowest = 0.0
    batches = keys // batch
    for b in range(batches):
        ms = T0_MS + (b * batch + np.arange(batch, dtype=np.int64)) * 1000 // rate
        hi = rng.integers(0, 2**64, batch, dtype=np.uint64)
        lo = rng.integers(0, 2**64, batch, dtype=np.uint64)
        started = time.perf_counter()
        if isinstance(held, KeySet):  # as the embedded cache claims: one call, both steps
            held.add_new(Keys(ms // WINDOW_MS, hi, lo, ms))
            looked = started
        else:
            k = Keys(ms // SLICE_MS, hi, lo, ms)
            new = ~held.contains(k)
            looked = time.perf_counter()
            held.add(k.take(new))
        ended = time.perf_counter()
        look, add = look + looked - started, add + ended - looked
        slowest = max(slowest, ended - started)
    size = held.size()
    # KeySet holds 16 bytes of fingerprint a key; FingerprintSet reports its arrays and filters.
    per_key = held.nbytes() / size if isinstance(held, FingerprintSet) else 16.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put(
        f"| {layout} | {look / batches * 1000:.2f} | {add / batches * 1000:.2f} | "
        f"{(look + add) / (batches * batch) * 1e9:.0f} | {slowest * 1000:.0f} | {per_key:.1f} | "
        f"{size:,} | {peak:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=50_000, help="events/s of event time")
    args = parser.parse_args()
    print(
        "| layout | contains ms/batch | add ms/batch | ns/key | slowest batch ms | B/key | keys "
        "| peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for layout in ("generation", "whole-window"):
        out: mp.Queue[str] = mp.Queue()
        child = mp.Process(target=run, args=(layout, args.keys, args.batch, args.rate, out))
        child.start()
        print(out.get(), flush=True)
        child.join()


if __name__ == "__main__":
    main()
