"""HyperLogLog distinct counts as Polars frames: one dense register array per group.

A sketch is a frame ``(keys…, registers)``: one row per group, ``registers`` a
:data:`REGISTERS`-byte binary whose byte *i* is register *i* (0: empty). Registers are built
from whole columns in one Polars pass; unions and estimates are NumPy operations over the
stacked arrays, so their cost follows the number of groups, not of registers set (a
long ``(keys…, reg, rho)`` frame was re-sorted on every merge: 1.8M rows for one hour of 1,000
campaigns). The union of two sketches is the register-wise maximum, so a sketch built up over
many runs equals the sketch of all the rows at once, and so does its estimate: the estimate is
computed from an exact integer sum, never from a float sum whose order could vary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

#: 2^12 registers: about 1.6 % standard error.
PRECISION: Final = 12
REGISTERS: Final = 1 << PRECISION
#: rho counts leading zeros in 32 hash bits after the register index (+1), so 1..33.
MAX_RHO: Final = 33
#: The column holding each group's registers.
COLUMN: Final = "registers"
#: Changes whenever stored sketches could not be merged with new ones (see :func:`check`).
FORMAT: Final = "dense1"
_SEED: Final = 0x5F3759DF6A09E667
_CHECK_VALUES: Final = ("adevents-hll-check", "", "user-1")

Matrix = npt.NDArray[np.uint8]


def empty(keys: pl.Schema) -> pl.DataFrame:
    """A sketch frame with no group, keyed by ``keys``."""
    return pl.DataFrame(schema={**dict(keys), COLUMN: pl.Binary()})


def _matrix(sketch: pl.DataFrame) -> Matrix:
    """The registers of every row, stacked: shape (rows, REGISTERS)."""
    if sketch.is_empty():
        return np.zeros((0, REGISTERS), np.uint8)
    blob = b"".join(sketch[COLUMN].to_list())
    return np.frombuffer(blob, np.uint8).reshape(len(sketch), REGISTERS)


def _with_matrix(groups: pl.DataFrame, matrix: Matrix) -> pl.DataFrame:
    """``groups`` (key columns) with ``matrix``'s rows as their registers."""
    flat = np.ascontiguousarray(matrix, np.uint8)
    column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(REGISTERS), len(groups), [None, pa.py_buffer(flat.tobytes())]
    )
    return groups.with_columns(pl.Series(COLUMN, column.cast(pa.binary()), pl.Binary()))


def registers(
    frame: pl.LazyFrame | pl.DataFrame, keys: Sequence[str], value: str = "user_id"
) -> pl.DataFrame:
    """The sketch of ``value`` per group of ``keys`` (nulls are not counted)."""
    h = pl.col(value).hash(_SEED)
    low_bits = h % (1 << (64 - PRECISION))
    zeros = (low_bits.bitwise_leading_zeros().cast(pl.Int32) - PRECISION).clip(upper_bound=32)
    long = (
        frame.lazy()
        .filter(pl.col(value).is_not_null())
        .select(
            *keys,
            reg=(h // (1 << (64 - PRECISION))).cast(pl.UInt16),
            rho=(zeros + 1).cast(pl.UInt8),
        )
        .group_by(*keys, "reg")
        .agg(pl.col("rho").max())
        .collect()
    )
    key_schema = pl.Schema({k: long.schema[k] for k in keys})
    if long.is_empty():
        return empty(key_schema)
    groups = long.select(keys).unique().with_row_index("_g")
    cells = long.join(groups, on=list(keys), how="inner", nulls_equal=True)
    matrix = np.zeros((len(groups), REGISTERS), np.uint8)
    matrix[cells["_g"].to_numpy(), cells["reg"].to_numpy()] = cells["rho"].to_numpy()
    return _with_matrix(groups.drop("_g"), matrix)


def merge(sketches: Sequence[pl.DataFrame], keys: Sequence[str]) -> pl.DataFrame:
    """The union of sketches (rows of one group, in any of them, merged), sorted by ``keys``."""
    parts = [s for s in sketches if len(s)]
    if not parts:
        return sketches[0].clear() if sketches else pl.DataFrame()
    both = pl.concat(parts).with_row_index("_row")
    ordered = both.sort(*keys, "_row")
    matrix = _matrix(ordered)
    starts = ordered.select(pl.struct(keys).rle_id().alias("_id"))["_id"].to_numpy()
    first = np.flatnonzero(np.r_[True, starts[1:] != starts[:-1]])
    merged = np.maximum.reduceat(matrix, first, axis=0) if len(first) else matrix
    return _with_matrix(ordered[first].select(keys), merged)


def merge_into(
    stored: pl.DataFrame, delta: pl.DataFrame, keys: Sequence[str]
) -> pl.DataFrame | None:
    """``stored`` merged with ``delta`` (sorted), or None when no register of it grows.

    A busy group's registers soon stop growing, so most updates are found to change nothing
    by comparing the few groups of ``delta`` with theirs in ``stored``.
    """
    if delta.is_empty():
        return None
    on = list(keys)
    pairs = delta.join(stored, on=on, how="left", suffix="_stored", nulls_equal=True)
    old = pairs.get_column(f"{COLUMN}_stored")
    if old.null_count():
        return merge([stored, delta], keys)  # a new group
    new_registers = _matrix(pairs.select(COLUMN))
    old_registers = _matrix(pairs.select(old.alias(COLUMN)))
    if not bool((new_registers > old_registers).any()):
        return None
    return merge([stored, delta], keys)


def _sigma(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Ertl's sigma(x) = x + sum_k x^(2^k) 2^(k-1), elementwise (inf at x = 1)."""
    y = np.ones_like(x)
    z = x.copy()
    x = x.copy()
    for _ in range(64):  # converged long before: x^(2^k) vanishes for x < 1
        x = x * x
        z = z + x * y
        y = y + y
    return np.where(x >= 1.0, np.inf, z)


def _tau(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Ertl's tau(x) = (1 - x - sum_k (1 - x^(2^-k))^2 2^-k) / 3, elementwise (0 at 0 and 1)."""
    y = np.ones_like(x)
    z = 1.0 - x
    x = x.copy()
    for _ in range(64):
        x = np.sqrt(x)
        y = y * 0.5
        z = z - (1.0 - x) ** 2 * y
    return np.where((x <= 0.0) | (x >= 1.0), 0.0, z / 3.0)


def estimate(sketch: pl.DataFrame, keys: Sequence[str], name: str = "unique_users") -> pl.DataFrame:
    """The distinct-count estimate of each group's sketch, as Int64 column ``name``.

    Ertl's improved raw estimator ("New cardinality estimation algorithms for HyperLogLog
    sketches", 2017) from each sketch's histogram of register values: unbiased over the whole
    range, with no switch from linear counting to the raw estimate (the classic estimator's
    switch at 2.5 m, about 10k users here, biased those counts by +1.8 %).
    """
    rho = _matrix(sketch)
    m = float(REGISTERS)
    q = MAX_RHO - 1
    counts = np.stack([(rho == k).sum(axis=1) for k in range(q + 2)], axis=1).astype(np.float64)
    z = m * _tau(1.0 - counts[:, q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + counts[:, k])
    z = z + m * _sigma(counts[:, 0] / m)
    value = np.where(np.isfinite(z), m * m / (2.0 * math.log(2.0)) / z, 0.0)
    return sketch.select(keys).with_columns(
        pl.Series(name, np.round(value), pl.Float64).cast(pl.Int64)
    )


def check() -> str:
    """A short string that changes whenever the hash behind the sketches, or their format, does.

    Polars documents its hash as stable within a version only; sketches made with another hash
    cannot be merged, so the rollup job rebuilds them when this changes.
    """
    s = pl.Series(_CHECK_VALUES, dtype=pl.String)
    return "-".join([FORMAT, *(f"{h:016x}" for h in s.hash(_SEED).to_list())])


def relative_error() -> float:
    """The standard error of an estimate (1.04 / sqrt(m))."""
    return 1.04 / math.sqrt(REGISTERS)
