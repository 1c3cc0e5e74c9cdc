"""normalize(): every compatible physical type becomes the contract's type; the rest is refused."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
import pyarrow as pa
import pytest
from pyarrow import ipc

from pipeline.normalize import DICTIONARY, SchemaMismatchError, normalize
from pipeline.schema import (
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    LOW_CARDINALITY_COLUMNS,
    MONEY_COLUMNS,
    OPTIONAL_COLUMNS,
    POLARS_EVENT_SCHEMA,
    REQUIRED_COLUMNS,
    STRING_COLUMNS,
    TIME_COLUMN,
)
from pipeline.validate import split_valid

#: The contract's schema with every field nullable: what normalize() returns.
NULLABLE_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in EVENT_SCHEMA])
#: What normalize(..., dictionaries=True) returns: the low-cardinality columns as DICTIONARY.
DICTIONARY_SCHEMA = pa.schema(
    [
        pa.field(f.name, DICTIONARY if f.name in LOW_CARDINALITY_COLUMNS else f.type)
        for f in EVENT_SCHEMA
    ]
)
T0 = datetime(2026, 11, 27, 9, 30, 0, 123_000, tzinfo=UTC)
T0_MS = 1_795_771_800_123
INT64_MAX = 2**63 - 1


def _values() -> dict[str, list[Any]]:
    """Three valid rows in the contract's Python values, the second with the optionals null."""
    return {
        "event_id": ["e-1", "e-2", "e-3"],
        "event_type": ["impression", "click", "conversion"],
        "event_time": [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)],
        "campaign_id": ["c-1", "c-2", "c-1"],
        "ad_id": ["a-1", "a-2", "a-3"],
        "publisher_id": ["p-1", "p-1", "p-2"],
        "user_id": ["u-1", None, "u-3"],
        "device_type": ["mobile", None, "ctv"],
        "country": ["US", None, "DE"],
        "cost_micros": [0, 1_500, 2_000_000],
        "revenue_micros": [10, 0, 3_000_000],
    }


@pytest.fixture
def make_table() -> Callable[..., pa.Table]:
    """Factory of a valid table in the canonical types; keyword arguments replace columns.

    A keyword whose value is None drops that column; an ``extra`` dict appends columns.
    """

    def factory(extra: dict[str, pa.Array] | None = None, **columns: pa.Array | None) -> pa.Table:
        arrays: dict[str, pa.Array] = {}
        for f in EVENT_SCHEMA:
            if f.name in columns:
                replacement = columns[f.name]
                if replacement is not None:
                    arrays[f.name] = replacement
            else:
                arrays[f.name] = pa.array(_values()[f.name], f.type)
        arrays.update(extra or {})
        return pa.table(arrays)

    return factory


def _column(table: pa.Table, name: str) -> list[Any]:
    return list(table.column(name).to_pylist())


# --- the canonical case -----------------------------------------------------------------------


def test_canonical_table_passes_through_unchanged(make_table: Callable[..., pa.Table]) -> None:
    out, ignored = normalize(make_table())
    assert out.schema == NULLABLE_SCHEMA
    assert ignored == []
    assert out.to_pydict() == _values()


def test_result_converts_to_the_polars_contract(make_table: Callable[..., pa.Table]) -> None:
    out, _ = normalize(make_table())
    frame = pl.from_arrow(out)
    assert isinstance(frame, pl.DataFrame)
    assert frame.schema == POLARS_EVENT_SCHEMA


def test_empty_table_normalises(make_table: Callable[..., pa.Table]) -> None:
    out, ignored = normalize(make_table().slice(0, 0))
    assert out.num_rows == 0
    assert out.schema == NULLABLE_SCHEMA
    assert ignored == []


def test_columns_come_out_in_contract_order_whatever_the_file_order(
    make_table: Callable[..., pa.Table],
) -> None:
    table = make_table()
    shuffled = table.select(list(reversed(table.column_names)))
    out, ignored = normalize(shuffled)
    assert out.column_names == list(EVENT_COLUMNS)
    assert out.to_pydict() == _values()
    assert ignored == []


def test_several_chunks_with_different_dictionaries(make_table: Callable[..., pa.Table]) -> None:
    first = make_table(campaign_id=pa.array(["c-1", "c-2", "c-1"]).dictionary_encode())
    second = make_table(campaign_id=pa.array(["c-9", "c-9", "c-8"]).dictionary_encode())
    out, _ = normalize(pa.concat_tables([first, second]))
    assert _column(out, "campaign_id") == ["c-1", "c-2", "c-1", "c-9", "c-9", "c-8"]
    assert out.schema == NULLABLE_SCHEMA


# --- strings ------------------------------------------------------------------------------------


def _strings(values: list[str | None], arrow_type: pa.DataType) -> pa.Array:
    """``values`` as ``arrow_type``; dictionaries by hand, as pa.array cannot build them all."""
    if not pa.types.is_dictionary(arrow_type):
        return pa.array(values, arrow_type)
    encoded = pa.array(values, pa.string()).dictionary_encode()
    return pa.DictionaryArray.from_arrays(
        encoded.indices.cast(arrow_type.index_type),
        encoded.dictionary.cast(arrow_type.value_type),
    )


STRING_TYPES = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "string_view": pa.string_view(),
    "dictionary<int8,string>": pa.dictionary(pa.int8(), pa.string()),
    "dictionary<int32,string>": pa.dictionary(pa.int32(), pa.string()),
    "dictionary<int16,large_string>": pa.dictionary(pa.int16(), pa.large_string()),
    "dictionary<uint8,string>": pa.dictionary(pa.uint8(), pa.string()),
    "dictionary<int8,string_view>": pa.dictionary(pa.int8(), pa.string_view()),
    "dictionary<int64,large_string>": pa.dictionary(pa.int64(), pa.large_string()),
}


@pytest.mark.parametrize("name", STRING_COLUMNS)
@pytest.mark.parametrize("arrow_type", STRING_TYPES.values(), ids=STRING_TYPES.keys())
def test_string_like_types_become_string(
    make_table: Callable[..., pa.Table], name: str, arrow_type: pa.DataType
) -> None:
    values = _values()[name]
    out, ignored = normalize(make_table(**{name: _strings(values, arrow_type)}))
    assert out.schema == NULLABLE_SCHEMA
    assert _column(out, name) == values
    assert ignored == []


@pytest.mark.parametrize("arrow_type", STRING_TYPES.values(), ids=STRING_TYPES.keys())
def test_string_like_types_survive_an_ipc_file(
    make_table: Callable[..., pa.Table], arrow_type: pa.DataType
) -> None:
    values = ["c-1", None, "c-1"]
    table = make_table(campaign_id=_strings(values, arrow_type))
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    read_back = ipc.open_file(sink.getvalue()).read_all()
    assert read_back.schema.field("campaign_id").type == arrow_type
    out, _ = normalize(read_back)
    assert _column(out, "campaign_id") == values


def test_dictionary_of_nulls_becomes_null_strings(make_table: Callable[..., pa.Table]) -> None:
    column = pa.DictionaryArray.from_arrays(pa.array([0, None, 0], pa.int8()), pa.nulls(1))
    out, _ = normalize(make_table(user_id=column))
    assert _column(out, "user_id") == [None, None, None]


@pytest.mark.parametrize("name", STRING_COLUMNS)
def test_null_typed_string_column_becomes_null_strings(
    make_table: Callable[..., pa.Table], name: str
) -> None:
    out, _ = normalize(make_table(**{name: pa.nulls(3)}))
    assert out.schema.field(name).type == pa.string()
    assert _column(out, name) == [None, None, None]


@pytest.mark.parametrize("name", LOW_CARDINALITY_COLUMNS)
@pytest.mark.parametrize("arrow_type", STRING_TYPES.values(), ids=STRING_TYPES.keys())
def test_with_dictionaries_low_cardinality_columns_become_dictionaries(
    make_table: Callable[..., pa.Table], name: str, arrow_type: pa.DataType
) -> None:
    values = _values()[name]
    out, _ = normalize(make_table(**{name: _strings(values, arrow_type)}), dictionaries=True)
    assert out.schema == DICTIONARY_SCHEMA
    assert _column(out, name) == values
    frame = pl.from_arrow(out)
    assert isinstance(frame, pl.DataFrame)
    assert frame.schema[name] == pl.Categorical
    assert frame.schema["event_id"] == pl.String


def test_with_dictionaries_a_dictionary_is_kept_not_decoded(
    make_table: Callable[..., pa.Table],
) -> None:
    # An entry no row uses stays in the dictionary: it was re-typed, not decoded and encoded.
    indices = pa.array([0, 2, 0], pa.int8())
    column = pa.DictionaryArray.from_arrays(indices, pa.array(["c-1", "unused", "c-2"]))
    out, _ = normalize(make_table(campaign_id=column), dictionaries=True)
    chunk = out.column("campaign_id").chunk(0)
    assert chunk.dictionary.to_pylist() == ["c-1", "unused", "c-2"]
    assert chunk.indices.to_pylist() == [0, 2, 0]


@pytest.mark.parametrize("name", sorted(OPTIONAL_COLUMNS & set(LOW_CARDINALITY_COLUMNS)))
def test_with_dictionaries_missing_or_null_typed_columns_are_null_dictionaries(
    make_table: Callable[..., pa.Table], name: str
) -> None:
    for table in (make_table(**{name: None}), make_table(**{name: pa.nulls(3)})):
        out, _ = normalize(table, dictionaries=True)
        assert out.schema == DICTIONARY_SCHEMA
        assert _column(out, name) == [None, None, None]


def test_string_values_are_not_trimmed_or_recased(make_table: Callable[..., pa.Table]) -> None:
    odd = [" e-1", "É-2 ", ""]
    out, _ = normalize(make_table(event_id=pa.array(odd, pa.large_string())))
    assert _column(out, "event_id") == odd


# --- money --------------------------------------------------------------------------------------

INT_TYPES = {
    "int8": (pa.int8(), 2**7 - 1, -(2**7)),
    "int16": (pa.int16(), 2**15 - 1, -(2**15)),
    "int32": (pa.int32(), 2**31 - 1, -(2**31)),
    "int64": (pa.int64(), INT64_MAX, -(2**63)),
    "uint8": (pa.uint8(), 2**8 - 1, 0),
    "uint16": (pa.uint16(), 2**16 - 1, 0),
    "uint32": (pa.uint32(), 2**32 - 1, 0),
    "uint64": (pa.uint64(), INT64_MAX, 0),
}


@pytest.mark.parametrize("name", MONEY_COLUMNS)
@pytest.mark.parametrize(
    ("arrow_type", "high", "low"), INT_TYPES.values(), ids=list(INT_TYPES.keys())
)
def test_any_integer_width_becomes_int64(
    make_table: Callable[..., pa.Table], name: str, arrow_type: pa.DataType, high: int, low: int
) -> None:
    values = [low, high, None]
    out, _ = normalize(make_table(**{name: pa.array(values, arrow_type)}))
    assert out.schema == NULLABLE_SCHEMA
    assert _column(out, name) == values


@pytest.mark.parametrize("name", MONEY_COLUMNS)
def test_uint64_above_int64_max_becomes_null(
    make_table: Callable[..., pa.Table], name: str
) -> None:
    values = [INT64_MAX, 2**63, 2**64 - 1]
    out, _ = normalize(make_table(**{name: pa.array(values, pa.uint64())}))
    assert _column(out, name) == [INT64_MAX, None, None]


@pytest.mark.parametrize("name", MONEY_COLUMNS)
def test_uint64_overflow_is_quarantined_as_invalid_money(
    make_table: Callable[..., pa.Table], name: str
) -> None:
    out, _ = normalize(make_table(**{name: pa.array([0, 2**63, 2**64 - 1], pa.uint64())}))
    frame = pl.from_arrow(out)
    assert isinstance(frame, pl.DataFrame)
    now_ms = T0_MS + 60_000
    valid, rejected = split_valid(frame, now_ms=now_ms, watermark_ms=None, window_ms=3_600_000)
    assert valid["event_id"].to_list() == ["e-1"]
    assert rejected["event_id"].to_list() == ["e-2", "e-3"]
    assert rejected["reason"].to_list() == ["invalid_money", "invalid_money"]


@pytest.mark.parametrize("name", MONEY_COLUMNS)
def test_null_typed_money_column_becomes_null_int64(
    make_table: Callable[..., pa.Table], name: str
) -> None:
    out, _ = normalize(make_table(**{name: pa.nulls(3)}))
    assert out.schema.field(name).type == pa.int64()
    assert _column(out, name) == [None, None, None]


# --- event_time ---------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "America/New_York", "+05:30", "Asia/Kolkata"])
def test_every_unit_and_zone_keeps_the_instant(
    make_table: Callable[..., pa.Table], unit: str, tz: str | None
) -> None:
    # Arrow stores the UTC instant whatever the zone label; naive values are taken as UTC.
    whole_second = T0.replace(microsecond=0)
    stamps = [whole_second, whole_second + timedelta(hours=7), None]
    naive_or_aware = [s if s is None or tz else s.replace(tzinfo=None) for s in stamps]
    column = pa.array(naive_or_aware, pa.timestamp(unit, tz=tz))
    out, _ = normalize(make_table(event_time=column))
    assert out.schema.field(TIME_COLUMN).type == pa.timestamp("ms", tz="UTC")
    assert _column(out, TIME_COLUMN) == stamps


@pytest.mark.parametrize(
    ("local", "tz", "utc"),
    [
        # Winter: New York is UTC-5.
        (datetime(2026, 11, 27, 9, 30), "America/New_York", datetime(2026, 11, 27, 14, 30)),
        # Summer: New York is UTC-4.
        (datetime(2026, 7, 1, 9, 30), "America/New_York", datetime(2026, 7, 1, 13, 30)),
        # Wall time 01:30 on the autumn DST change happens twice; fold=1 is the second (UTC-5).
        (
            datetime(2026, 11, 1, 1, 30, fold=1),
            "America/New_York",
            datetime(2026, 11, 1, 6, 30),
        ),
        (datetime(2026, 11, 27, 9, 30), "+05:30", datetime(2026, 11, 27, 4, 0)),
        (datetime(2026, 11, 27, 2, 0), "+05:30", datetime(2026, 11, 26, 20, 30)),
        (datetime(2026, 11, 27, 9, 30), "-03:00", datetime(2026, 11, 27, 12, 30)),
    ],
)
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_zoned_wall_time_maps_to_the_exact_utc_instant(
    make_table: Callable[..., pa.Table], local: datetime, tz: str, utc: datetime, unit: str
) -> None:
    if tz.startswith(("+", "-")):
        sign = 1 if tz[0] == "+" else -1
        hours, minutes = (int(x) for x in tz[1:].split(":"))
        zone: Any = timezone(sign * timedelta(hours=hours, minutes=minutes))
    else:
        zone = ZoneInfo(tz)
    column = pa.array([local.replace(tzinfo=zone)] * 3, pa.timestamp(unit, tz=tz))
    out, _ = normalize(make_table(event_time=column))
    assert _column(out, TIME_COLUMN) == [utc.replace(tzinfo=UTC)] * 3


def test_naive_means_utc_not_local_time(
    make_table: Callable[..., pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    column = pa.array([1_000, 2_000, 3_000], pa.timestamp("ms"))
    out, _ = normalize(make_table(event_time=column))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert _column(out, TIME_COLUMN) == [epoch + timedelta(seconds=s) for s in (1, 2, 3)]


@pytest.mark.parametrize(
    ("unit", "raw", "expected_ms"),
    [
        ("s", [T0_MS // 1000, 0, -1], [T0_MS - 123, 0, -1_000]),
        ("ms", [T0_MS, 0, -1], [T0_MS, 0, -1]),
        ("us", [T0_MS * 1_000 + 999, T0_MS * 1_000, 999], [T0_MS, T0_MS, 0]),
        ("ns", [T0_MS * 1_000_000 + 999_999, T0_MS * 1_000_000 + 1, 999_999], [T0_MS, T0_MS, 0]),
        # Before 1970 truncation still goes down to the millisecond holding the instant.
        ("us", [-1, -1_000, -1_500], [-1, -1, -2]),
        ("ns", [-1, -1_000_000, -1_000_001], [-1, -1, -2]),
    ],
)
@pytest.mark.parametrize("tz", [None, "UTC", "America/New_York"])
def test_sub_millisecond_units_truncate_to_the_millisecond(
    make_table: Callable[..., pa.Table],
    unit: str,
    raw: list[int],
    expected_ms: list[int],
    tz: str | None,
) -> None:
    column = pa.array(raw, pa.int64()).cast(pa.timestamp(unit, tz=tz))
    out, _ = normalize(make_table(event_time=column))
    as_ms = out.column(TIME_COLUMN).cast(pa.int64()).to_pylist()
    assert as_ms == expected_ms


@pytest.mark.parametrize(("unit", "per_ms"), [("us", 1_000), ("ns", 1_000_000)])
def test_truncation_agrees_with_polars(
    make_table: Callable[..., pa.Table], unit: str, per_ms: int
) -> None:
    raw = [-3 * per_ms // 2 - 1, 2 * per_ms - 1, T0_MS * per_ms + per_ms - 1]
    column = pa.array(raw, pa.int64()).cast(pa.timestamp(unit))
    out, _ = normalize(make_table(event_time=column))
    theirs = (
        pl.Series(raw, dtype=pl.Int64)
        .cast(pl.Datetime(unit))  # type: ignore[arg-type]
        .cast(pl.Datetime("ms"))
        .dt.replace_time_zone("UTC")
        .to_list()
    )
    assert _column(out, TIME_COLUMN) == theirs


def test_null_typed_event_time_becomes_null_timestamps(
    make_table: Callable[..., pa.Table],
) -> None:
    out, _ = normalize(make_table(event_time=pa.nulls(3)))
    assert out.schema.field(TIME_COLUMN).type == pa.timestamp("ms", tz="UTC")
    assert _column(out, TIME_COLUMN) == [None, None, None]


def test_seconds_that_overflow_milliseconds_are_a_schema_mismatch(
    make_table: Callable[..., pa.Table],
) -> None:
    column = pa.array([0, 2**62, 0], pa.timestamp("s"))
    with pytest.raises(SchemaMismatchError, match="event_time"):
        normalize(make_table(event_time=column))


# --- columns outside the contract, and optional columns --------------------------------------


def test_extra_columns_are_ignored_and_reported_in_file_order(
    make_table: Callable[..., pa.Table],
) -> None:
    extra = {
        "zeta": pa.array([1, 2, 3]),
        "Event_ID": pa.array(["x", "y", "z"]),
        "alpha": pa.array([b"a", b"b", b"c"], pa.binary()),
        "nested": pa.array([[1], [2], []]),
    }
    out, ignored = normalize(make_table(extra=extra))
    assert ignored == ["zeta", "Event_ID", "alpha", "nested"]
    assert out.column_names == list(EVENT_COLUMNS)
    assert out.to_pydict() == _values()


def test_extra_columns_before_contract_columns(make_table: Callable[..., pa.Table]) -> None:
    table = make_table(extra={"first": pa.array([1.5, 2.5, 3.5])})
    table = table.select(["first", *EVENT_COLUMNS])
    out, ignored = normalize(table)
    assert ignored == ["first"]
    assert out.schema == NULLABLE_SCHEMA


@pytest.mark.parametrize(
    "dropped",
    [
        *[(c,) for c in sorted(OPTIONAL_COLUMNS)],
        tuple(sorted(OPTIONAL_COLUMNS)),
    ],
    ids="+".join,
)
def test_missing_optional_columns_are_filled_with_null(
    make_table: Callable[..., pa.Table], dropped: tuple[str, ...]
) -> None:
    out, ignored = normalize(make_table(**dict.fromkeys(dropped)))
    assert out.schema == NULLABLE_SCHEMA
    assert ignored == []
    for name in EVENT_COLUMNS:
        expected = [None] * 3 if name in dropped else _values()[name]
        assert _column(out, name) == expected


# --- schema_mismatch ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_COLUMNS)
def test_missing_required_column(make_table: Callable[..., pa.Table], name: str) -> None:
    with pytest.raises(SchemaMismatchError) as info:
        normalize(make_table(**{name: None}))
    message = str(info.value)
    assert repr(name) in message
    assert "missing" in message


def test_missing_required_columns_are_all_named(make_table: Callable[..., pa.Table]) -> None:
    with pytest.raises(SchemaMismatchError) as info:
        normalize(make_table(ad_id=None, cost_micros=None))
    assert "'ad_id'" in str(info.value)
    assert "'cost_micros'" in str(info.value)


def test_table_without_columns_is_a_schema_mismatch() -> None:
    with pytest.raises(SchemaMismatchError, match="missing"):
        normalize(pa.table({}))


MISMATCHES: dict[str, tuple[str, pa.Array, tuple[str, ...]]] = {
    "float64 cost": (
        "cost_micros",
        pa.array([1.0, 2.0, 3.0], pa.float64()),
        ("'cost_micros'", "double", "integer"),
    ),
    "float32 revenue": (
        "revenue_micros",
        pa.array([1.0, 2.0, 3.0], pa.float32()),
        ("'revenue_micros'", "float", "integer"),
    ),
    "string cost": (
        "cost_micros",
        pa.array(["1", "2", "3"]),
        ("'cost_micros'", "string", "integer"),
    ),
    "decimal revenue": (
        "revenue_micros",
        pa.array([1, 2, 3], pa.decimal128(10, 0)),
        ("'revenue_micros'", "decimal", "integer"),
    ),
    "bool cost": (
        "cost_micros",
        pa.array([True, False, True]),
        ("'cost_micros'", "bool", "integer"),
    ),
    "string event_time": (
        "event_time",
        pa.array(["2026-11-27T09:30:00Z"] * 3),
        ("'event_time'", "string", "timestamp"),
    ),
    "int event_time": (
        "event_time",
        pa.array([T0_MS] * 3, pa.int64()),
        ("'event_time'", "int64", "timestamp"),
    ),
    "date event_time": (
        "event_time",
        pa.array([T0.date()] * 3, pa.date32()),
        ("'event_time'", "date32", "timestamp"),
    ),
    "int event_id": (
        "event_id",
        pa.array([1, 2, 3], pa.int64()),
        ("'event_id'", "int64", "string"),
    ),
    "binary campaign_id": (
        "campaign_id",
        pa.array([b"c-1", b"c-2", b"c-3"], pa.binary()),
        ("'campaign_id'", "binary", "string"),
    ),
    "large_binary user_id": (
        "user_id",
        pa.array([b"u"] * 3, pa.large_binary()),
        ("'user_id'", "binary", "string"),
    ),
    "dictionary of ints ad_id": (
        "ad_id",
        pa.array([1, 2, 1]).dictionary_encode(),
        ("'ad_id'", "dictionary", "string"),
    ),
    "dictionary of ints revenue": (
        "revenue_micros",
        pa.array([1, 2, 1]).dictionary_encode(),
        ("'revenue_micros'", "dictionary", "integer"),
    ),
    "duration event_time": (
        "event_time",
        pa.array([1, 2, 3], pa.duration("ms")),
        ("'event_time'", "duration", "timestamp"),
    ),
    "dictionary of timestamps event_time": (
        "event_time",
        pa.array([T0, T0, T0], pa.timestamp("ms")).dictionary_encode(),
        ("'event_time'", "dictionary", "timestamp"),
    ),
    "run-end encoded publisher_id": (
        "publisher_id",
        pa.RunEndEncodedArray.from_arrays(pa.array([3], pa.int32()), pa.array(["p"])),
        ("'publisher_id'", "run_end_encoded", "string"),
    ),
    "binary_view event_type": (
        "event_type",
        pa.array([b"click"] * 3, pa.binary_view()),
        ("'event_type'", "binary_view", "string"),
    ),
    "list country": (
        "country",
        pa.array([["US"], ["DE"], []]),
        ("'country'", "list", "string"),
    ),
}


@pytest.mark.parametrize(
    ("name", "column", "expected"), MISMATCHES.values(), ids=list(MISMATCHES.keys())
)
def test_uncastable_type_is_a_schema_mismatch(
    make_table: Callable[..., pa.Table],
    name: str,
    column: pa.Array,
    expected: tuple[str, ...],
) -> None:
    with pytest.raises(SchemaMismatchError) as info:
        normalize(make_table(**{name: column}))
    message = str(info.value)
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize("name", ["event_id", "cost_micros", "event_time", "country"])
def test_duplicated_contract_column_is_a_schema_mismatch(
    make_table: Callable[..., pa.Table], name: str
) -> None:
    table = make_table()
    doubled = table.append_column(table.schema.field(name), table.column(name))
    with pytest.raises(SchemaMismatchError) as info:
        normalize(doubled)
    assert repr(name) in str(info.value)
    assert "more than once" in str(info.value)


def test_schema_mismatch_is_a_value_error() -> None:
    assert issubclass(SchemaMismatchError, ValueError)
