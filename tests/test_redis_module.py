"""The adevents Redis module's commands on a real redis-server: answers, growth, persistence,
replication, memory (``redis_module/adevents_keys.c``)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import redis
from redis_module_server import ModuleRedisServer, build_module

from pipeline.redis_cache import _group_order
from pipeline.redis_tables import blob, parse_records, record_args, runs


@pytest.fixture(scope="module")
def module_so() -> Path:
    return build_module()


@pytest.fixture
def server(tmp_path: Path, module_so: Path) -> Iterator[ModuleRedisServer]:
    s = ModuleRedisServer(tmp_path / "redis", module_so).start()
    yield s
    s.stop()


@pytest.fixture
def r(server: ModuleRedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=server.port)
    yield client
    client.close()


def random_keys(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sel = rng.integers(-(2**63), 2**63, n, dtype=np.int64)
    lo = rng.integers(-(2**63), 2**63, n, dtype=np.int64)
    return sel, lo


def claim(r: redis.Redis, bits: int, data: bytes, *tables: str) -> bytes:
    reply: bytes = r.execute_command("ADEVENTS.CLAIM", bits, data, *tables)
    return reply


def probe(r: redis.Redis, data: bytes, *tables: str) -> bytes:
    reply: bytes = r.execute_command("ADEVENTS.PROBE", data, *tables)
    return reply


def info(r: redis.Redis, table: str) -> list[int] | None:
    reply = r.execute_command("ADEVENTS.INFO", table)
    return None if reply is None else [int(v) for v in reply]


def test_empty(r: redis.Redis) -> None:
    assert probe(r, b"", "t") == b""
    assert probe(r, blob(*random_keys(3, seed=1)), "t", "u") == b"000"
    assert info(r, "t") is None
    assert claim(r, 4, b"", "t") == b""
    assert info(r, "t") == [4, 0, 0, info(r, "t")[3]]  # type: ignore[index]
    assert r.type("t") == b"adev-keys"


def test_claim_answers_new_then_where_each_key_is(r: redis.Redis) -> None:
    a, b = random_keys(100, seed=2), random_keys(100, seed=3)
    assert claim(r, 2, blob(*a), "gen1") == b"0" * 100
    assert claim(r, 2, blob(*b), "gen2", "gen1") == b"0" * 100
    both = blob(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    # Own table first ('1'), then the others in argument order ('2', '3', ...).
    assert claim(r, 2, both, "gen3", "gen1", "gen2") == b"2" * 100 + b"3" * 100
    assert claim(r, 2, both, "gen2", "gen1") == b"2" * 100 + b"1" * 100
    assert probe(r, both, "nothing", "gen2") == b"0" * 100 + b"2" * 100
    assert info(r, "gen3")[1] == 0  # type: ignore[index]  # found elsewhere: nothing added


def test_a_key_repeated_in_one_blob_is_new_once(r: redis.Redis) -> None:
    sel, lo = random_keys(5, seed=4)
    order = np.array([0, 1, 0, 2, 1, 1, 3, 4, 4])
    assert claim(r, 0, blob(sel[order], lo[order]), "t") == b"001011001"
    assert info(r, "t")[1] == 5  # type: ignore[index]


def test_keys_are_told_apart_by_segment_and_stored_half(r: redis.Redis) -> None:
    # Same stored half, other segment (top bits of the selector): distinct keys.
    sel = np.array([0, 1 << 62, 0, 1], dtype=np.int64)  # the last shares segment 0 with the first
    lo = np.array([7, 7, 0, 7], dtype=np.int64)
    assert claim(r, 4, blob(sel, lo), "t") == b"0001"
    # 0 is stored as 1 (0 marks an empty slot): the one pair of halves the table merges.
    assert claim(r, 4, blob(np.zeros(1, np.int64), np.ones(1, np.int64)), "t") == b"1"


def test_growth_through_many_rehashes_keeps_every_key(r: redis.Redis) -> None:
    n = 60_000
    sel, lo = random_keys(n, seed=5)
    for start in range(0, n, 1_000):  # one segment: grows from 8 slots through ~30 rehashes
        part = slice(start, start + 1_000)
        assert claim(r, 0, blob(sel[part], lo[part]), "one") == b"0" * 1_000
        assert probe(r, blob(sel[: start + 1_000], lo[: start + 1_000]), "one") == b"1" * (
            start + 1_000
        )
    bits, keys, slots, _ = info(r, "one")  # type: ignore[misc]
    assert (bits, keys) == (0, n)
    assert 0.5 <= keys / slots <= 0.75
    assert claim(r, 0, blob(sel, lo), "one") == b"1" * n


def test_malformed_arguments_are_errors_not_crashes(r: redis.Redis) -> None:
    good = blob(*random_keys(2, seed=6))
    for bad in (b"x", good[:-1], good + b"\0" * 8):
        with pytest.raises(redis.ResponseError, match="multiple of 16"):
            claim(r, 0, bad, "t")
        with pytest.raises(redis.ResponseError, match="multiple of 16"):
            probe(r, bad, "t")
    for bits in ("-1", "21", "x"):
        with pytest.raises(redis.ResponseError, match="bits"):
            r.execute_command("ADEVENTS.ADD", bits, good, "t")
    claim(r, 3, good, "t")
    with pytest.raises(redis.ResponseError, match="ADEVENTS_BITS"):
        claim(r, 4, good, "t")
    r.set("s", "a string")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        claim(r, 0, good, "s")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        claim(r, 0, good, "t2", "s")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        probe(r, good, "s")
    with pytest.raises(redis.ResponseError, match="wrong number"):
        r.execute_command("ADEVENTS.CLAIM", 0, good)
    with pytest.raises(redis.ResponseError, match="too many"):
        claim(r, 0, good, *[f"t{i}" for i in range(65)])
    assert r.ping()
    assert info(r, "t2") is None  # refused before anything was written


def test_commands_declare_their_keys_and_flags(r: redis.Redis) -> None:
    """Cluster routing and scripts rely on the key positions; replicas and OOM on the flags."""
    data = blob(*random_keys(1, seed=7))
    assert r.command_getkeys("ADEVENTS.CLAIM", 4, data, "a", "b", "c") == ["a", "b", "c"]
    assert r.command_getkeys("ADEVENTS.ADD", 4, data, "a") == ["a"]
    assert r.command_getkeys("ADEVENTS.PROBE", data, "a", "b") == ["a", "b"]
    assert r.command_getkeys("ADEVENTS.INFO", "a") == ["a"]
    commands = r.command()
    flags = {
        name: set(commands[name.lower()]["flags"])
        for name in ("ADEVENTS.CLAIM", "ADEVENTS.ADD", "ADEVENTS.PROBE")
    }
    assert {"write", "denyoom"} <= flags["ADEVENTS.CLAIM"]
    assert {"write", "denyoom"} <= flags["ADEVENTS.ADD"]
    assert "readonly" in flags["ADEVENTS.PROBE"]
    specs = [set(spec[b"flags"]) for spec in commands["adevents.claim"]["key_specifications"]]
    assert specs == [{b"RW", b"insert"}, {b"RO", b"access"}]  # own table written, others read
    assert commands["adevents.claim"]["arity"] == -4


def test_rdb_round_trip(r: redis.Redis) -> None:
    sel, lo = random_keys(50_000, seed=8)
    r.execute_command("ADEVENTS.ADD", 6, blob(sel, lo), "big")
    claim(r, 0, blob(sel[:10], lo[:10]), "small")
    claim(r, 0, b"", "empty")
    r.execute_command("DEBUG", "RELOAD")
    assert probe(r, blob(sel, lo), "big") == b"1" * len(sel)
    assert probe(r, blob(sel, lo), "small")[:10] == b"1" * 10
    assert info(r, "big")[:2] == [6, 50_000]  # type: ignore[index]
    assert info(r, "empty")[:2] == [0, 0]  # type: ignore[index]
    _, keys, slots, _ = info(r, "big")  # type: ignore[misc]
    assert 0.5 <= keys / slots <= 0.75  # reloaded at the load of a grown table, not sparser


def test_rdb_from_before_salts_loads(tmp_path: Path, module_so: Path) -> None:
    """An RDB the module wrote before tables had salts (encoding 0, tests/data; written with
    these random_keys seeds) loads: every key found, in a salted table."""
    workdir = tmp_path / "old"
    workdir.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "adevents-keys-encver0.rdb", workdir / "dump.rdb")
    server = ModuleRedisServer(workdir, module_so).start()
    client = redis.Redis(port=server.port)
    try:
        for table, bits, n, seed in (("wide", 4, 3_000, 100), ("narrow", 0, 500, 101)):
            sel, lo = random_keys(n, seed=seed)
            assert probe(client, blob(sel, lo), table) == b"1" * n
            assert info(client, table)[:2] == [bits, n]  # type: ignore[index]
            fresh, fresh_lo = random_keys(n, seed=seed + 10)
            assert probe(client, blob(fresh, fresh_lo), table) == b"0" * n
        assert info(client, "empty")[:2] == [2, 0]  # type: ignore[index]
        crafted = crafted_blob(2_000)
        client.execute_command("ADEVENTS.ADD", 4, crafted, "wide")
        assert displacement(client, "wide") < 3 * 5_000
    finally:
        client.close()
        server.stop()


def crafted_blob(n: int) -> bytes:
    """Keys crafted against the public fingerprint: one segment and one home slot, unkeyed."""
    rng = np.random.default_rng(4)
    sel = rng.integers(0, 2**52, n, dtype=np.int64)  # the top 12 bits 0
    lo = rng.integers(0, 2**40, n, dtype=np.int64) | np.int64(0x123456 << 40)
    return blob(sel, lo)


def displacement(r: redis.Redis, table: str) -> int:
    return int(r.execute_command("ADEVENTS.DISPLACEMENT", table))


def test_crafted_keys_do_not_pile_up_before_or_after_a_reload(r: redis.Redis) -> None:
    """Each table has its own secret salts, so keys crafted to share a place spread as random
    keys do (slots past home, summed: ~n/2 to 1.5n, not the n^2/2 of one probe run). A reload
    keeps the salts (keys stay in their segments, so every key is still found) and the
    spread."""
    n = 20_000
    crafted = crafted_blob(n)
    r.execute_command("ADEVENTS.ADD", 4, crafted, "crafted")
    sel, lo = random_keys(n, seed=12)
    r.execute_command("ADEVENTS.ADD", 4, blob(sel, lo), "random")
    for _ in range(2):
        assert displacement(r, "crafted") < 2 * displacement(r, "random") < 3 * n
        r.execute_command("DEBUG", "RELOAD")
    assert probe(r, crafted, "crafted") == b"1" * n
    assert r.execute_command("ADEVENTS.DISPLACEMENT", "missing") is None


def test_aof_rewrite_round_trip(tmp_path: Path, module_so: Path) -> None:
    server = ModuleRedisServer(
        tmp_path / "aof", module_so, "--appendonly", "yes", "--aof-use-rdb-preamble", "no"
    ).start()
    client = redis.Redis(port=server.port)
    try:
        sel, lo = random_keys(70_000, seed=9)  # more than one emitted ADEVENTS.ADD (64k keys)
        client.execute_command("ADEVENTS.ADD", 2, blob(sel, lo), "t")
        claim(client, 0, b"", "empty")
        client.bgrewriteaof()
        deadline = time.monotonic() + 60
        while int(client.info("persistence")["aof_rewrite_in_progress"]) or int(
            client.info("persistence")["aof_rewrite_scheduled"]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.execute_command("DEBUG", "LOADAOF")
        assert probe(client, blob(sel, lo), "t") == b"1" * len(sel)
        assert info(client, "t")[:2] == [2, 70_000]  # type: ignore[index]
        assert info(client, "empty")[:2] == [0, 0]  # type: ignore[index]
    finally:
        client.close()
        server.stop()


def test_writes_reach_a_replica(tmp_path: Path, module_so: Path, r: redis.Redis) -> None:
    primary_port = r.connection_pool.connection_kwargs["port"]
    replica = ModuleRedisServer(
        tmp_path / "replica", module_so, "--replicaof", "127.0.0.1", str(primary_port)
    ).start()
    client = redis.Redis(port=replica.port)
    try:
        sel, lo = random_keys(1_000, seed=10)
        claim(r, 1, blob(sel[:500], lo[:500]), "t")
        r.execute_command("ADEVENTS.ADD", 1, blob(sel[500:], lo[500:]), "t")
        r.wait(1, 10_000)
        deadline = time.monotonic() + 30
        while probe(client, blob(sel, lo), "t") != b"1" * 1_000:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(redis.ReadOnlyError):
            claim(client, 1, blob(sel, lo), "t")
    finally:
        client.close()
        replica.stop()


def test_memory_usage_at_most_16_bytes_a_key(r: redis.Redis) -> None:
    """Issue 12: at most 16 bytes a key in Redis, by the type's own count (MEMORY USAGE) and
    by the server's (used_memory), after 1M keys claimed in batches."""
    n, batch = 1_000_000, 50_000
    before = int(r.info("memory")["used_memory"])
    for start in range(0, n, batch):
        sel, lo = random_keys(batch, seed=1_000 + start)
        claim(r, 12, blob(sel, lo), "t")  # 4096 segments of ~244 keys: as the cache sizes them
    per_key = r.memory_usage("t", samples=0) / n  # type: ignore[operator]
    assert 10.6 <= per_key <= 16, per_key
    used = (int(r.info("memory")["used_memory"]) - before) / n
    assert used <= 16, used


def test_commands_leak_nothing(r: redis.Redis) -> None:
    """Thousands of commands that add nothing leave Redis's memory where it was: every key a
    command opens is closed (an unclosed key handle was ~160 B a key a command)."""
    sel, lo = random_keys(100, seed=11)
    data = blob(sel, lo)
    claim(r, 2, data, "t")

    def commands(times: int) -> None:
        for _ in range(times):
            assert claim(r, 2, data, "t", "u", "v") == b"1" * 100
            probe(r, data, "t", "u")
            r.execute_command("ADEVENTS.ADD", 2, data, "t")
            info(r, "t")

    commands(1_000)  # the server's own buffers settle
    before = int(r.info("memory")["used_memory"])
    commands(3_000)
    grown = int(r.info("memory")["used_memory"]) - before
    assert grown < 64 * 1024, grown  # leaking handles: ~3 MB


def test_a_claim_that_adds_touches_watchers(r: redis.Redis, server: ModuleRedisServer) -> None:
    """A table written by a claim is a modified key for WATCH (and keyspace bookkeeping)."""
    sel, lo = random_keys(2, seed=12)
    claim(r, 0, blob(sel[:1], lo[:1]), "t")
    other = redis.Redis(port=server.port)
    with r.pipeline() as pipe:
        pipe.watch("t")
        claim(other, 0, blob(sel[1:], lo[1:]), "t")
        pipe.multi()
        pipe.ping()
        with pytest.raises(redis.WatchError):
            pipe.execute()
    other.close()


def test_table_claim_records_round_trip() -> None:
    """The table layout's claim records are binary (members and positions as int64): any byte
    may occur in them, ':' included, and each attempt's mask says what it won."""
    colons = int.from_bytes(b"::::;|,:", "little", signed=True)
    part = pl.DataFrame({"member": [-5, colons, 2**62], "position": [10, 11, 12]})
    members, positions = record_args(part)
    assert isinstance(members, bytes) and isinstance(positions, bytes)
    first = b"3:" + members + positions + b"020"  # won -5 and 2**62; the other was held
    redo = b"1:" + members[8:16] + positions[8:16] + b"1"
    listed, won = parse_records([b"rec", first + redo])
    assert listed == {"rec": listed["rec"]} and listed["rec"].tolist() == [10, 11, 12, 11]
    lo = np.array([-5, colons, 2**62], dtype=np.int64).view(np.uint64)
    assert won.holds(lo, np.array([10, 11, 12])).tolist() == [True, False, True]


@pytest.mark.parametrize("span", [1, 3, 2_047, 2_048, 100_000])
def test_claim_order_and_generation_runs_match_the_general_forms(span: int) -> None:
    """A claim's rows in (group, generation) order, stable (a key repeated in a batch stays
    new at its first row), by the 16-bit radix key when the generations fit, else lexsort;
    and each group's generation runs, as a group_by over the sorted rows gives them."""
    rng = np.random.default_rng(span)
    for size in (0, 1, 2, 1_000):
        group = rng.integers(0, 16, size).astype(np.int64)
        gens = (10**9 + rng.integers(0, span, size)).astype(np.int64)
        order = _group_order(group, gens)
        assert (order == np.lexsort((gens, group))).all()
        for g in range(16):
            part = pl.DataFrame({"slice": gens[order][group[order] == g]})
            counts = part.group_by("slice", maintain_order=True).agg(n=pl.len())
            ends = np.cumsum(counts["n"].to_numpy()).tolist()
            want = [
                (int(s), start, end)
                for s, start, end in zip(counts["slice"], [0, *ends][:-1], ends, strict=True)
            ]
            assert runs(part) == want
