"""``adevents sql``: ad-hoc SQL over the lake's views, as a table, CSV or JSON, or interactively."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import io
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import duckdb
from deltalake.exceptions import DeltaError

from pipeline.settings import Settings
from queries.lake import TABLE_NAMES, Lake

FORMATS = ("table", "csv", "json")
MAX_CELL = 60


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "query",
        nargs="?",
        help="SQL over the views " + ", ".join(TABLE_NAMES) + "; omit it for an interactive prompt",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default table)"
    )


_SCALARS: list[tuple[type | tuple[type, ...], Callable[[Any], Any]]] = [
    ((dt.datetime, dt.date, dt.time), lambda v: v.isoformat()),
    (dt.timedelta, lambda v: v.total_seconds()),
    (decimal.Decimal, float),
    (bytes, lambda v: v.hex()),
]


def _plain(value: Any) -> Any:
    """A JSON-friendly version of a DuckDB value."""
    for types, convert in _SCALARS:
        if isinstance(value, types):
            return convert(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    plain = _plain(value)
    if isinstance(plain, list | dict):
        return json.dumps(plain)
    return str(plain)


def format_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> str:
    """Render a result as an aligned text table, CSV (with a header) or a JSON array of objects."""
    if fmt == "json":
        objects = [{c: _plain(v) for c, v in zip(columns, row, strict=True)} for row in rows]
        return json.dumps(objects, indent=None, default=str) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_text(v) for v in row] for row in rows)
        return buf.getvalue()
    cells = [[_text(v) for v in row] for row in rows]
    cells = [[c if len(c) <= MAX_CELL else c[: MAX_CELL - 1] + "…" for c in row] for row in cells]
    widths = [len(c) for c in columns]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(columns), "-+-".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    out.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(out) + "\n"


def execute(lake: Lake, query: str, fmt: str, out: TextIO) -> bool:
    """Run one statement and print its result; print the error and return False on failure."""
    try:
        columns, rows = lake.sql(query)
    except (duckdb.Error, DeltaError) as exc:
        print(f"error: {lake.location.redact(str(exc))}", file=sys.stderr)
        return False
    if columns:
        out.write(format_rows(columns, rows, fmt))
    return True


def repl(lake: Lake, fmt: str, stdin: TextIO, out: TextIO) -> int:
    """Read statements ending in ``;`` (or a line at a time) until EOF or ``.quit``."""
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        print(
            f"adevents sql: views {', '.join(TABLE_NAMES)}. "
            "End statements with ';', .tables lists views, .quit leaves.",
            file=out,
        )
    pending: list[str] = []
    while True:
        try:
            if interactive:
                line = input("...> " if pending else "sql> ")
            else:
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            break
        except KeyboardInterrupt:
            pending = []
            print(file=out)
            continue
        stripped = line.strip()
        if not pending and stripped in (".quit", ".exit", "\\q", "quit", "exit"):
            break
        if not pending and stripped == ".tables":
            out.write("\n".join(TABLE_NAMES) + "\n")
            continue
        if not stripped and not pending:
            continue
        pending.append(line.rstrip("\n"))
        if stripped.endswith(";"):
            execute(lake, "\n".join(pending), fmt, out)
            pending = []
    if pending and "".join(pending).strip():
        execute(lake, "\n".join(pending), fmt, out)
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    lake = Lake.from_settings(settings)
    try:
        if args.query is not None:
            return 0 if execute(lake, args.query, args.format, sys.stdout) else 1
        return repl(lake, args.format, sys.stdin, sys.stdout)
    finally:
        lake.close()
