"""The decide step of a commit group: files in; events, quarantine rows and ledger rows out.

Pure but for the key cache's claim, which is passed in: given the same files, the same clock
reading, the same watermark and the same claim answers, it decides the same (which is what
lets a redo after a crash reproduce the first attempt exactly). normalise → validate → dedupe
within the group (first copy wins, in file then row order) → claim what is left → enrich.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.enrich import enrich
from pipeline.fingerprint import Keys, compute_keys
from pipeline.groups import GroupFile
from pipeline.keycache import POSITION_BITS, Mask, Positions
from pipeline.keytable import first_copies
from pipeline.normalize import SchemaMismatchError, normalize
from pipeline.schema import ENRICHED_SCHEMA, IN_FLIGHT_SCHEMA, QUARANTINE_SCHEMA, LedgerRow
from pipeline.spool import REJECTED_SUFFIX, PoisonInputError, display_name
from pipeline.validate import late_expr, reason_expr

_FILE: Final = "__file"
_POSITION: Final = "__position"
#: A spool file's rows are positions ``index in the group << _FILE_SHIFT | row``.
_FILE_SHIFT: Final = 32
#: Columns a rejected-rows file from the HTTP ingest carries (the rest are added here).
REJECTED_COLUMNS: Final = [
    c for c in QUARANTINE_SCHEMA.names() if c not in ("source_file", "batch_id", "ingested_at")
]


@dataclass(frozen=True)
class FileInput:
    """One file of a group as read: its table, or why it can never be read."""

    file: GroupFile
    arrived_ms: int
    table: pa.Table | None
    poison: PoisonInputError | None = None
    read_ms: float = 0.0
    #: Each row's source position, for claims idempotent per position (a Kafka batch: the
    #: partition and offset of the row's message, ``pipeline.keycache.position_of``). None:
    #: the file's index in its group and the row's in the file.
    positions: Positions | None = None


@dataclass
class FileOutcome:
    """What one file contributes to its group's commits."""

    file: GroupFile
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA
    ledger: LedgerRow  # without the commit's own columns (set when the ledger commits)
    poison: PoisonInputError | None = None


@dataclass(frozen=True)
class Decided:
    """A decided group: an outcome per input, in input order, and the group's events."""

    outcomes: list[FileOutcome]
    #: The group's events, in input order, as one frame of one chunk: what the lake is given
    #: (IN_FLIGHT_SCHEMA; ENRICHED_SCHEMA when empty). Per-input slices concatenated again
    #: made a frame of several chunks, which cost the sort ~40 ns an event more.
    events: pl.DataFrame


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def _source(file: GroupFile) -> str:
    name = display_name(file.name)
    if name.endswith(REJECTED_SUFFIX):  # rows the HTTP ingest rejected: name the request
        return name.removesuffix(REJECTED_SUFFIX) + ".http"
    return name


def _quarantine_rows(
    rows: pl.DataFrame, file: GroupFile, now: datetime, *, with_offsets: bool = False
) -> pl.DataFrame:
    source = pl.lit(_source(file))
    if with_offsets:  # a Kafka batch: name each row's message, "<topic>/<partition>@<offset>"
        offset = pl.col(_POSITION) & ((1 << POSITION_BITS) - 1)
        source = pl.concat_str([source, pl.lit("@"), offset.cast(pl.String)])
    return (
        rows.with_columns(
            source_file=source,
            batch_id=pl.lit(file.batch_id),
            ingested_at=pl.lit(now).cast(QUARANTINE_SCHEMA["ingested_at"]),
        )
        .select(QUARANTINE_SCHEMA.names())
        .cast(dict(QUARANTINE_SCHEMA))  # type: ignore[arg-type]
    )


def _poisoned(inp: FileInput, poison: PoisonInputError, rows: int) -> FileOutcome:
    return FileOutcome(
        file=inp.file,
        quarantine=QUARANTINE_SCHEMA.to_frame(),
        ledger=LedgerRow(
            batch_id=inp.file.batch_id,
            source_file=_source(inp.file),
            status=poison.reason,
            rows_in=rows,
            quarantined=rows,
            arrived_at=inp.arrived_ms,
            read_ms=inp.read_ms,
        ),
        poison=poison,
    )


def _rejected_file(inp: FileInput, table: pa.Table, now: datetime) -> FileOutcome:
    """A file of rows the HTTP ingest already rejected: every row goes to quarantine."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    missing = [c for c in REJECTED_COLUMNS if c not in frame.columns]
    if missing:
        poison = PoisonInputError("schema_mismatch", f"rejected-rows file lacks {missing}")
        return _poisoned(inp, poison, table.num_rows)
    try:
        rows = frame.select(REJECTED_COLUMNS).cast(
            {c: QUARANTINE_SCHEMA[c] for c in REJECTED_COLUMNS}
        )
    except pl.exceptions.PolarsError as exc:
        return _poisoned(inp, PoisonInputError("schema_mismatch", str(exc)), table.num_rows)
    quarantine = _quarantine_rows(rows, inp.file, now)
    return FileOutcome(
        file=inp.file,
        quarantine=quarantine,
        ledger=_counts(inp, rows_in=len(rows), rejected=rows),
    )


def _counts(inp: FileInput, *, rows_in: int, rejected: pl.DataFrame) -> LedgerRow:
    row = LedgerRow(
        batch_id=inp.file.batch_id,
        source_file=_source(inp.file),
        rows_in=rows_in,
        quarantined=len(rejected),
        arrived_at=inp.arrived_ms,
        read_ms=inp.read_ms,
    )
    row.count_reasons(dict(rejected["reason"].value_counts().iter_rows()))
    return row


@dataclass
class _Readable:
    """An input whose table normalised: its rows join the group's one frame."""

    index: int  #: in the group's inputs
    inp: FileInput
    table: pa.Table
    outcome: FileOutcome


def _normalised(inp: FileInput, index: int) -> _Readable | FileOutcome:
    assert inp.table is not None
    try:
        table, ignored = normalize(inp.table, dictionaries=True)
    except SchemaMismatchError as exc:
        return _poisoned(inp, PoisonInputError("schema_mismatch", str(exc)), inp.table.num_rows)
    ledger = LedgerRow(
        batch_id=inp.file.batch_id,
        source_file=_source(inp.file),
        rows_in=table.num_rows,
        arrived_at=inp.arrived_ms,
        read_ms=inp.read_ms,
        ignored_columns=len(ignored),
    )
    outcome = FileOutcome(inp.file, QUARANTINE_SCHEMA.to_frame(), ledger)
    return _Readable(index, inp, table, outcome)


def _with_origin(r: _Readable) -> pa.Table:
    """``r``'s table with each row's input (``_FILE``) and source position (``_POSITION``):
    its message's (Kafka), else ``index << _FILE_SHIFT | row``. Added per table, before the
    group's tables are concatenated, so that they are chunked as every other column."""
    n = r.table.num_rows
    positions = r.inp.positions
    if positions is None:
        positions = np.arange(n, dtype=np.int64) + (r.index << _FILE_SHIFT)
    files = pa.array(np.full(n, r.index, np.int32))
    return r.table.append_column(_FILE, files).append_column(
        _POSITION, pa.array(positions.astype(np.int64, copy=False))
    )


def _by_file(
    readable: Sequence[_Readable], values: Callable[[_Readable], object], dtype: pl.DataType
) -> pl.Expr:
    """A per-row value of the row's input (by ``_FILE``): a gather from one value per input
    (5 ns a row, where mapping each row's ``_FILE`` through a dict took 21)."""
    per_index: list[object] = [None] * (max((r.index for r in readable), default=-1) + 1)
    for r in readable:
        per_index[r.index] = values(r)
    return pl.lit(pl.Series(per_index, dtype=dtype)).gather(pl.col(_FILE))


def _watermarks(
    tagged: pl.DataFrame, readable: Sequence[_Readable], watermark_ms: int | None
) -> dict[int, int | None]:
    """The watermark each input is judged late against: the group's, raised by the inputs
    before it, as if each were a group of its own (grouping, which depends on timing, never
    changes a verdict). A late row is older than the watermark, so the greatest event_time of
    the rows that pass every other rule is the greatest of the valid ones. Each input's rows
    are one run of the frame, so its greatest is a slice's (a group_by took 20 ns an event)."""
    valid_ms = tagged.select(
        pl.when(pl.col("reason").is_null()).then(pl.col("event_time").dt.epoch("ms"))
    ).to_series()
    marks: dict[int, int | None] = {}
    start = 0
    for r in readable:
        marks[r.index] = watermark_ms
        top = valid_ms.slice(start, r.table.num_rows).max()
        start += r.table.num_rows
        if top is not None:
            watermark_ms = max(int(top), watermark_ms or int(top))  # type: ignore[arg-type]
    return marks


def _per_file_stats(events: pl.DataFrame) -> dict[int, tuple[int, int, int, int]]:
    """Per input (``_FILE``): its rows, unknown campaigns and least and greatest event_time
    (ms). Rows stay in input order from the group's frame to here (filters, a left join keeping
    its order), so each input's rows are one run of the frame and these are reductions over
    runs (a group_by took 15 ns an event). Valid rows all have an event_time."""
    if not len(events):
        return {}
    files = events[_FILE].to_numpy()
    starts = np.flatnonzero(np.r_[True, files[1:] != files[:-1]])
    times = events["event_time"].dt.epoch("ms").to_numpy()
    unknown = np.add.reduceat(events["advertiser_id"].is_null().to_numpy(), starts)
    low, high = np.minimum.reduceat(times, starts), np.maximum.reduceat(times, starts)
    rows = np.diff(np.r_[starts, len(files)])
    return {
        int(files[start]): (int(n), int(u), int(lo), int(hi))
        for start, n, u, lo, hi in zip(starts, rows, unknown, low, high, strict=True)
    }


def _split(
    readable: Sequence[_Readable], now: datetime, watermark_ms: int | None, window_ms: int
) -> pl.DataFrame:
    """The valid rows of every readable input, in input then row order, with ``_FILE`` and
    ``_POSITION``; each input's quarantine rows and ledger counts set on its outcome."""
    frame = pl.from_arrow(pa.concat_tables([_with_origin(r) for r in readable]))
    assert isinstance(frame, pl.DataFrame)
    # One copy into single chunks, here, rather than at the sort: every step between works on
    # one chunk (a join or a gather over the inputs' several chunks re-aligns them first: the
    # enrich step took 58 ns an event on two chunks, 35 on one).
    frame = frame.rechunk()
    categorical = [n for n, t in frame.schema.items() if t == pl.Categorical]
    reason = reason_expr(
        now_ms=_ms(now) or 0, watermark_ms=None, window_ms=0, categorical=categorical
    )
    tagged = frame.with_columns(reason)
    marks = _watermarks(tagged, readable, watermark_ms)
    if any(mark is not None for mark in marks.values()):
        late = late_expr(_by_file(readable, lambda r: marks[r.index], pl.Int64()), window_ms)
        late_reason = pl.when(late).then(pl.lit("late_event"))
        tagged = tagged.with_columns(pl.coalesce("reason", late_reason).alias("reason"))
    is_valid = pl.col("reason").is_null()
    rejected = tagged.filter(~is_valid)
    if len(rejected):
        _quarantine(rejected, readable, now)
    return tagged.filter(is_valid).drop("reason")


def _quarantine(rejected: pl.DataFrame, readable: Sequence[_Readable], now: datetime) -> None:
    """Each input's rejected rows and their counts by reason, on its outcome."""
    counts: dict[int, dict[str, int]] = {}
    for index, reason, n in rejected.group_by(_FILE, "reason").len().iter_rows():
        counts.setdefault(index, {})[reason] = n
    rows = rejected.partition_by(_FILE, as_dict=True, include_key=False)
    for r in readable:
        mine = rows.get((r.index,))
        if mine is None:
            continue
        with_offsets = r.inp.positions is not None
        r.outcome.quarantine = _quarantine_rows(mine, r.inp.file, now, with_offsets=with_offsets)
        r.outcome.ledger.quarantined = len(mine)
        r.outcome.ledger.count_reasons(counts[r.index])


#: Keys of the first copies, and their source positions, to the key cache's answers.
Claim = Callable[[Keys, Positions], Mask]


def decide(
    inputs: Sequence[FileInput],
    *,
    now: datetime,
    watermark_ms: int | None,
    window_ms: int,
    slice_ms: int,
    campaigns: pl.DataFrame,
    claim: Claim,
) -> Decided:
    """Decide a group. ``claim`` gets the keys of the group's first copies (in order) and
    answers which are new to the key cache; it is not called when no row is valid.

    The group's readable inputs are one frame from validation to enrichment (per-input work
    is a fixed cost: a Kafka group holds one input per partition), then one outcome each."""
    now = now.astimezone(UTC)
    outcomes: list[FileOutcome] = []
    readable: list[_Readable] = []
    for index, inp in enumerate(inputs):
        if inp.poison is not None or inp.table is None:
            poison = inp.poison or PoisonInputError("unreadable_file", "no table")
            outcomes.append(_poisoned(inp, poison, 0))
        elif inp.file.name.endswith(REJECTED_SUFFIX):
            outcomes.append(_rejected_file(inp, inp.table, now))
        else:
            result = _normalised(inp, index)
            if isinstance(result, _Readable):
                readable.append(result)
                outcomes.append(result.outcome)
            else:
                outcomes.append(result)
    if not readable:
        return Decided(outcomes, ENRICHED_SCHEMA.to_frame())
    valid = _split(readable, now, watermark_ms, window_ms)
    kept = _dedupe(valid, slice_ms, claim)
    return Decided(outcomes, _enrich(kept, readable, campaigns, now))


def _dedupe(valid: pl.DataFrame, slice_ms: int, claim: Claim) -> pl.DataFrame:
    """Each event's first copy in the group if the key cache has not seen it."""
    if not len(valid):
        return valid.drop(_POSITION)
    keys = compute_keys(valid["event_id"], valid["event_time"], slice_ms)
    positions = valid[_POSITION].to_numpy()
    first = _first_copies(keys)
    is_new = np.zeros(len(keys), dtype=bool)
    is_new[first] = claim(keys.take(first), positions[first])
    _claim_other_copies(keys, positions, first, is_new, claim)
    return valid.filter(pl.Series(is_new)).drop(_POSITION)


def _first_copies(keys: Keys) -> Mask:
    """Per row, whether it is the first of its fingerprint in the group: copies are found on
    the 128-bit fingerprints (far cheaper than on the strings), in one pass in C (5 ns an
    event; Polars' is_first_distinct on ``lo``, then on both halves where ``lo`` repeats, took
    29). The key cache then decides between groups."""
    return first_copies(keys.hi, keys.lo)


def _claim_other_copies(
    keys: Keys, positions: Positions, first: Mask, is_new: Mask, claim: Claim
) -> None:
    """Ask again, copy by copy, for keys whose first copy in the group was refused but which
    the group holds at other positions too: a redo whose boundaries differ from its dead
    attempt's may meet first a copy the attempt found a duplicate, while the attempt won the
    key at another copy's position (claims are idempotent per position, not per key). At most
    one copy of a key is ever True. Rare (a key refused here and copied within the group),
    so usually no call at all."""
    order = pl.DataFrame({"hi": keys.hi, "lo": keys.lo, "row": np.arange(len(keys))})
    refused = order.filter(pl.Series(first & ~is_new)).select("hi", "lo")
    pending = order.filter(pl.Series(~first)).join(refused, on=["hi", "lo"], how="semi")
    while len(pending):
        ask = pending.filter(pl.struct("hi", "lo").is_first_distinct())
        rows = ask["row"].to_numpy()
        won = claim(keys.take(rows), positions[rows])
        is_new[rows] = won
        settled = ask.filter(pl.Series(won)).select("hi", "lo")
        pending = pending.filter(~pl.col("row").is_in(ask["row"].implode()))
        pending = pending.join(settled, on=["hi", "lo"], how="anti")


def _enrich(
    kept: pl.DataFrame, readable: Sequence[_Readable], campaigns: pl.DataFrame, now: datetime
) -> pl.DataFrame:
    """The group's kept rows, enriched; each input's ledger counts."""
    batch_id = _by_file(readable, lambda r: r.inp.file.batch_id, pl.Categorical())
    events, _unknown = enrich(
        kept, campaigns, batch_id=batch_id, ingested_at=now, keep=[_FILE], schema=IN_FLIGHT_SCHEMA
    )
    stats = _per_file_stats(events)
    for r in readable:
        row = r.outcome.ledger
        n, unknown, low, high = stats.get(r.index, (0, 0, None, None))
        row.accepted = n
        row.duplicates = row.rows_in - row.quarantined - n
        row.unknown_campaigns = unknown
        row.min_event_time, row.max_event_time = low, high
    return events.drop(_FILE)
