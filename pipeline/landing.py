"""Landing a decided commit group: the three tables' commits, the claim finished, inputs retired.

Each step is idempotent, so a group redone after a crash at any point lands exactly as its
first attempt would have: the lake skips a table that has the version, finishing a claim and
retiring an input twice changes nothing. A group's decided ledger rows are recorded with its
intent before its events commit, so that a redo after that commit writes the ledger the first
attempt decided (not what deciding again, against keys now taken by the group itself, says).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import polars as pl

from lake.tables import EVENTS, LEDGER, QUARANTINE
from lake.writer import LakeWriter, Outcome, Staged, TableCommit, prepare
from pipeline import faults
from pipeline.decide import Claim, FileInput, FileOutcome, decide
from pipeline.fingerprint import Keys
from pipeline.groups import Intent, Intents
from pipeline.keycache import CacheLostError, KeyCache, Mask, Positions
from pipeline.lake import batch_keys
from pipeline.retry import classify
from pipeline.schema import ENRICHED_SCHEMA, QUARANTINE_SCHEMA, LedgerRow, ledger_frame
from pipeline.source import Source

log = logging.getLogger("adevents.consumer")


@dataclass
class Group:
    """A decided group, ready to commit."""

    intent: Intent
    outcomes: list[FileOutcome]
    started: float
    timings: dict[str, float] = field(default_factory=dict)
    #: The group's events sorted and bucketed for the lake (``lake.writer.prepare``).
    events: pl.DataFrame = field(default_factory=ENRICHED_SCHEMA.to_frame)

    def top(self) -> int | None:
        """The newest event time of the group, or None when it has no event."""
        tops = [o.ledger.max_event_time for o in self.outcomes]
        return max([t for t in tops if t is not None], default=None)

    def write_ms(self, landing_started: float) -> float:
        """The write stage's time: the sort on the deciding thread, then the landing's commits
        of events and quarantine since ``landing_started`` (``time.perf_counter``)."""
        landing_ms = (time.perf_counter() - landing_started) * 1000
        return self.timings.get("sort_ms", 0.0) + landing_ms

    def frame(self, table: str) -> pl.DataFrame:
        """The group's rows for ``table`` (events or quarantine)."""
        if table == EVENTS.name:
            return self.events
        return _concat([o.quarantine for o in self.outcomes], QUARANTINE_SCHEMA)


@dataclass(frozen=True)
class Written:
    """A group whose files are written (:meth:`Lander.write`), to complete."""

    group: Group
    rows: list[LedgerRow]
    staged: list[Staged]
    #: When writing began (``time.perf_counter``).
    started: float


def decide_group(
    intent: Intent,
    inputs: Sequence[FileInput],
    claim: Claim | None,
    *,
    window_ms: int,
    slice_ms: int,
    campaigns: pl.DataFrame,
) -> Group:
    """Decide a group as its intent says (clock, watermark), timing the stages. ``claim``
    None decides without claiming: a redo whose events are committed, where only its
    quarantine rows count."""
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def claim_keys(keys: Keys, positions: Positions) -> Mask:
        t = time.perf_counter()
        won = claim(keys, positions) if claim is not None else np.zeros(len(keys), dtype=bool)
        # Summed: a group may claim more than once (see decide._claim_other_copies).
        timings["dedupe_ms"] = timings.get("dedupe_ms", 0.0) + (time.perf_counter() - t) * 1000
        return won

    decision = decide(
        inputs,
        now=datetime.fromtimestamp(intent.now_ms / 1000, UTC),
        watermark_ms=intent.watermark_ms,
        window_ms=window_ms,
        slice_ms=slice_ms,
        campaigns=campaigns,
        claim=claim_keys,
    )
    decided = time.perf_counter()
    timings["validate_ms"] = (decided - started) * 1000 - timings.get("dedupe_ms", 0.0)
    group = Group(intent, decision.outcomes, started, timings)
    if len(decision.events):
        # Sorted here, on the deciding thread, not by the writer thread that lands the group
        # before: on a backlog the writer is the busier of the two (its Parquet and commits).
        group.events = prepare(EVENTS, decision.events)
    timings["sort_ms"] = (time.perf_counter() - decided) * 1000
    return group


def _concat(frames: Sequence[pl.DataFrame], schema: pl.Schema) -> pl.DataFrame:
    frames = [f for f in frames if len(f)]
    return pl.concat(frames) if frames else schema.to_frame()


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@dataclass
class Lander:
    """Lands the groups of one source (``app_id``) in the lake, through the key cache's claims."""

    app_id: str
    lake: LakeWriter
    cache: KeyCache
    source: Source
    intents: Intents
    #: Named in every ledger row this lander writes.
    consumer: str
    clock: Callable[[], datetime]
    slice_ms: int

    def claim_id(self, version: int) -> str:
        """The key cache's claim id of group ``version``: ``<app_id>:<version>``."""
        return f"{self.app_id}:{version}"

    def land(self, group: Group) -> list[LedgerRow]:
        """Commit a decided group to the three tables, finish its claim, retire its inputs."""
        return self.complete(self.write(group))

    def write(self, group: Group) -> Written:
        """The first half of :meth:`land`: record the decided ledger rows, write the events'
        and quarantine's files. Nothing is visible yet; this may run while the group before
        is being completed."""
        started = time.perf_counter()
        version = group.intent.version
        rows = [replace(o.ledger) for o in group.outcomes]
        for row in rows:
            row.validate_ms = group.timings.get("validate_ms")
            row.dedupe_ms = group.timings.get("dedupe_ms")
        self.intents.record_decided(version, rows)
        staged = [
            self.lake.stage(t, version, group.frame(t)) for t in (EVENTS.name, QUARANTINE.name)
        ]
        return Written(group, rows, staged, started)

    def complete(self, written: Written) -> list[LedgerRow]:
        """The second half of :meth:`land`: commit the written files (events, then quarantine),
        the ledger, finish the claim, retire the inputs. Groups complete in version order."""
        intent = written.group.intent
        if not self.cache.valid(self.claim_id(intent.version)):
            # Redis lost its data after these keys were claimed: another consumer may have
            # claimed them since. Committing now could duplicate; the redo decides again.
            raise CacheLostError(f"group {intent.version}: the key cache lost its claims")
        for staged in written.staged:
            _after_commit(self.lake.commit_staged(self.app_id, intent.version, staged))
        write_ms = written.group.write_ms(written.started)
        return self._finish(
            written.group, written.rows, write_ms=write_ms, started=written.group.started
        )

    def land_committed(self, group: Group, ledger: Sequence[LedgerRow]) -> list[LedgerRow]:
        """Finish a redone group whose events are committed: its keys back into the key
        cache, its quarantine rows (decided again without claims), its recorded ledger rows."""
        self._restore_claims(group.intent.version, ledger)
        self._commit(QUARANTINE.name, group.frame(QUARANTINE.name), group.intent.version)
        return self._finish(group, [replace(r) for r in ledger], write_ms=None, started=None)

    def _commit(self, table: str, frame: pl.DataFrame, version: int) -> None:
        """One table's commit of the group: one call each, for a crash point between tables."""
        (result,) = self.lake.commit(self.app_id, version, {table: frame})
        _after_commit(result)

    def _finish(
        self,
        group: Group,
        rows: list[LedgerRow],
        *,
        write_ms: float | None,
        started: float | None,
    ) -> list[LedgerRow]:
        """The ledger commit, then finish the claim and retire the inputs."""
        intent = group.intent
        stamp(rows, _ms(self.clock()), self.consumer, write_ms=write_ms, started=started)
        self._commit(LEDGER.name, ledger_frame(rows), intent.version)
        self.cache.finish(self.claim_id(intent.version), group.top())
        faults.point("after_finish")
        for outcome in group.outcomes:
            self.source.retire(outcome.file, outcome.poison, intent.now_ms)
        faults.point("after_retire")
        self.intents.forget(intent.version)
        return rows

    def _restore_claims(self, version: int, ledger: Sequence[LedgerRow]) -> None:
        restore_claims(self.lake, self.cache, self.claim_id(version), ledger, self.slice_ms)


def _after_commit(result: TableCommit) -> None:
    """The crash point after a table's commit, when the commit did something."""
    if result.outcome is not Outcome.SKIPPED:
        faults.point(f"after_{result.table}_commit")


def stamp(
    rows: Sequence[LedgerRow],
    committed_at: int,
    consumer: str,
    *,
    write_ms: float | None,
    started: float | None,
) -> None:
    """Set the ledger rows' commit time, lag, consumer and (for a first attempt) timings."""
    for row in rows:
        row.committed_at = committed_at
        row.lag_ms = committed_at - (row.arrived_at or committed_at)
        row.consumer = consumer
        if write_ms is not None:
            row.write_ms = write_ms
        if started is not None:
            row.processing_ms = (time.perf_counter() - started) * 1000


def close_cache(cache: KeyCache) -> None:
    """Close a key cache at exit; a transient fault then (no room for the embedded cache's
    closing snapshot, Redis down) loses nothing: its segments are on disk, Redis keeps its
    keys, and the next start loads them."""
    try:
        cache.close()
    except Exception as exc:
        if classify(exc) is None:
            raise
        log.warning("closing the key cache: %s", exc)


def restore_claims(
    lake: LakeWriter, cache: KeyCache, claim_id: str, ledger: Sequence[LedgerRow], slice_ms: int
) -> None:
    """Put a committed group's keys (back) into the key cache, as its claim left them."""
    lows = [r.min_event_time for r in ledger if r.min_event_time is not None]
    highs = [r.max_event_time for r in ledger if r.max_event_time is not None]
    if not lows:
        return
    ids = {r.batch_id for r in ledger}
    keys, top = batch_keys(lake, ids, (min(lows), max(highs)), slice_ms)
    cache.restore(claim_id, keys, top)


class Pacer:
    """MAX_EVENTS_PER_SECOND (0 = no cap): after each landed group, waits so that the events
    landed stay at or below the cap on average, whichever source they came from.

    A group's share of the cap (its rows / cap seconds) runs from the end of the previous
    group's, or from the previous landing if that came later: the time spent deciding and
    writing the group counts, and only what is left of its share is slept. (Starting the share
    at the landing instead slept a whole share after every group: at the default cap of 1M,
    ``adevents consume --once`` over 4M events ran at 397-414k events/s where it could land
    724-739k.) After an idle spell no credit builds up beyond the group at hand.
    """

    def __init__(
        self,
        cap: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cap = cap
        self._clock = clock
        self._sleep = sleep
        #: None until the first landing, whose share starts there: when its work began is
        #: not known here, so it is not credited (the cap holds from the first group on).
        self._share_start: float | None = None

    def landed(self, rows: int) -> None:
        if self.cap <= 0:
            return
        now = self._clock()
        allowed = (now if self._share_start is None else self._share_start) + rows / self.cap
        if allowed > now:
            self._sleep(allowed - now)
            self._share_start = allowed
        else:
            self._share_start = now
