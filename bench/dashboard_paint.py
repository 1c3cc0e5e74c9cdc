"""Dashboard first paint over a big lake: Chromium's own paint timing of each page, and bytes.

Run (builds the lake first when DATA_DIR has no events; ``--prepare`` compacts and rolls up,
as the scheduled jobs would):

    python bench/dashboard_paint.py --data-dir /tmp/bench-lake --events 50000000 --prepare

It starts ``adevents serve`` over DATA_DIR and opens each page in a real headless Chromium
(``api.dashboard_testing``), first with an empty browser cache, then ``--loads`` more times in
the same browser (a return visit: plotly.js comes from the cache, as it does for anyone who has
opened the dashboard once). Per load: first-contentful-paint and the page's own
``charts-drawn`` mark (ms from navigation start), and the bytes transferred.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from api_load import build_lake, prepare, server

from api.dashboard_testing import Page, open_page

_PLOTLY = """(() => {
    const e = performance.getEntriesByType('resource').find(r => r.name.includes('plotly'));
    return e ? e.responseEnd : null;
})()"""
_BYTES = """(() => {
    const nav = performance.getEntriesByType('navigation')[0];
    const res = performance.getEntriesByType('resource');
    return nav.transferSize + res.reduce((n, r) => n + r.transferSize, 0);
})()"""


def load(page: Page, url: str) -> dict[str, Any]:
    page.goto(url)
    page.wait_for("performance.getEntriesByName('charts-drawn').length", "the charts")
    timings = page.paint_timings()
    return {
        "fcp_ms": round(timings["first-contentful-paint"], 1),
        "charts_ms": round(timings["charts-drawn"], 1),
        "plotly_loaded_ms": page.evaluate(_PLOTLY),
        "bytes": int(page.evaluate(_BYTES)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--rate", type=int, default=0, help="generator rate (0: as fast)")
    parser.add_argument("--prepare", action="store_true", help="compact and roll up first")
    parser.add_argument("--loads", type=int, default=5, help="return visits per page")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--campaign", default=None, help="campaign page to open (default: top)")
    args = parser.parse_args()

    build_lake(args.data_dir, args.events, args.rate)
    if args.prepare:
        prepare(args.data_dir)
    results: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        server(args.data_dir, 1, Path(tmp, "server.log")) as url,
        open_page(args.chromium, Path(tmp, "profile")) as page,
    ):
        # The server answers once before timing (its first answer of each page opens what
        # that page reads: "server_cold_s"); the browser's cache stays empty.
        with urllib.request.urlopen(f"{url}/campaigns/top?limit=1", timeout=600) as r:
            top = json.load(r)["campaigns"]
        campaign = args.campaign or (top[0]["campaign_id"] if top else "none")
        pages = {
            "dashboard 1h": f"{url}/?range=1h",
            "dashboard 24h": f"{url}/?range=24h",
            "campaign 1h": f"{url}/campaigns/{campaign}?range=1h",
        }
        for name, address in pages.items():
            started = time.perf_counter()
            with urllib.request.urlopen(address, timeout=600) as r:
                r.read()
            cold = round(time.perf_counter() - started, 3)
            first = load(page, address)
            again = [load(page, address) for _ in range(args.loads)]
            results[name] = {
                "server_cold_s": cold,
                "first_visit": first,
                "return_fcp_ms_median": statistics.median(r["fcp_ms"] for r in again),
                "return_charts_ms_median": statistics.median(r["charts_ms"] for r in again),
                "return_bytes": again[-1]["bytes"],
            }
            print(name, json.dumps(results[name]), flush=True)
        events = page.evaluate(
            "fetch('/ad_events/latest?limit=1').then(r => r.json()).then(j => j.total_count)"
        )
    print(json.dumps({"events": events, "campaign": campaign, "pages": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
