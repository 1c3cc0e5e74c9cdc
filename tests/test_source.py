"""The Source contract, run against a spool slot and the in-memory fake of `pipeline.testing`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from pyarrow import ipc

from pipeline.schema import Layout
from pipeline.source import Source, SpoolSource
from pipeline.spool import PoisonInputError, atomic_write_bytes, list_incoming
from pipeline.testing import MemorySource, event_table


@dataclass
class Harness:
    """A source under test and what the contract needs around it."""

    #: The source as a (re)started consumer sees it: same state, new object for the spool.
    open: Callable[[], Source]
    #: put(name, table or None): make a batch wait; None puts one that can never be read.
    put: Callable[[str, pa.Table | None], None]
    #: Names of the poison batches set aside, with their reasons.
    set_aside: Callable[[], dict[str, str]]


def _arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _spool(tmp_path: Path) -> Harness:
    layout = Layout(str(tmp_path))
    layout.ensure()

    def put_file(name: str, table: pa.Table | None) -> None:
        body = b"not Arrow IPC" if table is None else _arrow_bytes(table)
        atomic_write_bytes(layout.incoming / name, body, durable=False)  # as producers publish

    def set_aside() -> dict[str, str]:
        sidecars = layout.quarantine_files.glob("*/reason.json")
        return {(b := json.loads(p.read_text()))["file"]: b["reason"] for p in sidecars}

    return Harness(lambda: SpoolSource(layout, 0, durable=False), put_file, set_aside)


def _memory() -> Harness:
    memory = MemorySource()

    def put_batch(name: str, table: pa.Table | None) -> None:
        poison = PoisonInputError("unreadable_file", "the file cannot be read")
        memory.put(name, poison if table is None else table)

    def set_aside() -> dict[str, str]:
        return {name: reason for name, (reason, _) in memory.set_aside.items()}

    return Harness(lambda: memory, put_batch, set_aside)


@pytest.fixture(params=["spool", "memory"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return _spool(tmp_path) if request.param == "spool" else _memory()


def _tables(names: str) -> dict[str, pa.Table]:
    return {f"{n}.arrow": event_table([f"{n}-{i}" for i in range(3)], time_ms=0) for n in names}


def test_taken_batches_come_first_again_after_a_restart_until_retired(harness: Harness) -> None:
    tables = _tables("cabd")
    for name, table in tables.items():
        harness.put(name, table)
    src = harness.open()
    first = []
    for inp in src.take(set()):
        first.append(inp)
        if len(first) == 2:
            break  # a full group: the rest stays waiting, not taken
    src.hold()
    assert [i.file.name for i in first] == ["a.arrow", "b.arrow"]
    assert all(i.table is not None and i.table.equals(tables[i.file.name]) for i in first)

    again = harness.open()  # a restart: what was held comes back first, at the same positions
    assert again.app_id == src.app_id
    assert [i.file for i in again.take(set())][:2] == [i.file for i in first]
    for inp in first:  # a redo reads a recorded position: the same rows each time
        reread = again.read(inp.file)
        assert reread is not None and reread.table is not None
        assert reread.table.equals(tables[inp.file.name])

    again.retire(first[0].file, None, 0)
    again.retire(first[0].file, None, 0)  # idempotent
    assert again.read(first[0].file) is None
    # Names being written (skip) are passed over; what is left comes in name order.
    names = [i.file.name for i in again.take({"b.arrow"})]
    assert names == ["c.arrow", "d.arrow"]


def test_a_batch_that_cannot_be_read_is_poison_every_time_and_set_aside(harness: Harness) -> None:
    harness.put("bad.arrow", None)
    src = harness.open()
    (inp,) = src.take(set())
    src.hold()
    assert inp.table is None and inp.poison is not None
    assert inp.poison.reason == "unreadable_file"
    reread = src.read(inp.file)
    assert reread is not None and reread.poison is not None
    assert reread.poison.reason == "unreadable_file"
    src.retire(inp.file, inp.poison, 1_700_000_000_000)
    assert harness.set_aside() == {"bad.arrow": "unreadable_file"}
    assert list(src.take(set())) == []
    assert src.read(inp.file) is None


def test_a_spool_batch_taken_by_another_slot_is_not_taken(tmp_path: Path) -> None:
    harness = _spool(tmp_path)
    layout = Layout(str(tmp_path))
    for name, table in _tables("ab").items():
        harness.put(name, table)
    mine, theirs = SpoolSource(layout, 0, durable=False), SpoolSource(layout, 1, durable=False)
    assert mine.app_id != theirs.app_id
    assert [i.file.name for i in theirs.take(set())] == ["a.arrow", "b.arrow"]
    assert list(mine.take(set())) == []
    assert list_incoming(layout.incoming) == []  # both in slot 1's directory
