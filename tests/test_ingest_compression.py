"""gzip and zstd request bodies at POST /ad_events: every format lands, bombs stop at their limit.

Bombs are judged by the work they cost (bytes decompressed, a real server's peak memory), never
by time: the decompressor reports how far it got, and a real uvicorn process's VmHWM shows that
a body expanding to 1 GiB never took more than its limit's worth of memory.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import struct
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import zstandard
from litestar import Litestar
from litestar.testing import TestClient
from pyarrow import ipc

from api.ingest import IngestPlugin, IngestSettings
from api.ingest_encoding import (
    GZIP,
    GZIP_STEP,
    MAX_OVERSHOOT,
    ZSTD,
    ZSTD_MAX_WINDOW,
    CorruptBodyError,
    InflatedTooLargeError,
    Limits,
    UnsupportedEncodingError,
    content_encoding,
    decompress,
)
from api.ingest_testing import body_of, running
from lake.location import LakeLocation
from lake.snapshot import connect
from pipeline.decode import ARROW_FILE, ARROW_STREAM, JSON, NDJSON
from pipeline.schema import Layout
from pipeline.settings import Settings, SettingsError
from pipeline.spool import list_incoming
from pipeline.testing import consume_once, event_table

KEY = "compress-key-0123456789"
NOW_MS = int(time.time() * 1000)
FORMATS = (JSON, NDJSON, ARROW_STREAM, ARROW_FILE)
MiB = 1024**2
#: The defaults: INGEST_MAX_BODY_BYTES and INGEST_MAX_COMPRESSION_RATIO.
DEFAULT = Limits(32 * MiB, 100.0)


# -- bodies --------------------------------------------------------------------------------------
def compress(data: bytes, encoding: str) -> bytes:
    if encoding == GZIP:
        return gzip.compress(data)
    return zstandard.ZstdCompressor(level=3).compress(data)


def events(prefix: str, n: int = 50) -> pa.Table:
    return event_table([f"{prefix}-{i:05d}" for i in range(n)], time_ms=NOW_MS - 1000)


def body(table: pa.Table, media: str) -> bytes:
    if media != ARROW_FILE:
        return body_of(table, media)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def zeros(total: int, step: int = 4 * MiB) -> Iterator[bytes]:
    block = bytes(step)
    for start in range(0, total, step):
        yield block[: min(step, total - start)]


@functools.cache
def gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes (a multiple of 4 MiB) as one valid gzip member of about size/1000.

    Built without compressing it all: after a full flush deflate starts afresh, so every
    further 4 MiB of zeros compresses to the same bytes, repeated; then the final (empty) block
    and the trailer with the whole CRC-32 and size."""
    block = bytes(4 * MiB)
    assert size % len(block) == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    final_empty_block = b"\x03\x00"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return first + repeated * (size // len(block) - 1) + final_empty_block + trailer


@functools.cache
def zstd_bomb(size: int) -> bytes:
    """``size`` zero bytes as one zstd frame (a few KB) with no content size in its header, as
    a streaming compressor writes it."""
    frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    return b"".join(frame.compress(z) for z in zeros(size)) + frame.flush()


BOMBS: dict[str, Callable[[int], bytes]] = {GZIP: gzip_bomb, ZSTD: zstd_bomb}


def test_the_bombs_are_valid_streams() -> None:
    """The bombs below are what they claim: valid gzip and zstd of that many zeros."""
    assert gzip.decompress(gzip_bomb(8 * MiB)) == bytes(8 * MiB)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zstd_bomb(8 * MiB)) == bytes(
        8 * MiB
    )


# -- the decompressor ----------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
def test_round_trip_one_or_several_members(encoding: str) -> None:
    data = body(events("rt", 2000), NDJSON)
    packed = compress(data, encoding)
    assert decompress(packed, encoding, DEFAULT) == data
    # gzip members and zstd frames one after the other are one body (both formats say so).
    assert decompress(packed + packed, encoding, DEFAULT) == data + data


def test_identity_is_the_body_as_it_is() -> None:
    assert decompress(b"[]", "identity", DEFAULT) == b"[]"


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
@pytest.mark.parametrize(
    "damage",
    ["truncated", "cut_in_half", "trailing_bytes", "flipped_bytes", "not_compressed", "empty"],
)
def test_damaged_bodies_are_corrupt_never_partial(encoding: str, damage: str) -> None:
    data = body(events("bad", 500), NDJSON)
    packed = compress(data, encoding)
    mid = len(packed) // 2
    damaged = {
        "truncated": packed[:-4],
        "cut_in_half": packed[:mid],
        "trailing_bytes": packed + b"\x00junk",
        "flipped_bytes": packed[:mid]
        + bytes(b ^ 0xFF for b in packed[mid : mid + 16])
        + packed[mid + 16 :],
        "not_compressed": data,
        "empty": b"",
    }[damage]
    with pytest.raises(CorruptBodyError) as caught:
        decompress(damaged, encoding, DEFAULT)
    message = str(caught.value)
    assert f"not valid {encoding}" in message
    # Our words, not the library's.
    assert "Error -3" not in message and "zstd decompress" not in message


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
def test_mangled_bodies_are_taken_or_refused_never_anything_else(encoding: str) -> None:
    """Random bit flips, cuts and insertions in valid bodies and bombs: every outcome is the
    decompressed bytes, a CorruptBodyError or an InflatedTooLargeError, within the limit."""
    rnd = random.Random(15)
    limits = Limits(MiB, 100.0)
    seeds = [compress(body(events("m", 300), NDJSON), encoding), BOMBS[encoding](4 * MiB)]
    for i in range(800):
        mangled = bytearray(seeds[i % 2])
        for _ in range(rnd.randint(1, 4)):
            op, pos = rnd.random(), rnd.randrange(len(mangled))
            if op < 0.5:
                mangled[pos] ^= 1 << rnd.randrange(8)
            elif op < 0.75:
                del mangled[pos : pos + rnd.randint(1, 30)]
            else:
                mangled[pos:pos] = rnd.randbytes(rnd.randint(1, 10))
        try:
            out = decompress(bytes(mangled), encoding, limits)
        except InflatedTooLargeError as exc:
            assert exc.decompressed <= limits.limit(len(mangled)) + MAX_OVERSHOOT
        except CorruptBodyError:
            pass
        else:
            assert len(out) <= limits.limit(len(mangled))


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
@pytest.mark.parametrize("binding", ["ratio", "max_bytes"])
def test_a_bomb_stops_at_its_limit(encoding: str, binding: str) -> None:
    """256 MiB of zeros: decompression stops just past the binding limit, whichever it is."""
    bomb = BOMBS[encoding](256 * MiB)
    limits = Limits(4 * MiB, 1e6) if binding == "max_bytes" else Limits(512 * MiB, 20.0)
    limit = limits.limit(len(bomb))
    assert limit == (4 * MiB if binding == "max_bytes" else int(20.0 * len(bomb)))
    with pytest.raises(InflatedTooLargeError) as caught:
        decompress(bomb, encoding, limits)
    assert limit < caught.value.decompressed <= limit + MAX_OVERSHOOT
    setting = "INGEST_MAX_BODY_BYTES" if binding == "max_bytes" else "INGEST_MAX_COMPRESSION_RATIO"
    assert setting in str(caught.value)


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
def test_a_bomb_of_many_members_stops_at_its_limit(encoding: str) -> None:
    """The limit is on the whole body, not per gzip member or zstd frame."""
    member = BOMBS[encoding](4 * MiB)
    bomb = member * 16
    with pytest.raises(InflatedTooLargeError) as caught:
        decompress(bomb, encoding, Limits(8 * MiB, 1e9))
    assert 8 * MiB < caught.value.decompressed <= 8 * MiB + MAX_OVERSHOOT


def test_gzip_steps_are_bounded() -> None:
    """One gzip step yields at most GZIP_STEP bytes, so the overshoot is exactly bounded."""
    bomb = gzip_bomb(16 * MiB)
    with pytest.raises(InflatedTooLargeError) as caught:
        decompress(bomb, GZIP, Limits(MiB, 1e9))
    assert MiB < caught.value.decompressed <= MiB + GZIP_STEP


def test_a_legitimate_body_at_the_limit_is_taken() -> None:
    data = body(events("lim", 3000), JSON)
    for encoding in (GZIP, ZSTD):
        packed = compress(data, encoding)
        exact = Limits(len(data), len(data) / len(packed))
        assert decompress(packed, encoding, exact) == data
        with pytest.raises(InflatedTooLargeError):
            decompress(packed, encoding, Limits(len(data) - 1, 1e9))


def test_zstd_window_over_the_limit_is_refused_before_decompressing() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    frame = zstandard.ZstdCompressor(compression_params=params).compressobj()
    packed = b"".join(frame.compress(z) for z in zeros(2 * MiB)) + frame.flush()
    with pytest.raises(InflatedTooLargeError) as caught:
        decompress(packed, ZSTD, DEFAULT)
    assert caught.value.decompressed == 0
    assert str(ZSTD_MAX_WINDOW) in str(caught.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "identity"),
        ("", "identity"),
        ("identity", "identity"),
        ("gzip", GZIP),
        (" GZip ", GZIP),
        ("x-gzip", GZIP),
        ("zstd", ZSTD),
        ("gzip, identity", GZIP),
    ],
)
def test_content_encoding_names(header: str | None, expected: str) -> None:
    assert content_encoding(header) == expected


@pytest.mark.parametrize("header", ["br", "deflate", "compress", "gzip, zstd", "gzip, gzip"])
def test_unknown_or_stacked_encodings_are_unsupported(header: str) -> None:
    with pytest.raises(UnsupportedEncodingError, match="gzip or zstd"):
        content_encoding(header)


# -- through the app -----------------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def settings_of(data_dir: Path) -> Settings:
    return Settings.from_env({}, data_dir=str(data_dir), fsync="false", batch_interval="10ms")


@pytest.fixture
def make_client(data_dir: Path) -> Callable[..., TestClient[Litestar]]:
    def factory(**ingest: Any) -> TestClient[Litestar]:
        ingest.setdefault("ingest_api_keys", KEY)
        plugin = IngestPlugin(settings_of(data_dir), IngestSettings.from_env({}, **ingest))
        return TestClient(Litestar(plugins=[plugin]))

    return factory


def post(client: TestClient[Litestar], content: bytes, media: str, encoding: str | None) -> Any:
    headers = {"content-type": media, "x-api-key": KEY}
    if encoding is not None:
        headers["content-encoding"] = encoding
    return client.post("/ad_events", content=content, headers=headers)


def spool_files(data_dir: Path) -> list[Path]:
    return list_incoming(Layout(str(data_dir)).incoming)


def test_every_format_in_gzip_and_zstd_lands_in_the_lake(
    make_client: Callable[..., TestClient[Litestar]], data_dir: Path
) -> None:
    expected: list[str] = []
    with make_client() as client:
        for media in FORMATS:
            for encoding in (GZIP, ZSTD):
                table = events(f"{encoding}-{media.rsplit('/', 1)[-1]}", 40)
                r = post(client, compress(body(table, media), encoding), media, encoding)
                assert r.status_code == 202, r.text
                assert r.json() == {"received": 40, "accepted": 40, "rejected": []}
                expected += table.column("event_id").to_pylist()
    settings = settings_of(data_dir)
    consume_once(settings)
    con = connect(LakeLocation.from_settings(settings))
    landed = [row[0] for row in con.execute("SELECT event_id FROM events").fetchall()]
    assert sorted(landed) == sorted(expected)


def test_a_compressed_body_keeps_its_row_rules(
    make_client: Callable[..., TestClient[Litestar]],
) -> None:
    table = event_table(["ok-1", "bad-1"], time_ms=NOW_MS - 1000, country=["FR", "france"])
    with make_client() as client:
        r = post(client, compress(body(table, JSON), ZSTD), JSON, ZSTD)
    assert r.status_code == 202
    assert r.json()["rejected"] == [{"index": 1, "reason": "invalid_country"}]


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
def test_a_bomb_is_413_and_nothing_is_stored(
    make_client: Callable[..., TestClient[Litestar]], data_dir: Path, encoding: str
) -> None:
    bomb = BOMBS[encoding](256 * MiB)
    with make_client() as client:
        r = post(client, bomb, JSON, encoding)
    assert r.status_code == 413, r.text
    assert "INGEST_MAX_COMPRESSION_RATIO" in r.json()["detail"]
    assert spool_files(data_dir) == []


def test_the_body_limit_applies_to_the_decompressed_size(
    make_client: Callable[..., TestClient[Litestar]], data_dir: Path
) -> None:
    data = body(events("big", 2000), JSON)
    packed = compress(data, GZIP)
    assert len(packed) < 64 * 1024 < len(data)
    with make_client(ingest_max_body_bytes="64KiB", ingest_max_compression_ratio="1000") as c:
        r = post(c, packed, JSON, GZIP)
    assert r.status_code == 413, r.text
    assert "INGEST_MAX_BODY_BYTES" in r.json()["detail"]
    assert spool_files(data_dir) == []


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
def test_a_corrupt_body_is_400_and_shows_no_internals(
    make_client: Callable[..., TestClient[Litestar]], data_dir: Path, encoding: str
) -> None:
    packed = compress(body(events("c", 200), NDJSON), encoding)
    with make_client() as client:
        r = post(client, packed[: len(packed) // 2], NDJSON, encoding)
        plain = post(client, body(events("p", 3), JSON), JSON, encoding)  # says gzip, is not
    for answer in (r, plain):
        assert answer.status_code == 400, answer.text
        detail = answer.json()["detail"]
        assert f"not valid {encoding}" in detail
        assert str(data_dir) not in detail and "Error" not in detail
        assert set(answer.json()) == {"status_code", "detail", "request_id"}
    assert spool_files(data_dir) == []


def test_an_unknown_encoding_is_415_with_the_accepted_ones(
    make_client: Callable[..., TestClient[Litestar]],
) -> None:
    with make_client() as client:
        r = post(client, b"[]", JSON, "br")
        ok = post(client, b"[]", JSON, "identity")
    assert r.status_code == 415
    assert "Content-Encoding 'br' is not supported" in r.json()["detail"]
    assert r.headers["accept-encoding"] == "gzip, zstd, identity"
    assert ok.status_code == 202


def test_the_openapi_schema_names_the_encodings(data_dir: Path) -> None:
    from api.app import create_app

    with TestClient(create_app(settings_of(data_dir))) as client:
        schema = client.get("/docs/openapi.json").json()
    parameters = schema["paths"]["/ad_events"]["post"]["parameters"]
    [encoding] = [p for p in parameters if p["name"] == "Content-Encoding"]
    assert encoding["in"] == "header" and encoding["schema"]["enum"] == ["gzip", "zstd", "identity"]


def test_compression_ratio_setting_is_validated() -> None:
    def ratio(env: dict[str, str]) -> float:
        return IngestSettings.from_env(env).ingest_max_compression_ratio

    assert ratio({}) == 100.0
    assert ratio({"INGEST_MAX_COMPRESSION_RATIO": "250"}) == 250.0
    for bad in ("0.5", "-1", "many"):
        with pytest.raises(SettingsError, match="INGEST_MAX_COMPRESSION_RATIO"):
            IngestSettings.from_env({"INGEST_MAX_COMPRESSION_RATIO": bad})


# -- a real server's memory ----------------------------------------------------------------------
def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
def test_a_1_gib_bomb_costs_a_real_server_its_limit_not_its_size(
    tmp_path: Path, encoding: str
) -> None:
    """A real uvicorn process at the default limits (32 MiB, ratio 100) gets a body that
    expands to 1 GiB: 413, and its peak memory grows by well under the 1 GiB it would take to
    decompress it whole (the limit's 32 MiB, plus the body and the joined chunks)."""
    bomb = BOMBS[encoding](1024 * MiB)
    assert len(bomb) <= 32 * MiB  # under the body limit: only the decompression can stop it
    env = {"INGEST_API_KEYS": KEY, "FSYNC": "false"}
    with running(str(tmp_path / "data"), tmp_path / "server.log", env) as server:
        # Warm up the request path, so the peak before the bomb includes what any request costs.
        warm = events("warm", 200)
        for media in FORMATS:
            request(server.url, compress(body(warm, media), encoding), media, encoding)
        before = peak_rss(server.proc.pid)
        status, answer = request(server.url, bomb, JSON, encoding)
        after = peak_rss(server.proc.pid)
    assert status == 413, answer
    assert "INGEST_MAX_" in answer["detail"]
    assert after - before < 256 * MiB, (before, after)


def request(url: str, content: bytes, media: str, encoding: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{url}/ad_events",
        data=content,
        method="POST",
        headers={"content-type": media, "content-encoding": encoding, "x-api-key": KEY},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
