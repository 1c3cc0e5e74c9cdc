"""Generated budgets fit the rate: at the demo's rate only the chosen campaigns over-pace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from generator import model
from generator.budgets import (
    BUDGET_HEADROOM,
    DAY_S,
    OVERPACED_CAMPAIGNS,
    OVERPACED_FROM_TOP,
    spend_per_event,
)
from generator.dimension import Dimension, ensure_campaigns, population_for
from generator.runner import DEFAULT_CAMPAIGNS, budget_rate
from jobs.alerts import budget_rules
from pipeline.settings import JobSettings, Settings

DEMO_RATE = Settings().events_per_second
MIDNIGHT = datetime(2026, 12, 2, tzinfo=UTC)


def dimension_at(tmp_path: Path, rate: float, seed: int = 11) -> Dimension:
    return ensure_campaigns(tmp_path / f"campaigns-{rate}.parquet", DEFAULT_CAMPAIGNS, seed, rate)


def expected_spend(dimension: Dimension, rate: float, seconds: float) -> pl.DataFrame:
    """Each campaign's expected spend over ``seconds`` at ``rate``, from the generator's own
    shares and prices: the frame the alert job sums from the rollups."""
    population = population_for(dimension)
    return pl.DataFrame(
        {
            "campaign_id": population.campaigns,
            "spend_micros": spend_per_event(population) * rate * seconds,
        }
    )


def flagged(dimension: Dimension, spend: pl.DataFrame, now: datetime) -> dict[str, str]:
    budgets = dimension.frame.select("campaign_id", "daily_budget_micros")
    found = budget_rules(spend, budgets, now=now, t=JobSettings())
    return {o.subject: o.severity for o in found}


@pytest.mark.parametrize("rate", [DEMO_RATE, 500])
def test_a_minute_of_spend_flags_exactly_the_overpaced_campaigns(tmp_path: Path, rate: int) -> None:
    dimension = dimension_at(tmp_path, rate)
    assert len(dimension.overpaced) == OVERPACED_CAMPAIGNS
    assert dimension.budget_rate == rate
    minute = expected_spend(dimension, rate, 60)
    # Whatever time of day the demo starts at: the warning applies early in the day only.
    for started in (timedelta(0), timedelta(hours=12), timedelta(hours=23, minutes=58)):
        now = MIDNIGHT + started + timedelta(minutes=1)
        assert flagged(dimension, minute, now) == dict.fromkeys(dimension.overpaced, "critical")


def test_normally_paced_campaigns_stay_under_the_warning_all_day(tmp_path: Path) -> None:
    dimension = dimension_at(tmp_path, DEMO_RATE)
    for share in (0.25, 0.5, 0.79, 0.999):
        spend = expected_spend(dimension, DEMO_RATE, share * DAY_S)
        now = MIDNIGHT + timedelta(seconds=share * DAY_S)
        assert set(flagged(dimension, spend, now)) == set(dimension.overpaced)


def test_budgets_scale_with_the_rate(tmp_path: Path) -> None:
    slow, fast = dimension_at(tmp_path, 5_000), dimension_at(tmp_path, 50_000)
    assert slow.overpaced == fast.overpaced  # chosen from the seed, not the rate
    normal = ~pl.col("campaign_id").is_in(list(fast.overpaced))
    budgets = [d.frame.filter(normal).get_column("daily_budget_micros") for d in (slow, fast)]
    # Whole dollars rounded up: ten times the rate is ten times the budget, within $10.
    assert ((budgets[1] - budgets[0] * 10).abs() <= 10_000_000).all()
    population = population_for(fast)
    day = spend_per_event(population) * 50_000 * DAY_S * BUDGET_HEADROOM
    at = [population.campaigns.index(c) for c in fast.frame.filter(normal)["campaign_id"]]
    ratio = budgets[1].to_numpy() / day[at]
    assert ratio.min() >= 1.0 and ratio.max() < 1.01


def test_overpaced_campaigns_are_reproducible_top_spenders(tmp_path: Path) -> None:
    first, again = dimension_at(tmp_path / "a", DEMO_RATE), dimension_at(tmp_path / "b", DEMO_RATE)
    other = dimension_at(tmp_path / "c", DEMO_RATE, seed=12)
    assert first.overpaced == again.overpaced != other.overpaced
    assert first.frame.equals(again.frame)
    spend = spend_per_event(population_for(first))
    top = {f"cmp-{i + 1:05d}" for i in np.argsort(-spend)[:OVERPACED_FROM_TOP]}
    assert set(first.overpaced) <= top


def test_expected_spend_matches_what_the_generator_draws(tmp_path: Path) -> None:
    """The expectation the budgets rest on, against 2M drawn events (a fixed seed: no flakes;
    seeds 0-5 land within 1.1 % in total)."""
    dimension = dimension_at(tmp_path, DEMO_RATE)
    population = population_for(dimension)
    size = 2_000_000
    spec = model.BatchSpec(id_prefix=b"t-", seq_start=0, size=size, start_ms=0, end_ms=40_000)
    frame = model.generate_batch(np.random.default_rng(5), population, spec).frame
    drawn = frame.group_by(pl.col("campaign_id").cast(pl.String)).agg(pl.col("cost_micros").sum())
    expected = expected_spend(dimension, 1, size)
    both = drawn.join(expected, on="campaign_id").sort("spend_micros", descending=True)
    assert both["cost_micros"].sum() == pytest.approx(expected["spend_micros"].sum(), rel=0.03)
    top = both.head(5)  # a few hundred clicks each: their count varies by several %
    assert np.abs(top["cost_micros"].to_numpy() / top["spend_micros"].to_numpy() - 1).max() < 0.1


def test_an_existing_dimension_keeps_its_population_and_budgets(tmp_path: Path) -> None:
    path = tmp_path / "campaigns.parquet"
    made = ensure_campaigns(path, 50, seed=1, events_per_second=1_000)
    again = ensure_campaigns(path, 10, seed=2, events_per_second=9_000)
    assert again.frame.equals(made.frame) and again.overpaced == made.overpaced
    assert again.population_seed == 1 and again.budget_rate == 1_000
    own = tmp_path / "own.parquet"
    made.frame.write_parquet(own)  # by hand: no generation metadata
    mine = ensure_campaigns(own, 10, seed=2, events_per_second=1_000)
    assert mine.frame.equals(made.frame)
    assert (mine.population_seed, mine.budget_rate, mine.overpaced) == (2, None, ())


def test_budget_rate_at_rate_zero_is_the_simulated_density() -> None:
    settings = Settings.from_env({}, events_per_second=20_000)
    assert budget_rate(settings) == 20_000
    assert budget_rate(settings, 300) == 300
    assert budget_rate(settings, 0) == 20_000
    assert budget_rate(Settings.from_env({}, events_per_second=0), 0) > 0
