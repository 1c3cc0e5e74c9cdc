"""``adevents quarantine list|show|replay``: rejected rows by reason and time, and their recovery.

``replay`` sends the selected rows back through the normal input path: Arrow IPC files written
into the spool (``incoming/``) by the producers' own writer (temporary name, then rename), as
producer ``replay_<UTC stamp>_<pid>``. The consumer validates, deduplicates and enriches them
like any other file, and its ledger rows carry that name as ``source_file``: that is how the
ledger records a replay. A row replayed twice lands once (the key cache dedupes on event_id
and event_time, which the replay keeps as they are unless the fix changes them); a row still
invalid after the fix goes back to quarantine with its reason, under the replay's file name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from typing import Final

import duckdb
from deltalake.exceptions import DeltaError

from pipeline.schema import REASONS, Layout
from pipeline.settings import Settings, parse_duration
from pipeline.spool import SpoolWriter
from queries import quarantine
from queries.command import FORMATS, format_rows
from queries.lake import Lake

PROG: Final = "adevents quarantine"
#: Rows per spool file a replay writes (the HTTP ingest's INGEST_BATCH_EVENTS default).
REPLAY_FILE_ROWS: Final = 100_000
SHOW_LIMIT: Final = 100


def _instant_ms(text: str) -> int:
    """Epoch ms of ``text``: an ISO 8601 date or date-time (no offset means UTC), or a duration
    ago (``90m``, ``2h``, ``7d``)."""
    try:
        return int((time.time() - parse_duration(text)) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a date-time (2026-12-02T10:00Z) nor a duration ago (2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    # Also accepted after the action (``adevents quarantine list --data-dir X``); SUPPRESS
    # leaves the value given before it alone when absent here.
    p.add_argument("--data-dir", default=argparse.SUPPRESS, help="data directory (DATA_DIR)")
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (LOG_LEVEL)")
    p.add_argument(
        "--reason",
        action="append",
        choices=REASONS,
        metavar="REASON",
        help="only rows rejected for this reason (repeatable): " + ", ".join(REASONS),
    )
    p.add_argument(
        "--since",
        type=_instant_ms,
        help="rejected at or after: 2026-12-02, 2026-12-02T10:00Z, or a duration ago (2h, 7d)",
    )
    p.add_argument("--until", type=_instant_ms, help="rejected before (same forms as --since)")
    p.add_argument(
        "--source",
        help="only rows from this source_file (a spool file name, <stem>.http for the HTTP "
        "ingest's), or a pattern with * ? [ ] such as '*-replay_*'",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="rejected rows counted by time bucket and reason",
        description="Rejected rows per hour (or day) of rejection and reason: how many, from "
        "how many files, first and last rejection, event-time range, first source file.",
    )
    _add_common(listing)
    listing.add_argument("--by", choices=quarantine.BUCKETS, default="hour", help="time bucket")
    listing.add_argument("--format", choices=FORMATS, default="table", help="output format")
    show = actions.add_parser(
        "show",
        help="the rejected rows themselves, with their values and reason",
        description="The rejected rows, oldest rejection first: the event's values as "
        "received, reason, source_file, batch_id, ingested_at.",
    )
    _add_common(show)
    show.add_argument(
        "--limit",
        type=_positive,
        default=SHOW_LIMIT,
        help=f"at most this many (default {SHOW_LIMIT})",
    )
    show.add_argument("--format", choices=FORMATS, default="table", help="output format")
    replay = actions.add_parser(
        "replay",
        help="send the selected rows back through the spool, optionally corrected by SQL",
        description="Write the selected rows, corrected by --fix if given, as Arrow IPC files "
        "into the spool (incoming/), where the consumer validates, deduplicates and enriches "
        "them like any input. A row replayed twice lands once; a row still invalid goes back "
        "to quarantine. The quarantined rows themselves stay where they are.",
    )
    _add_common(replay)
    replay.add_argument(
        "--fix",
        metavar="SQL",
        help=f"one SELECT over the relation {quarantine.ROWS!r} (the selected rows, every "
        "quarantine column) whose result has the event columns, e.g. "
        f'"SELECT * REPLACE (upper(country) AS country) FROM {quarantine.ROWS}"',
    )
    replay.add_argument("--limit", type=_positive, help="replay at most this many rows")
    replay.add_argument(
        "--dry-run", action="store_true", help="say what would be replayed; write nothing"
    )


def _selection(args: argparse.Namespace) -> quarantine.Selection:
    return quarantine.Selection(
        reasons=tuple(args.reason or ()),
        since_ms=args.since,
        until_ms=args.until,
        source=args.source,
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    lake = Lake.from_settings(settings)
    try:
        if args.action == "list":
            rows = quarantine.summary(lake, _selection(args), args.by)
            sys.stdout.write(format_rows(quarantine.SUMMARY_COLUMNS, rows, args.format))
            return 0
        if args.action == "show":
            table = quarantine.rows(lake, _selection(args), limit=args.limit)
            records = [tuple(r.values()) for r in table.to_pylist()]
            sys.stdout.write(format_rows(table.column_names, records, args.format))
            return 0
        return _replay(lake, args, settings)
    except (duckdb.Error, DeltaError) as exc:
        print(f"{PROG}: cannot read the lake: {lake.location.redact(str(exc))}", file=sys.stderr)
        return 1
    finally:
        lake.close()


def run_id(now: datetime) -> str:
    """The producer name of one replay: its UTC start and the process, so two replays never
    write the same file name (a spool name holds only ``[A-Za-z0-9_]`` around its dashes)."""
    return f"replay_{now.astimezone(UTC):%Y%m%dT%H%M%SZ}_{os.getpid()}"


def _replay(lake: Lake, args: argparse.Namespace, settings: Settings) -> int:
    try:
        result = quarantine.replay(lake, _selection(args), fix=args.fix, limit=args.limit)
    except quarantine.FixError as exc:
        print(f"{PROG} replay: {exc}\nnothing was written", file=sys.stderr)
        return 2
    out = sys.stdout
    if result.selected == 0:
        print("nothing to replay: no quarantined row matches the selection", file=out)
        return 0
    events = result.events
    for column, n in sorted(result.unfit.items()):
        print(
            f"not replayed: {n} row(s) whose {column} does not convert to the contract's type "
            "(they stay in quarantine; see them with show and correct them with --fix)",
            file=out,
        )
    if result.rekeyed:
        print(
            f"warning: the fix changed the event_id of {result.rekeyed} row(s); the key cache "
            "dedupes on it, so a replay of them under another fix can land twice",
            file=out,
        )
    if events.num_rows == 0:
        print(f"nothing replayed: none of the {result.selected} selected rows converts", file=out)
        return 1
    producer = run_id(datetime.now(UTC))
    if args.dry_run:
        print(
            f"dry run: would replay {events.num_rows} of {result.selected} selected rows as "
            f"{producer}; nothing written",
            file=out,
        )
        return 0
    writer = SpoolWriter(Layout(settings.data_dir).incoming, producer, durable=settings.fsync)
    names = [
        writer.write(events.slice(start, REPLAY_FILE_ROWS)).name
        for start in range(0, events.num_rows, REPLAY_FILE_ROWS)
    ]
    print(
        f"replayed {events.num_rows} of {result.selected} selected rows as {producer}: "
        f"{len(names)} file(s) in incoming/ ({names[0]}"
        + (f" … {names[-1]})" if len(names) > 1 else ")"),
        file=out,
    )
    print(
        "once a consumer (adevents consume) has taken them, check:\n"
        f'  adevents sql "SELECT source_file, rows_in, accepted, duplicates, quarantined '
        f"FROM ledger WHERE contains(source_file, '{producer}')\"\n"
        f"  adevents quarantine list --source '*-{producer}-*'   (rows still invalid)\n"
        "rows that already landed count as duplicates; rows older than DEDUPE_WINDOW behind "
        "the newest event come back as late_event",
        file=out,
    )
    return 0
