"""Soak: run ``adevents demo`` for an hour and sample the read latencies every 30 s.

Issue 10's small-files target: the dashboard, latest, top and stats latencies at 60 minutes stay
within 1.5x of those at 5 minutes. The demo runs as a new user starts it (generator at
EVENTS_PER_SECOND in BATCH_INTERVAL batches, one consumer, the scheduler, the API) on a fresh
DATA_DIR; each sample times every endpoint (best of three requests, so one GC pause does not
decide a sample), counts each Delta table's live files, and reads the resident memory of every
process of the demo (so memory that grows with the volume shows, as the scheduler's once did).
The demo's log (INFO: a line per job run, with its seconds) is kept as ``DATA_DIR/demo.log``.

    python bench/soak.py --minutes 60 --out soak.json

The verdict compares the median of the samples in minutes 4-6 with those in the last two
minutes, per endpoint, and exits 1 when one is above ``--max-ratio``. It also reports the
first of each sample's three requests (the one that meets a new table version), which the
verdict does not judge.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

ENDPOINTS = {
    "dashboard": "/",
    "latest": "/ad_events/latest?limit=100",
    "top": "/campaigns/top?limit=10",
    "stats": "/campaigns/{campaign}/stats",
}
TABLES = ("events", "quarantine", "ledger")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    return time.perf_counter() - started, body


def wait_ready(base: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            get(base + "/ad_events/latest?limit=1")
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the demo's API never answered")


def live_files(lake: Path) -> dict[str, int]:
    out = {}
    for table in TABLES:
        try:
            out[table] = len(DeltaTable(str(lake / table)).file_uris())
        except TableNotFoundError:  # not created yet
            out[table] = 0
    return out


def _children() -> dict[int, list[int]]:
    """Each process's children, from /proc."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out


def _role(pid: int) -> str:
    """A short name for a demo process: the adevents subcommand or module it runs."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    words = [w for w in argv[1:] if w and not w.startswith("-")]
    return " ".join(words[:3])[:60] or Path(argv[0]).name


def tree_rss_mb(root: int) -> dict[str, float]:
    """Resident memory (MB) of ``root`` and each of its descendants, by role and pid."""
    children = _children()
    out: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss_kb = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )
        out[f"{_role(pid)} [{pid}]"] = round(rss_kb / 1024, 1)
    return out


def top_campaign(base: str) -> str:
    _, body = get(base + ENDPOINTS["top"])
    payload = json.loads(body)
    rows = payload.get("campaigns") or payload.get("items") or payload.get("data") or []
    return str(rows[0]["campaign_id"]) if rows else "cmp-00001"


def sample(base: str, lake: Path, started: float, demo: int) -> dict[str, Any]:
    campaign = top_campaign(base)
    point: dict[str, Any] = {"minute": (time.monotonic() - started) / 60}
    for name, path in ENDPOINTS.items():
        url = base + path.format(campaign=campaign)
        times = [get(url)[0] * 1000 for _ in range(3)]
        # The first of three meets whatever changed since the last sample (a new version to
        # open); the best of three is the verdict's, so that one GC pause does not decide it.
        point[name], point[f"{name}_first"] = min(times), times[0]
    point["files"] = live_files(lake)
    point["rss_mb"] = tree_rss_mb(demo)
    return point


def window(samples: list[dict[str, Any]], low: float, high: float, name: str) -> float:
    values = [s[name] for s in samples if low <= s["minute"] < high]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--rate", default="50000", help="EVENTS_PER_SECOND of the generator")
    parser.add_argument("--max-ratio", type=float, default=1.5)
    parser.add_argument("--data-dir", help="default: a fresh temporary directory")
    parser.add_argument("--out", help="write every sample and the verdict here as JSON")
    args = parser.parse_args()
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="adevents-soak-"))
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data), "EVENTS_PER_SECOND": args.rate}
    env.setdefault("BATCH_INTERVAL", "100ms")
    data.mkdir(parents=True, exist_ok=True)
    log = open(data / "demo.log", "wb")  # noqa: SIM115 (kept open for the demo's life)
    demo = subprocess.Popen(
        [sys.executable, "-m", "cli", "demo", "--port", str(port), "--log-level", "INFO"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    samples: list[dict[str, Any]] = []
    try:
        wait_ready(base, time.monotonic() + 120)
        started = time.monotonic()
        end = started + args.minutes * 60
        while time.monotonic() < end and demo.poll() is None:
            point = sample(base, data / "lake", started, demo.pid)
            samples.append(point)
            print(json.dumps(point), flush=True)
            time.sleep(max(0.0, args.every - (time.monotonic() - started) % args.every))
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
        log.close()
    last = args.minutes
    verdict = {}
    for name in ENDPOINTS:
        early = window(samples, 4.0, 6.0, name)
        late = window(samples, last - 2.0, last + 1.0, name)
        first = [
            window(samples, lo, hi, f"{name}_first")
            for lo, hi in ((4.0, 6.0), (last - 2.0, last + 1.0))
        ]
        verdict[name] = {
            "ms_at_5_min": early,
            "ms_at_end": late,
            "ratio": late / early,
            "first_request_ms_at_5_min": first[0],
            "first_request_ms_at_end": first[1],
        }
    print(json.dumps(verdict, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"samples": samples, "verdict": verdict}, indent=2))
    return 0 if all(v["ratio"] <= args.max_ratio for v in verdict.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
