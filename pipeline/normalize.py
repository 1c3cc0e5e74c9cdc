"""Normalise compatible Arrow types to the contract's types, or say why a file cannot be."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import (
    EVENT_SCHEMA,
    LOW_CARDINALITY_COLUMNS,
    MONEY_COLUMNS,
    OPTIONAL_COLUMNS,
    TIME_COLUMN,
)

#: The type of a low-cardinality column normalised with ``dictionaries=True``.
DICTIONARY: pa.DictionaryType = pa.dictionary(pa.int32(), pa.string())
#: What normalize returns, by its ``dictionaries`` argument: EVENT_SCHEMA, every field
#: nullable, with LOW_CARDINALITY_COLUMNS as DICTIONARY when asked.
_SCHEMAS = {
    dictionaries: pa.schema(
        pa.field(
            f.name, DICTIONARY if dictionaries and f.name in LOW_CARDINALITY_COLUMNS else f.type
        )
        for f in EVENT_SCHEMA
    )
    for dictionaries in (False, True)
}


class SchemaMismatchError(ValueError):
    """The file lacks a required column or has a type that cannot be normalised."""


def _is_stringlike(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_stringlike(t.value_type)
    return bool(
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_null(t)
    )


def _to_string(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        # Cast the dictionary itself first: Arrow cannot decode a dictionary of string_view.
        as_string = pa.dictionary(col.type.index_type, pa.string())
        chunks = [
            pa.DictionaryArray.from_arrays(c.indices, c.dictionary.cast(pa.string()))
            for c in col.chunks
        ]
        col = pa.chunked_array(chunks, as_string)
    return col.cast(pa.string())


def _to_dictionary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string-like column as DICTIONARY: a dictionary is re-typed, never decoded (its
    indices and values are cast: a few dozen values, not a row each); plain strings are
    encoded, the hashing the Parquet writer would otherwise do."""
    if not pa.types.is_dictionary(col.type):
        return pc.dictionary_encode(_to_string(col)).cast(DICTIONARY)
    chunks = [
        pa.DictionaryArray.from_arrays(c.indices.cast(pa.int32()), c.dictionary.cast(pa.string()))
        for c in col.chunks
    ]
    return pa.chunked_array(chunks, DICTIONARY)


def _to_int64(name: str, col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_null(col.type) or pa.types.is_int64(col.type):
        return col.cast(pa.int64())
    if pa.types.is_integer(col.type):
        if pa.types.is_uint64(col.type):
            # Values above int64's range cannot be money: null them so the row is quarantined.
            too_big = pc.greater(col, pa.scalar(2**63 - 1, pa.uint64()))
            col = pc.if_else(too_big, pa.scalar(None, pa.uint64()), col)
        return col.cast(pa.int64())
    raise SchemaMismatchError(
        f"column {name!r} has type {col.type}, but money must be an integer number of USD "
        "micros (any integer width); floats and strings are not accepted"
    )


def _to_event_time(col: pa.ChunkedArray) -> pa.ChunkedArray:
    target = pa.timestamp("ms", tz="UTC")
    if pa.types.is_null(col.type):
        return col.cast(target)
    if not pa.types.is_timestamp(col.type):
        raise SchemaMismatchError(
            f"column 'event_time' has type {col.type}, but it must be an Arrow timestamp "
            "(s, ms, us or ns; any time zone, or none for UTC)"
        )
    # Arrow keeps timestamps as UTC instants whatever the zone label, and naive means UTC
    # here, so relabelling the zone and truncating the unit is all the normalisation needed.
    as_utc = col.cast(pa.timestamp(col.type.unit, tz="UTC"))
    if col.type.unit in ("us", "ns") and (pc.min(as_utc).value or 0) < 0:
        # The unsafe cast below rounds towards zero, i.e. up before 1970: floor like Polars.
        as_utc = pc.floor_temporal(as_utc, unit="millisecond")
    try:
        # Seconds must not overflow when scaled up; finer units are truncated to the ms.
        return as_utc.cast(target, safe=col.type.unit == "s")
    except pa.ArrowInvalid as exc:
        raise SchemaMismatchError(f"column 'event_time' holds values out of range: {exc}") from None


def normalize(table: pa.Table, *, dictionaries: bool = False) -> tuple[pa.Table, list[str]]:
    """Return the table in exactly EVENT_SCHEMA (nullable) and the names of ignored columns;
    with ``dictionaries``, LOW_CARDINALITY_COLUMNS are DICTIONARY instead of strings (what
    the consumer's frames hold: ``pipeline.schema.IN_FLIGHT_SCHEMA``)."""
    names = table.column_names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SchemaMismatchError(f"column(s) {duplicated} appear more than once")
    missing = [
        f.name for f in EVENT_SCHEMA if f.name not in names and f.name not in OPTIONAL_COLUMNS
    ]
    if missing:
        raise SchemaMismatchError(f"required column(s) {missing} are missing; the file has {names}")
    schema = _SCHEMAS[dictionaries]
    arrays: list[pa.ChunkedArray] = []
    for f in EVENT_SCHEMA:
        target = schema.field(f.name).type
        if f.name not in names:
            arrays.append(pa.chunked_array([pa.nulls(table.num_rows, target)], target))
            continue
        col = table.column(f.name)
        if target == DICTIONARY and _is_stringlike(col.type):
            arrays.append(_to_dictionary(col))
        elif f.name == TIME_COLUMN:
            arrays.append(_to_event_time(col))
        elif f.name in MONEY_COLUMNS:
            arrays.append(_to_int64(f.name, col))
        elif _is_stringlike(col.type):
            arrays.append(_to_string(col))
        else:
            raise SchemaMismatchError(
                f"column {f.name!r} has type {col.type}, but it must be a string "
                "(string, large_string, string_view or dictionary of strings)"
            )
    ignored = [n for n in names if n not in schema.names]
    return pa.Table.from_arrays(arrays, schema=schema), ignored
