"""The dashboard in a real headless Chromium, against a real server over a lake with data."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from dashboard_lake import serving

from api.dashboard_testing import Page, chromium_path, open_page
from pipeline.schema import MINUTE_MS

#: Where the README's screenshot goes; written only when UPDATE_SCREENSHOTS=1.
README_SHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
#: A readable tick label or hover value: 45k, 1.2M, 250 ms, 1.5 s, $1.2k, 2.5%.
READABLE = re.compile(r"^-?\$?\d+(\.\d+)?[kMB]?( ms| s|%)?$")


def missing(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} and CI=true")
    pytest.skip(f"{message}; set CI=true to make this a failure")


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with serving(tmp_path, now_ms()) as url:
        yield url


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    with open_page(chromium_path(missing), tmp_path / "chromium-profile") as p:
        yield p


def ticks(page: Page, chart: str) -> list[str]:
    labels: list[str] = page.evaluate(
        f"[...document.querySelectorAll('#{chart} .ytick text')].map(t => t.textContent)"
    )
    return labels


def series(page: Page, chart: str) -> dict[str, list[float | None]]:
    data: dict[str, list[float | None]] = page.evaluate(
        f"Object.fromEntries(document.getElementById('{chart}').data.map(t => [t.name, t.y]))"
    )
    return data


def top_row(page: Page, campaign: str) -> list[str]:
    row: list[str] = page.evaluate(
        f'[...document.querySelectorAll(\'#top-campaigns tr[data-campaign="{campaign}"] '
        "td[data-value]')].map(td => td.dataset.value)"
    )
    return row


def text(page: Page, element_id: str) -> str:
    value: str = page.evaluate(f"document.getElementById('{element_id}').textContent")
    return value


def test_dashboard_in_a_browser(server: str, page: Page, tmp_path: Path) -> None:
    page.goto(f"{server}/?range=15m")
    page.wait_for("performance.getEntriesByName('charts-drawn').length", "the charts")
    timings = page.paint_timings()
    print(f"dashboard paint timings (ms): {json.dumps(timings)}")
    assert timings["first-contentful-paint"] <= timings["charts-drawn"]

    # Throughput from the ledger: 12 rows in, 10 accepted, 1 duplicate, 1 quarantined, in
    # 10 s steps over the last 15 minutes.
    throughput = series(page, "chart-throughput")
    assert len(throughput["events in"]) in (90, 91)
    for name, rows in (("events in", 12), ("accepted", 10), ("duplicates", 1), ("quarantined", 1)):
        assert sum(v or 0 for v in throughput[name]) * 10 == pytest.approx(rows), name
    assert [v for v in series(page, "chart-latency")["p95"] if v is not None]

    # Readable axes: "0", "0.5", "1.5", "250 ms" ... never "e+" nor a cut-off label.
    for chart in ("chart-throughput", "chart-latency"):
        labels = ticks(page, chart)
        assert len(labels) >= 3 and all(READABLE.match(t) for t in labels), (chart, labels)
    assert all(t.endswith(" ms") or t == "0 ms" for t in ticks(page, "chart-latency"))
    # Y tick labels are inside the page (the left margin holds them), not cut at its edge.
    assert page.evaluate(
        "[...document.querySelectorAll('.ytick text')]"
        ".every(t => t.getBoundingClientRect().left >= 0)"
    )

    # A hover over the step where the batches landed shows its value, formatted.
    x, y = page.evaluate(
        """(() => {
        const gd = document.getElementById('chart-throughput');
        const trace = gd.data[0], i = trace.y.findIndex(v => v > 0);
        const xa = gd._fullLayout.xaxis, size = gd._fullLayout._size;
        const box = gd.getBoundingClientRect();
        return [box.left + size.l + xa.l2p(xa.d2l(trace.x[i])), box.top + size.t + size.h / 2];
        })()"""
    )
    page.hover(x, y)
    hovered = page.wait_for(
        "document.querySelector('#chart-throughput .hoverlayer').textContent", "a hover label"
    )
    shown = page.evaluate(
        "(() => { const t = document.getElementById('chart-throughput').data[0];"
        " return t.text[t.y.findIndex(v => v > 0)]; })()"
    )
    assert READABLE.match(shown) and shown in hovered and "events in" in hovered, hovered

    # The panel refreshes by itself (every 5 s).
    page.wait_for("Number(document.getElementById('page').dataset.refreshes) >= 1", "a refresh")

    # Tiles and tables.
    assert re.search(r"\d", text(page, "tile-p50")) and "ms" in text(page, "tile-p99")
    assert "8.33%" in text(page, "tile-dup") and "8.33%" in text(page, "tile-quarantine")
    assert "0.0 s" in text(page, "tile-lag") and "10" in text(page, "tile-total")
    assert top_row(page, "cmp-a") == ["4", "1", "1", "6.0", "9.0"]
    assert top_row(page, "cmp-b") == ["2", "0", "0", "0.5", "0.0"]
    top = text(page, "top-campaigns")
    assert "cmp-aAlpha" in top.replace(" ", "") and "25.00%" in top and "1.50" in top
    severity = page.evaluate(
        "document.querySelector('#alerts-table tr[data-rule=\"error_rate\"]').dataset.severity"
    )
    assert severity == "critical" and "8.33% of 12 rows quarantined" in text(page, "alerts")
    assert "healthy" in text(page, "health-status")

    # The range switch: 6 h takes in cmp-a's two older impressions, and draws 6 hours.
    page.click('.ranges button[data-range="6h"]')
    page.wait_for("document.getElementById('page').dataset.seriesRange === '6h'", "6 h series")
    page.wait_for("document.getElementById('top-campaigns').rows.length > 1", "the table")
    page.wait_for(
        "document.querySelector('#panel section h2').textContent.includes('last 6 h')",
        "the 6 h panel",
    )
    assert top_row(page, "cmp-a") == ["6", "1", "1", "8.0", "9.0"]
    assert len(series(page, "chart-throughput")["events in"]) in (120, 121)
    since = int(page.evaluate("document.getElementById('page').dataset.seriesSince"))
    assert now_ms() - since >= 6 * 60 * MINUTE_MS
    assert page.evaluate("location.search") == "?range=6h"
    assert (
        page.evaluate(
            "document.querySelector('.ranges button[data-range=\"6h\"]')"
            ".getAttribute('aria-pressed')"
        )
        == "true"
    )

    shot = page.screenshot(tmp_path / "dashboard.png")
    assert shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        page.click('.ranges button[data-range="15m"]')
        page.wait_for("document.getElementById('page').dataset.seriesRange === '15m'", "15 min")
        shutil.copyfile(page.screenshot(tmp_path / "dashboard-15m.png"), README_SHOT)

    page.evaluate("1")  # every event the page sent so far has been read
    assert page.errors == []
    assert page.foreign_requests() == []
    assert any("/dashboard/assets/plotly.min.js" in u for u in page.requests)


def test_docs_render_in_a_browser_with_no_internet(server: str, page: Page) -> None:
    """Swagger UI runs from this server's own files: every operation is on the page."""
    page.goto(f"{server}/docs")
    paths = page.wait_for(
        "(() => { const p = [...document.querySelectorAll('[data-path]')]"
        ".map(e => e.dataset.path); return p.includes('/alerts') ? p : null; })()",
        "Swagger UI's operations",
    )
    assert {"/ad_events/latest", "/campaigns/{campaign_id}/stats", "/alerts"} <= set(paths)
    assert "Unable to render" not in page.evaluate("document.body.textContent")
    assert page.foreign_requests() == []
