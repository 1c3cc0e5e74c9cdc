"""The Redis key cache, its rebuild lock and consumer slots on a real 3-primary Redis Cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import redis
from conftest import free_port
from hardening import lake_table, ledger, wait_for
from redis_module_server import build_module
from test_scaleout import REBUILT, wait_stopped

from generator.runner import generate
from lake.location import LakeLocation
from pipeline.fingerprint import Keys, empty_keys
from pipeline.groups import waiting_entries
from pipeline.leases import RedisLeases, process_space
from pipeline.reconcile import reconcile
from pipeline.redis_cache import GROUPS, REBUILD_LOCK, RedisKeyCache
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter
from pipeline.testing import event_table


@dataclass
class Cluster:
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]
    #: The adevents module is loaded on every primary (the key cache uses its tables).
    module: bool = False

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def nodes(self) -> list[redis.Redis]:
        return [redis.Redis(port=p) for p in self.ports]

    def flush_all_primaries(self) -> None:
        for node in self.nodes():
            node.flushall()
            node.close()


def _wait_cluster_ok(ports: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        node = redis.Redis(port=port)
        while node.cluster("info").get("cluster_state") != "ok":
            assert time.monotonic() < deadline, f"cluster not ok on {port}"
            time.sleep(0.1)
        node.close()


@contextlib.contextmanager
def _running_cluster(work: Path, module: Path | None = None) -> Iterator[Cluster]:
    """Three primaries, no replicas, on free ports (and free cluster-bus ports), with the
    ``module`` loaded if given."""
    extra = [] if module is None else ["--loadmodule", str(module)]
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli must be on PATH to test Redis Cluster")
    ports, procs = [], []
    try:
        for _ in range(3):
            port, bus = free_port(), free_port()
            node_dir = work / str(port)
            node_dir.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--cluster-port",
                        str(bus),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(node_dir),
                        *extra,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            ports.append(port)
        for port in ports:
            node = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    node.ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, f"redis-server on {port} did not start"
                    time.sleep(0.05)
            node.close()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait_cluster_ok(ports)
        yield Cluster(ports, procs, module is not None)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three primaries without the adevents module: the bucket-set layout."""
    with _running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three primaries with the adevents module loaded: the table layout."""
    work = tmp_path_factory.mktemp("module-cluster")
    with _running_cluster(work, build_module()) as running:
        yield running


@pytest.fixture(params=["sets", "module"])
def any_cluster(request: pytest.FixtureRequest) -> Cluster:
    """The cluster without the module, then the one with it (the tests of the key layout)."""
    running: Cluster = request.getfixturevalue(
        "cluster" if request.param == "sets" else "module_cluster"
    )
    return running


def _cache(cluster: Cluster, prefix: str, **kw: float) -> RedisKeyCache:
    return RedisKeyCache.from_url(
        cluster.url, prefix=prefix, window_ms=3_600_000, slice_ms=1_000, **kw
    )


def _random_keys(n: int, first_slice: int, seed: int) -> Keys:
    rng = np.random.default_rng(seed)
    ms = first_slice * 1_000 + rng.integers(0, 20_000, n)
    hi = rng.integers(0, 2**64, n, dtype=np.uint64)
    lo = rng.integers(0, 2**64, n, dtype=np.uint64)
    return Keys(ms // 1_000, hi, lo, ms)


def _consume(data: Path, url: str, prefix: str, **extra: str) -> subprocess.Popen[bytes]:
    """``adevents consume --once`` on the cluster; groups of two spool files unless told."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADEVENTS_")}
    env |= {
        "DATA_DIR": str(data),
        "REDIS_URL": url,
        "REDIS_KEY_PREFIX": prefix,
        "FSYNC": "false",
        "MAX_EVENTS_PER_SECOND": "0",
        "COMMIT_TARGET_ROWS": "10000",
        "REBUILD_GRACE": "100ms",
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "consume", "--once"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes]) -> str:
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err, err.decode()
    return err.decode()


def _spool(data: Path, truth: Path, events: int, seed: int) -> None:
    settings = Settings.from_env({}, data_dir=str(data), dup_rate=0.02)
    generate(settings, events=events, rate=0, batch_size=5_000, seed=seed, truth=truth)


# -- the key layout on a cluster ------------------------------------------------------------
def test_keys_spread_over_every_primary_and_each_operation_stays_in_one_slot(
    any_cluster: Cluster,
) -> None:
    cluster = any_cluster
    cache = _cache(cluster, "layout")
    cache.rebuild(empty_keys(), None)
    assert cache.tables == cluster.module  # detected on every primary
    keys = _random_keys(50_000, 100, seed=1)
    assert cache.claim("b1", keys).all()  # one EVALSHA per group: alive, record, floor, sets
    assert cache.claim("b1", keys).all()  # idempotent per batch
    assert not cache.claim("b2", keys).any()
    cache.finish("b1", 119_999)
    cache.finish("b2", 119_999)
    assert cache.stats().keys == 50_000
    per_node = [
        sum(1 for _ in n.scan_iter(match="layout:{g*", count=1000)) for n in cluster.nodes()
    ]
    assert all(count > 0 for count in per_node), per_node  # 16 group tags over 3 primaries
    # The claim records of a finished batch are gone from every slot.
    for node in cluster.nodes():
        assert not list(node.scan_iter(match="layout:{g*}:claim:*"))
    cache.close()


def test_scripts_are_loaded_on_every_primary_and_reloaded_after_a_flush(
    any_cluster: Cluster,
) -> None:
    cluster = any_cluster
    cache = _cache(cluster, "scripts")
    cache.rebuild(empty_keys(), None)
    claim_sha = cache._table_claim_sha if cache.tables else cache._claim_sha
    for node in cluster.nodes():
        assert node.script_exists(claim_sha, cache._wm_sha) == [True, True]
        node.script_flush()
    assert cache.claim("s1", _random_keys(1_000, 10, seed=2)).all()
    cache.finish("s1", 30_000)
    assert cache.watermark() == 30_000
    cache.close()


def test_rebuild_scans_and_unlinks_on_every_primary(any_cluster: Cluster) -> None:
    cluster = any_cluster
    cache = _cache(cluster, "rb")
    cache.rebuild(empty_keys(), None)
    assert cache.claim("old", _random_keys(20_000, 500, seed=3)).all()
    client = redis.RedisCluster.from_url(f"redis://127.0.0.1:{cluster.ports[0]}")
    for g in range(GROUPS):  # strays in every group's slot, so on every primary
        client.set(f"rb:{{g{g}}}:stray", "x")
    fresh = _random_keys(5_000, 600, seed=4)
    cache.rebuild(fresh, 619_999)
    for node in cluster.nodes():
        assert not list(node.scan_iter(match="rb:{g*}:stray"))
        assert not list(node.scan_iter(match="rb:{g*}:claim:*"))
        assert not list(node.scan_iter(match="rb:{g*}:5[01][0-9]:*"))  # the old slices' sets
        assert not list(node.scan_iter(match="rb:{g*}:t:5[01][0-9]"))  # or tables
    assert cache.stats().keys == 5_000
    assert not cache.claim("again", fresh).any()
    client.close()
    cache.close()


# -- the rebuild lock ------------------------------------------------------------------------
def test_the_rebuild_lock_on_a_cluster(cluster: Cluster) -> None:
    """The rebuild lock (a lease under the ``{l}`` tag) on a cluster: exclusive, renewed while
    held, taken once its holder elsewhere lets it expire, taken over at once from a dead holder
    of this host."""
    client = redis.RedisCluster.from_url(f"redis://127.0.0.1:{cluster.ports[0]}")
    a = RedisLeases(client, prefix="lz", owner="a", timeout_s=3.0)
    b = RedisLeases(client, prefix="lz", owner="b", timeout_s=3.0)
    lease = a.acquire(REBUILD_LOCK)
    assert lease is not None and a.held(lease)
    assert b.acquire(REBUILD_LOCK) is None  # exclusive
    # The heartbeat renews it: its time to live, falling until then, goes back up.
    key = f"lz:{{l}}:{REBUILD_LOCK}"
    lowest = [int(client.pttl(key))]

    def renewed() -> bool:
        ttl = int(client.pttl(key))
        lowest.append(min(lowest[-1], ttl))
        return ttl > lowest[-2]

    wait_for(renewed, "the heartbeat to renew the lock")
    assert a.held(lease) and b.acquire(REBUILD_LOCK) is None
    a.release(lease)
    assert not a.held(lease)
    taken = b.acquire(REBUILD_LOCK)
    assert taken is not None
    b.release(taken)
    # A holder elsewhere: held off until its lease expires (here: made to expire now).
    client.set(key, "elsewhere@1|1|gone|x")
    assert b.acquire(REBUILD_LOCK) is None
    client.pexpire(key, 1)
    wait_for(lambda: client.exists(key) == 0, "the lease to expire")
    taken = b.acquire(REBUILD_LOCK)
    assert taken is not None
    b.release(taken)
    # A holder of this host that died: taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.set(key, f"{process_space()}|{dead.pid}|gone|x", px=60_000)
    assert b.acquire(REBUILD_LOCK) is not None
    a.close()
    b.close()
    client.close()


# -- consumers on a cluster ---------------------------------------------------------------
def test_two_slots_land_a_spool_with_duplicates_exactly_once(
    any_cluster: Cluster, tmp_path: Path
) -> None:
    """Slots 0 and 1 of one spool share the cluster. Each stops once it has claimed its second
    group (so both own files, whoever started first), then they race over the rest."""
    cluster = any_cluster
    data, truth = tmp_path / "data", tmp_path / "truth.parquet"
    _spool(data, truth, 300_000, seed=11)
    procs = [
        _consume(
            data, cluster.url, "two", CONSUMER_SLOT=str(slot), ADEVENTS_STOP_AT="after_claim:2"
        )
        for slot in range(2)
    ]
    for proc in procs:
        wait_stopped(proc)
    for proc in procs:
        os.kill(proc.pid, signal.SIGCONT)
    for proc in procs:
        _finish(proc)
    assert not waiting_entries(data / "incoming")
    result = reconcile(data, truth)
    assert result.stored == result.truth_distinct_valid and result.expected_duplicates > 0
    rows = ledger(data)
    assert rows["source_file"].is_unique().all()
    assert rows["consumer"].n_unique() == 2
    # The consumers chose the layout the cluster offers: module tables only where it is loaded.
    tables = [list(node.scan_iter(match="two:{g*}:t:*")) for node in cluster.nodes()]
    assert all(tables) if cluster.module else not any(tables), tables


def test_flush_of_every_primary_triggers_a_rebuild(cluster: Cluster, tmp_path: Path) -> None:
    data, truth = tmp_path / "data", tmp_path / "truth.parquet"
    _spool(data, truth, 100_000, seed=12)
    _finish(_consume(data, cluster.url, "fl"))
    reconcile(data, truth)
    cluster.flush_all_primaries()
    # Re-sends of stored events (with their event_time, as the contract says) and new ones.
    stored = lake_table(data, "events")
    again = stored.sample(2_000, seed=1).sort("event_time")
    ids = again["event_id"].to_list() + [f"after-flush-{i}" for i in range(1_000)]
    times = again["event_time"].dt.epoch("ms").to_list() + [int(time.time() * 1000) - 1_000] * 1_000
    path = SpoolWriter(data / "incoming", "resend").write(event_table(ids, time_ms=times))
    err = _finish(_consume(data, cluster.url, "fl"))
    assert REBUILT in err, err
    assert not waiting_entries(data / "incoming")
    row = ledger(data).row(by_predicate=pl.col("source_file") == path.name, named=True)
    assert (row["accepted"], row["duplicates"]) == (1_000, 2_000)
    events = lake_table(data, "events")
    assert events["event_id"].is_unique().all()
    assert len(events) == len(stored) + 1_000
    cache = _cache(cluster, "fl")
    assert not cache.needs_rebuild()
    cache.close()


def test_killed_consumer_on_a_cluster_redoes_its_group(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 right after a group's events commit; restarted on its slot, the consumer redoes
    the group (its keys restored into the cluster from the events table) and the lake
    reconciles."""
    data, truth = tmp_path / "data", tmp_path / "truth.parquet"
    _spool(data, truth, 200_000, seed=13)
    first = _consume(
        data,
        cluster.url,
        "kill",
        COMMIT_TARGET_ROWS="20000",
        ADEVENTS_CRASH_AT="after_events_commit:3",
    )
    first.communicate(timeout=180)
    assert first.returncode == -signal.SIGKILL
    assert waiting_entries(data / "incoming")
    _finish(_consume(data, cluster.url, "kill", COMMIT_TARGET_ROWS="20000"))
    result = reconcile(data, truth)
    assert result.stored == result.truth_distinct_valid


@pytest.mark.parametrize("kind", ["single", "cluster", "unreachable"])
def test_health_and_metrics_reach_the_key_cache(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """/health pings and /metrics sizes the Redis REDIS_URL names, a cluster as well as one
    server (both through pipeline.redis_client); an unreachable one is unhealthy and NaN."""
    from api.health import HealthChecker
    from api.metrics import Metrics
    from queries.lake import Lake

    if kind == "cluster":
        url = request.getfixturevalue("cluster").url
    elif kind == "single":
        url = request.getfixturevalue("redis_url")
    else:
        url = f"redis+cluster://127.0.0.1:{free_port()}"
    settings = Settings.from_env({}, data_dir=str(tmp_path), redis_url=url)
    lake = Lake(LakeLocation.from_settings(settings), data_dir=settings.data_dir)
    checker, metrics = HealthChecker(settings, lake), Metrics(settings, lake)
    try:
        health = checker.check()
        sizes = [
            line.split()[-1]
            for line in metrics.render().decode().splitlines()
            if line.startswith('adevents_key_cache_bytes{cache="redis"} ')
        ]
    finally:
        checker.close()
        lake.close()
    assert health.key_cache.kind == "redis"
    assert len(sizes) == 1
    if kind == "unreachable":
        assert not health.key_cache.ok
        assert "key_cache_unavailable" in health.reasons
        assert sizes == ["NaN"]
    else:
        assert health.key_cache.ok, health.key_cache.error
        assert "key_cache_unavailable" not in health.reasons
        assert float(sizes[0]) > 0
