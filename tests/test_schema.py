"""The contract's typed rows agree with its table schemas."""

from __future__ import annotations

import dataclasses

from pipeline.schema import LEDGER_SCHEMA, REASONS, LedgerRow, ledger_frame


def test_the_typed_ledger_row_is_the_ledger_schema() -> None:
    """LedgerRow (what the consumer builds) and LEDGER_SCHEMA (the table) are one shape:
    the same columns in the same order, and a frame of rows has exactly the schema."""
    assert [f.name for f in dataclasses.fields(LedgerRow)] == LEDGER_SCHEMA.names()
    row = LedgerRow(batch_id="b", source_file="f.arrow", rows_in=3, quarantined=1)
    row.count_reasons({"invalid_country": 1})
    frame = ledger_frame([row])
    assert frame.schema == LEDGER_SCHEMA
    assert frame["quarantined_invalid_country"].to_list() == [1]
    assert sum(frame[f"quarantined_{r}"].item() for r in REASONS) == 1
