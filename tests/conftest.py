"""Shared fixtures: settings factories, a real Redis with a per-test key prefix, spool helpers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import redis
from s3_server import S3Server

from lake.location import LakeLocation
from pipeline.settings import Settings

# The suite's own DATA_DIRs are small and the machine's free space is not the subject of most
# tests: the production default (1GiB) would make /health 503 on a nearly full CI disk. Tests of
# disk pressure set DISK_MIN_FREE (or disk_min_free) themselves.
os.environ.setdefault("DISK_MIN_FREE", "16MiB")

#: Most workers the suite starts, whatever the machine (each runs real consumers and servers).
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than cores, at most MAX_WORKERS. Much of the suite waits on
    child processes (kill -9 loops, restarted redis-servers, the real-time demo), so a worker per
    core leaves cores idle: on 2 cores the whole suite took 460 s with 3 workers against 531 s
    with 2 (same tree, back to back)."""
    return min((os.cpu_count() or 1) + 1, MAX_WORKERS)


TEST_REDIS_URL = os.environ.get("ADEVENTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_or_fail(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {url} is unreachable and CI=true: {exc}")
        pytest.skip(f"Redis at {url} is unreachable (set CI=true to make this a failure)")
    return client


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared test Redis; keys are cleaned up by the ``redis_prefix`` fixture."""
    _redis_or_fail(TEST_REDIS_URL).close()
    yield TEST_REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, removed afterwards."""
    prefix = f"adtest-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        client.unlink(key)
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, for tests that restart, kill or flush Redis."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def extra_args(self) -> list[str]:
        """More redis-server arguments (a subclass loads a module)."""
        return []

    def start(self) -> Self:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not on PATH; it is needed to test Redis restarts")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Its log in a file: a server that does not start (a module that fails to load) says
        # why there.
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(log),
                *self.extra_args(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = log.read_text() if log.exists() else ""
                    raise RuntimeError(f"redis-server did not start:\n{text}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same port: Redis comes back empty."""
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Factory of Settings on a fresh DATA_DIR under tmp_path, ignoring the caller's env."""

    def factory(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", str(tmp_path / "data"))
        overrides.setdefault("fsync", False)
        overrides.setdefault("max_events_per_second", 0)
        overrides.setdefault("disk_min_free", 16 * 1024**2)
        # A fresh Redis prefix is an empty cache: every start rebuilds, first sleeping the grace
        # (2 s by default) for other consumers' commits under way. A test's consumers wait for
        # no one, and valid() keeps a rebuild exact whatever the grace.
        overrides.setdefault("rebuild_grace", 0.05)
        return Settings.from_env({}, **overrides)

    return factory


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One real S3 server (moto, loopback, IAM auth on) for the session; each test takes a
    fresh prefix of its bucket through ``s3.env()``."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> LakeLocation:
    """A fresh lake, once on local disk and once under a fresh prefix of the S3 server."""
    if request.param == "local":
        return LakeLocation.from_env({"LAKE_URI": str(tmp_path / "lake")})
    server: S3Server = request.getfixturevalue("s3")
    return LakeLocation.from_env(server.env())
