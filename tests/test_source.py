"""The Source contract, run against the spool and the in-memory fake ``pipeline.testing`` ships."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from pyarrow import ipc

from pipeline.spool import PoisonInputError, Source, SpoolSource, atomic_write_bytes
from pipeline.testing import MemorySource, event_table

#: put(name, table or None): make a batch wait; None puts one that can never be read.
Put = Callable[[str, pa.Table | None], None]


def _arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


@pytest.fixture(params=["spool", "memory"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Source, Put]:
    if request.param == "spool":
        incoming = tmp_path / "incoming"
        incoming.mkdir()

        def put_file(name: str, table: pa.Table | None) -> None:
            body = b"not Arrow IPC" if table is None else _arrow_bytes(table)
            atomic_write_bytes(incoming / name, body, durable=False)  # as producers publish

        return SpoolSource(incoming), put_file
    memory = MemorySource()

    def put_batch(name: str, table: pa.Table | None) -> None:
        poison = PoisonInputError("unreadable_file", "the file cannot be read")
        memory.put(name, poison if table is None else table)

    return memory, put_batch


def test_batches_wait_in_name_order_until_retired(source: tuple[Source, Put]) -> None:
    src, put = source
    assert src.waiting() == []
    tables = {name: event_table([f"{name}-{i}" for i in range(3)], time_ms=0) for name in "cab"}
    for name, table in tables.items():
        put(f"{name}.arrow", table)
    assert src.waiting() == ["a.arrow", "b.arrow", "c.arrow"]
    # Reading takes nothing away: a consumer that dies now finds every batch again.
    assert src.read("b.arrow").equals(tables["b"])
    assert src.read("b.arrow").equals(tables["b"])
    assert src.waiting() == ["a.arrow", "b.arrow", "c.arrow"]
    src.retire("b.arrow")
    src.retire("b.arrow")  # idempotent
    assert src.waiting() == ["a.arrow", "c.arrow"]
    with pytest.raises(FileNotFoundError):
        src.read("b.arrow")


def test_a_batch_that_cannot_be_read_is_poison_every_time(source: tuple[Source, Put]) -> None:
    src, put = source
    put("bad.arrow", None)
    for _ in range(2):
        with pytest.raises(PoisonInputError) as exc:
            src.read("bad.arrow")
        assert exc.value.reason == "unreadable_file"
    assert src.waiting() == ["bad.arrow"]  # listed until retired (the consumer quarantines it)
    src.retire("bad.arrow")
    assert src.waiting() == []
