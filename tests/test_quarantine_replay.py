"""Bad-row recovery: ``adevents quarantine list|show|replay`` against a real consumer and lake.

Events rejected for a bad country are listed, shown, corrected by SQL and replayed through the
spool; a real Consumer (both key caches) lands them exactly once, a second replay adds nothing,
and the ledger names the replay's files. A fix that cannot be used writes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from cli import build_parser
from cli.quarantine import run as quarantine_command
from lake.location import LakeLocation
from lake.snapshot import snapshot
from pipeline.schema import EVENT_COLUMNS, Layout
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter, list_incoming
from pipeline.testing import consume_once, event_table
from queries.quarantine import ROW_SCHEMA, FixError, correct

FIX = "SELECT * REPLACE (upper(country) AS country) FROM rows"


@pytest.fixture(params=["embedded", "redis"])
def settings(request: pytest.FixtureRequest, make_settings: Callable[..., Settings]) -> Settings:
    if request.param == "redis":
        return make_settings(
            redis_url=request.getfixturevalue("redis_url"),
            redis_key_prefix=request.getfixturevalue("redis_prefix"),
        )
    return make_settings()


def consume(settings: Settings) -> None:
    """Run a real consumer over DATA_DIR until incoming/ is empty."""
    consume_once(settings)
    assert list_incoming(Layout(settings.data_dir).incoming) == []


def quarantine(
    settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    """``adevents quarantine ARGV`` as the CLI parses it, over ``settings``: (code, out, err)."""
    capsys.readouterr()
    args = build_parser().parse_args(["quarantine", *argv])
    code = quarantine_command(args, settings)
    out, err = capsys.readouterr()
    return code, out, err


def table(settings: Settings, name: str) -> pl.DataFrame:
    location = LakeLocation.from_settings(settings)
    frame = pl.from_arrow(snapshot(location).datasets[name].to_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def spool(settings: Settings, producer: str, tables: list[pa.Table]) -> list[str]:
    writer = SpoolWriter(Layout(settings.data_dir).incoming, producer)
    return [writer.write(t).name for t in tables]


def test_bad_country_rows_corrected_by_sql_land_exactly_once(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    ids = ["e0", "e1", "e2", "e3", "ok1", "ok2", "money"]
    countries = ["us", "de", "fr", "usa", "US", "GB", "US"]
    [source] = spool(
        settings,
        "gen",
        [
            event_table(
                ids,
                time_ms=[now - 1000 * i for i in range(len(ids))],
                country=countries,
                cost_micros=[1500, 1500, 1500, 1500, 1500, 1500, -1],
            )
        ],
    )
    consume(settings)
    assert sorted(table(settings, "events")["event_id"]) == ["ok1", "ok2"]

    # list: one bucket per reason, with counts, files and the source
    code, out, _ = quarantine(settings, capsys, "list", "--format", "json")
    assert code == 0
    groups = {g["reason"]: g for g in json.loads(out)}
    assert set(groups) == {"invalid_country", "invalid_money"}
    assert groups["invalid_country"]["rejected"] == 4 and groups["invalid_country"]["files"] == 1
    assert groups["invalid_country"]["first_source"] == source
    assert groups["invalid_money"]["rejected"] == 1
    code, out, _ = quarantine(settings, capsys, "list", "--reason", "invalid_money", "--by", "day")
    assert code == 0 and "invalid_money" in out and "invalid_country" not in out
    assert out.rstrip().endswith("(1 row)")

    # show: the rows themselves with their original values, filtered, limited, as CSV
    code, out, _ = quarantine(
        settings, capsys, "show", "--reason", "invalid_country", "--format", "csv"
    )
    assert code == 0
    shown = list(csv.DictReader(io.StringIO(out)))
    assert list(shown[0]) == ROW_SCHEMA.names
    assert sorted((r["event_id"], r["country"]) for r in shown) == [
        ("e0", "us"),
        ("e1", "de"),
        ("e2", "fr"),
        ("e3", "usa"),
    ]
    assert {r["reason"] for r in shown} == {"invalid_country"}
    assert {r["source_file"] for r in shown} == {source}
    code, out, _ = quarantine(settings, capsys, "show", "--limit", "2", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 2
    code, out, _ = quarantine(settings, capsys, "show", "--source", "nothing-*", "--format", "json")
    assert code == 0 and json.loads(out) == []

    # replay, corrected: three rows become valid, "USA" is still not a country code
    code, out, _ = quarantine(
        settings, capsys, "replay", "--reason", "invalid_country", "--fix", FIX
    )
    assert code == 0, out
    assert "replayed 4 of 4 selected rows as replay_" in out
    assert "ledger" in out and "contains(source_file" in out
    [replay_file] = [p.name for p in list_incoming(Layout(settings.data_dir).incoming)]
    assert "-replay_" in replay_file
    consume(settings)

    events = table(settings, "events")
    assert sorted(events["event_id"]) == ["e0", "e1", "e2", "ok1", "ok2"]
    assert dict(zip(events["event_id"], events["country"], strict=True))["e1"] == "DE"
    [replayed_batch] = events.filter(pl.col("event_id") == "e0")["batch_id"]
    assert replayed_batch.startswith(replay_file.removesuffix(".arrow"))
    back = table(settings, "quarantine").filter(pl.col("source_file") == replay_file)
    assert back.select("event_id", "country", "reason").rows() == [("e3", "USA", "invalid_country")]
    # The ledger records the replay: its file, what it took in and what became of it.
    ledger = table(settings, "ledger").filter(pl.col("source_file").str.contains("-replay_"))
    assert ledger.select("source_file", "status", "rows_in", "accepted", "duplicates").rows() == [
        (replay_file, "ok", 4, 3, 0)
    ]
    assert ledger["quarantined"].to_list() == ledger["quarantined_invalid_country"].to_list() == [1]

    # A second replay of the same rows adds nothing: the three land as duplicates.
    code, out, _ = quarantine(
        settings, capsys, "replay", "--source", source, "--reason", "invalid_country", "--fix", FIX
    )
    assert code == 0 and "replayed 4 of 4" in out
    consume(settings)
    assert sorted(table(settings, "events")["event_id"]) == ["e0", "e1", "e2", "ok1", "ok2"]
    ledger = table(settings, "ledger").filter(pl.col("source_file").str.contains("-replay_"))
    assert sorted(ledger.select("rows_in", "accepted", "duplicates", "quarantined").rows()) == [
        (4, 0, 3, 1),
        (4, 3, 0, 1),
    ]
    # Only the still-invalid row came back, once per replay.
    assert table(settings, "quarantine").filter(pl.col("event_id") == "e3").height == 3

    # The rows that came back are found by the replay's file names, and can be replayed again.
    code, out, _ = quarantine(
        settings, capsys, "list", "--source", "*-replay_*", "--format", "json"
    )
    assert code == 0
    groups = json.loads(out)  # one group, or two if an hour ended between the replays
    assert {g["reason"] for g in groups} == {"invalid_country"}
    assert sum(g["rejected"] for g in groups) == 2


def test_a_fix_that_cannot_be_used_writes_nothing(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    now = int(time.time() * 1000)
    spool(settings, "gen", [event_table(["a", "b"], time_ms=now, country=["us", "x"])])
    consume(settings)
    incoming = Layout(settings.data_dir).incoming
    for fix, says in [
        ("SELECT nope FROM rows", "nope"),
        ("SELEC * FROM rows", "not valid SQL"),
        ("DELETE FROM rows", "exactly one SELECT"),
        (f"{FIX}; {FIX}", "exactly one SELECT"),
        ("SELECT event_id, country FROM rows", "lacks the event column(s) event_type"),
        ("SELECT * REPLACE (CAST(country AS INTEGER) AS country) FROM rows", "Conversion"),
        ("SELECT * FROM read_parquet('/etc/hostname')", "disabled"),
    ]:
        code, out, err = quarantine(settings, capsys, "replay", "--fix", fix)
        assert code == 2, (fix, out, err)
        assert says in err and "nothing was written" in err
        assert written(incoming) == []
    code, out, _ = quarantine(settings, capsys, "replay", "--fix", FIX, "--dry-run")
    assert code == 0 and "would replay 2 of 2" in out
    assert written(incoming) == []
    code, out, _ = quarantine(settings, capsys, "replay", "--reason", "late_event")
    assert code == 0 and "nothing to replay" in out
    assert written(incoming) == []


def written(incoming: Path) -> list[str]:
    """Everything in incoming/ but the consumer's slot directories, temp files included."""
    return sorted(p.name for p in incoming.iterdir() if not p.name.startswith(".slot-"))


def _rows(**overrides: list[Any]) -> pa.Table:
    now = int(time.time() * 1000)
    base: dict[str, list[Any]] = {
        "event_id": ["a", "b", "c"],
        "event_type": ["click"] * 3,
        "event_time": [now] * 3,
        "campaign_id": ["c1"] * 3,
        "ad_id": ["ad"] * 3,
        "publisher_id": ["p"] * 3,
        "user_id": [None] * 3,
        "device_type": [None] * 3,
        "country": ["us"] * 3,
        "cost_micros": [5] * 3,
        "revenue_micros": [0] * 3,
        "reason": ["invalid_country"] * 3,
        "source_file": ["f.arrow"] * 3,
        "batch_id": ["f-1"] * 3,
        "ingested_at": [now] * 3,
    }
    base.update(overrides)
    return pa.table(base, schema=ROW_SCHEMA)


def test_corrected_values_convert_to_the_contract_or_stay_in_quarantine() -> None:
    rows = _rows()
    unchanged = correct(rows, None)
    assert unchanged.events.column_names == list(EVENT_COLUMNS)
    assert unchanged.events.num_rows == 3 and unchanged.unfit == {} and unchanged.rekeyed == 0
    assert unchanged.events.column("event_time").equals(rows.column("event_time"))

    # Text and numbers convert when exact; a fraction of a micro or a non-time does not.
    fixed = correct(
        rows,
        """SELECT * REPLACE (
               CASE event_id WHEN 'a' THEN '12' WHEN 'b' THEN '1.5' ELSE ' 7 ' END AS cost_micros,
               CASE event_id WHEN 'c' THEN 'not a time' ELSE '2026-12-01 10:00:00' END
                   AS event_time,
               2.0 AS revenue_micros)
           FROM rows""",
    )
    assert fixed.selected == 3
    assert fixed.unfit == {"cost_micros": 1, "event_time": 1}
    [event] = fixed.events.to_pylist()
    assert (event["event_id"], event["cost_micros"], event["revenue_micros"]) == ("a", 12, 2)
    assert event["event_time"].isoformat() == "2026-12-01T10:00:00+00:00"  # naive means UTC
    assert fixed.rekeyed == 0  # its event_time changed: the same event_id, the same key

    # Epoch milliseconds are times; optional columns may be left out (null).
    epoch = correct(
        rows,
        "SELECT * EXCLUDE (country, user_id, device_type) REPLACE "
        "(epoch_ms(event_time) AS event_time) FROM rows",
    )
    assert epoch.unfit == {} and epoch.rekeyed == 0
    renamed = correct(rows, "SELECT * REPLACE (event_id || '-fixed' AS event_id) FROM rows")
    assert renamed.rekeyed == 3  # a new event_id is a new key
    assert epoch.events.column("event_time").equals(rows.column("event_time"))
    assert epoch.events.column("country").null_count == 3

    with pytest.raises(FixError, match="exactly one SELECT"):
        correct(rows, "COPY rows TO '/tmp/rows.csv'")


def test_quarantine_is_a_registered_command_that_takes_the_data_dir_after_its_action(
    tmp_path: Path,
) -> None:
    args = build_parser().parse_args(
        ["quarantine", "show", "--data-dir", str(tmp_path), "--since", "2026-12-02T10:00"]
    )
    assert args.command == "quarantine" and args.action == "show"
    assert args.data_dir == str(tmp_path)
    assert args.since == 1_796_205_600_000  # 10:00 UTC: no offset means UTC
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quarantine", "list", "--since", "soon"])
