"""The generator loop: pacing, duplicate and late hold-back queues, spool writes, ground truth."""

from __future__ import annotations

import itertools
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from generator import ID_SHAPES, model
from generator.dimension import ensure_campaigns, population_for, seed_sequences
from generator.http import HttpSender, SendTotals
from generator.kafka import KafkaSender, PublishTotals
from pipeline.schema import KEY_COLUMN, TIME_COLUMN, Layout
from pipeline.settings import Settings
from pipeline.signals import stop_on_signals
from pipeline.spool import SpoolWriter

#: Events per file when writing as fast as possible.
MAX_RATE_BATCH: Final = 100_000
#: Nominal event density of the simulated clock when EVENTS_PER_SECOND is 0.
FALLBACK_DENSITY: Final = 50_000
#: Campaigns in a dimension the generator creates.
DEFAULT_CAMPAIGNS: Final = 1000
#: Largest number of rows in one file (Arrow string offsets are 32-bit).
MAX_BATCH: Final = 10_000_000
#: Share of duplicates re-sent in the same batch; the rest come 1..RETRY_BATCHES batches later.
SAME_BATCH_DUPLICATES: Final = 0.25
RETRY_BATCHES: Final = 20
#: How far a late event's time lies before its delivery (some beyond a 1 h dedupe window).
LATE_DELAY_MS: Final = (60_000, 2 * 3600_000)
#: Longest shift of a re-stamped copy's event_time (RESTAMP_RATE), and at most this share of
#: DEDUPE_WINDOW, so both copies stay well inside the window.
RESTAMP_MAX_MS: Final = 60_000
RESTAMP_MAX_WINDOW_SHARE: Final = 0.1
TRUTH_SCHEMA: Final = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("copies", pa.int64(), nullable=False),
        pa.field("valid", pa.bool_(), nullable=False),
        pa.field("late_ms", pa.int64(), nullable=False),
    ]
)

Int64s = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GenerateSummary:
    """What one run wrote. ``events`` counts rows (copies included); ``distinct`` event_ids."""

    files: int
    events: int
    distinct: int
    duplicates: int
    invalid: int
    late: int
    seconds: float
    seed: int
    producer: str
    truth: Path | None = None
    #: Duplicate copies whose event_time differs from their original's (RESTAMP_RATE).
    restamped: int = 0
    #: What the server answered, when the events were sent over HTTP.
    sent: SendTotals | None = None
    #: What the brokers acknowledged, when the events were published to Kafka.
    published: PublishTotals | None = None

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def _restamped_note(self) -> str:
        return f" ({self.restamped} re-stamped)" if self.restamped else ""

    def line(self) -> str:
        return (
            f"generated {self.files} files, {self.events} events ({self.distinct} distinct, "
            f"{self.duplicates} duplicates{self._restamped_note}, {self.invalid} invalid, "
            f"{self.late} late) "
            f"in {self.seconds:.2f} s = {self.events_per_second:,.0f} events/s "
            f"(producer {self.producer}, seed {self.seed})"
        )


@dataclass
class _Held:
    """Rows held back for a later batch: duplicate copies, or late events with their delays."""

    frame: pl.DataFrame
    origin_ms: int
    late_seqs: Int64s | None = None
    late_delay_ms: Int64s | None = None


@dataclass
class _Truth:
    """Per-event counts kept as NumPy chunks indexed by sequence number, not per-event objects.

    Sequence number ``s`` is the run's ``s``-th fresh event; its event_id is derived from it,
    except for rows given a malformed id, whose ids are kept aside (``odd``).
    """

    keep: bool
    copies: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    valid: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    odd_seqs: list[Int64s] = field(default_factory=list)
    odd_ids: list[pl.Series] = field(default_factory=list)
    late_seqs: list[Int64s] = field(default_factory=list)
    late_ms: list[Int64s] = field(default_factory=list)
    fresh: int = 0
    empty_ids: int = 0
    rows: int = 0
    invalid_rows: int = 0
    late_rows: int = 0

    def add_batch(
        self,
        seq_start: int,
        copies: npt.NDArray[np.uint8],
        valid: npt.NDArray[np.bool_],
        odd_rows: Int64s,
        odd_ids: pl.Series,
    ) -> None:
        self.fresh += len(copies)
        self.rows += int(copies.sum(dtype=np.int64))
        self.invalid_rows += int(copies[~valid].sum(dtype=np.int64))
        self.empty_ids += int((odd_ids.str.len_bytes() == 0).sum())
        if self.keep:
            self.copies.append(copies)
            self.valid.append(valid)
            if len(odd_rows):
                self.odd_seqs.append(seq_start + odd_rows)
                self.odd_ids.append(odd_ids)

    def add_late(self, seqs: Int64s, late_ms: Int64s) -> None:
        self.late_rows += len(seqs)
        if self.keep:
            self.late_seqs.append(seqs)
            self.late_ms.append(late_ms)

    @property
    def distinct(self) -> int:
        # Every malformed empty event_id is the same id.
        return self.fresh - max(self.empty_ids - 1, 0)

    def write(self, path: Path, id_prefix: bytes, id_shape: str, chunk: int = 1_000_000) -> None:
        """Write the truth Parquet atomically (temporary name, then rename)."""
        copies = np.concatenate([np.empty(0, np.uint8), *self.copies]).astype(np.int64)
        valid = np.concatenate([np.empty(0, np.bool_), *self.valid])
        late = np.zeros(len(copies), dtype=np.int64)
        if self.late_seqs:
            late[np.concatenate(self.late_seqs)] = np.concatenate(self.late_ms)
        odd_seqs = np.concatenate([np.empty(0, np.int64), *self.odd_seqs])
        normal = np.ones(len(copies), dtype=np.bool_)
        normal[odd_seqs] = False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with pq.ParquetWriter(tmp, TRUTH_SCHEMA) as writer:
            for start in range(0, max(len(copies), 1), chunk):
                part = slice(start, start + chunk)
                keep = normal[part]
                columns = [
                    model.event_ids(id_prefix, np.arange(start, start + len(keep))[keep], id_shape),
                    pa.array(copies[part][keep]),
                    pa.array(valid[part][keep]),
                    pa.array(late[part][keep]),
                ]
                writer.write_table(pa.Table.from_arrays(columns, schema=TRUTH_SCHEMA))
            if len(odd_seqs):
                # Malformed ids are grouped: several rows may share the empty one.
                odd = (
                    pl.DataFrame(
                        {
                            "event_id": pl.concat(self.odd_ids),
                            "copies": copies[odd_seqs],
                            "valid": valid[odd_seqs],
                            "late_ms": late[odd_seqs],
                        }
                    )
                    .group_by("event_id", maintain_order=True)
                    .agg(pl.col("copies").sum(), pl.col("valid").all(), pl.col("late_ms").max())
                )
                writer.write_table(odd.to_arrow().cast(TRUTH_SCHEMA))
        os.replace(tmp, path)


class _BatchWriter(Protocol):
    """Where micro-batches go: the spool (SpoolWriter), a server (HttpSender) or Kafka."""

    def write(self, table: pa.Table) -> object: ...


class _BackgroundWriter:
    """Converts and writes files on one thread, in order, so drawing the next batch overlaps
    the I/O. A failed write is raised by the next ``submit`` or by ``close``."""

    def __init__(self, writer: _BatchWriter, population: model.Population, depth: int = 2) -> None:
        self._writer = writer
        self._population = population
        self._queue: queue.Queue[pl.DataFrame | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.files = 0
        self._thread = threading.Thread(target=self._work, name="generator-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (frame := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                self._writer.write(model.to_spool_table(frame, self._population))
                self.files += 1
            except BaseException as exc:  # handed to the producing thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, frame: pl.DataFrame) -> None:
        self._raise()
        self._queue.put(frame)

    def close(self) -> None:
        """Write everything submitted, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


class _Run:
    """One generator run's mutable state; ``step`` draws, holds back and writes one batch."""

    def __init__(
        self,
        *,
        settings: Settings,
        writer: _BackgroundWriter,
        population: model.Population,
        id_prefix: bytes,
        id_shape: str,
        seeds: np.random.SeedSequence,
        clock: Callable[[], float],
        keep_truth: bool,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.population = population
        self.id_prefix = id_prefix
        self.id_shape = id_shape
        sequences = seeds.spawn(2)
        self.model_rng = np.random.default_rng(sequences[0])
        self.rng = np.random.default_rng(sequences[1])
        self.clock = clock
        self.truth = _Truth(keep=keep_truth)
        self.queue: dict[int, list[_Held]] = {}
        self.index = 0  # batches drawn so far
        self.seq = 0  # fresh events drawn so far
        self.committed = 0  # rows written or held back: all will be written
        self.rows = 0
        self.restamped = 0  # duplicate copies given another event_time
        self.clock_ms = self.now_ms()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def step(self, size: int, start_ms: int, end_ms: int, budget: int | None) -> None:
        """Write one file: due held-back rows, then ``size`` minus those of fresh rows and their
        same-batch duplicates; hold back late rows and later duplicates. ``budget`` caps the
        rows this batch may commit."""
        self.clock_ms = end_ms
        due = self.queue.pop(self.index, [])
        self.index += 1
        room = max(size - sum(h.frame.height for h in due), 0)
        if budget is not None:
            room = min(room, budget)
        dup_rate, late_rate = self.settings.dup_rate, self.settings.late_rate
        share = SAME_BATCH_DUPLICATES * dup_rate
        same = int(self.rng.binomial(room, share / (1 + share))) if dup_rate and room else 0
        fresh = room - same
        later = int(self.rng.binomial(fresh, dup_rate - share)) if dup_rate and fresh else 0
        if budget is not None:
            later = min(later, budget - room)
        late = int(self.rng.binomial(fresh, late_rate)) if late_rate and fresh else 0
        # Originals of duplicates are distinct on-time rows, so copies <= 2 and late_ms is exact.
        same = min(same, fresh - late)
        later = min(later, fresh - late - same)
        parts = [h.frame for h in due]
        if fresh:
            spec = model.BatchSpec(
                self.id_prefix,
                self.seq,
                fresh,
                start_ms,
                end_ms,
                self.settings.invalid_rate,
                self.id_shape,
            )
            batch = model.generate_batch(self.model_rng, self.population, spec)
            frame = batch.frame
            picks = self.rng.choice(fresh, late + same + later, replace=False).astype(np.int64)
            late_rows, same_rows, later_rows = np.split(picks, [late, late + same])
            on_time = frame
            if late:
                delay = self.rng.integers(LATE_DELAY_MS[0], LATE_DELAY_MS[1] + 1, late)
                shift = np.zeros(fresh, dtype=np.int64)
                shift[late_rows] = delay
                frame = frame.with_columns(
                    pl.col(TIME_COLUMN) - pl.Series(shift).cast(pl.Duration("ms"))
                )
                kept = np.ones(fresh, dtype=np.bool_)
                kept[late_rows] = False
                on_time = frame.filter(pl.Series(kept))
                self._hold(frame, late_rows, end_ms, late_delay_ms=delay)
            copies_of = self._restamped(frame, np.concatenate([same_rows, later_rows]))
            parts += [on_time, copies_of[same_rows]]
            self._hold(copies_of, later_rows, end_ms)
            copies = np.ones(fresh, dtype=np.uint8)
            copies[same_rows] += 1
            copies[later_rows] += 1
            valid = np.ones(fresh, dtype=np.bool_)
            valid[batch.invalid] = False
            odd_rows = batch.invalid_ids
            odd_ids = frame.get_column(KEY_COLUMN).gather(odd_rows)
            self.truth.add_batch(self.seq, copies, valid, odd_rows, odd_ids)
            self.seq += fresh
            self.committed += fresh + same + later
        self._write(parts, due)

    def _restamped(self, frame: pl.DataFrame, copy_rows: Int64s) -> pl.DataFrame:
        """``frame`` with a RESTAMP_RATE share of ``copy_rows`` moved in event time, for the
        copies sent from it: later or earlier, by 1 ms to RESTAMP_MAX_MS (at most a tenth of
        the dedupe window), log-uniformly: with a 1 h window two thirds are under a second
        (a pixel stamped twice by the server, often across a second boundary) and the rest are
        an SDK retry's seconds. The ground truth is by event_id, so such a copy still counts as
        a duplicate."""
        rate = self.settings.restamp_rate
        count = int(self.rng.binomial(len(copy_rows), rate)) if rate and len(copy_rows) else 0
        if not count:
            return frame
        rows = self.rng.choice(copy_rows, count, replace=False)
        longest = min(RESTAMP_MAX_MS, self.settings.dedupe_window * 1000 * RESTAMP_MAX_WINDOW_SHARE)
        size = np.exp(self.rng.uniform(0.0, np.log(max(longest, 1.0)), count)).astype(np.int64)
        sign = np.where(self.rng.random(count) < 0.5, -1, 1)
        shift = np.zeros(frame.height, dtype=np.int64)
        shift[rows] = sign * np.maximum(size, 1)
        self.restamped += count
        return frame.with_columns(pl.col(TIME_COLUMN) + pl.Series(shift).cast(pl.Duration("ms")))

    def _hold(
        self,
        frame: pl.DataFrame,
        rows: Int64s,
        origin_ms: int,
        late_delay_ms: Int64s | None = None,
    ) -> None:
        """Queue ``rows`` of ``frame`` for delivery 1..RETRY_BATCHES batches from now."""
        if not len(rows):
            return
        wait = self.rng.integers(1, RETRY_BATCHES + 1, len(rows))
        order = np.argsort(wait, kind="stable")
        held = frame[rows[order]]
        seqs = self.seq + rows[order]
        delay = None if late_delay_ms is None else late_delay_ms[order]
        bounds = np.searchsorted(wait[order], np.arange(1, RETRY_BATCHES + 2))
        for k, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
            if hi > lo:
                self.queue.setdefault(self.index - 1 + k, []).append(
                    _Held(
                        held.slice(lo, hi - lo),
                        origin_ms,
                        None if delay is None else seqs[lo:hi],
                        None if delay is None else delay[lo:hi],
                    )
                )

    def _write(self, parts: list[pl.DataFrame], delivered: list[_Held]) -> None:
        parts = [p for p in parts if p.height]
        if not parts:
            return
        frame = pl.concat(parts) if len(parts) > 1 else parts[0]
        self.writer.submit(frame)
        self.rows += frame.height
        for held in delivered:
            if held.late_seqs is not None and held.late_delay_ms is not None:
                late_ms = self.clock_ms - held.origin_ms + held.late_delay_ms
                self.truth.add_late(held.late_seqs, late_ms)

    def flush(self, max_rows: int) -> None:
        """Write every held-back row, oldest first, in files of about ``max_rows``."""
        pending: list[_Held] = []
        for index in sorted(self.queue):
            pending += self.queue.pop(index)
            if sum(h.frame.height for h in pending) >= max_rows:
                self._write([h.frame for h in pending], pending)
                pending = []
        self._write([h.frame for h in pending], pending)

    def realtime(
        self,
        rate: float,
        batch_size: int,
        events: int | None,
        duration: float | None,
        stop: threading.Event,
    ) -> None:
        """A batch of ``batch_size`` every ``batch_size / rate`` seconds; a late tick catches up."""
        interval = batch_size / rate
        ticks = None if duration is None else max(1, math.ceil(duration / interval - 1e-9))
        began = time.monotonic()
        tick = 0
        last_ms = self.now_ms() - round(interval * 1000)
        while not stop.is_set():
            budget = None if events is None else events - self.committed
            if (budget is not None and budget <= 0) or (ticks is not None and tick >= ticks):
                break
            wait = began + (tick + 1) * interval - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            reached = int((time.monotonic() - began) / interval)
            if ticks is not None:
                reached = min(reached, ticks)
            behind = max(reached - tick, 1)
            tick += behind
            end_ms = self.now_ms()
            self.step(batch_size * behind, last_ms, end_ms, budget)
            last_ms = end_ms
        self.clock_ms = self.now_ms()

    def flat_out(
        self, batch_size: int, events: int | None, duration: float | None, stop: threading.Event
    ) -> None:
        """As fast as possible, on a simulated clock of EVENTS_PER_SECOND events per second that
        ends at the wall clock (with ``events``) or starts there (and never passes it)."""
        density = self.settings.events_per_second or FALLBACK_DENSITY
        ms_per_event = 1000 / density
        origin = self.now_ms() - (0 if events is None else events * ms_per_event)
        began = time.monotonic()
        while not stop.is_set():
            budget = None if events is None else events - self.committed
            if budget is not None and budget <= 0:
                break
            if duration is not None and time.monotonic() - began >= duration:
                break
            span = batch_size if budget is None else min(batch_size, budget)
            start = origin + self.seq * ms_per_event
            end = start + span * ms_per_event
            if events is None:
                end = min(end, self.now_ms())
                start = min(start, end)
            self.step(batch_size, math.floor(start), math.floor(end), budget)


def budget_rate(settings: Settings, rate: float | None = None) -> float:
    """Events per second a new dimension's budgets fit: the real rate, or at rate 0 the
    simulated clock's density."""
    rate = float(settings.events_per_second if rate is None else rate)
    return rate or float(settings.events_per_second or FALLBACK_DENSITY)


def generate(
    settings: Settings,
    *,
    events: int | None = None,
    duration: float | None = None,
    rate: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    truth: str | Path | None = None,
    producer: str = "gen",
    stop: threading.Event | None = None,
    campaigns: int = DEFAULT_CAMPAIGNS,
    clock: Callable[[], float] = time.time,
    http: str | None = None,
    api_key: str | None = None,
    ids: str = "sequential",
    kafka: bool = False,
) -> GenerateSummary:
    """Write synthetic events into ``DATA_DIR/incoming`` until ``events`` rows, ``duration``
    seconds, ``stop`` or SIGINT/SIGTERM; then flush held-back rows and write ``truth``.

    ``rate`` (default EVENTS_PER_SECOND) of 0 writes as fast as possible; ``batch_size`` is the
    rows per file (default rate x BATCH_INTERVAL, or 100000 at rate 0). DUP_RATE, LATE_RATE,
    INVALID_RATE and RESTAMP_RATE come from ``settings``; ``ids`` is the event_id shape (one of
    ``ID_SHAPES``). ``campaigns`` sizes a dimension created because none exists; ``clock``
    (seconds since the epoch) stamps event times, for reproducible files. With ``http`` (the
    server's URL) each batch is POSTed to /ad_events with ``api_key`` instead of being written
    to the spool; with ``kafka`` it is published to the topic of ``settings.kafka``, and the
    run returns once the brokers acknowledged every message. The truth is the same whichever
    way the events travel.
    """
    rate = float(settings.events_per_second if rate is None else rate)
    if not (rate >= 0 and math.isfinite(rate)):
        raise ValueError("rate must be 0 (as fast as possible) or more")
    if events is not None and events < 0:
        raise ValueError("events must be 0 or more")
    if duration is not None and not duration > 0:
        raise ValueError("duration must be longer than 0")
    if batch_size is None:
        batch_size = MAX_RATE_BATCH if rate == 0 else round(rate * settings.batch_interval)
        batch_size = min(max(batch_size, 1), MAX_BATCH)
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch size must be between 1 and {MAX_BATCH}")
    if ids not in ID_SHAPES:
        raise ValueError(f"id shape must be one of {', '.join(ID_SHAPES)}")
    if seed is None:
        seed = secrets.randbits(64)
    if seed < 0:
        raise ValueError("seed must be 0 or more")
    id_prefix = model.event_id_prefix(producer, seed)
    if http is not None and kafka:
        raise ValueError("events go either over HTTP or to Kafka, not both")
    layout = Layout(settings.data_dir)
    sender: HttpSender | KafkaSender | None = None
    if http is not None:
        sender = HttpSender(http, api_key)
    elif kafka:
        sender = KafkaSender(settings.kafka)
    spool = SpoolWriter(layout.incoming, producer) if sender is None else sender
    run_seq = seed_sequences(seed)[2]
    dimension = ensure_campaigns(layout.campaigns, campaigns, seed, budget_rate(settings, rate))
    population = population_for(dimension)
    writer = _BackgroundWriter(spool, population)
    run = _Run(
        settings=settings,
        writer=writer,
        population=population,
        id_prefix=id_prefix,
        id_shape=ids,
        seeds=run_seq,
        clock=clock,
        keep_truth=truth is not None,
    )
    stop = threading.Event() if stop is None else stop
    began = time.perf_counter()
    with stop_on_signals(stop, what="stopping the generator"):
        try:
            if rate > 0:
                run.realtime(rate, batch_size, events, duration, stop)
            else:
                run.flat_out(batch_size, events, duration, stop)
            run.flush(batch_size)
        finally:
            try:
                writer.close()
            finally:
                if sender is not None:
                    sender.close()
        seconds = time.perf_counter() - began
        truth_path = None if truth is None else Path(truth)
        if truth_path is not None:
            run.truth.write(truth_path, id_prefix, ids)
    return GenerateSummary(
        files=writer.files,
        events=run.rows,
        distinct=run.truth.distinct,
        duplicates=run.rows - run.truth.distinct,
        invalid=run.truth.invalid_rows,
        late=run.truth.late_rows,
        seconds=seconds,
        seed=seed,
        producer=producer,
        truth=truth_path,
        restamped=run.restamped,
        sent=sender.totals if isinstance(sender, HttpSender) else None,
        published=sender.totals if isinstance(sender, KafkaSender) else None,
    )
