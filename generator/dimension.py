"""The campaign dimension file: created once, first writer wins, with budgets fitted to a rate.

Budgets fit one population (Zipf shares and prices, drawn from a seed), so the file records
that seed in its Parquet metadata, with the rate and the campaigns over-paced on purpose: every
generator that reads the file draws from the same population, whatever its own seed, and the
demo can name the over-paced campaigns.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import polars as pl

from generator import model
from generator.budgets import daily_budgets, pick_overpaced

#: Parquet metadata keys of a generated dimension.
SEED_KEY: Final = "adevents.population_seed"
RATE_KEY: Final = "adevents.budget_events_per_second"
OVERPACED_KEY: Final = "adevents.overpaced_campaigns"


@dataclass(frozen=True)
class Dimension:
    """The campaigns, the seed whose population the generator draws from, and, when the
    generator made the file, the rate its budgets fit and the campaigns over-paced on purpose."""

    frame: pl.DataFrame
    population_seed: int
    budget_rate: float | None = None
    overpaced: tuple[str, ...] = ()


def seed_sequences(seed: int) -> list[np.random.SeedSequence]:
    """The run's three independent streams: dimension, population, events."""
    return np.random.SeedSequence(seed).spawn(3)


def population_for(dimension: Dimension) -> model.Population:
    """The population the generator draws from: the one the dimension's budgets fit."""
    rng = np.random.default_rng(seed_sequences(dimension.population_seed)[1])
    return model.build_population(rng, model.campaign_ids(dimension.frame))


def _generated(
    count: int, seed: int, events_per_second: float
) -> tuple[pl.DataFrame, dict[str, str]]:
    dimension_seq, population_seq, _ = seed_sequences(seed)
    rng = np.random.default_rng(dimension_seq)
    frame = model.build_campaigns(rng, count)
    population = model.build_population(
        np.random.default_rng(population_seq), model.campaign_ids(frame)
    )
    budgets = daily_budgets(population, events_per_second, pick_overpaced(rng, population))
    frame = frame.with_columns(pl.Series("daily_budget_micros", budgets.daily_budget_micros))
    metadata = {
        SEED_KEY: str(seed),
        RATE_KEY: repr(float(events_per_second)),
        OVERPACED_KEY: ",".join(budgets.overpaced),
    }
    return frame, metadata


def ensure_campaigns(path: Path, count: int, seed: int, events_per_second: float) -> Dimension:
    """The campaign dimension at ``path``; one of ``count`` campaigns, budgets fitted to
    ``events_per_second`` and the population of ``seed``, is written if none exists.

    Creation is atomic and first-writer-wins: a temporary file is hard-linked into place, so
    generators starting together all end up drawing from the same file. A file without our
    metadata (written by hand) draws from ``seed``'s population.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        frame, metadata = _generated(count, seed, events_per_second)
        frame.write_parquet(tmp, metadata=metadata)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # no hard links here: a rename is still atomic, last writer wins
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return read_dimension(path, seed)


def read_dimension(path: Path, seed: int) -> Dimension:
    """The dimension at ``path``, with its generation metadata (``seed`` when it has none)."""
    metadata = pl.read_parquet_metadata(path)
    overpaced = metadata.get(OVERPACED_KEY, "")
    rate = metadata.get(RATE_KEY)
    return Dimension(
        frame=pl.read_parquet(path),
        population_seed=int(metadata.get(SEED_KEY, seed)),
        budget_rate=None if rate is None else float(rate),
        overpaced=tuple(overpaced.split(",")) if overpaced else (),
    )
