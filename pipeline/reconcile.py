"""Reconcile the lake against a generator's ground truth: every event exactly once, or why not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.dataset as pads

from lake.location import LakeLocation
from lake.snapshot import snapshot


class ReconcileError(AssertionError):
    """The lake does not match the ground truth; the message lists every discrepancy."""


@dataclass(frozen=True)
class Reconciliation:
    """Counts from the truth and from the lake, side by side."""

    truth_rows: int
    truth_distinct_valid: int
    truth_invalid_rows: int
    stored: int
    stored_distinct: int
    late_quarantined_rows: int
    late_quarantined_ids: int
    expected_duplicates: int
    ledger_duplicates: int
    ledger_rows_in: int

    def problems(self) -> list[str]:
        out = []
        if self.stored != self.stored_distinct:
            out.append(f"{self.stored - self.stored_distinct} event_ids are stored more than once")
        if self.ledger_duplicates != self.expected_duplicates:
            out.append(
                f"ledger counts {self.ledger_duplicates} duplicates, the truth implies "
                f"{self.expected_duplicates}"
            )
        if self.ledger_rows_in != self.truth_rows:
            out.append(
                f"ledger saw {self.ledger_rows_in} rows, the generator sent {self.truth_rows}"
            )
        return out


def _table_frame(dataset: pads.Dataset, columns: list[str]) -> pl.DataFrame:
    frame = pl.from_arrow(dataset.to_table(columns=columns))
    assert isinstance(frame, pl.DataFrame)
    return frame


def reconcile(lake: LakeLocation | str | Path, truth_path: str | Path) -> Reconciliation:
    """Compare the lake's ``events``, ``quarantine`` and ``ledger`` tables (one snapshot) with
    the truth; raise :class:`ReconcileError` listing every discrepancy.

    ``lake`` is a location, or a DATA_DIR whose lake is the default one (``DATA_DIR/lake``).
    """
    location = (
        lake if isinstance(lake, LakeLocation) else LakeLocation.from_env({}, data_dir=str(lake))
    )
    tables = snapshot(location).datasets
    truth = pl.read_parquet(truth_path)
    valid = truth.filter(pl.col("valid"))
    stored = _table_frame(tables["events"], ["event_id"])["event_id"]
    quarantine = _table_frame(tables["quarantine"], ["event_id", "reason"])
    late = quarantine.filter(pl.col("reason") == "late_event")["event_id"]
    ledger = _table_frame(tables["ledger"], ["rows_in", "duplicates"])
    problems: list[str] = []

    stored_ids = stored.unique()
    unknown = stored_ids.filter(~stored_ids.is_in(valid["event_id"].implode()))
    if len(unknown):
        problems.append(
            f"{len(unknown)} stored event_ids were never sent as valid, "
            f"e.g. {unknown[:3].to_list()}"
        )
    accounted = pl.concat([stored_ids, late.unique()]).unique()
    missing = valid["event_id"].filter(~valid["event_id"].is_in(accounted.implode()))
    if len(missing):
        problems.append(f"{len(missing)} valid events were lost, e.g. {missing[:3].to_list()}")
    # Every valid copy that was neither stored nor quarantined as late was a duplicate.
    expected_duplicates = int(valid["copies"].sum()) - len(stored) - len(late)
    result = Reconciliation(
        truth_rows=int(truth["copies"].sum()),
        truth_distinct_valid=len(valid),
        truth_invalid_rows=int(truth.filter(~pl.col("valid"))["copies"].sum()),
        stored=len(stored),
        stored_distinct=len(stored_ids),
        late_quarantined_rows=len(late),
        late_quarantined_ids=late.n_unique(),
        expected_duplicates=expected_duplicates,
        ledger_duplicates=int(ledger["duplicates"].sum()),
        ledger_rows_in=int(ledger["rows_in"].sum()),
    )
    problems += result.problems()
    if problems:
        raise ReconcileError("; ".join(problems))
    return result
