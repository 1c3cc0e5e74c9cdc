"""The adevents Redis module for tests: built once (``make -C redis_module``), loaded into
private redis-servers."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
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

    def extra_args(self) -> list[str]:
        return ["--enable-debug-command", "local", "--loadmodule", str(self.module), *self.extra]
