"""The embedded key cache's table alone: CPU per key to claim, and bytes per key, as it fills.

    python bench/key_table.py --keys 10000000 --batch 100000

Claims ``--keys`` fresh random fingerprints in batches of ``--batch`` into one generation
(each claim also looks in an older, empty one, as a claim always has a neighbour), then
claims ``--probe-batches`` more batches with the window full (what a consumer pays once its
window is held: the figure ``bench/stage_costs.py`` includes in its claim step), then fills
the older generation as full (not timed) and claims as many again: the steady state, where the
previous generation of the window is full and a new key misses in both tables. Reports CPU ns
a key for each phase, and bytes a key held. Drawing the random keys is not timed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.fingerprint import Keys
from pipeline.keytable import KeySet


def batches(n: int, batch: int, seed: int, generation: int = 1) -> list[Keys]:
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        hi = rng.integers(0, 2**64, size, dtype=np.uint64, endpoint=False)
        lo = rng.integers(0, 2**64, size, dtype=np.uint64, endpoint=False)
        out.append(Keys(np.full(size, generation, np.int64), hi, lo))
    return out


def claim_all(held: KeySet, keys: list[Keys]) -> float:
    """CPU ns a key to claim every batch."""
    started = time.process_time()
    for k in keys:
        held.add_new(k)
    return (time.process_time() - started) / max(sum(len(k) for k in keys), 1) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--probe-batches", type=int, default=20)
    args = parser.parse_args()
    held = KeySet(Keys(np.zeros(1, np.int64), np.ones(1, np.uint64), np.ones(1, np.uint64)))
    fill = claim_all(held, batches(args.keys, args.batch, seed=1))
    full = claim_all(held, batches(args.probe_batches * args.batch, args.batch, seed=2))
    print(f"{held.size():,} keys held in {len(held.tables)} generations")
    print(f"claim while filling: {fill:.0f} CPU ns a key")
    print(f"claim with the window held: {full:.0f} CPU ns a key")
    print(f"memory: {held.bytes() / held.size():.1f} bytes a key")
    # The steady state: the previous generation is as full (a claim misses in both tables).
    claim_all(held, batches(args.keys, args.batch, seed=3, generation=0))
    both = claim_all(held, batches(args.probe_batches * args.batch, args.batch, seed=4))
    print(f"claim with the previous generation full too: {both:.0f} CPU ns a key")


if __name__ == "__main__":
    main()
