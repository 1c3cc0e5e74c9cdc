"""A file's rows held in memory, ordered once by (campaign_id, event_time, event_id).

A campaign's newest events in the uncompacted tail are then a binary search and a take, where a
scan of the file's rows cost ~9 ms a file per question (DuckDB converts every row of a
registered Arrow table; measured on the consumer's 190k-row files of a 50M-event lake), and a
campaign's stats totals in a time range are two binary searches over running totals in that
order. Files never change, so an order built once stays right for as long as the file is held.
The per-row event values (counted type, money) that stats sum are here too, for
:mod:`queries.event_sums`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

#: The columns of an event as queries.events returns it, in its field order.
EVENT_FIELDS: Final = (
    "event_id",
    "event_type",
    "time_ms",
    "campaign_id",
    "ad_id",
    "publisher_id",
    "advertiser_id",
    "device_type",
    "country",
    "cost_micros",
    "revenue_micros",
)


@dataclass(frozen=True)
class Cursor:
    """Rows strictly before (time_us, event_id) in (event_time, event_id) order."""

    time_us: int
    event_id: str


def plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``column`` with its dictionary (if any) decoded into plain values."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _in_order(keys: pa.Table, times: npt.NDArray[np.int64]) -> bool:
    """Whether the rows are in (campaign_id, event_time, event_id) order already, nulls none: a
    stable sort would then leave them as they are. Only the neighbours that tie on campaign and
    time compare their ids."""
    if keys.num_rows < 2:
        return True
    if any(keys.column(n).null_count for n in keys.column_names):
        return False
    campaign = keys.column("campaign_id").combine_chunks()
    before, after = campaign.slice(0, len(campaign) - 1), campaign.slice(1)
    if not pc.all(pc.less_equal(before, after)).as_py():
        return False
    same = np.asarray(pc.equal(before, after).to_numpy(zero_copy_only=False), dtype=bool)
    step = np.diff(times)
    if bool(((step < 0) & same).any()):
        return False
    tied = np.flatnonzero(same & (step == 0))
    if not len(tied):
        return True
    ids = keys.column("event_id").combine_chunks()
    first, second = ids.take(pa.array(tied)), ids.take(pa.array(tied + 1))
    return bool(pc.all(pc.less_equal(first, second)).as_py())


#: The counted event types, in the order of a total's first three fields.
_COUNTED: Final = ("impression", "click", "conversion")
_KIND: Final = {kind: k for k, kind in enumerate(_COUNTED)}


def _money(column: pa.ChunkedArray | None, rows: int) -> npt.NDArray[np.int64]:
    if column is None:
        return np.zeros(rows, dtype=np.int64)
    return np.asarray(column.fill_null(0).to_numpy(), dtype=np.int64)


def coded(
    column: pa.ChunkedArray, codes: Callable[[pa.Array], npt.NDArray[Any]], null: object
) -> npt.NDArray[Any]:
    """Per row, a code computed once per distinct value (``codes`` of a chunk's dictionary, the
    ``null`` code for nulls): on the dictionary columns a row group is read as, a lookup by
    index. Three ``pc.equal`` of event_type, one per counted type, took 1.1 ms of a 16,384-row
    group; the whole of its totals now costs less than one of them."""
    out = []
    for chunk in column.chunks:
        encoded = chunk if pa.types.is_dictionary(chunk.type) else pc.dictionary_encode(chunk)
        known = codes(encoded.dictionary)
        table = np.append(known, np.asarray([null], dtype=known.dtype))
        out.append(table[encoded.indices.fill_null(len(known)).to_numpy()])
    return np.concatenate(out) if out else codes(pa.array([], pa.string()))


def _kinds(values: pa.Array) -> npt.NDArray[np.int8]:
    """Each value's column among the totals' first three, or 3 (not counted)."""
    return np.asarray([_KIND.get(v, 3) for v in values.to_pylist()], dtype=np.int8)


def event_values(table: pa.Table, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Per row of ``rows``: [impression, click, conversion, cost, revenue]."""
    values = np.zeros((len(rows), 5), dtype=np.int64)
    if len(rows):
        names = set(table.column_names)
        if "event_type" in names:
            kinds = coded(table.column("event_type"), _kinds, 3)[rows]
            counted = np.flatnonzero(kinds < 3)
            values[counted, kinds[counted]] = 1
        for k, name in ((3, "cost_micros"), (4, "revenue_micros")):
            column = table.column(name) if name in names else None
            values[:, k] = _money(column, table.num_rows)[rows]
    return values


#: Memory an OrderedRows takes beyond its rows, per row, once stats have asked it: the order and
#: the times (8 + 8 bytes) and the running totals (5 x 8). The tail's budget charges it.
ORDER_BYTES_PER_ROW: Final = 56


class OrderedRows:
    """One file's rows and their order by (campaign_id, event_time, event_id), ascending.

    Strings compare as their UTF-8 bytes, as DuckDB's ORDER BY compares VARCHARs.
    """

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        keys = pa.table(
            {
                "campaign_id": plain(table.column("campaign_id")),
                "event_time": table.column("event_time"),
                "event_id": table.column("event_id"),
            }
        )
        micros = table.column("event_time").cast(pa.timestamp("us", "UTC")).cast(pa.int64())
        times = micros.to_numpy()
        if _in_order(keys, times):
            # A clustered hour's row groups are written in this order: 2-3 ms of sort saved
            # a 16,384-row group, about a third of reading one cold.
            self.order: npt.NDArray[np.int64] = np.arange(table.num_rows, dtype=np.int64)
            self.times_us: npt.NDArray[np.int64] = times
            campaigns = keys.column("campaign_id").combine_chunks()
        else:
            order = pc.sort_indices(
                keys,
                sort_keys=[
                    ("campaign_id", "ascending"),
                    ("event_time", "ascending"),
                    ("event_id", "ascending"),
                ],
            )
            self.order = order.to_numpy().astype(np.int64)
            self.times_us = times[self.order]
            campaigns = keys.column("campaign_id").take(order).combine_chunks()
        # Where each campaign's run starts and ends in the order.
        ends = pc.run_end_encode(campaigns)
        values = ends.values.to_pylist()
        stops = ends.run_ends.to_pylist()
        starts = [0, *stops[:-1]]
        self.runs: dict[str, tuple[int, int]] = dict(
            zip(values, zip(starts, stops, strict=True), strict=True)
        )
        self._types: npt.NDArray[np.object_] | None = None
        self._running: npt.NDArray[np.int64] | None = None
        shown = table.select([n for n in EVENT_FIELDS if n != "time_ms"] + ["event_time"])
        self._schema = shown.schema
        self._batches = shown.to_batches()
        sizes = [len(b) for b in self._batches]
        self._offsets: npt.NDArray[np.int64] = np.cumsum([0, *sizes[:-1]], dtype=np.int64)

    def spans(self) -> dict[str, tuple[int, int]]:
        """Each campaign's (first, last) event time in microseconds."""
        last = self.times_us
        return {c: (int(last[a]), int(last[b - 1])) for c, (a, b) in self.runs.items()}

    @property
    def nbytes(self) -> int:
        """Memory held: the rows, the order and any running totals."""
        running = 0 if self._running is None else self._running.nbytes
        return int(self.table.nbytes) + self.order.nbytes + self.times_us.nbytes + running

    def totals(
        self, campaign_id: str, since_us: int, until_us: int, width_ms: int
    ) -> dict[int, list[int]]:
        """The campaign's rows in [since, until) summed by bucket of ``width_ms`` (a floor of
        the epoch): bucket start (epoch ms) -> [impressions, clicks, conversions, cost,
        revenue]; buckets without rows are left out. Two binary searches a bucket over running
        totals built once: DuckDB's scan of the uncompacted tail's files in memory cost ~4 ms a
        stats question, for a few hundred rows."""
        run = self.runs.get(campaign_id)
        if run is None:
            return {}
        start, stop = run
        times = self.times_us[start:stop]
        a = start + int(np.searchsorted(times, since_us, "left"))
        b = start + int(np.searchsorted(times, until_us, "left"))
        if b <= a:
            return {}
        first = int(self.times_us[a]) // 1000
        first -= first % width_ms
        last = int(self.times_us[b - 1]) // 1000
        buckets = np.arange(first, last + 1, width_ms, dtype=np.int64)
        cuts = a + np.searchsorted(self.times_us[a:b], buckets[1:] * 1000, "left")
        edges = np.concatenate(([a], cuts, [b]))
        running = self._running_totals()
        sums = running[edges[1:]] - running[edges[:-1]]
        filled = edges[1:] > edges[:-1]
        return dict(zip(buckets[filled].tolist(), sums[filled].tolist(), strict=True))

    def _running_totals(self) -> npt.NDArray[np.int64]:
        """Row k: [impressions, clicks, conversions, cost, revenue] of the first k rows of the
        order (40 bytes a row, built on first use)."""
        if self._running is None:
            running = np.zeros((self.table.num_rows + 1, 5), dtype=np.int64)
            np.cumsum(event_values(self.table, self.order), axis=0, out=running[1:])
            self._running = running
        return self._running

    def _event_types(self) -> npt.NDArray[np.object_]:
        if self._types is None:
            column = plain(self.table.column("event_type")).take(pa.array(self.order))
            self._types = np.array(column.to_pylist(), dtype=object)
        return self._types

    def newest(
        self,
        campaign_id: str,
        limit: int,
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        event_type: str | None = None,
        before: Cursor | None = None,
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit`` rows of the campaign in [since, until), of ``event_type`` and before
        ``before`` when given, newest first by (event_time, event_id): EVENT_FIELDS each."""
        run = self.runs.get(campaign_id)
        if run is None or limit <= 0:
            return []
        start, stop = run
        times = self.times_us[start:stop]
        if since_us is not None:
            start += int(np.searchsorted(times, since_us, "left"))
        if until_us is not None:
            stop = run[0] + int(np.searchsorted(times, until_us, "left"))
        if before is not None:
            at = run[0] + int(np.searchsorted(times, before.time_us, "left"))
            tied = run[0] + int(np.searchsorted(times, before.time_us, "right"))
            # Rows tied on the cursor's time are in event_id order: those below its id count.
            ids = self._tied_ids(at, tied)
            stop = min(stop, at + _count_below(ids, before.event_id))
        if stop <= start:
            return []
        if event_type is None:
            positions = np.arange(max(start, stop - limit), stop)[::-1]
        else:
            kept = np.flatnonzero(self._event_types()[start:stop] == event_type) + start
            positions = kept[-limit:][::-1]
        return self._rows(self.order[positions])

    def _tied_ids(self, start: int, stop: int) -> list[str]:
        rows = pa.array(self.order[start:stop])
        return [str(v) for v in self.table.column("event_id").take(rows).to_pylist()]

    def _rows(self, rows: npt.NDArray[np.int64]) -> list[tuple[Any, ...]]:
        # Taken chunk by chunk: a take over the whole (chunked) table concatenates every
        # chunk first (8 ms for a 190k-row file).
        chunk = np.searchsorted(self._offsets, rows, "right") - 1
        picked = []
        for c in np.unique(chunk):
            local = rows[chunk == c] - self._offsets[c]
            picked.append(self._batches[c].take(pa.array(local)))
        # The rows in the order asked for, and back to plain values.
        taken = pa.Table.from_batches(picked, schema=self._schema)
        back = np.argsort(np.argsort(chunk, kind="stable"), kind="stable")
        taken = taken.take(pa.array(back))
        columns: list[list[Any]] = []
        for name in EVENT_FIELDS:
            if name == "time_ms":
                stamps = taken.column("event_time").cast(pa.timestamp("us", "UTC"))
                micros = stamps.cast(pa.int64()).to_numpy()
                columns.append((micros // 1000).tolist())
            else:
                columns.append(plain(taken.column(name)).to_pylist())
        return list(zip(*columns, strict=True))


def _count_below(ids: list[str], bound: str) -> int:
    """How many of the ascending ``ids`` (by UTF-8 bytes) are below ``bound``."""
    key = bound.encode()
    return sum(1 for i in ids if i.encode() < key)
