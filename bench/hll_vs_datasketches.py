"""Unique-user sketches over whole columns: ``jobs/hll.py`` against Apache DataSketches' HLL.

    .venv/bin/pip install datasketches   # for this measurement only: not in the locks
    .venv/bin/python bench/hll_vs_datasketches.py --rows 1000000 5000000 --users 1000 10000 100000

Speed: for each row count and users-per-group, a frame of ``(campaign_id, minute, user_id)``
grouped as ``jobs/rollup.py`` groups it (per campaign and minute); times ``hll.registers`` then
``hll.estimate`` (Polars, whole columns) against one DataSketches ``hll_sketch`` per group fed
every user_id (its Python API takes one value per call), then ``get_estimate``. Both at 2^12
registers (lg_k 12, the precision of hll.py). Best of ``--repeat`` runs.

Accuracy: ``--error-groups`` groups of about ``--error-users`` distinct users each; the mean
signed relative error (bias) and the root-mean-square relative error of both estimators.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from jobs import hll

KEYS: Final = ("campaign_id", "minute")
LG_K: Final = hll.PRECISION
START_MS: Final = 1_796_169_600_000  # 2026-12-02T00:00:00Z


def column_frame(rows: int, users_per_group: int, *, seed: int) -> pl.DataFrame:
    """``rows`` events in groups of ``2 * users_per_group`` rows, each drawing its users from a
    pool of ``users_per_group`` (so about 86 % of the pool is seen per group)."""
    rng = np.random.default_rng(seed)
    group = np.arange(rows) // (2 * users_per_group)
    user = group * users_per_group + rng.integers(0, users_per_group, rows)
    return pl.DataFrame(
        {
            "campaign_id": pl.Series(group % 200).cast(pl.String).str.zfill(5),
            "minute": pl.Series(START_MS + (group // 200) * 60_000).cast(pl.Datetime("ms", "UTC")),
            "user_id": pl.Series(user).cast(pl.String),
        }
    )


def ours(frame: pl.DataFrame) -> pl.DataFrame:
    """hll.py: registers then estimate, per group."""
    return hll.estimate(hll.registers(frame, KEYS), KEYS)


def theirs(frame: pl.DataFrame) -> pl.DataFrame:
    """DataSketches: one HLL_8 sketch per group, fed value by value."""
    import datasketches as ds  # measured here only; not a dependency of adevents

    keys: list[tuple[object, ...]] = []
    estimates: list[int] = []
    for key, part in frame.group_by(KEYS):
        sketch = ds.hll_sketch(LG_K, ds.tgt_hll_type.HLL_8)
        collections.deque(map(sketch.update, part["user_id"].to_list()), maxlen=0)
        keys.append(key)
        estimates.append(round(sketch.get_estimate()))
    columns = list(zip(*keys, strict=True))
    return pl.DataFrame(
        {KEYS[0]: columns[0], KEYS[1]: columns[1], "unique_users": estimates},
        schema={
            KEYS[0]: frame.schema[KEYS[0]],
            KEYS[1]: frame.schema[KEYS[1]],
            "unique_users": pl.Int64,
        },
    )


def best_seconds(run: Callable[[pl.DataFrame], pl.DataFrame], frame: pl.DataFrame, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        run(frame)
        times.append(time.perf_counter() - started)
    return min(times)


@dataclass(frozen=True)
class Errors:
    bias: float
    rms: float

    def __str__(self) -> str:
        return f"bias {self.bias:+.2%}, rms {self.rms:.2%}"


def errors(estimated: pl.DataFrame, exact: pl.DataFrame) -> Errors:
    joined = estimated.join(exact, on=list(KEYS))
    rel = (joined["unique_users"] / joined["exact"] - 1.0).to_list()
    return Errors(statistics.fmean(rel), math.sqrt(statistics.fmean(r * r for r in rel)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--users", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--error-users", type=int, default=10_000)
    parser.add_argument("--error-groups", type=int, default=200)
    args = parser.parse_args()

    print("rows       users/group groups  hll.py s  datasketches s  ratio")
    for rows in args.rows:
        for users in args.users:
            frame = column_frame(rows, users, seed=rows + users)
            groups = frame.select(pl.struct(*KEYS).n_unique()).item()
            a = best_seconds(ours, frame, args.repeat)
            b = best_seconds(theirs, frame, args.repeat)
            print(f"{rows:<10,} {users:<11,} {groups:<7,} {a:8.3f}  {b:14.3f}  {b / a:5.1f}x")

    # The pool is sized so that a group sees about error_users distinct users.
    pool = round(args.error_users / (1 - math.exp(-2)))
    frame = column_frame(args.error_groups * 2 * pool, pool, seed=7)
    exact = frame.group_by(KEYS).agg(exact=pl.col("user_id").n_unique())
    mean_exact = statistics.fmean(exact["exact"].to_list())
    print(f"\naccuracy over {len(exact)} groups of ~{mean_exact:,.0f} distinct users each:")
    print(f"  hll.py        {errors(ours(frame), exact)}")
    print(f"  datasketches  {errors(theirs(frame), exact)}")
    print(f"  (standard error at 2^{LG_K} registers: {hll.relative_error():.2%})")


if __name__ == "__main__":
    main()
