"""The adevents Redis module for tests: built once (``make -C redis_module``), loaded into
private redis-servers."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import RedisServer

MODULE_DIR = Path(__file__).resolve().parent.parent / "redis_module"
MODULE_SO = MODULE_DIR / "adevents_keys.so"
_built = threading.Lock()


def build_module() -> Path:
    """The module's .so, built if missing or stale (make decides). Without a C compiler the
    test is skipped, or fails under CI=true (CI must test the module)."""
    with _built:
        missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
        if missing:
            message = f"{' and '.join(missing)} not on PATH: cannot build the Redis module"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{message} and CI=true")
            pytest.skip(message)
        # pytest-xdist workers build at once on a fresh checkout: one builds, the others wait
        # for it (the Makefile also links to a temporary name and renames, so a server never
        # loads a half-written .so).
        with (MODULE_DIR / ".build.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = subprocess.run(
                ["make", "-C", str(MODULE_DIR)], capture_output=True, text=True, check=False
            )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "warning" not in done.stderr, done.stderr
        return MODULE_SO


class ModuleRedisServer(RedisServer):
    """A private redis-server with the adevents module loaded (and DEBUG allowed locally, for
    ``DEBUG RELOAD``)."""

    def __init__(self, workdir: Path, module: Path, *extra: str) -> None:
        super().__init__(workdir)
        self.module = module
        self.extra = extra

    def start(self) -> ModuleRedisServer:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not on PATH; it is needed to test the Redis module")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # stderr to a file: a module that fails to load says why there.
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
                "--enable-debug-command",
                "local",
                "--loadmodule",
                str(self.module),
                "--logfile",
                str(log),
                *self.extra,
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
                    message = f"redis-server with the module did not start:\n{text}"
                    raise RuntimeError(message) from None
                time.sleep(0.05)
        client.close()
        return self
