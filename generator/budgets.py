"""Daily budgets that fit the generator's own spend, with a few campaigns over-paced on purpose.

A campaign's spend follows from the population: its Zipf share of impressions (clicks follow
impressions, so they share it), its CPM and CPC, and the funnel's click rate. A budget is that
spend over a day at the configured rate, with headroom; the over-paced ones get a budget of a
few tens of seconds of it, so the demo's budget alerts are those, and only those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from generator.model import Population

Floats = npt.NDArray[np.float64]
Int64s = npt.NDArray[np.int64]

DAY_S: Final = 86_400
#: A normally paced budget is this many times its expected daily spend: at the day's end it has
#: spent half, under the ALERT_BUDGET_WARNING (0.8) share, with room for the draws' noise.
BUDGET_HEADROOM: Final = 2.0
#: Campaigns over-paced on purpose, so the demo shows a handful of budget alerts.
OVERPACED_CAMPAIGNS: Final = 4
#: An over-paced campaign's daily budget is its expected spend over this many seconds: it warns
#: after about 0.8 of that and is critical after it, within the demo's first minute.
OVERPACED_BUDGET_S: Final = 40.0
#: Over-paced campaigns come from this many of the highest spenders: enough events a second that
#: their spend tracks its expectation, and they show among the dashboard's top campaigns.
OVERPACED_FROM_TOP: Final = 50
_CENT: Final = 10_000
_DOLLAR: Final = 1_000_000


@dataclass(frozen=True)
class Budgets:
    """Daily budgets in micros, per campaign of the population, and which are over-paced."""

    daily_budget_micros: Int64s
    overpaced: tuple[str, ...]


def campaign_shares(population: Population) -> Floats:
    """Each campaign's share of impressions, exactly as the generator's sampler draws them."""
    counts = np.bincount(population.campaign_sampler, minlength=len(population.campaigns))
    shares: Floats = counts / counts.sum()
    return shares


def spend_per_event(population: Population) -> Floats:
    """Expected cost in micros that each campaign adds per generated event (of any type).

    An event is an impression, click or conversion in the ratio 1 : ctr : ctr x cvr; an
    impression costs CPM / 1000, a click its CPC and a conversion nothing.
    """
    ctr, cvr = population.ctr, population.cvr
    per_impression = population.cpm_micros // 1000 + ctr * population.cpc_micros
    spend: Floats = campaign_shares(population) * per_impression / (1 + ctr + ctr * cvr)
    return spend


def pick_overpaced(
    rng: np.random.Generator, population: Population, count: int = OVERPACED_CAMPAIGNS
) -> npt.NDArray[np.intp]:
    """Positions of ``count`` campaigns drawn from the OVERPACED_FROM_TOP highest spenders."""
    spend = spend_per_event(population)
    top = np.argsort(-spend, kind="stable")[: max(OVERPACED_FROM_TOP, count)]
    picked: npt.NDArray[np.intp] = np.sort(rng.choice(top, min(count, len(top)), replace=False))
    return picked


def daily_budgets(
    population: Population, events_per_second: float, overpaced: npt.NDArray[np.intp]
) -> Budgets:
    """Budgets for ``events_per_second``: BUDGET_HEADROOM x a day's expected spend, rounded up
    to whole dollars; the ``overpaced`` positions get OVERPACED_BUDGET_S of spend (in cents)."""
    if not events_per_second > 0:
        raise ValueError("budgets need a rate above 0 events/s")
    per_second = spend_per_event(population) * events_per_second
    normal = np.ceil(per_second * DAY_S * BUDGET_HEADROOM / _DOLLAR) * _DOLLAR
    short = np.ceil(per_second * OVERPACED_BUDGET_S / _CENT) * _CENT
    budget = np.maximum(normal, _DOLLAR)
    budget[overpaced] = np.maximum(short[overpaced], _CENT)
    return Budgets(
        daily_budget_micros=budget.astype(np.int64),
        overpaced=tuple(population.campaigns[i] for i in overpaced),
    )
