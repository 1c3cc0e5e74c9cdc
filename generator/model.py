"""Pure event model: a NumPy Generator and a population in, one micro-batch Polars frame out."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from generator import ID_SHAPES
from pipeline.schema import (
    CAMPAIGN_COLUMNS,
    CAMPAIGN_SCHEMA,
    DEVICE_TYPES,
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    EVENT_TYPES,
    KEY_COLUMN,
    LOW_CARDINALITY_COLUMNS,
    MAX_EVENT_ID_BYTES,
    REASONS,
    TIME_COLUMN,
    UTC_MS,
)

Int64s = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

#: Low-cardinality string columns, written as Arrow dictionaries (the consumer decodes them).
DICT_COLUMNS: Final = LOW_CARDINALITY_COLUMNS
#: The Arrow schema of a spool file: the contract's names and types, dictionary-encoded where
#: that is cheap, and nullable everywhere so malformed rows can be written.
SPOOL_SCHEMA: Final = pa.schema(
    [
        pa.field(f.name, pa.dictionary(pa.int32(), f.type) if f.name in DICT_COLUMNS else f.type)
        for f in EVENT_SCHEMA
    ]
)
#: Reasons a row can carry inside a file; the others depend on the consumer's clock, or (for
#: ``field_too_long``) need values far larger than the generator's realistic ids (it is tested
#: in tests/test_validate.py and tests/test_ingest_hardening.py instead).
ROW_REASONS: Final = tuple(
    r for r in REASONS if r not in ("future_event", "late_event", "field_too_long")
)

IMPRESSION, CLICK, CONVERSION = (
    EVENT_TYPES.index(t) for t in ("impression", "click", "conversion")
)
#: Malformed values appended to the dictionaries so invalid rows stay dictionary-encoded.
BAD_EVENT_TYPES: Final = ("view", "impresion")
BAD_DEVICE_TYPES: Final = ("phone", "smartphone")
BAD_COUNTRIES: Final = ("usa", "united states")
#: Columns nulled for ``missing_field``: not event_id or event_type, nor money (a null there is
#: ``invalid_money`` to the validator), whose own reasons come first.
NULLABLE_FOR_MISSING: Final = ("campaign_id", "ad_id", "publisher_id", TIME_COLUMN)

DEVICE_MIX: Final = {"mobile": 0.60, "desktop": 0.27, "tablet": 0.07, "ctv": 0.04, "other": 0.02}
COUNTRY_MIX: Final = {
    "US": 40.0, "GB": 7.0, "DE": 6.0, "IN": 5.0, "CA": 4.5, "FR": 4.5, "BR": 4.0, "JP": 3.5,
    "AU": 3.0, "MX": 3.0, "ES": 2.5, "IT": 2.5, "NL": 1.5, "KR": 1.5, "PL": 1.2, "TR": 1.2,
    "ID": 1.2, "SE": 1.0, "PH": 1.0, "ZA": 0.8, "AR": 0.8, "CO": 0.8, "CH": 0.7, "BE": 0.7,
    "AT": 0.6, "IE": 0.6, "VN": 0.6, "TH": 0.6, "NO": 0.5, "DK": 0.5, "SG": 0.5, "AE": 0.5,
    "SA": 0.5, "NG": 0.5, "EG": 0.5, "MY": 0.5, "PT": 0.5, "CL": 0.5, "FI": 0.4, "NZ": 0.4,
}  # fmt: skip
#: Share of users whose country is unknown (the column is optional in the contract).
UNKNOWN_COUNTRY_SHARE: Final = 0.003
#: Mean collection delay between an event happening and the producer seeing it.
COLLECTION_DELAY_MS: Final = 150.0

_SAMPLER_SLOTS: Final = 1 << 20
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_QUAD = np.arange(1 << 16)
# The four hex digits of every 16-bit number, each as one little-endian uint32 of ASCII bytes.
_HEX4 = (
    np.stack([_HEX[(_QUAD >> s) & 15] for s in (12, 8, 4, 0)], axis=1).copy().view("<u4").ravel()
)


def _hex_field(values: npt.NDArray[np.integer], digits: int) -> tuple[str, npt.NDArray[Any]]:
    """One fixed-width field of hex digits: its NumPy dtype and its ASCII bytes, per value."""
    unsigned = values.astype(np.uint64)
    if digits == 1:
        return "u1", _HEX[(unsigned & np.uint64(15)).astype(np.intp)]
    if digits not in (4, 8, 12, 16):
        raise ValueError("digits must be 1, 4, 8, 12 or 16")
    groups = digits // 4
    quads = [
        _HEX4[((unsigned >> np.uint64(16 * (groups - 1 - i))) & np.uint64(0xFFFF)).astype(np.intp)]
        for i in range(groups)
    ]
    return f"{groups}<u4", np.stack(quads, axis=1)


def _hex_concat(
    prefix: bytes, parts: Sequence[tuple[npt.NDArray[np.integer], int]]
) -> pa.StringArray:
    """``prefix`` + each part's low hex digits, row by row, as one Arrow string array built
    without a Python object per string (the rows are one NumPy record array's bytes)."""
    n = len(parts[0][0])
    packed = [_hex_field(values, digits) for values, digits in parts]
    layout = [("prefix", f"S{len(prefix)}")] if prefix else []
    row = np.dtype(layout + [(f"f{i}", dtype) for i, (dtype, _) in enumerate(packed)])
    if n * row.itemsize >= 2**31:
        raise ValueError("too many strings for one Arrow string array")
    data = np.empty(n, dtype=row)
    if prefix:
        data["prefix"] = prefix
    for i, (_, chars) in enumerate(packed):
        data[f"f{i}"] = chars
    offsets = np.arange(0, (n + 1) * row.itemsize, row.itemsize, dtype=np.int32)
    array = pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data.view(np.uint8))]
    )
    assert isinstance(array, pa.StringArray)
    return array


def hex_strings(prefix: bytes, values: npt.NDArray[np.integer], digits: int) -> pa.StringArray:
    """``prefix`` + the low ``digits`` (a multiple of 4, at most 16) hex digits of each value."""
    if digits not in (4, 8, 12, 16):
        raise ValueError("digits must be 4, 8, 12 or 16")
    return _hex_concat(prefix, [(values, digits)])


def event_id_prefix(producer: str, seed: int) -> bytes:
    """The part of every event_id a run shares: distinct producers or seeds never collide."""
    if not producer or "-" in producer:
        raise ValueError("producer must be non-empty and contain no '-'")
    return f"{producer}-{seed:016x}-".encode()


EVENT_SEQ_DIGITS: Final = 12
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser: a bijection of 64-bit integers that looks random."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    mixed: npt.NDArray[np.uint64] = x ^ (x >> np.uint64(31))
    return mixed


def _hex33_ids(prefix: bytes, seqs: npt.NDArray[np.integer]) -> pa.StringArray:
    """33 hex digits per sequence number, keyed by the run's ``prefix`` (producer and seed).

    The middle 16 digits are a bijection of the sequence number, so a run's ids never collide;
    ids of other runs collide with probability about n^2 / 2^129, as truly random ids would.
    """
    key = np.frombuffer(hashlib.blake2b(prefix, digest_size=16).digest(), dtype="<u8")
    unsigned = seqs.astype(np.uint64)
    unique = _mix64(unsigned + key[0])
    noise = _mix64(unsigned ^ key[1])
    return _hex_concat(b"", [(noise >> np.uint64(60), 1), (unique, 16), (noise, 16)])


def event_ids(
    prefix: bytes, seqs: npt.NDArray[np.integer], shape: str = "sequential"
) -> pa.StringArray:
    """The event_id of each sequence number of a run, in one of ID_SHAPES."""
    if shape == "sequential":
        return hex_strings(prefix, seqs, EVENT_SEQ_DIGITS)
    if shape == "hex33":
        return _hex33_ids(prefix, seqs)
    raise ValueError(f"id shape must be one of {', '.join(ID_SHAPES)}")


def _sampler(weights: npt.NDArray[np.float64]) -> npt.NDArray[np.uint32]:
    """A lookup table whose uniform draws follow ``weights``: faster than searching a CDF."""
    slots = max(_SAMPLER_SLOTS, 16 * len(weights))
    p = weights / weights.sum()
    counts = np.floor(p * slots).astype(np.int64)
    remainder = slots - int(counts.sum())
    counts[np.argsort(-(p * slots - counts), kind="stable")[:remainder]] += 1
    return np.repeat(np.arange(len(weights), dtype=np.uint32), counts)


def _draw(
    rng: np.random.Generator, table: npt.NDArray[np.uint32], n: int
) -> npt.NDArray[np.uint32]:
    return table[rng.integers(0, len(table), n)]


def zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> npt.NDArray[np.float64]:
    """Zipf popularity ``1 / rank**exponent`` with ranks shuffled over the ``n`` items."""
    ranks = rng.permutation(n) + 1
    weights: npt.NDArray[np.float64] = 1.0 / ranks.astype(np.float64) ** exponent
    return weights


def build_campaigns(rng: np.random.Generator, n: int) -> pl.DataFrame:
    """A campaign dimension of ``n`` campaigns in CAMPAIGN_SCHEMA, ids ``cmp-00001`` onwards.

    Budgets are null (no budget, no alert): they depend on the population and the rate, so the
    generator sets them (:mod:`generator.budgets`)."""
    if n < 1:
        raise ValueError("need at least one campaign")
    width = max(5, len(str(n)))
    advertisers = max(1, n // 8)
    brands = np.array(
        ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell"]
    )
    seasons = np.array(["Spring", "Summer", "Autumn", "Winter", "Holiday", "Back to School"])
    goals = np.array(["Awareness", "Retargeting", "Prospecting", "App Install", "Sale", "Launch"])
    number = np.arange(1, n + 1)
    advertiser = rng.integers(0, advertisers, n)
    names = (
        pl.DataFrame(
            {
                "brand": brands[advertiser % len(brands)],
                "season": rng.choice(seasons, n),
                "goal": rng.choice(goals, n),
                "number": number,
            }
        )
        .select(pl.format("{} {} {} #{}", "brand", "season", "goal", "number"))
        .to_series()
    )
    frame = pl.DataFrame(
        {
            "campaign_id": [f"cmp-{i:0{width}d}" for i in number],
            "advertiser_id": [f"adv-{a + 1:04d}" for a in advertiser],
            "campaign_name": names,
            "daily_budget_micros": pl.Series([None] * n, dtype=pl.Int64),
        },
        schema=CAMPAIGN_SCHEMA,
    )
    return frame


def campaign_ids(dimension: pl.DataFrame) -> list[str]:
    """The distinct non-null campaign_ids of a dimension, in file order."""
    missing = [c for c in CAMPAIGN_COLUMNS if c not in dimension.columns]
    if missing:
        raise ValueError(f"campaign dimension lacks column(s) {', '.join(missing)}")
    ids = (
        dimension.get_column("campaign_id").cast(pl.String).drop_nulls().unique(maintain_order=True)
    )
    if ids.len() == 0:
        raise ValueError("campaign dimension has no campaign_id")
    return ids.to_list()


@dataclass(frozen=True)
class Population:
    """Everything a batch is drawn from: campaigns and their prices, ads, publishers, users."""

    campaigns: tuple[str, ...]
    campaign_sampler: npt.NDArray[np.uint32]
    cpm_micros: Int64s
    cpc_micros: Int64s
    conversion_value_micros: Int64s
    ad_first: Int64s
    ad_count: Int64s
    publisher_sampler: npt.NDArray[np.uint32]
    user_device: npt.NDArray[np.uint8]
    user_country: npt.NDArray[np.uint16]  # == len(COUNTRY_MIX) for an unknown country
    ctr: float
    cvr: float
    #: Per DICT_COLUMNS column: valid values first, then the malformed ones.
    categories: Mapping[str, tuple[str, ...]]
    enums: Mapping[str, pl.Enum]
    dictionaries: Mapping[str, pa.Array]

    @property
    def users(self) -> int:
        return len(self.user_device)


def build_population(
    rng: np.random.Generator,
    campaigns: Sequence[str],
    *,
    users: int = 1_000_000,
    publishers: int = 500,
    ctr: float = 0.015,
    cvr: float = 0.03,
    campaign_skew: float = 1.1,
) -> Population:
    """Draw campaign prices and Zipf popularity, ads, publishers, users' devices and countries."""
    n = len(campaigns)
    if n == 0:
        raise ValueError("need at least one campaign")
    ad_count = rng.integers(1, 9, n).astype(np.int64)
    ad_first = np.concatenate([[0], np.cumsum(ad_count)[:-1]]).astype(np.int64)
    # Micros per impression, so an impression costs CPM / 1000 exactly.
    per_mille = np.maximum(np.round(rng.lognormal(np.log(2.5), 0.5, n) * 1000), 100)
    cpc = np.maximum(np.round(rng.lognormal(np.log(0.6), 0.6, n) * 1e6), 10_000)
    value = np.maximum(np.round(rng.lognormal(np.log(45.0), 0.7, n) * 1e6), 1e6)
    device_p = np.array([DEVICE_MIX.get(d, 0.0) for d in DEVICE_TYPES])
    country_p = np.array(list(COUNTRY_MIX.values()))
    country_p = np.append(
        country_p / country_p.sum() * (1 - UNKNOWN_COUNTRY_SHARE), UNKNOWN_COUNTRY_SHARE
    )
    categories = {
        "event_type": EVENT_TYPES + BAD_EVENT_TYPES,
        "campaign_id": tuple(campaigns),
        "ad_id": tuple(f"ad-{i:06d}" for i in range(int(ad_count.sum()))),
        "publisher_id": tuple(f"pub-{i:04d}" for i in range(publishers)),
        "device_type": DEVICE_TYPES + BAD_DEVICE_TYPES,
        "country": tuple(COUNTRY_MIX) + BAD_COUNTRIES,
    }
    return Population(
        campaigns=tuple(campaigns),
        campaign_sampler=_sampler(zipf_weights(rng, n, campaign_skew)),
        cpm_micros=per_mille.astype(np.int64) * 1000,
        cpc_micros=cpc.astype(np.int64),
        conversion_value_micros=value.astype(np.int64),
        ad_first=ad_first,
        ad_count=ad_count,
        publisher_sampler=_sampler(zipf_weights(rng, publishers, 1.0)),
        user_device=_draw(rng, _sampler(device_p), users).astype(np.uint8),
        user_country=_draw(rng, _sampler(country_p), users).astype(np.uint16),
        ctr=ctr,
        cvr=cvr,
        categories=categories,
        enums={c: pl.Enum(v) for c, v in categories.items()},
        dictionaries={c: pa.array(v, pa.string()) for c, v in categories.items()},
    )


@dataclass(frozen=True)
class BatchSpec:
    """One batch to draw: ``size`` fresh events numbered from ``seq_start``, happening in
    ``(start_ms, end_ms]`` and seen a little later, but never after ``end_ms``."""

    id_prefix: bytes
    seq_start: int
    size: int
    start_ms: int
    end_ms: int
    invalid_rate: float = 0.0
    id_shape: str = "sequential"


@dataclass(frozen=True)
class Batch:
    """A drawn batch: the frame in contract columns, and which rows were made malformed."""

    frame: pl.DataFrame
    invalid: Int64s  # row positions, ascending
    reasons: npt.NDArray[np.uint8]  # index into ROW_REASONS, per invalid row

    @property
    def invalid_ids(self) -> Int64s:
        """Positions of rows whose event_id was replaced by a malformed one."""
        rows: Int64s = self.invalid[self.reasons == ROW_REASONS.index("invalid_event_id")]
        return rows


def _funnel_counts(
    rng: np.random.Generator, size: int, ctr: float, cvr: float
) -> tuple[int, int, int]:
    rest = int(rng.binomial(size, (ctr + ctr * cvr) / (1 + ctr + ctr * cvr)))
    clicks = int(rng.binomial(rest, 1 / (1 + cvr)))
    impressions, conversions = size - rest, rest - clicks
    if impressions == 0:
        return size, 0, 0
    if clicks == 0:
        return impressions + conversions, 0, 0
    return impressions, clicks, conversions


def _follow(rng: np.random.Generator, source_ms: Int64s, end_ms: int) -> Int64s:
    """Times after each source time, skewed towards soon after, never past ``end_ms``."""
    gap = np.maximum(end_ms - source_ms, 0)
    follow: Int64s = source_ms + (gap * rng.random(len(source_ms)) ** 2).astype(np.int64)
    return follow


def generate_batch(rng: np.random.Generator, population: Population, spec: BatchSpec) -> Batch:
    """Draw ``spec.size`` events: impressions, then the clicks and conversions that follow them."""
    n = spec.size
    n_imp, n_click, n_conv = _funnel_counts(rng, n, population.ctr, population.cvr)

    campaign = _draw(rng, population.campaign_sampler, n_imp).astype(np.int64)
    ad = population.ad_first[campaign] + (rng.random(n_imp) * population.ad_count[campaign]).astype(
        np.int64
    )
    publisher = _draw(rng, population.publisher_sampler, n_imp)
    user = rng.integers(0, population.users, n_imp)
    span = max(spec.end_ms - spec.start_ms, 0) / max(n_imp, 1)
    happened = spec.start_ms + (np.arange(n_imp) + rng.random(n_imp)) * span
    seen = happened - rng.exponential(COLLECTION_DELAY_MS, n_imp)
    imp_ms = np.minimum(seen.astype(np.int64), spec.end_ms)

    # Clicks follow impressions on the same user and ad; conversions follow clicks.
    click_src = rng.integers(0, n_imp, n_click)
    click_ms = _follow(rng, imp_ms[click_src], spec.end_ms)
    conv_src = rng.integers(0, max(n_click, 1), n_conv)
    conv_ms = _follow(rng, click_ms[conv_src], spec.end_ms)
    row = np.concatenate([np.arange(n_imp), click_src, click_src[conv_src]])
    campaign, user = campaign[row], user[row]

    cost = np.zeros(n, dtype=np.int64)
    cost[:n_imp] = population.cpm_micros[campaign[:n_imp]] // 1000
    cost[n_imp : n_imp + n_click] = population.cpc_micros[campaign[n_imp : n_imp + n_click]]
    revenue = np.zeros(n, dtype=np.int64)
    if n_conv:
        value = population.conversion_value_micros[campaign[n_imp + n_click :]]
        basket = rng.lognormal(0.0, 0.5, n_conv)
        revenue[n_imp + n_click :] = np.maximum(value * basket, 1).astype(np.int64)
    country = population.user_country[user]
    columns: dict[str, npt.NDArray[np.integer]] = {
        "event_type": np.repeat(
            np.array([IMPRESSION, CLICK, CONVERSION], dtype=np.uint8), [n_imp, n_click, n_conv]
        ),
        "campaign_id": campaign,
        "ad_id": ad[row],
        "publisher_id": publisher[row],
        "device_type": population.user_device[user],
        "country": country,
        TIME_COLUMN: np.concatenate([imp_ms, click_ms, conv_ms]),
        "cost_micros": cost,
        "revenue_micros": revenue,
    }
    nulls: dict[str, Bools] = {"country": country == len(COUNTRY_MIX)}
    ids = event_ids(spec.id_prefix, np.arange(spec.seq_start, spec.seq_start + n), spec.id_shape)
    invalid, reasons, ids = _corrupt(rng, columns, nulls, ids, spec.invalid_rate)

    data: dict[str, pl.Series] = {
        KEY_COLUMN: _series(ids),
        "user_id": _series(hex_strings(b"user-", user, 8)),
        TIME_COLUMN: _series(pa.array(columns[TIME_COLUMN], mask=nulls.get(TIME_COLUMN))).cast(
            UTC_MS
        ),
    }
    for name in DICT_COLUMNS:
        codes = _series(pa.array(columns[name], mask=nulls.get(name)))
        data[name] = codes.cat.to(population.enums[name])
    for name in ("cost_micros", "revenue_micros"):
        data[name] = _series(pa.array(columns[name], mask=nulls.get(name)))
    frame = pl.DataFrame([data[c].alias(c) for c in EVENT_COLUMNS])
    return Batch(frame=frame, invalid=invalid, reasons=reasons)


def _series(array: pa.Array) -> pl.Series:
    series = pl.from_arrow(array)
    assert isinstance(series, pl.Series)
    return series


def _corrupt(
    rng: np.random.Generator,
    columns: dict[str, npt.NDArray[np.integer]],
    nulls: dict[str, Bools],
    ids: pa.StringArray,
    rate: float,
) -> tuple[Int64s, npt.NDArray[np.uint8], pa.StringArray]:
    """Give a ``rate`` share of rows exactly one defect each, spread evenly over ROW_REASONS.

    Edits ``columns`` and ``nulls`` in place; returns the rows, their reason indexes and the
    event_ids with malformed ones swapped in.
    """
    size = len(ids)
    count = int(rng.binomial(size, rate)) if rate > 0 else 0
    rows = np.sort(rng.choice(size, count, replace=False)).astype(np.int64)
    reasons = rng.integers(0, len(ROW_REASONS), count).astype(np.uint8)
    for code, reason in enumerate(ROW_REASONS):
        at = rows[reasons == code]
        if not len(at):
            continue
        if reason == "invalid_event_id":
            # Half empty, half too long; a long one keeps its real id inside, so it stays unique.
            long_ids = pc.utf8_rpad(ids.take(at), width=MAX_EVENT_ID_BYTES + 1, padding="~")
            empty = pa.array(rng.random(len(at)) < 0.5)
            mask = np.zeros(size, dtype=np.bool_)
            mask[at] = True
            ids = pc.replace_with_mask(ids, mask, pc.if_else(empty, "", long_ids))
        elif reason == "invalid_event_type":
            bad = rng.integers(0, len(BAD_EVENT_TYPES), len(at))
            columns["event_type"][at] = len(EVENT_TYPES) + bad
        elif reason == "missing_field":
            which = rng.integers(0, len(NULLABLE_FOR_MISSING), len(at))
            for k, column in enumerate(NULLABLE_FOR_MISSING):
                mask = nulls.setdefault(column, np.zeros(size, dtype=np.bool_))
                mask[at[which == k]] = True
        elif reason == "invalid_money":
            money = columns["cost_micros"]
            money[at] = -1 - money[at]
        elif reason == "invalid_country":
            bad = rng.integers(0, len(BAD_COUNTRIES), len(at))
            columns["country"][at] = len(COUNTRY_MIX) + bad
            nulls["country"][at] = False
        elif reason == "invalid_device_type":
            bad = rng.integers(0, len(BAD_DEVICE_TYPES), len(at))
            columns["device_type"][at] = len(DEVICE_TYPES) + bad
        else:  # pragma: no cover - a new row reason in the contract needs a defect here
            raise AssertionError(f"no way to make a row {reason}")
    return rows, reasons, ids


def to_spool_table(frame: pl.DataFrame, population: Population) -> pa.Table:
    """The frame as an Arrow table in SPOOL_SCHEMA, ready for ``SpoolWriter.write``."""
    frame = frame.rechunk()
    arrays: list[pa.Array] = []
    for field in SPOOL_SCHEMA:
        series = frame.get_column(field.name)
        if field.name in DICT_COLUMNS:
            codes = series.to_physical().to_arrow().cast(pa.int32())
            arrays.append(
                pa.DictionaryArray.from_arrays(codes, population.dictionaries[field.name])
            )
        else:
            arrays.append(series.to_arrow().cast(field.type))
    return pa.Table.from_arrays(arrays, schema=SPOOL_SCHEMA)
