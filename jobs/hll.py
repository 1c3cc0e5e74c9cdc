"""HyperLogLog distinct counts as Polars frames: registers per group, merged by max, estimated.

A sketch is a long frame ``(keys…, reg, rho)`` with one row per non-empty register. The union of
two sketches is the register-wise maximum, so a sketch built up over many runs equals the sketch
of all the rows at once, and so does its estimate: the estimate is computed from an exact
integer sum, never from a float sum whose order could vary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import polars as pl

#: 2^12 registers: about 1.6 % standard error.
PRECISION: Final = 12
REGISTERS: Final = 1 << PRECISION
#: rho counts leading zeros in 32 hash bits after the register index (+1), so 1..33.
MAX_RHO: Final = 33
_SEED: Final = 0x5F3759DF6A09E667
_ALPHA: Final = 0.7213 / (1 + 1.079 / REGISTERS)
_CHECK_VALUES: Final = ("adevents-hll-check", "", "user-1")


def registers(frame: pl.LazyFrame, keys: Sequence[str], value: str = "user_id") -> pl.LazyFrame:
    """The sketch of ``value`` per group of ``keys`` (nulls are not counted)."""
    h = pl.col(value).hash(_SEED)
    low_bits = h % (1 << (64 - PRECISION))
    zeros = (low_bits.bitwise_leading_zeros().cast(pl.Int32) - PRECISION).clip(upper_bound=32)
    return (
        frame.filter(pl.col(value).is_not_null())
        .with_columns(
            reg=(h // (1 << (64 - PRECISION))).cast(pl.UInt16),
            rho=(zeros + 1).cast(pl.UInt8),
        )
        .group_by(*keys, "reg")
        .agg(pl.col("rho").max())
    )


def merge(
    sketches: Sequence[pl.DataFrame], keys: Sequence[str], *, sort: bool = True
) -> pl.DataFrame:
    """The union of sketches: the register-wise maximum (sorted, for stable files)."""
    parts = [s for s in sketches if len(s)]
    if not parts:
        return sketches[0].clear() if sketches else pl.DataFrame()
    merged = pl.concat(parts).group_by(*keys, "reg").agg(pl.col("rho").max())
    return merged.sort(*keys, "reg") if sort else merged


def merge_into(
    stored: pl.DataFrame, delta: pl.DataFrame, keys: Sequence[str]
) -> pl.DataFrame | None:
    """``stored`` merged with ``delta`` (sorted), or None when no register of it grows.

    A busy group's registers soon stop growing, so most updates are found to change nothing
    by a join against the few rows of ``delta``, without re-sorting all of ``stored``.
    """
    on = [*keys, "reg"]
    grown = delta.join(stored, on=on, how="left", suffix="_stored").filter(
        pl.col("rho_stored").is_null() | (pl.col("rho") > pl.col("rho_stored"))
    )
    if grown.is_empty():
        return None
    return merge([stored, grown.select(stored.columns)], keys)


def estimate(sketch: pl.LazyFrame, keys: Sequence[str], name: str = "unique_users") -> pl.LazyFrame:
    """The distinct-count estimate of each group's sketch, as Int64 column ``name``."""
    scale = 1 << MAX_RHO
    # sum of 2^-rho over all registers, times 2^33: an exact integer below 2^46.
    z = (pl.lit(2, pl.Int64).pow(MAX_RHO - pl.col("rho").cast(pl.Int64))).sum()
    m = float(REGISTERS)
    return (
        sketch.group_by(*keys)
        .agg(nonzero=pl.len().cast(pl.Int64), z=z)
        .with_columns(empty=REGISTERS - pl.col("nonzero"))
        .with_columns(total=pl.col("z") + pl.col("empty") * scale)
        .with_columns(raw=_ALPHA * m * m * scale / pl.col("total").cast(pl.Float64))
        .with_columns(
            pl.when((pl.col("raw") <= 2.5 * m) & (pl.col("empty") > 0))
            .then(m * (m / pl.col("empty").cast(pl.Float64)).log())
            .otherwise(pl.col("raw"))
            .round(0)
            .cast(pl.Int64)
            .alias(name)
        )
        .select(*keys, name)
    )


def check() -> str:
    """A short string that changes whenever the hash behind the sketches does.

    Polars documents its hash as stable within a version only; sketches made with another hash
    cannot be merged, so the rollup job rebuilds them when this changes.
    """
    s = pl.Series(_CHECK_VALUES, dtype=pl.String)
    return "-".join(f"{h:016x}" for h in s.hash(_SEED).to_list())


def relative_error() -> float:
    """The standard error of an estimate (1.04 / sqrt(m))."""
    return 1.04 / math.sqrt(REGISTERS)
