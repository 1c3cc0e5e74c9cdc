"""A campaign's event totals per time bucket, summed from local row groups without a DuckDB scan.

A stats question whose ``until`` falls inside a compacted hour reads the partial minute at
``until`` from events. Through DuckDB that cost 17 ms (122,880-row groups) to 30 ms (16,384-row
groups) of a 2-core machine a question, for one row group read: most of it the scan's set-up and
its pruning of every row group of the hour's files (5 ms for 777 groups that all fail). Here the
footers are cached (:class:`queries.row_groups.RowGroups`) and only the five columns the totals
need are decoded from the groups that can hold the campaign in the runs asked: 4 ms for a
122,880-row group, 0.7 ms for a 16,384-row one (50M-event lake).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from queries.row_groups import RowGroups

#: Columns the totals are computed from.
COLUMNS: Final = ("campaign_id", "event_time", "event_type", "cost_micros", "revenue_micros")
#: The counted event types, in the order of a total's first three fields.
_COUNTED: Final = ("impression", "click", "conversion")

#: A bucket's start (epoch ms) -> [impressions, clicks, conversions, spend, revenue].
Sums = dict[int, list[int]]


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    stamps = column.cast(pa.timestamp("us", "UTC")).cast(pa.int64())
    # Nulls (none in the schema) become a time no run holds.
    return np.asarray(stamps.fill_null(np.iinfo(np.int64).min).to_numpy(), dtype=np.int64)


def _money(column: pa.ChunkedArray | None, rows: int) -> np.ndarray:
    if column is None:
        return np.zeros(rows, dtype=np.int64)
    return np.asarray(column.fill_null(0).to_numpy(), dtype=np.int64)


def add_table(
    out: Sums,
    table: pa.Table,
    campaign_id: str,
    runs: Sequence[tuple[int, int]],
    width_ms: int,
) -> None:
    """Add the campaign's rows of ``table`` with times in ``runs`` (epoch ms, [start, end)) to
    ``out``, by bucket of ``width_ms`` (UTC: a bucket is a floor of the epoch), as the SQL
    ``count(*) FILTER (...)``/``coalesce(sum(...), 0)`` of ``queries.campaigns`` would."""
    mine = pc.equal(table.column("campaign_id"), pa.scalar(campaign_id)).fill_null(False)
    rows = table.filter(mine)
    if rows.num_rows == 0:
        return
    times = _micros(rows.column("event_time"))
    keep = np.zeros(len(times), dtype=bool)
    for lo, hi in runs:
        keep |= (times >= lo * 1000) & (times < hi * 1000)
    if not keep.any():
        return
    rows = rows.filter(pa.array(keep))
    times = times[keep]
    names = set(rows.column_names)
    kinds = rows.column("event_type") if "event_type" in names else None
    cost = _money(rows.column("cost_micros") if "cost_micros" in names else None, len(times))
    revenue = _money(
        rows.column("revenue_micros") if "revenue_micros" in names else None, len(times)
    )
    buckets, at = np.unique((times // 1000) // width_ms * width_ms, return_inverse=True)
    n = len(buckets)
    counts = []
    for kind in _COUNTED:
        if kinds is None:
            counts.append(np.zeros(n, dtype=np.int64))
            continue
        hit = np.asarray(pc.equal(kinds, kind).fill_null(False).to_numpy(), dtype=bool)
        counts.append(np.bincount(at[hit], minlength=n).astype(np.int64))
    # Money summed in int64 (np.bincount's float weights would round large sums).
    spend = np.zeros(n, dtype=np.int64)
    earned = np.zeros(n, dtype=np.int64)
    np.add.at(spend, at, cost)
    np.add.at(earned, at, revenue)
    for j, bucket in enumerate(buckets.tolist()):
        values = [int(counts[0][j]), int(counts[1][j]), int(counts[2][j])]
        values += [int(spend[j]), int(earned[j])]
        known = out.setdefault(int(bucket), [0, 0, 0, 0, 0])
        for k, v in enumerate(values):
            known[k] += v


def from_row_groups(
    groups: RowGroups,
    paths: Iterable[str],
    campaign_id: str,
    runs: Sequence[tuple[int, int]],
    width_ms: int,
) -> Sums:
    """The campaign's totals by bucket in ``runs`` over the local files ``paths``: only the row
    groups whose statistics (or known per-campaign spans) can hold it in a run are read."""
    out: Sums = {}
    for path in paths:
        for lo, hi in runs:
            for _, group in groups.candidates(path, campaign_id, lo * 1000, hi * 1000):
                # One run at a time so a group between two runs is not read; a group two
                # runs share is read once per run, each counting only its own rows.
                table = groups.columns(path, group.index, COLUMNS)
                add_table(out, table, campaign_id, ((lo, hi),), width_ms)
    return out
