"""The tables the scheduled jobs write and the queries read: rollups and alerts.

Where their files live under ``rollups/`` and ``alerts/``, the rollup job's rule for which ledger
files it has seen, the :class:`Alert` record and the read of the alert store. Their schemas are
in :mod:`pipeline.schema`; the jobs (``jobs.rollup``, ``jobs.alerts``) write the files, replacing
each atomically. Imports nothing from the project but :mod:`pipeline.schema`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import polars as pl

from pipeline.schema import ALERT_SCHEMA, Layout

#: Ledger files written up to this long before the rollup job's last listing are listed again
#: (their ids remembered), so a file renamed into place late is never missed.
LEDGER_LAG_S: Final = 300.0

SEVERITIES: Final = ("warning", "critical")
FIRING: Final = "firing"
RESOLVED: Final = "resolved"


def read_parquet_or(path: Path, schema: pl.Schema) -> pl.DataFrame:
    """The frame in ``path`` cast to ``schema``, or an empty one when there is no such file.

    Read through one open file: the jobs replace these files by rename while others read
    them, and a reader that opened the path twice (footer, then pages) could meet the old
    file's footer and the new file's pages ("page header reported the wrong page size")."""
    try:
        with path.open("rb") as fh:
            body = fh.read()
    except FileNotFoundError:
        return pl.DataFrame(schema=schema)
    return pl.read_parquet(io.BytesIO(body)).select(schema.names()).cast(schema)


# -- rollups -----------------------------------------------------------------------------------
class RollupPaths:
    """Where each rollup level and sketch of a date/hour lives."""

    def __init__(self, layout: Layout) -> None:
        self.root = layout.rollups

    def level(self, granularity: str) -> Path:
        return self.root / granularity

    def minute(self, date: str, hour: int) -> Path:
        return self.root / "minute" / f"date={date}" / f"hour={hour:02d}" / "rollup.parquet"

    def hour(self, date: str) -> Path:
        return self.root / "hour" / f"date={date}" / "rollup.parquet"

    def day(self, date: str) -> Path:
        return self.root / "day" / f"date={date}" / "rollup.parquet"

    def hour_sketch(self, date: str, hour: int) -> Path:
        return self.root / "_hll" / "hour" / f"date={date}" / f"hour={hour:02d}.parquet"

    def day_sketch(self, date: str) -> Path:
        return self.root / "_hll" / "day" / f"date={date}.parquet"

    @property
    def sketches(self) -> Path:
        return self.root / "_hll"

    @property
    def state(self) -> Path:
        return self.root / "_state.json"


# -- alerts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alert:
    """One alert over its life: firing from ``started_at``, resolved at ``ended_at``."""

    alert_id: str
    rule: str
    subject: str
    severity: str
    status: str
    value: float
    threshold: float
    message: str
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None

    @property
    def open(self) -> bool:
        return self.status == FIRING

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("started_at", "updated_at", "ended_at"):
            out[k] = None if out[k] is None else out[k].isoformat()
        return out


def alerts_path(layout: Layout) -> Path:
    """The alert store: one Parquet file, replaced atomically by the alerts job."""
    return layout.alerts / "alerts.parquet"


def alerts_frame(alerts: Sequence[Alert]) -> pl.DataFrame:
    """``alerts`` as the store holds them (ALERT_SCHEMA, newest first)."""
    rows = [{k: getattr(a, k) for k in ALERT_SCHEMA.names()} for a in alerts]
    return pl.DataFrame(rows, schema=ALERT_SCHEMA).sort("started_at", "alert_id", descending=True)


def _from_frame(frame: pl.DataFrame) -> list[Alert]:
    return [Alert(**row) for row in frame.iter_rows(named=True)]


def load_alerts(layout: Layout) -> list[Alert]:
    """Every stored alert (open and recently resolved), newest first."""
    return _from_frame(read_parquet_or(alerts_path(layout), ALERT_SCHEMA))


def list_alerts(layout: Layout, *, open_only: bool = False, limit: int = 100) -> list[Alert]:
    """Alerts for ``GET /alerts`` and the dashboard: open ones first (critical, then newest),
    then resolved ones, most recently ended first."""
    alerts = [a for a in load_alerts(layout) if a.open or not open_only]

    def order(a: Alert) -> tuple[int, int, float]:
        if a.open:
            return (0, -SEVERITIES.index(a.severity), -a.started_at.timestamp())
        ended = a.ended_at or a.updated_at
        return (1, 0, -ended.timestamp())

    return sorted(alerts, key=order)[: max(0, limit)]
