"""`adevents serve --workers N` and the API load benchmark, run for real (tiny) so neither rots."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_load_benchmark_runs_against_several_workers(tmp_path: Path) -> None:
    """bench/api_load.py builds a lake, compacts and rolls it up, starts `adevents serve
    --workers 2` and loads every endpoint from two processes: all 200s, numbers printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "api_load.py"),
            "--data-dir",
            str(tmp_path / "lake"),
            "--events",
            "20000",
            "--prepare",
            "--workers",
            "2",
            "--processes",
            "2",
            "--clients",
            "4",
            "--seconds",
            "0.3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "server: 2 worker(s); load: 2 process(es)" in out
    # Each job's one-line summary (their fields are the jobs' own business).
    assert re.search(r"^compacted tables=\d+ ", out, re.MULTILINE), out
    assert re.search(r"^rollup \w+=\d+ ", out, re.MULTILINE), out
    assert re.search(r"lake: 19,\d{3} events", out), out
    lines = [line for line in out.splitlines() if " req/s " in line]
    prefixes = ["/health", "/ad_events/latest", "/campaigns/", "/ad_events/by_campaign/"]
    assert len(lines) == 4 and all(ln.startswith(p) for ln, p in zip(lines, prefixes, strict=True))
    assert all(line.rstrip().endswith("5xx 0") for line in lines), out


@pytest.mark.parametrize("chosen", [None, "system"])
def test_the_api_allocates_arrow_memory_with_jemalloc_unless_told_otherwise(
    tmp_path: Path, chosen: str | None
) -> None:
    """The server is built with Arrow's jemalloc pool (mimalloc made a decode in ten take
    10-15 times as long): ARROW_DEFAULT_MEMORY_POOL is set before pyarrow is first imported,
    in the process and in the environment uvicorn's workers inherit; an operator's choice
    stands."""
    code = (
        "import argparse, os\n"
        "from api.command import build_server\n"
        "from pipeline.settings import Settings\n"
        f"settings = Settings.from_env({{'DATA_DIR': {str(tmp_path)!r}}})\n"
        "build_server(argparse.Namespace(host='127.0.0.1', port=0, access_log=False), settings)\n"
        "import pyarrow as pa\n"
        "print(pa.default_memory_pool().backend_name, os.environ['ARROW_DEFAULT_MEMORY_POOL'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    env |= {"PYTHONPATH": str(ROOT)} | ({"ARROW_DEFAULT_MEMORY_POOL": chosen} if chosen else {})
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pool = chosen or "jemalloc"
    assert done.stdout.split() == [pool, pool]
