"""Row validation: each reason code, its boundaries, and which reason wins when several apply."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from pipeline.schema import (
    DEVICE_TYPES,
    EVENT_TYPES,
    ID_COLUMNS,
    LOW_CARDINALITY_COLUMNS,
    MAX_FUTURE_MS,
    MAX_ID_BYTES,
    MAX_MONEY_MICROS,
    MONEY_COLUMNS,
    POLARS_EVENT_SCHEMA,
    REASONS,
)
from pipeline.validate import reason_expr, split_valid

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 27, 9, 30, 0, 250_000, tzinfo=UTC)
NOW_MS = (NOW - EPOCH) // timedelta(milliseconds=1)
HOUR_MS = 3_600_000
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _at(ms: int) -> datetime:
    """The UTC instant ``ms`` milliseconds after NOW."""
    return NOW + timedelta(milliseconds=ms)


def _row(**changes: Any) -> dict[str, Any]:
    """A valid event one minute old, with ``changes`` applied."""
    row: dict[str, Any] = {
        "event_id": "evt-0001",
        "event_type": "click",
        "event_time": _at(-60_000),
        "campaign_id": "cmp-1",
        "ad_id": "ad-1",
        "publisher_id": "pub-1",
        "user_id": "user-1",
        "device_type": "mobile",
        "country": "US",
        "cost_micros": 1_500,
        "revenue_micros": 0,
    }
    row.update(changes)
    return row


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=POLARS_EVENT_SCHEMA, orient="row")


def _reasons(
    rows: list[dict[str, Any]],
    *,
    now_ms: int = NOW_MS,
    watermark_ms: int | None = None,
    window_ms: int = HOUR_MS,
) -> list[str | None]:
    """Each row's reason, the same whether its low-cardinality columns are strings or, as the
    consumer holds them, categoricals (every test here checks both)."""
    expr = reason_expr(now_ms=now_ms, watermark_ms=watermark_ms, window_ms=window_ms)
    reasons = list(_frame(rows).select(expr).to_series().to_list())
    categorical = _frame(rows).cast(dict.fromkeys(LOW_CARDINALITY_COLUMNS, pl.Categorical()))
    on_codes = reason_expr(
        now_ms=now_ms,
        watermark_ms=watermark_ms,
        window_ms=window_ms,
        categorical=LOW_CARDINALITY_COLUMNS,
    )
    assert categorical.select(on_codes).to_series().to_list() == reasons
    return reasons


def _reason(row: dict[str, Any], **kwargs: Any) -> str | None:
    return _reasons([row], **kwargs)[0]


# --- the valid row ------------------------------------------------------------------------------


def test_valid_row_has_no_reason() -> None:
    assert _reason(_row()) is None


def test_optional_columns_may_be_null() -> None:
    assert _reason(_row(user_id=None, device_type=None, country=None)) is None


def test_reason_expression_is_a_string_column_named_reason() -> None:
    expr = reason_expr(now_ms=NOW_MS, watermark_ms=None, window_ms=HOUR_MS)
    out = _frame([_row()]).select(expr)
    assert out.schema == pl.Schema({"reason": pl.String()})


def test_no_rows_no_reasons() -> None:
    assert _reasons([]) == []


# --- invalid_event_id ---------------------------------------------------------------------------


EVENT_ID_CASES: list[tuple[str | None, str | None]] = [
    (None, "invalid_event_id"),
    ("", "invalid_event_id"),
    ("a", None),
    (" ", None),
    ("a" * 128, None),
    ("a" * 129, "invalid_event_id"),
    # Bytes of UTF-8, not characters: é is 2 bytes, € 3, 😀 4.
    ("é" * 64, None),
    ("é" * 64 + "a", "invalid_event_id"),
    ("é" * 65, "invalid_event_id"),
    ("€" * 42 + "ab", None),
    ("€" * 43, "invalid_event_id"),
    ("😀" * 32, None),
    ("😀" * 32 + "a", "invalid_event_id"),
    ("a" * 127 + "é", "invalid_event_id"),
    ("a" * 10_000, "invalid_event_id"),
]


@pytest.mark.parametrize(
    ("event_id", "reason"),
    EVENT_ID_CASES,
    ids=[
        f"{'null' if e is None else len(e.encode())}B-{'ok' if r is None else 'bad'}"
        for e, r in EVENT_ID_CASES
    ],
)
def test_event_id_is_1_to_128_bytes(event_id: str | None, reason: str | None) -> None:
    assert _reason(_row(event_id=event_id)) == reason


# --- invalid_event_type -------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_accepted(event_type: str) -> None:
    assert _reason(_row(event_type=event_type)) is None


@pytest.mark.parametrize(
    "event_type",
    [None, "", "Click", "CLICK", " click", "click ", "clicks", "view", "impression\n"],
)
def test_other_event_types_are_rejected(event_type: str | None) -> None:
    assert _reason(_row(event_type=event_type)) == "invalid_event_type"


# --- missing_field ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["campaign_id", "ad_id", "publisher_id"])
@pytest.mark.parametrize("value", [None, ""], ids=["null", "empty"])
def test_required_text_null_or_empty_is_missing(name: str, value: str | None) -> None:
    assert _reason(_row(**{name: value})) == "missing_field"


@pytest.mark.parametrize("name", ["campaign_id", "ad_id", "publisher_id"])
@pytest.mark.parametrize("value", [" ", "x", "0", "a" * MAX_ID_BYTES])
def test_required_text_any_non_empty_value_is_present(name: str, value: str) -> None:
    assert _reason(_row(**{name: value})) is None


def test_null_event_time_is_missing() -> None:
    assert _reason(_row(event_time=None)) == "missing_field"


@pytest.mark.parametrize("watermark_ms", [None, NOW_MS])
def test_null_event_time_is_missing_not_late_or_future(watermark_ms: int | None) -> None:
    assert _reason(_row(event_time=None), watermark_ms=watermark_ms) == "missing_field"


@pytest.mark.parametrize("name", ["user_id", "device_type", "country"])
def test_optional_columns_are_not_required(name: str) -> None:
    assert _reason(_row(**{name: None})) is None


def test_empty_user_id_is_accepted() -> None:
    assert _reason(_row(user_id="")) is None


# --- field_too_long -----------------------------------------------------------------------------

ID_LENGTH_CASES = [
    ("a" * MAX_ID_BYTES, None),
    ("a" * (MAX_ID_BYTES + 1), "field_too_long"),
    # Bytes of UTF-8, not characters: 64 four-byte emoji are exactly the limit.
    ("😀" * (MAX_ID_BYTES // 4), None),
    ("😀" * (MAX_ID_BYTES // 4) + "a", "field_too_long"),
    ("é" * (MAX_ID_BYTES // 2 + 1), "field_too_long"),
    ("a" * 150_000, "field_too_long"),
]


def test_max_id_bytes_is_the_contracts() -> None:
    assert MAX_ID_BYTES == 256
    assert ID_COLUMNS == ("campaign_id", "ad_id", "publisher_id", "user_id")


@pytest.mark.parametrize("name", ID_COLUMNS)
@pytest.mark.parametrize(
    ("value", "reason"),
    ID_LENGTH_CASES,
    ids=[f"{len(v.encode())}B-{'ok' if r is None else 'bad'}" for v, r in ID_LENGTH_CASES],
)
def test_ids_are_at_most_max_id_bytes(name: str, value: str, reason: str | None) -> None:
    assert _reason(_row(**{name: value})) == reason


def test_a_long_id_in_a_row_with_nulls_is_still_too_long() -> None:
    """Null optional columns must not hide a long required one (Kleene logic in any_horizontal)."""
    row = _row(user_id=None, device_type=None, country=None, ad_id="a" * (MAX_ID_BYTES + 1))
    assert _reason(row) == "field_too_long"


def test_device_type_and_country_have_their_own_rules_not_the_id_limit() -> None:
    assert _reason(_row(device_type="x" * 1_000)) == "invalid_device_type"
    assert _reason(_row(country="X" * 1_000)) == "invalid_country"


# --- invalid_money ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MONEY_COLUMNS)
@pytest.mark.parametrize(
    "value", [None, -1, -1_000_000, INT64_MIN, MAX_MONEY_MICROS + 1, 5 * 10**18, INT64_MAX], ids=str
)
def test_money_null_negative_or_above_the_bound_is_invalid(name: str, value: int | None) -> None:
    assert _reason(_row(**{name: value})) == "invalid_money"


@pytest.mark.parametrize("name", MONEY_COLUMNS)
@pytest.mark.parametrize("value", [0, 1, 1_000_000, MAX_MONEY_MICROS], ids=str)
def test_money_zero_up_to_the_bound_is_valid(name: str, value: int) -> None:
    assert _reason(_row(**{name: value})) is None


# --- invalid_country ----------------------------------------------------------------------------


@pytest.mark.parametrize("country", [None, "US", "DE", "GB", "ZZ", "AA"])
def test_country_two_upper_case_letters_or_null(country: str | None) -> None:
    assert _reason(_row(country=country)) is None


@pytest.mark.parametrize(
    "country",
    ["us", "Us", "uS", "USA", "U1", "1U", "U", "", " US", "US ", "US\n", "U S", "ÉÉ", "ＵＳ", "--"],
)
def test_country_anything_else_is_invalid(country: str) -> None:
    assert _reason(_row(country=country)) == "invalid_country"


# --- invalid_device_type ------------------------------------------------------------------------


@pytest.mark.parametrize("device_type", [*DEVICE_TYPES, None])
def test_known_device_types_or_null(device_type: str | None) -> None:
    assert _reason(_row(device_type=device_type)) is None


@pytest.mark.parametrize(
    "device_type", ["Mobile", "MOBILE", "", " mobile", "mobile ", "phone", "tv", "others"]
)
def test_other_device_types_are_invalid(device_type: str) -> None:
    assert _reason(_row(device_type=device_type)) == "invalid_device_type"


# --- future_event -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset_ms", "reason"),
    [
        (-10 * 365 * 24 * HOUR_MS, None),
        (0, None),
        (1, None),
        (MAX_FUTURE_MS - 1, None),
        (MAX_FUTURE_MS, None),
        (MAX_FUTURE_MS + 1, "future_event"),
        (HOUR_MS, "future_event"),
        (10 * 365 * 24 * HOUR_MS, "future_event"),
    ],
)
def test_more_than_five_minutes_ahead_is_future(offset_ms: int, reason: str | None) -> None:
    assert MAX_FUTURE_MS == 5 * 60 * 1000
    assert _reason(_row(event_time=_at(offset_ms))) == reason


def test_future_is_relative_to_the_given_clock() -> None:
    row = _row(event_time=_at(MAX_FUTURE_MS + 1))
    assert _reason(row) == "future_event"
    assert _reason(row, now_ms=NOW_MS + 1) is None


# --- late_event ---------------------------------------------------------------------------------


@pytest.mark.parametrize("window_ms", [0, 1, 1_000, HOUR_MS, 24 * HOUR_MS])
@pytest.mark.parametrize(
    ("before_cutoff_ms", "reason"),
    [(-MAX_FUTURE_MS, None), (-1, None), (0, None), (1, "late_event"), (HOUR_MS, "late_event")],
)
def test_older_than_watermark_minus_window_is_late(
    window_ms: int, before_cutoff_ms: int, reason: str | None
) -> None:
    watermark_ms = NOW_MS - 30_000
    cutoff_ms = watermark_ms - window_ms
    event_time = _at(cutoff_ms - before_cutoff_ms - NOW_MS)
    assert _reason(_row(event_time=event_time), watermark_ms=watermark_ms, window_ms=window_ms) == (
        reason
    )


def test_watermark_minus_window_exactly_is_on_time() -> None:
    watermark_ms = NOW_MS
    row = _row(event_time=_at(-HOUR_MS))
    assert _reason(row, watermark_ms=watermark_ms, window_ms=HOUR_MS) is None
    row = _row(event_time=_at(-HOUR_MS - 1))
    assert _reason(row, watermark_ms=watermark_ms, window_ms=HOUR_MS) == "late_event"


@pytest.mark.parametrize("when", [EPOCH, datetime(1900, 1, 1, tzinfo=UTC), _at(-100 * HOUR_MS)])
def test_nothing_is_late_before_the_first_watermark(when: datetime) -> None:
    assert _reason(_row(event_time=when), watermark_ms=None) is None


# --- precedence ---------------------------------------------------------------------------------

#: Per reason, the change that makes only that reason apply (with WATERMARK_MS and HOUR_MS).
WATERMARK_MS = NOW_MS
BREAKERS: dict[str, dict[str, Any]] = {
    "invalid_event_id": {"event_id": ""},
    "invalid_event_type": {"event_type": "Click"},
    "missing_field": {"publisher_id": ""},
    "field_too_long": {"user_id": "u" * (MAX_ID_BYTES + 1)},
    "invalid_money": {"cost_micros": -1},
    "invalid_country": {"country": "us"},
    "invalid_device_type": {"device_type": "Mobile"},
    "future_event": {"event_time": _at(MAX_FUTURE_MS + 1)},
    "late_event": {"event_time": _at(-HOUR_MS - 1)},
}


def test_reason_codes_are_the_contracts() -> None:
    assert REASONS == (
        "invalid_event_id",
        "invalid_event_type",
        "missing_field",
        "field_too_long",
        "invalid_money",
        "invalid_country",
        "invalid_device_type",
        "future_event",
        "late_event",
    )
    assert set(BREAKERS) == set(REASONS)


@pytest.mark.parametrize("reason", REASONS)
def test_each_breaker_alone_gives_its_reason(reason: str) -> None:
    assert _reason(_row(**BREAKERS[reason]), watermark_ms=WATERMARK_MS) == reason


def _both(first: str, second: str) -> tuple[dict[str, Any], int]:
    """A row breaking two rules, and the watermark to test it with."""
    if {first, second} == {"future_event", "late_event"}:
        # Only a watermark far ahead of the clock makes one event both future and late.
        return _row(event_time=_at(HOUR_MS)), NOW_MS + 10 * HOUR_MS
    return _row(**BREAKERS[first], **BREAKERS[second]), WATERMARK_MS


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(REASONS, 2)))
def test_the_earlier_reason_wins(first: str, second: str) -> None:
    row, watermark_ms = _both(first, second)
    assert _reason(row, watermark_ms=watermark_ms) == first


@pytest.mark.parametrize("fixed", range(len(REASONS) + 1))
def test_fixing_reasons_in_order_reveals_the_next(fixed: int) -> None:
    """Every rule broken at once, then repaired one by one in REASONS order."""
    row = _row()
    for reason in REASONS[:-2]:
        row.update(BREAKERS[reason])
    # An hour ahead is future; with the watermark 10 h ahead, it is late too.
    row["event_time"] = _at(HOUR_MS)
    watermark_ms = NOW_MS + 10 * HOUR_MS
    repairs = [{k: _row()[k] for k in BREAKERS[r]} for r in REASONS[:-2]]
    repairs.append({"event_time": _row()["event_time"]})  # future_event
    for repair in repairs[:fixed]:
        row.update(repair)
    if fixed == len(REASONS):  # late_event: the watermark falls back to the clock
        watermark_ms = NOW_MS
    expected = REASONS[fixed] if fixed < len(REASONS) else None
    assert _reason(row, watermark_ms=watermark_ms, window_ms=HOUR_MS) == expected


def test_one_row_one_reason_for_many_faults() -> None:
    row = _row(
        event_id=None,
        event_type=None,
        event_time=None,
        campaign_id=None,
        cost_micros=None,
        country="usa",
        device_type="TV",
    )
    assert _reason(row, watermark_ms=NOW_MS) == "invalid_event_id"


# --- split_valid --------------------------------------------------------------------------------


def _mixed() -> tuple[list[dict[str, Any]], list[str | None]]:
    rows: list[dict[str, Any]] = []
    expected: list[str | None] = []
    for i, reason in enumerate([None, *REASONS, None, "invalid_money", None, None]):
        row = _row(event_id=f"evt-{i:04d}", cost_micros=i)
        if reason is not None:
            row.update(BREAKERS[reason])
        rows.append(row)
        expected.append(reason)
    return rows, expected


def test_split_valid_keeps_valid_rows_untouched_and_in_order() -> None:
    rows, expected = _mixed()
    frame = _frame(rows)
    valid, _ = split_valid(frame, now_ms=NOW_MS, watermark_ms=WATERMARK_MS, window_ms=HOUR_MS)
    keep = [i for i, r in enumerate(expected) if r is None]
    assert valid.schema == frame.schema
    assert valid.equals(frame[keep])


def test_split_valid_tags_rejected_rows_in_order_with_values_as_received() -> None:
    rows, expected = _mixed()
    frame = _frame(rows)
    _, rejected = split_valid(frame, now_ms=NOW_MS, watermark_ms=WATERMARK_MS, window_ms=HOUR_MS)
    bad = [i for i, r in enumerate(expected) if r is not None]
    assert rejected.columns == [*frame.columns, "reason"]
    assert rejected.drop("reason").equals(frame[bad])
    assert rejected["reason"].to_list() == [expected[i] for i in bad]


def test_split_valid_partitions_every_row() -> None:
    rows, _ = _mixed()
    frame = _frame(rows)
    valid, rejected = split_valid(
        frame, now_ms=NOW_MS, watermark_ms=WATERMARK_MS, window_ms=HOUR_MS
    )
    assert len(valid) + len(rejected) == len(frame)
    ids = set(valid["event_id"]) | set(rejected["event_id"])
    assert ids == set(frame["event_id"])


@pytest.mark.parametrize("n", [0, 1, 100])
def test_split_valid_all_valid(n: int) -> None:
    frame = _frame([_row(event_id=f"e{i}") for i in range(n)])
    valid, rejected = split_valid(frame, now_ms=NOW_MS, watermark_ms=None, window_ms=HOUR_MS)
    assert valid.equals(frame)
    assert rejected.is_empty()
    assert rejected.schema == pl.Schema({**dict(frame.schema), "reason": pl.String()})


@pytest.mark.parametrize("n", [1, 100])
def test_split_valid_all_rejected(n: int) -> None:
    frame = _frame([_row(event_id=f"e{i}", country="usa") for i in range(n)])
    valid, rejected = split_valid(frame, now_ms=NOW_MS, watermark_ms=None, window_ms=HOUR_MS)
    assert valid.is_empty()
    assert valid.schema == frame.schema
    assert rejected["reason"].to_list() == ["invalid_country"] * n


def test_split_valid_keeps_duplicates() -> None:
    """Validation is per row; duplicates are dedupe's business."""
    frame = _frame([_row(), _row(), _row()])
    valid, _ = split_valid(frame, now_ms=NOW_MS, watermark_ms=None, window_ms=HOUR_MS)
    assert len(valid) == 3


def test_split_valid_does_not_modify_its_input() -> None:
    rows, _ = _mixed()
    frame = _frame(rows)
    before = frame.clone()
    split_valid(frame, now_ms=NOW_MS, watermark_ms=WATERMARK_MS, window_ms=HOUR_MS)
    assert frame.equals(before)
    assert "reason" not in frame.columns
