"""POST /ad_events in process: formats, row rules, quarantine, bad input, keys, limits, batching."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from pyarrow import ipc

from api.ingest import Ingestor, IngestPlugin, IngestSettings
from api.ingest_spool import REJECTED_SCHEMA
from api.ingest_testing import arrow_body, body_of, json_rows
from generator import model
from lake.location import LakeLocation
from lake.snapshot import connect
from pipeline.decode import ARROW_FILE, ARROW_STREAM, JSON, NDJSON
from pipeline.schema import (
    EVENT_SCHEMA,
    MAX_ID_BYTES,
    QUARANTINE_SCHEMA,
    REASONS,
    Layout,
)
from pipeline.settings import Settings, SettingsError
from pipeline.spool import ARRIVED_AT_KEY, REJECTED_SUFFIX, SpoolWriter, list_incoming
from pipeline.testing import consume_once, event_table

KEY = "test-key-0123456789"
OTHER_KEY = "second-key-abcdef"
NOW_MS = int(time.time() * 1000)
FORMATS = (JSON, NDJSON, ARROW_STREAM)


def accepted_files(data_dir: Path) -> list[Path]:
    files = list_incoming(Layout(str(data_dir)).incoming)
    return [f for f in files if not f.name.endswith(REJECTED_SUFFIX)]


def rejected_files(data_dir: Path) -> list[Path]:
    files = list_incoming(Layout(str(data_dir)).incoming)
    return [f for f in files if f.name.endswith(REJECTED_SUFFIX)]


def spooled(data_dir: Path) -> pa.Table:
    """Every accepted row in incoming/, in file then row order."""
    files = accepted_files(data_dir)
    if not files:
        return EVENT_SCHEMA.empty_table()
    return pa.concat_tables([ipc.open_file(str(f)).read_all() for f in files])


def rejected(data_dir: Path) -> pl.DataFrame:
    """Every rejected row in incoming/, in file then row order; each file in the contract's
    schema (``QUARANTINE_SCHEMA`` less what the consumer adds) and stamped with its arrival."""
    tables = []
    for f in rejected_files(data_dir):
        table = ipc.open_file(str(f)).read_all()
        assert table.schema.equals(REJECTED_SCHEMA), table.schema
        assert table.schema.metadata[ARRIVED_AT_KEY].decode().isdecimal()
        tables.append(table)
    added = ("source_file", "batch_id", "ingested_at")
    schema = pl.Schema({n: t for n, t in QUARANTINE_SCHEMA.items() if n not in added})
    if not tables:
        return pl.DataFrame(schema=schema)
    frame = pl.from_arrow(pa.concat_tables(tables))
    assert isinstance(frame, pl.DataFrame) and frame.schema == schema
    return frame


def contract(table: pa.Table) -> pa.Table:
    """``table`` in exactly the contract's (nullable) types, for comparison."""
    from pipeline.normalize import normalize

    return normalize(table)[0]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_app(data_dir: Path) -> Callable[..., Litestar]:
    """Factory of an app with only the ingest plugin, over ``data_dir``."""

    def factory(*, batch_interval: str = "10ms", **ingest: Any) -> Litestar:
        settings = Settings.from_env({}, data_dir=str(data_dir), batch_interval=batch_interval)
        ingest.setdefault("ingest_api_keys", f"{KEY},{OTHER_KEY}")
        return Litestar(plugins=[IngestPlugin(settings, IngestSettings.from_env({}, **ingest))])

    return factory


@pytest.fixture
def client(make_app: Callable[..., Litestar]) -> Iterator[TestClient[Litestar]]:
    with TestClient(make_app()) as c:
        yield c


def post(
    client: TestClient[Litestar], body: bytes, media: str | None, *, key: str | None = KEY
) -> Any:
    headers = {} if media is None else {"content-type": media}
    if key is not None:
        headers["x-api-key"] = key
    return client.post("/ad_events", content=body, headers=headers)


def sample(n: int = 5, **columns: Any) -> pa.Table:
    return event_table([f"ev-{i}" for i in range(n)], time_ms=NOW_MS - 1000, **columns)


# -- the three formats -----------------------------------------------------------------------------
@pytest.mark.parametrize("media", [*FORMATS, ARROW_FILE])
def test_each_format_spools_the_rows_durably(
    client: TestClient[Litestar], data_dir: Path, media: str
) -> None:
    table = sample(7, user_id=[None, "u", "u", None, "u", "u", "ü-ñ"])
    if media == ARROW_FILE:
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        body = sink.getvalue().to_pybytes()
    else:
        body = body_of(table, media)
    r = post(client, body, media)
    assert r.status_code == 202, r.text
    assert r.json() == {"received": 7, "accepted": 7, "rejected": []}
    # Answered only once durable: the file is in place now, with nothing half-written.
    assert spooled(data_dir).equals(contract(table))
    assert not [p for p in (data_dir / "incoming").iterdir() if p.suffix != ".arrow"]


def test_a_large_body_is_decoded_off_the_event_loop(
    client: TestClient[Litestar], data_dir: Path
) -> None:
    from api.ingest import THREAD_DECODE_BYTES

    table = event_table([f"big-{i:08d}" for i in range(40_000)], time_ms=NOW_MS)
    body = arrow_body(table)
    assert len(body) >= THREAD_DECODE_BYTES
    r = post(client, body, ARROW_STREAM)
    assert r.status_code == 202 and r.json()["accepted"] == 40_000
    assert spooled(data_dir).equals(contract(table))


def test_arrow_compatible_types_are_normalised(
    client: TestClient[Litestar], data_dir: Path
) -> None:
    """Dictionary strings, narrow integers, ns timestamps in another zone, extra columns."""
    base = sample(3)
    arrays = {n: base.column(n) for n in base.column_names}
    arrays["campaign_id"] = base.column("campaign_id").dictionary_encode()
    arrays["cost_micros"] = base.column("cost_micros").cast(pa.int32())
    arrays["event_time"] = base.column("event_time").cast(pa.timestamp("ns", tz="Asia/Tokyo"))
    arrays["extra"] = pa.chunked_array([pa.array([1, 2, 3])])
    table = pa.table(arrays)
    r = post(client, arrow_body(table), ARROW_STREAM)
    assert r.status_code == 202 and r.json()["accepted"] == 3
    assert spooled(data_dir).equals(contract(base))


def test_json_event_time_forms(client: TestClient[Litestar], data_dir: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"event_time": 1_764_236_000_123},
        {"event_time": "2025-11-27T09:33:20.123Z"},
        {"event_time": "2025-11-27T10:33:20.123999+01:00"},  # floored to the ms
        {"event_time": "2025-11-27T09:33:20.123"},  # no offset: UTC
        {"event_time": "2025-11-27 09:33:20.123Z"},
        {"event_time": "1969-12-31T23:59:59.9995Z"},  # before 1970: floored, like normalize
    ]
    base = json_rows(sample(1))[0]
    body = json.dumps([{**base, "event_id": f"t{i}", **r} for i, r in enumerate(rows)])
    r = post(client, body.encode(), JSON)
    assert r.status_code == 202 and r.json()["accepted"] == 6, r.text
    ms = spooled(data_dir).column("event_time").cast(pa.int64()).to_pylist()
    assert ms == [1_764_236_000_123] * 5 + [-1]


# -- row rules, quarantine, ledger -----------------------------------------------------------------
def one_row_per_reason() -> tuple[pa.Table, list[tuple[int, str]]]:
    """A valid row, then a row failing each rule the endpoint checks, then a valid one."""
    future = NOW_MS + 3_600_000
    ids = ["ok-1", "", "x", "m", "L", "n", "c", "d", "f", "ok-2"]
    table = event_table(
        ids,
        time_ms=[NOW_MS] * 8 + [future, NOW_MS],
        event_type=["click", "click", "view", *["click"] * 7],
        ad_id=["a", "a", "a", "", "a" * (MAX_ID_BYTES + 1), *["a"] * 5],
        cost_micros=[1, 1, 1, 1, 1, -1, 1, 1, 1, 1],
        country=["US", "US", "US", "US", "US", "US", "usa", "US", "US", "US"],
        device_type=["ctv", "ctv", "ctv", "ctv", "ctv", "ctv", "ctv", "phone", "ctv", "ctv"],
    )
    expected = list(enumerate(REASONS[:8], start=1))
    return table, expected


@pytest.mark.parametrize("media", FORMATS)
def test_rejected_rows_are_reported_and_quarantined(
    client: TestClient[Litestar], data_dir: Path, media: str
) -> None:
    table, expected = one_row_per_reason()
    r = post(client, body_of(table, media), media)
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["received"] == 10 and answer["accepted"] == 2
    assert [(x["index"], x["reason"]) for x in answer["rejected"]] == expected
    assert spooled(data_dir).column("event_id").to_pylist() == ["ok-1", "ok-2"]
    q = rejected(data_dir)
    assert q["reason"].to_list() == [reason for _, reason in expected]
    assert q["event_id"].to_list() == table.column("event_id").to_pylist()[1:9]
    assert q["cost_micros"].to_list()[4] == -1  # the values as received
    assert q["event_time"].dt.epoch("ms").to_list() == [NOW_MS] * 7 + [NOW_MS + 3_600_000]


def test_rejected_rows_travel_as_one_file_beside_their_accepted_sibling(
    client: TestClient[Litestar], data_dir: Path
) -> None:
    """``<stem>.rejected.arrow``: the spool writer's next stem, so it sorts right after the
    micro-batch's accepted file; stamped with the request's arrival; nothing else is written."""
    table, _ = one_row_per_reason()
    before = int(time.time() * 1000)
    assert post(client, body_of(table, JSON), JSON).status_code == 202
    after = int(time.time() * 1000)
    [accepted] = accepted_files(data_dir)
    [rejected_file] = rejected_files(data_dir)
    assert list_incoming(data_dir / "incoming") == [accepted, rejected_file]
    stamp, producer, seq = accepted.name.removesuffix(".arrow").split("-")
    r_stamp, r_producer, r_seq = rejected_file.name.removesuffix(REJECTED_SUFFIX).split("-")
    assert (r_producer, int(r_seq)) == (producer, int(seq) + 1) and r_stamp >= stamp
    metadata = ipc.open_file(str(rejected_file)).schema.metadata
    assert metadata == {ARRIVED_AT_KEY: metadata[ARRIVED_AT_KEY]}
    assert before <= int(metadata[ARRIVED_AT_KEY]) <= after
    # The lake is not ours; state/ holds only the ingest's metrics (api/ingest_metrics.py).
    assert sorted(p.name for p in data_dir.iterdir()) == ["incoming", "state"]
    assert [p.name for p in (data_dir / "state").iterdir()] == ["ingest-metrics"]


def test_a_request_of_only_rejected_rows_writes_only_a_rejected_file(
    client: TestClient[Litestar], data_dir: Path
) -> None:
    r = post(client, body_of(sample(3, event_type=["view"] * 3), NDJSON), NDJSON)
    assert r.status_code == 202 and r.json()["accepted"] == 0
    assert accepted_files(data_dir) == [] and len(rejected_files(data_dir)) == 1
    assert rejected(data_dir)["reason"].to_list() == ["invalid_event_type"] * 3


def test_wrongly_typed_json_values_are_row_reasons_not_400(
    client: TestClient[Litestar], data_dir: Path
) -> None:
    base = json_rows(sample(1))[0]
    odd: list[dict[str, Any]] = [
        {"event_id": 17},
        {"event_type": ["click"]},
        {"event_time": "yesterday"},
        {"event_time": 1.5e12},
        {"event_time": True},
        {"cost_micros": "100"},
        {"cost_micros": 1.0},
        {"revenue_micros": 2**63},  # beyond int64
        {"cost_micros": False},
        {"country": 44},
        {"device_type": {"kind": "ctv"}},
        {"publisher_id": None},
        {"ad_id": 7, "campaign_id": None},
    ]
    body = [{**base, "event_id": f"w{i}", **o} for i, o in enumerate(odd)]
    body.append({**base, "event_id": "fine", "user_id": 12345, "extra": [1, {"x": None}]})
    for media in (JSON, NDJSON):
        payload = (
            json.dumps(body) if media == JSON else "\n".join(json.dumps(b) for b in body)
        ).encode()
        r = post(client, payload, media)
        assert r.status_code == 202, r.text
        reasons = [x["reason"] for x in r.json()["rejected"]]
        assert reasons == [
            "invalid_event_id",
            "invalid_event_type",
            *["missing_field"] * 3,
            *["invalid_money"] * 4,
            "invalid_country",
            "invalid_device_type",
            *["missing_field"] * 2,
        ]
        assert r.json()["accepted"] == 1
    stored = spooled(data_dir)
    assert stored.column("user_id").to_pylist() == ["12345", "12345"]
    q = rejected(data_dir)
    assert q.filter(pl.col("event_id") == "w9")["country"].to_list() == ["44", "44"]
    assert len(rejected_files(data_dir)) == 2


def test_generator_invalid_rows_get_the_consumers_reasons(tmp_path: Path) -> None:
    """The same malformed batch through the spool and through HTTP: same lake, same reasons;
    the ingest's rejected rows reach the quarantine table as ``<stem>.http`` with a ledger row
    of their own, so rows_in = accepted + duplicates + quarantined holds for every batch."""
    rng = np.random.default_rng(7)
    campaigns = model.build_campaigns(rng, 20)
    population = model.build_population(rng, model.campaign_ids(campaigns))
    spec = model.BatchSpec(b"par-", 0, 3000, NOW_MS - 60_000, NOW_MS, 0.3)
    table = model.to_spool_table(model.generate_batch(rng, population, spec).frame, population)

    lakes = []
    for way in ("spool", "http"):
        settings = Settings.from_env(
            {}, data_dir=str(tmp_path / way), fsync="false", batch_interval="10ms"
        )
        if way == "spool":
            SpoolWriter(Layout(settings.data_dir).incoming, "gen").write(table)
        else:
            ingest = IngestSettings.from_env({}, ingest_api_keys=KEY)
            app = Litestar(plugins=[IngestPlugin(settings, ingest)])
            with TestClient(app) as c:
                r = post(c, arrow_body(table), ARROW_STREAM)
                assert r.status_code == 202 and r.json()["rejected"], r.text
            [rejected_file] = rejected_files(tmp_path / way)
            http_source = rejected_file.name.removesuffix(REJECTED_SUFFIX) + ".http"
            http_rejected = len(r.json()["rejected"])
        consume_once(settings)
        con = connect(LakeLocation.from_settings(settings))
        events = con.execute("SELECT event_id FROM events ORDER BY event_id").fetchall()
        quarantine = con.execute(
            "SELECT event_id, reason FROM quarantine ORDER BY event_id, reason"
        ).fetchall()
        unbalanced = con.execute(
            "SELECT batch_id FROM ledger WHERE rows_in <> accepted + duplicates + quarantined"
        ).fetchall()
        assert unbalanced == []
        rows_in = con.execute("SELECT sum(rows_in) FROM ledger").fetchone()
        lakes.append((events, quarantine, rows_in))
        if way == "http":
            from_http = con.execute(
                "SELECT count(*) FROM quarantine WHERE source_file = ?", [http_source]
            ).fetchone()
            ledger_row = con.execute(
                "SELECT rows_in, accepted, duplicates, quarantined FROM ledger "
                "WHERE source_file = ?",
                [http_source],
            ).fetchall()
            assert from_http == (http_rejected,)
            assert ledger_row == [(http_rejected, 0, 0, http_rejected)]
    assert lakes[0] == lakes[1]
    assert len(lakes[0][1]) > 500  # the batch really had malformed rows of each kind
    assert {r for _, r in lakes[0][1]} == set(model.ROW_REASONS)


# -- bad input: 400, 413, 415, never 500 -----------------------------------------------------------
def _file_format() -> bytes:
    sink = pa.BufferOutputStream()
    table = sample(2)
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


BAD_BODIES = [
    (JSON, b"[{not json", "not valid JSON"),
    (JSON, b"{not json", "JSON array"),
    (JSON, b'{"event_id": "a"}', "JSON array of event objects"),
    (JSON, b"[1, 2]", "JSON array of event objects"),
    (JSON, b'[{"event_id": "a"}', "not valid JSON"),
    (JSON, b'[{"event_id": "\xff\xfe"}]', "not valid JSON"),
    (JSON, b"", "empty"),
    (JSON, b"  \n ", "empty"),
    (NDJSON, b'{"event_id": "a"}\n\n{"event_id": \n', "line 3"),
    (NDJSON, b'{"event_id": "a"}\n[1]\n', "line 2"),
    (NDJSON, b'{"event_id": "a"}, {"event_id": "b"}\n', "line 1"),
    (ARROW_STREAM, b"garbage bytes", "not a valid Arrow IPC stream"),
    (ARROW_STREAM, arrow_body(sample(3))[:-40], "not a valid Arrow IPC stream"),
    (ARROW_STREAM, _file_format(), "file format"),
    (ARROW_STREAM, arrow_body(sample(2).drop_columns(["ad_id"])), "'ad_id'"),
    (
        ARROW_STREAM,
        arrow_body(sample(2).set_column(9, "cost_micros", pa.array([1.5, 2.0]))),
        "micros",
    ),
    (ARROW_STREAM, arrow_body(pa.table({"event_id": [[1]]})), "missing"),
    (ARROW_FILE, b"ARROW1\x00\x00garbage", "not a valid Arrow IPC file"),
]


@pytest.mark.parametrize(("media", "body", "message"), BAD_BODIES)
def test_malformed_bodies_are_400_with_a_message(
    client: TestClient[Litestar], data_dir: Path, media: str, body: bytes, message: str
) -> None:
    r = post(client, body, media)
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]
    assert spooled(data_dir).num_rows == 0


def test_mangled_bodies_never_cause_a_server_error(client: TestClient[Litestar]) -> None:
    rnd = random.Random(1)
    table = sample(20)
    for media in FORMATS:
        good = body_of(table, media)
        for _ in range(60):
            body = bytearray(good)
            for _ in range(rnd.randint(1, 8)):
                op, pos = rnd.random(), rnd.randrange(len(body))
                if op < 0.4:
                    body[pos] = rnd.randrange(256)
                elif op < 0.7:
                    del body[pos : pos + rnd.randint(1, 50)]
                else:
                    body[pos:pos] = rnd.randbytes(rnd.randint(1, 20))
            r = post(client, bytes(body), media)  # raise_server_exceptions: a 500 raises here
            assert r.status_code in (202, 400), r.text


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({"content-type": "text/plain"}, "Content-Type 'text/plain'"),
        ({}, "missing Content-Type"),
        ({"content-type": JSON, "content-encoding": "br"}, "Content-Encoding 'br'"),
    ],
)
def test_unsupported_media_is_415(
    client: TestClient[Litestar], headers: dict[str, str], fragment: str
) -> None:
    r = client.post("/ad_events", content=b"[]", headers={"x-api-key": KEY, **headers})
    assert r.status_code == 415 and fragment in r.json()["detail"]


def test_media_type_parameters_and_aliases_are_accepted(client: TestClient[Litestar]) -> None:
    for media in ("application/json; charset=utf-8", "Application/JSON", "application/jsonl"):
        assert post(client, b"[]" if "jsonl" not in media else b"\n", media).status_code in (
            202,
            400,
        )
    assert post(client, b"[]", "application/json; charset=utf-8").status_code == 202


def test_body_over_the_limit_is_413(make_app: Callable[..., Litestar], data_dir: Path) -> None:
    with TestClient(make_app(ingest_max_body_bytes="1KiB")) as c:
        table = sample(100)
        r = post(c, body_of(table, JSON), JSON)
        assert r.status_code == 413 and "INGEST_MAX_BODY_BYTES" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            yield b"[" + b" " * 800
            yield b" " * 800 + b"]"

        r = c.post("/ad_events", content=chunks(), headers={"content-type": JSON, "x-api-key": KEY})
        assert r.status_code == 413
        assert post(c, body_of(sample(2), JSON), JSON).status_code == 202
    assert spooled(data_dir).num_rows == 2


# -- API keys --------------------------------------------------------------------------------------
def test_api_keys(client: TestClient[Litestar]) -> None:
    def status(**headers: str) -> int:
        h = {"content-type": JSON, **headers}
        return int(client.post("/ad_events", content=b"[]", headers=h).status_code)

    assert status() == 401
    assert status(**{"x-api-key": "wrong"}) == 401
    assert status(authorization=f"Basic {KEY}") == 401
    assert status(authorization="Bearer ") == 401
    assert status(**{"x-api-key": KEY}) == 202
    assert status(**{"x-api-key": OTHER_KEY}) == 202
    assert status(authorization=f"Bearer {KEY}") == 202
    assert status(authorization=f"bearer {OTHER_KEY}") == 202
    r = client.post("/ad_events", content=b"[]", headers={"content-type": JSON})
    assert "X-API-Key" in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")


def test_no_keys_configured_refuses_every_ingest(make_app: Callable[..., Litestar]) -> None:
    with TestClient(make_app(ingest_api_keys="")) as c:
        assert post(c, b"[]", JSON).status_code == 401
        assert post(c, b"[]", JSON, key="").status_code == 401


def test_key_settings_are_checked() -> None:
    assert IngestSettings.from_env({"INGEST_API_KEYS": " a , b,,"}).ingest_api_keys == ("a", "b")
    with pytest.raises(SettingsError, match="INGEST_API_KEYS"):
        IngestSettings.from_env({"INGEST_API_KEYS": "has space"})
    with pytest.raises(SettingsError, match="MAX_BACKLOG_EVENTS"):
        IngestSettings.from_env({"MAX_BACKLOG_EVENTS": "0"})


@pytest.mark.parametrize("required", [False, True])
def test_read_routes_honour_api_keys_required_for_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, required: bool
) -> None:
    from api.app import create_app

    env = {"INGEST_API_KEYS": KEY, "API_KEYS_REQUIRED_FOR_READ": str(required).lower()}
    settings = Settings.from_env(env, data_dir=str(tmp_path / "lake"), fsync="false")
    Layout(settings.data_dir).ensure()
    with TestClient(create_app(settings)) as c:
        for path in ("/ad_events/latest", "/campaigns/top", "/metrics"):
            assert c.get(path).status_code == (401 if required else 200), path
            assert c.get(path, headers={"x-api-key": KEY}).status_code == 200
            assert c.get(path, headers={"authorization": f"Bearer {KEY}"}).status_code == 200
            assert c.get(path, headers={"x-api-key": "nope"}).status_code == (
                401 if required else 200
            )
        assert c.get("/health").status_code in (200, 503)  # open either way
        assert post(c, b"[]", JSON, key=None).status_code == 401
        assert post(c, b"[]", JSON).status_code == 202


# -- backpressure ----------------------------------------------------------------------------------
def test_backlog_over_the_bound_is_429_until_consumed(
    make_app: Callable[..., Litestar], data_dir: Path
) -> None:
    with TestClient(make_app(max_backlog_events="50")) as c:
        assert post(c, body_of(sample(40), JSON), JSON).status_code == 202
        r = post(c, body_of(sample(20), JSON), JSON)  # 40 waiting: still under the bound
        assert r.status_code == 202
        r = post(c, body_of(sample(1), JSON), JSON)  # 60 waiting
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "MAX_BACKLOG_EVENTS" in r.json()["detail"]
        for f in list_incoming(Layout(str(data_dir)).incoming):
            f.unlink()  # what the consumer does
        time.sleep(0.3)  # the listing of incoming/ is reused for a moment
        assert post(c, body_of(sample(1), JSON), JSON).status_code == 202


def test_other_producers_files_count_towards_the_backlog(
    make_app: Callable[..., Litestar], data_dir: Path
) -> None:
    with TestClient(make_app(max_backlog_events="1000")) as c:
        assert post(c, body_of(sample(1), JSON), JSON).status_code == 202
        SpoolWriter(Layout(str(data_dir)).incoming, "gen").write(sample(5000))
        time.sleep(0.3)
        assert post(c, body_of(sample(1), JSON), JSON).status_code == 429


def test_rejected_rows_count_towards_the_backlog_until_consumed(
    make_app: Callable[..., Litestar], data_dir: Path
) -> None:
    """They wait in incoming/ for the consumer like accepted rows: counted when written, and
    read from the file's footer by a process that did not write it."""
    invalid = body_of(sample(40, event_type=["view"] * 40), JSON)
    with TestClient(make_app(max_backlog_events="50")) as c:
        assert post(c, invalid, JSON).status_code == 202
        assert post(c, invalid, JSON).status_code == 202  # 40 waiting: still under the bound
        assert post(c, body_of(sample(1), JSON), JSON).status_code == 429
    assert accepted_files(data_dir) == [] and len(rejected_files(data_dir)) == 2
    with TestClient(make_app(max_backlog_events="81")) as c:  # another process: 80 waiting
        assert post(c, body_of(sample(1), JSON), JSON).status_code == 202
        assert post(c, body_of(sample(1), JSON), JSON).status_code == 429


# -- group commit ----------------------------------------------------------------------------------
@pytest.fixture
def make_ingestor(data_dir: Path) -> Callable[..., Ingestor]:
    def factory(batch_interval: str, **ingest: Any) -> Ingestor:
        settings = Settings.from_env({}, data_dir=str(data_dir), batch_interval=batch_interval)
        return Ingestor(settings, IngestSettings.from_env({}, **ingest))

    return factory


def test_concurrent_requests_share_one_durable_write(
    make_ingestor: Callable[..., Ingestor], data_dir: Path
) -> None:
    ingestor = make_ingestor("300ms")
    tables = [event_table([f"r{i}-{j}" for j in range(50)], time_ms=NOW_MS) for i in range(24)]

    async def scenario() -> list[Any]:
        await ingestor.start()
        try:
            return list(
                await asyncio.gather(*(ingestor.take(arrow_body(t), ARROW_STREAM) for t in tables))
            )
        finally:
            await ingestor.close()

    started = time.monotonic()
    answers = asyncio.run(scenario())
    assert time.monotonic() - started < 3
    assert [a.accepted for a in answers] == [50] * 24
    assert len(list_incoming(Layout(str(data_dir)).incoming)) == 1  # one write, not 24
    ids = spooled(data_dir).column("event_id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}-{j}" for i in range(24) for j in range(50))
    assert ingestor.committer.stats.commits == 1 and ingestor.committer.stats.requests == 24


def test_shutdown_writes_what_is_waiting(
    make_ingestor: Callable[..., Ingestor], data_dir: Path
) -> None:
    ingestor = make_ingestor("30s")

    async def scenario() -> Any:
        await ingestor.start()
        task = asyncio.ensure_future(ingestor.take(body_of(sample(3), JSON), JSON))
        await asyncio.sleep(0.2)
        assert not task.done()  # waiting for the interval
        await ingestor.close()
        return await task

    assert asyncio.run(scenario()).accepted == 3
    assert spooled(data_dir).num_rows == 3


def test_a_full_batch_is_written_without_waiting_for_the_interval(
    make_app: Callable[..., Litestar], data_dir: Path
) -> None:
    with TestClient(make_app(batch_interval="30s", ingest_batch_events="100")) as c:
        started = time.monotonic()
        assert post(c, body_of(sample(100), ARROW_STREAM), ARROW_STREAM).status_code == 202
        assert time.monotonic() - started < 5
    assert spooled(data_dir).num_rows == 100


def test_a_failed_write_is_503_and_nothing_is_acknowledged(
    make_app: Callable[..., Litestar], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api import ingest_spool

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest_spool.SpoolBatchWriter, "write", broken)
    with TestClient(make_app()) as c:
        r = post(c, body_of(sample(3), JSON), JSON)
        assert r.status_code == 503 and "disk is full" in r.json()["detail"]
        assert "No space left" not in r.text  # the error's own words go to the log
        assert r.json()["request_id"] == r.headers["x-request-id"]
        assert r.headers["retry-after"] == "1"
    assert spooled(data_dir).num_rows == 0


def test_a_failed_rejected_file_is_503_and_keeps_the_accepted_file(
    make_app: Callable[..., Litestar], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted rows go first: when the rejected file then fails, the accepted file stays and
    the client's retry repeats only rows the consumer deduplicates."""
    real_fsync = os.fsync

    def fsync_failing_for_rejected_files(fd: int) -> None:
        if REJECTED_SUFFIX in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    table, _ = one_row_per_reason()
    with TestClient(make_app()) as c:
        monkeypatch.setattr(os, "fsync", fsync_failing_for_rejected_files)
        r = post(c, body_of(table, JSON), JSON)
        assert r.status_code == 503 and "disk is full" in r.json()["detail"]
        assert len(accepted_files(data_dir)) == 1 and rejected_files(data_dir) == []
        assert sorted(p.name for p in (data_dir / "incoming").iterdir()) == [
            accepted_files(data_dir)[0].name  # no temporary file left behind
        ]
        monkeypatch.undo()
        assert post(c, body_of(table, JSON), JSON).status_code == 202  # the client's retry
    assert spooled(data_dir).column("event_id").to_pylist() == ["ok-1", "ok-2"] * 2
    assert len(rejected(data_dir)) == 8


def test_openapi_documents_the_endpoint(client: TestClient[Litestar]) -> None:
    op = client.get("/schema/openapi.json").json()["paths"]["/ad_events"]["post"]
    assert set(op["requestBody"]["content"]) == {JSON, NDJSON, ARROW_STREAM, ARROW_FILE}
    assert {"202", "400", "401", "413", "415", "429", "503"} <= set(op["responses"])


def test_temporary_files_of_killed_ingests_are_swept(
    client: TestClient[Litestar], data_dir: Path
) -> None:
    incoming = data_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    stale = incoming / ".001764236000000-http123abcd-000000007.arrow.tmp"
    fresh = incoming / ".001764236000000-http456abcd-000000001.arrow.tmp"
    stale_rejected = incoming / f".001764236000000-http123abcd-000000008{REJECTED_SUFFIX}.77.tmp"
    foreign = incoming / ".001764236000000-gen-000000001.arrow.tmp"
    for p in (stale, stale_rejected, fresh, foreign):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    for p in (stale, stale_rejected, foreign):
        os.utime(p, (old, old))
    assert post(client, body_of(sample(1), JSON), JSON).status_code == 202
    assert not stale.exists() and not stale_rejected.exists()
    assert fresh.exists() and foreign.exists()
