"""A smoke run of ``adevents bench`` so it cannot rot (its figures are not asserted: noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.bench import STAGES


@pytest.mark.parametrize("key_cache", ["embedded", "redis"])
def test_bench_smoke_run_reconciles(tmp_path: Path, key_cache: str, redis_url: str) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "REDIS_URL": redis_url} if key_cache == "redis" else dict(os.environ)
    env.pop("DATA_DIR", None)
    if key_cache == "embedded":
        env.pop("REDIS_URL", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "bench",
            "--events",
            "60000",
            "--batch-size",
            "10000",
            "--naive-events",
            "5000",
            "--key-cache",
            key_cache,
            "--no-progress",
            "--json",
            str(out),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["reconciled"] is True
    assert result["duplicates_dropped"] == result["duplicates_expected"] > 0
    assert result["events_per_second"] > 0
    assert result["ceiling_events_per_second"] > 0 and result["naive_events_per_second"] > 0
    assert list(result["stage_seconds"]) == list(STAGES)
    assert 0 < result["groups"] <= result["files"]
    assert result["key_cache_bytes_per_key"] > 0
    assert "ratio to ceiling" in proc.stdout


def test_bench_refuses_a_data_dir_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "something").write_text("x")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "bench",
            "--events",
            "1000",
            "--key-cache",
            "embedded",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "not empty" in proc.stderr
