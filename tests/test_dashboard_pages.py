"""The campaign page and the alerts page in a real headless Chromium, and the routes beside them."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from dashboard_lake import BUDGET_MICROS, OLD_MS, serving

from api.dashboard_pages import event_usd
from api.dashboard_testing import Page, chromium_path, open_page

DAY_MS = 86_400_000


def missing(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} and CI=true")
    pytest.skip(f"{message}; set CI=true to make this a failure")


@pytest.fixture
def now() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def server(tmp_path: Path, now: int) -> Iterator[str]:
    with serving(tmp_path, now) as url:
        yield url


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    with open_page(chromium_path(missing), tmp_path / "chromium-profile") as p:
        yield p


def fetch(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


def text(page: Page, selector: str) -> str:
    value: str = page.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")
    return value


def chart(page: Page, chart_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = page.evaluate(
        f"document.getElementById('{chart_id}').data"
        ".map(t => ({name: t.name, x: t.x, y: t.y, text: t.text}))"
    )
    return data


def assert_clean(page: Page) -> None:
    page.evaluate("1")  # every event the page sent so far has been read
    assert page.errors == []
    assert page.foreign_requests() == []


def test_campaign_page(server: str, page: Page, now: int, tmp_path: Path) -> None:
    page.goto(f"{server}/campaigns/cmp-a?range=1h")
    page.wait_for("performance.getEntriesByName('charts-drawn').length", "the charts")
    assert "Alpha" in text(page, "#campaign-about") and "adv-1" in text(page, "#campaign-about")

    # Funnel over the last hour: 4 impressions -> 1 click -> 1 conversion.
    (funnel,) = chart(page, "chart-funnel")
    assert funnel["y"] == ["impressions", "clicks", "conversions"] and funnel["x"] == [4, 1, 1]
    # Totals and ratios over the hour.
    assert text(page, "#tile-spend b") == "$6.00" and text(page, "#tile-revenue b") == "$9.00"
    assert text(page, "#tile-ctr b") == "25.00%" and text(page, "#tile-cvr b") == "100.00%"
    assert text(page, "#tile-cpa b") == "$6.00" and text(page, "#tile-roas b") == "1.50"

    # Spend today (UTC) against the 5 USD budget, with the pacing line over the day.
    day_start = now - now % DAY_MS
    recent = sum(1.0 for i in range(6) if now - 1000 * i >= day_start)
    expected = recent + (2.0 if now - OLD_MS >= day_start else 0.0)
    lines = {line["name"]: line for line in chart(page, "chart-spend")}
    assert lines["spend today"]["y"][0] == 0 and lines["spend today"]["y"][-1] == expected
    budget = BUDGET_MICROS / 1e6
    assert lines["daily budget"]["y"] == [budget, budget]
    assert lines["pacing"]["y"] == [0, budget]
    assert "of $5.00 daily budget" in text(page, "#tile-budget")

    # CTR, CVR, CPA, ROAS over time: per minute, with readable values.
    for chart_id, unit in (("ctr", "%"), ("cvr", "%"), ("cpa", "$"), ("roas", "")):
        (line,) = chart(page, f"chart-{chart_id}")
        shown = [t for t, v in zip(line["text"], line["y"], strict=True) if v is not None]
        assert shown and all(unit in t for t in shown), (chart_id, shown)
        labels = page.evaluate(
            f"[...document.querySelectorAll('#chart-{chart_id} .ytick text')]"
            ".map(t => t.textContent)"
        )
        assert labels and not any("e+" in t or "e-" in t for t in labels), labels

    # The latest events, newest first: cmp-a's 8, the two old ones last.
    ids = page.evaluate(
        "[...document.querySelectorAll('#latest-events tr[data-event]')].map(r => r.dataset.event)"
    )
    # (old0 and old1 share their time: the larger event_id comes first.)
    assert ids == ["a0", "a1", "a2", "a3", "a4", "a5", "old1", "old0"]

    # A hover over the funnel's first stage shows its value.
    page.hover(*page.center_of("#chart-funnel .point"))
    hovered = page.wait_for(
        "document.querySelector('#chart-funnel .hoverlayer').textContent", "a hover label"
    )
    assert "impressions: 4" in hovered, hovered

    # 6 h takes in the two older impressions.
    page.click('.ranges button[data-range="6h"]')
    page.wait_for("document.getElementById('page').dataset.seriesRange === '6h'", "6 h series")
    page.wait_for(
        "document.querySelector('#tile-impressions b').textContent === '6'", "the 6 h tiles"
    )
    assert chart(page, "chart-funnel")[0]["x"] == [6, 1, 1]
    page.screenshot(tmp_path / "campaign.png")
    assert_clean(page)


def test_dashboard_links_to_the_campaign_page(server: str, page: Page) -> None:
    page.goto(f"{server}/?range=1h")
    page.click('#top-campaigns tr[data-campaign="cmp-a"] a')
    page.wait_for("location.pathname === '/campaigns/cmp-a'", "the campaign page")
    page.wait_for("document.readyState === 'complete'", "the campaign page to load")
    assert page.evaluate("location.search") == "?range=1h"
    page.wait_for("performance.getEntriesByName('charts-drawn').length", "the charts")
    assert_clean(page)


def test_alerts_page(server: str, page: Page, tmp_path: Path) -> None:
    page.goto(f"{server}/dashboard/alerts")
    row = "#open-alerts tr[data-rule='error_rate']"
    assert page.evaluate(f"document.querySelector({json.dumps(row)}).dataset.severity") == (
        "critical"
    )
    assert "8.33% of 12 rows quarantined" in text(page, row)
    resolved = "#resolved-alerts tr[data-rule='budget']"
    assert "cmp-a spent 120%" in text(page, resolved)
    assert page.evaluate(
        f"document.querySelector({json.dumps(resolved + ' a')}).getAttribute('href')"
    ) == ("/campaigns/cmp-a")
    assert "1 open, 1 resolved" in text(page, "#updated")
    # The panel refreshes by itself and still shows both.
    page.wait_for("Number(document.getElementById('page').dataset.refreshes) >= 1", "a refresh")
    assert page.evaluate("document.querySelectorAll('tr[data-alert]').length") == 2
    page.screenshot(tmp_path / "alerts.png")
    assert_clean(page)


def test_unknown_campaign_page(server: str, page: Page) -> None:
    page.goto(f"{server}/campaigns/cmp-nope")
    page.wait_for("performance.getEntriesByName('charts-drawn').length", "the charts")
    assert "not in the campaign dimension" in text(page, "#campaign-about")
    assert "No events yet" in text(page, "#events")
    assert chart(page, "chart-funnel")[0]["x"] == [0, 0, 0]
    assert_clean(page)


def test_json_routes_beside_the_pages(server: str) -> None:
    """The JSON API keeps its paths; the pages' data is JSON too; a bad range is a 400."""
    status, kind, body = fetch(f"{server}/campaigns/cmp-a/stats")
    assert status == 200 and kind.startswith("application/json")
    assert json.loads(body)["campaign_id"] == "cmp-a"
    status, kind, body = fetch(f"{server}/campaigns/top")
    assert status == 200 and json.loads(body)["campaigns"][0]["campaign_id"] == "cmp-a"
    status, kind, body = fetch(f"{server}/campaigns/cmp-a")
    assert status == 200 and kind.startswith("text/html")
    status, kind, body = fetch(f"{server}/dashboard/campaigns/cmp-a/series?range=24h")
    charts = {c["id"]: c for c in json.loads(body)["charts"]}
    assert status == 200 and charts["chart-funnel"]["lines"][0]["y"] == [6, 1, 1]
    status, _, body = fetch(f"{server}/dashboard/series?range=15m")
    assert status == 200 and {c["id"] for c in json.loads(body)["charts"]} == {
        "chart-throughput",
        "chart-latency",
    }
    for url in ("/?range=2h", "/dashboard/series?range=7d", "/campaigns/cmp-a?range=x"):
        status, _, body = fetch(f"{server}{url}")
        assert status == 400, url
        assert b"Traceback" not in body
    status, _, _ = fetch(f"{server}/dashboard/assets/../../pyproject.toml")
    assert status == 404
    status, _, _ = fetch(f"{server}/dashboard/assets/plotly.js.map")
    assert status == 404


@pytest.mark.parametrize(
    ("usd", "shown"),
    [
        (0.0015, "$0.0015"),
        (9.0, "$9.00"),
        (0.0, "$0.00"),
        (1234.5, "$1,234.50"),
        (1e-6, "$0.000001"),
    ],
)
def test_event_money_is_shown_to_the_micro(usd: float, shown: str) -> None:
    """An impression often costs less than a cent: the latest events do not round it to $0.00."""
    assert event_usd(usd) == shown
