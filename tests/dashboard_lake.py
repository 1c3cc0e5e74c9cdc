"""The small lake the dashboard's browser tests look at, and a server over it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from api.testing import running_server
from jobs.alerts import check_alerts, save_alerts
from lake.location import LakeLocation
from pipeline.schema import CAMPAIGN_SCHEMA, Layout
from pipeline.settings import JobSettings, Settings
from pipeline.tables import load_alerts
from pipeline.testing import event_table
from queries.testing import land

HOUR_MS = 3_600_000
#: cmp-a's daily budget: 5 USD.
BUDGET_MICROS = 5_000_000
#: Events two hours old: outside the 15 min and 1 h ranges, inside 6 h and 24 h.
OLD_MS = 2 * HOUR_MS


def fill(data: Path, now_ms: int) -> Settings:
    """Two campaigns (cmp-a "Alpha" with a 5 USD daily budget, cmp-b "Beta" without), landed by
    the real consumer in three batches, and the alerts the job fires over them, plus one
    resolved budget alert:

    - 8 recent events: cmp-a 4 impressions, a click and a conversion (1 USD each, 9 USD
      revenue on the conversion), cmp-b 2 impressions (0.25 USD each);
    - a duplicate of one of them and a row quarantined for its country;
    - 2 impressions of cmp-a two hours old (1 USD each).

    12 rows in, 10 stored, 1 duplicate, 1 quarantined (8.3 %: the error-rate alert fires).
    """
    # A day's dedupe window: events two hours old are not late (the default window is 1 h).
    settings = Settings.from_env({}, data_dir=str(data), fsync="false", dedupe_window="24h")
    layout = Layout(str(data))
    layout.dimensions.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "campaign_id": ["cmp-a", "cmp-b"],
            "advertiser_id": ["adv-1", "adv-2"],
            "campaign_name": ["Alpha", "Beta"],
            "daily_budget_micros": [BUDGET_MICROS, None],
        },
        schema=CAMPAIGN_SCHEMA,
    ).write_parquet(layout.campaigns)
    ids = [f"a{i}" for i in range(6)] + ["b0", "b1"]
    land(
        settings,
        event_table(
            ids,
            time_ms=[now_ms - 1000 * i for i in range(8)],
            event_type=["impression"] * 4 + ["click", "conversion", "impression", "impression"],
            campaign_id=["cmp-a"] * 6 + ["cmp-b"] * 2,
            cost_micros=[1_000_000] * 6 + [250_000] * 2,
            revenue_micros=[0] * 5 + [9_000_000, 0, 0],
        ),
        event_table(["a0", "c0"], time_ms=now_ms, country=["US", "usa"]),
        event_table(
            ["old0", "old1"],
            time_ms=now_ms - OLD_MS,
            campaign_id=["cmp-a"] * 2,
            cost_micros=[1_000_000] * 2,
        ),
    )
    location = LakeLocation.from_settings(settings)
    now = datetime.now(UTC)  # after the batches' commits, which the rules look back from
    # Only the error rate may fire: batch latency on a busy machine is not this test's subject.
    rules = replace(JobSettings(), alert_latency_p95_warning=1e9, alert_latency_p95_critical=1e9)
    check_alerts(layout, location, rules, now=now, durable=False)
    firing = load_alerts(layout)
    assert [a.rule for a in firing] == ["error_rate"], firing
    resolved = replace(
        firing[0],
        alert_id="budget-cmp-a-yesterday",
        rule="budget",
        subject="cmp-a",
        status="resolved",
        value=1.2,
        threshold=1.0,
        message="campaign cmp-a spent 120% of its daily budget",
        ended_at=now,
    )
    save_alerts(layout, [*firing, resolved], durable=False)
    return settings


@contextmanager
def serving(tmp_path: Path, now_ms: int) -> Iterator[str]:
    """uvicorn serving api.app:app over :func:`fill`'s lake; its URL."""
    data = tmp_path / "data"
    fill(data, now_ms)
    with running_server(str(data), tmp_path / "server.log") as url:
        yield url
