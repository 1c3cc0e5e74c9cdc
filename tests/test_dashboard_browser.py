"""The dashboard in a real headless Chromium, against a real server over a lake with data."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from api.testing import running_server
from jobs.alerts import check_alerts
from lake.location import LakeLocation
from pipeline.schema import Layout
from pipeline.settings import JobSettings, Settings
from pipeline.testing import event_table
from queries.testing import land, write_campaigns

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOW_MS = int(time.time() * 1000)


def chromium_or_fail() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    message = "chromium is not installed (apt-get install -y chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} and CI=true")
    pytest.skip(f"{message}; set CI=true to make this a failure")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """uvicorn serving api.app:app (settings from the environment) over a lake with two
    campaigns, a duplicate and a quarantined row; the alert job has evaluated its rules once."""
    data = tmp_path / "data"
    settings = Settings.from_env({}, data_dir=str(data), fsync="false")
    write_campaigns(
        settings, [{"campaign_id": "cmp-a", "advertiser_id": "adv-1", "campaign_name": "Alpha"}]
    )
    ids = [f"a{i}" for i in range(6)] + ["b0", "b1"]
    land(
        settings,
        event_table(
            ids,
            time_ms=[NOW_MS - 1000 * i for i in range(8)],
            event_type=["impression"] * 4 + ["click", "conversion", "impression", "impression"],
            campaign_id=["cmp-a"] * 6 + ["cmp-b"] * 2,
            cost_micros=[1_000_000] * 6 + [250_000] * 2,
            revenue_micros=[0] * 5 + [9_000_000, 0, 0],
        ),
        event_table(["a0", "c0"], time_ms=NOW_MS, country=["US", "usa"]),
    )
    # 1 of 10 rows quarantined is above the 5 % error-rate level: a critical alert fires.
    location = LakeLocation.from_settings(settings)
    check_alerts(Layout(str(data)), location, JobSettings(), now=datetime.now(UTC), durable=False)
    with running_server(str(data), tmp_path / "server.log") as url:
        yield url


VOID = frozenset({"meta", "link", "br", "hr", "img", "input", "wbr", "source", "col", "area"})


class Dom(HTMLParser):
    """Elements by id, each with its attributes and text; table rows by data-campaign."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self.series: dict[tuple[str, str], str] = {}
        self.rows: dict[str, list[str]] = {}
        #: Open alerts shown: data-rule -> (data-severity, the row's text).
        self.alerts: dict[str, tuple[str, str]] = {}
        self._alert: str | None = None
        self._open: list[tuple[str, str | None]] = []
        self._chart = ""
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag not in VOID:
            self._open.append((tag, a.get("id")))
        if "id" in a:
            self.by_id[a["id"]] = a
            self.text[a["id"]] = ""
            if tag == "svg":
                self._chart = a["id"]
        if tag == "g" and "data-values" in a:
            self.series[(self._chart, a["data-name"])] = a["data-values"]
        if tag == "tr" and "data-campaign" in a:
            self._row = a["data-campaign"]
            self.rows[self._row] = []
        if tag == "td" and self._row and "data-value" in a:
            self.rows[self._row].append(a["data-value"])
        if tag == "tr" and "data-alert" in a:
            self._alert = a["data-rule"]
            self.alerts[self._alert] = (a["data-severity"], "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
            self._alert = None
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._alert is not None:
            severity, text = self.alerts[self._alert]
            self.alerts[self._alert] = (severity, text + data)
        for _, element in self._open:
            if element is not None:
                self.text[element] += data


def dump_dom(url: str, tmp_path: Path) -> Dom:
    return parse(render(url, tmp_path))


def parse(html: str) -> Dom:
    dom = Dom()
    dom.feed(html)
    return dom


def render(url: str, tmp_path: Path, budget_ms: int = 12_000) -> str:
    """The DOM of ``url`` after ``budget_ms`` of (virtual) time in headless Chromium, which can
    reach nothing but this machine."""
    browser = chromium_or_fail()
    argv = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        # No host resolves but 127.0.0.1: anything the page loads from elsewhere fails.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        # Let the page run (virtual) time: on the dashboard, the 5 s refresh must replace the panel.
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode()


def test_dashboard_shows_the_lake_in_a_browser(server: str, tmp_path: Path) -> None:
    dom = dump_dom(f"{server}/", tmp_path)
    panel = dom.by_id["panel"]
    assert int(panel["data-refreshes"]) >= 1, "the page did not refresh itself"
    # Throughput chart: 10 rows in, 9 accepted, within the last 15 minutes, in 10 s steps.
    assert "chart-throughput" in dom.by_id and "chart-latency" in dom.by_id
    events_in = [float(v) for v in dom.series[("chart-throughput", "events in")].split(",") if v]
    accepted = [float(v) for v in dom.series[("chart-throughput", "accepted")].split(",") if v]
    assert sum(events_in) * 10 == pytest.approx(10)
    assert sum(accepted) * 10 == pytest.approx(8)
    assert [v for v in dom.series[("chart-latency", "p95")].split(",") if v]
    # Tiles
    assert re.search(r"\d", dom.text["tile-p50"]) and "ms" in dom.text["tile-p99"]
    assert "10.00%" in dom.text["tile-dup"]
    assert "10.00%" in dom.text["tile-quarantine"]
    assert "0.0 s" in dom.text["tile-lag"]
    assert "8" in dom.text["tile-total"]
    # Top campaigns: impressions, clicks, conversions, spend, revenue for each campaign.
    assert dom.rows["cmp-a"] == ["4", "1", "1", "6.0", "9.0"]
    assert dom.rows["cmp-b"] == ["2", "0", "0", "0.5", "0.0"]
    top = dom.text["top-campaigns"]
    assert "cmp-a Alpha" in top and "25.00%" in top and "100.00%" in top and "1.50" in top
    # The alert the job fired, still shown after the refresh.
    severity, text = dom.alerts["error_rate"]
    assert severity == "critical"
    assert "error_rate · pipeline" in text and "10.00% of 10 rows quarantined" in text
    assert "critical" in dom.text["tile-alerts"] and "No open alerts" not in dom.text["alerts"]
    assert "healthy" in dom.text["health-status"]


def test_docs_render_in_a_browser_with_no_internet(server: str, tmp_path: Path) -> None:
    """Swagger UI runs from this server's own files: every operation is on the page."""
    html = render(f"{server}/docs", tmp_path, budget_ms=8_000)
    shown = set(re.findall(r'data-path="([^"]+)"', html))
    assert {"/ad_events/latest", "/campaigns/{campaign_id}/stats", "/alerts"} <= shown, shown
    assert "Unable to render" not in html
