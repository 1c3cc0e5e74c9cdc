"""What ``adevents demo`` tells a person to look at: the campaigns over-paced on purpose."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cli.demo import what_to_watch
from generator.dimension import read_dimension
from pipeline.schema import Layout
from pipeline.settings import Settings

URL = "http://127.0.0.1:8000/"


def test_names_the_overpaced_campaigns_and_where_their_alerts_show(tmp_path: Path) -> None:
    settings = Settings.from_env({}, data_dir=str(tmp_path), events_per_second=20_000)
    said = what_to_watch(settings, URL)
    dimension = read_dimension(Layout(str(tmp_path)).campaigns, seed=0)
    assert dimension.budget_rate == 20_000 and dimension.overpaced
    assert ", ".join(dimension.overpaced) in said
    assert f"{URL}alerts?open=true" in said and "fit" not in said
    # The same data directory at another rate keeps its budgets, and says how to refit them.
    faster = Settings.from_env({}, data_dir=str(tmp_path), events_per_second=40_000)
    again = what_to_watch(faster, URL)
    assert ", ".join(dimension.overpaced) in again
    assert "fit 20,000 events/s, not 40,000" in again


def test_a_dimension_written_by_hand_keeps_its_own_budgets(tmp_path: Path) -> None:
    path = Layout(str(tmp_path)).campaigns
    path.parent.mkdir(parents=True)
    own = pl.DataFrame({"campaign_id": ["summer"], "daily_budget_micros": [5_000_000]})
    own.write_parquet(path)
    said = what_to_watch(Settings.from_env({}, data_dir=str(tmp_path)), URL)
    assert "not generated here" in said
