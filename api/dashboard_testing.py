"""Helpers for tests and benches of the dashboard: a real headless Chromium over DevTools.

It can reach nothing but this machine (``--host-resolver-rules``), and it records every request
the page makes and every console error, so tests can say "no request to another host" and "no
console errors" of what a person's browser would do. No virtual time: tests wait for the page's
own signals (``data-refreshes``, ``data-series-range``, performance marks), with generous
timeouts as a safety net only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Safety nets, not expectations: a step that takes this long has failed.
START_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 60.0


@dataclass
class Page:
    """One tab, spoken to over its DevTools websocket."""

    ws: ClientConnection
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _next_id: int = 0
    _events: list[dict[str, Any]] = field(default_factory=list)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call ``method`` and return its result (events that arrive meanwhile are recorded)."""
        self._next_id += 1
        call_id = self._next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._record(message)

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params["exceptionDetails"])[:2000])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a)) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
        self._events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll until ``expression`` is truthy; its value."""
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {expression}")
            time.sleep(0.1)

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self._events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", f"{url} to load")

    def center_of(self, selector: str) -> tuple[float, float]:
        rect = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        return float(rect[0]), float(rect[1])

    def hover(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).scrollIntoView()")
        x, y = self.center_of(selector)
        self.hover(x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        """The whole page (not only the window) as a PNG."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def foreign_requests(self) -> list[str]:
        """Requests to anything but this machine (data: URLs are not requests to a host)."""
        return [
            u
            for u in self.requests
            if not u.startswith("data:") and urlsplit(u).hostname not in ("127.0.0.1", "localhost")
        ]

    def paint_timings(self) -> dict[str, float]:
        """first-paint, first-contentful-paint and the page's own charts-drawn mark (ms from
        navigation start), as Chromium's performance timeline records them."""
        # The paint entry arrives with the compositor's presentation time, which may come
        # after the page's own scripts have run.
        self.wait_for(
            "performance.getEntriesByName('first-contentful-paint').length", "the first paint"
        )
        timings: dict[str, float] = self.evaluate(
            "Object.fromEntries([...performance.getEntriesByType('paint'),"
            " ...performance.getEntriesByType('mark')].map(e => [e.name, e.startTime]))"
        )
        return timings


def chromium_path(on_missing: Callable[[str], None]) -> str:
    """Chromium's path; ``on_missing(message)`` is called (and must raise) when it is absent."""
    if not os.path.exists(CHROMIUM):
        on_missing("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


@contextmanager
def open_page(
    browser: str, profile: Path, *, width: int = 1280, height: int = 900
) -> Iterator[Page]:
    """A headless Chromium with one page, its network and console recorded."""
    profile.mkdir(parents=True, exist_ok=True)
    argv = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        # No host resolves but 127.0.0.1: anything the page loads from elsewhere fails.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={width},{height}",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    with open(profile.parent / "chromium.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (profile.parent / "chromium.log").read_text(errors="replace")
                raise RuntimeError(f"chromium did not start: {log_text[-2000:]}")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(ws_url, max_size=None, open_timeout=START_TIMEOUT_S) as ws:
            page = Page(ws)
            for domain in ("Page", "Runtime", "Network", "Log"):
                page.send(f"{domain}.enable")
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
