"""``pipeline.decide``: what the key cache's answers make of a group.

The key cache is asked about each key's first copy in the group; a copy other than a key's
first can win only in a redo with other boundaries. Each case checks the events, their order
and the ledger counts against the answers a scripted claim gives.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from pipeline.decide import Claim, Decided, FileInput, decide
from pipeline.enrich import empty_campaigns
from pipeline.fingerprint import Keys
from pipeline.groups import GroupFile
from pipeline.keycache import Mask, Positions
from pipeline.schema import IN_FLIGHT_SCHEMA
from pipeline.testing import event_table

NOW = datetime(2026, 12, 4, 12, tzinfo=UTC)
T0 = int(NOW.timestamp() * 1000) - 60_000
HOUR_MS = 3_600_000


class ScriptedClaim:
    """Answers each call from a script: per call, the source positions that win (a spool
    file's rows are ``index in the group << 32 | row``)."""

    def __init__(self, *winners: set[int]) -> None:
        self.winners = list(winners)
        self.asked: list[list[int]] = []

    def __call__(self, keys: Keys, positions: Positions) -> Mask:
        self.asked.append([int(p) for p in positions])
        wins = self.winners.pop(0)
        return np.array([int(p) in wins for p in positions], dtype=bool)


def decide_files(claim: Claim, *tables: pa.Table) -> Decided:
    """Decide a group of one input per table (files a.arrow, b.arrow, ...; batches b-a, ...)."""
    inputs = [
        FileInput(file=GroupFile(name=f"{n}.arrow", batch_id=f"b-{n}"), arrived_ms=0, table=t)
        for n, t in zip("abcdefgh", tables, strict=False)
    ]
    return decide(
        inputs,
        now=NOW,
        watermark_ms=None,
        window_ms=HOUR_MS,
        slice_ms=HOUR_MS,
        campaigns=empty_campaigns(),
        claim=claim,
    )


def decided(ids: list[str], claim: ScriptedClaim, **columns: object) -> Decided:
    """Decide one input of ``ids``, a millisecond apart from T0."""
    return decide_files(
        claim, event_table(ids, time_ms=[T0 + i for i in range(len(ids))], **columns)
    )


def test_refused_first_copies_are_left_out() -> None:
    claim = ScriptedClaim({0, 2, 3})  # rows 1 and 4 were seen before this group
    got = decided(["e0", "e1", "e2", "e3", "e4"], claim)
    assert claim.asked == [[0, 1, 2, 3, 4]]
    events = got.events
    assert events["event_id"].to_list() == ["e0", "e2", "e3"]  # in input order
    assert events.columns == IN_FLIGHT_SCHEMA.names()
    ledger = got.outcomes[0].ledger
    assert (ledger.accepted, ledger.duplicates) == (3, 2)
    assert (ledger.min_event_time, ledger.max_event_time) == (T0, T0 + 3)


def test_all_first_copies_won_and_copies_within_the_group_dropped() -> None:
    claim = ScriptedClaim({0, 1, 3})
    got = decided(["e0", "e1", "e0", "e3"], claim)
    assert claim.asked == [[0, 1, 3]]  # row 2 is a copy of row 0: never asked
    assert got.events["event_id"].to_list() == ["e0", "e1", "e3"]
    ledger = got.outcomes[0].ledger
    assert (ledger.accepted, ledger.duplicates) == (3, 1)


def test_a_later_copy_won_by_a_dead_attempt_is_the_one_kept() -> None:
    """A redo with other boundaries: the attempt that died won e0 at row 2 (its first copy
    then), so row 0 is refused and row 2, asked again, wins. The kept rows are decided as
    they are: e0 from row 2 (its user_id says so), e1."""
    claim = ScriptedClaim({1}, {2})
    got = decided(["e0", "e1", "e0"], claim, user_id=["u-row0", "u-row1", "u-row2"])
    assert claim.asked == [[0, 1], [2]]
    events = got.events.sort("event_id")
    assert events["event_id"].to_list() == ["e0", "e1"]
    assert events["user_id"].to_list() == ["u-row2", "u-row1"]
    ledger = got.outcomes[0].ledger
    assert (ledger.accepted, ledger.duplicates) == (2, 1)
    assert (ledger.min_event_time, ledger.max_event_time) == (T0 + 1, T0 + 2)


def test_nothing_new() -> None:
    got = decided(["e0", "e1"], ScriptedClaim(set()))
    assert got.events.is_empty()
    ledger = got.outcomes[0].ledger
    assert (ledger.accepted, ledger.duplicates) == (0, 2)
    assert ledger.min_event_time is None


def test_a_failing_claim_fails_the_decision() -> None:
    def broken(keys: Keys, positions: Positions) -> Mask:
        raise ConnectionError("the key cache is down")

    with pytest.raises(ConnectionError, match="down"):
        decide_files(broken, event_table(["e0"], time_ms=T0))


def test_each_input_gets_its_own_rows_counts_and_batch_id() -> None:
    """Two files in one group: e1 is in both, so b's copy is a duplicate within the group;
    each file's ledger counts and time range are its own, and each row carries its batch."""
    tables = [
        event_table(["e0", "e1"], time_ms=[T0 + 5, T0 + 1]),
        event_table(["e1", "e2", "e3"], time_ms=[T0 + 9, T0 + 7, T0 + 8]),
    ]
    claim = ScriptedClaim({0, 1, (1 << 32) | 1})  # b's e3 was seen before this group
    got = decide_files(claim, *tables)
    assert got.events.select("event_id", "batch_id").rows() == [
        ("e0", "b-a"),
        ("e1", "b-a"),
        ("e2", "b-b"),
    ]
    a, b = (o.ledger for o in got.outcomes)
    assert (a.accepted, a.duplicates, a.min_event_time, a.max_event_time) == (2, 0, T0 + 1, T0 + 5)
    assert (b.accepted, b.duplicates, b.min_event_time, b.max_event_time) == (1, 2, T0 + 7, T0 + 7)
    assert claim.asked == [[0, 1, (1 << 32) | 1, (1 << 32) | 2]]  # b's e1 is a copy: not asked
    by_batch = got.events.group_by("batch_id", maintain_order=True).agg("event_id")
    assert by_batch["event_id"].to_list() == [["e0", "e1"], ["e2"]]
