"""Prometheus and Grafana, for real: Debian's ``prometheus`` scrapes a running ``adevents serve``
with the repository's scrape configuration and alerting rules (deploy/prometheus/), a PromQL
query through Prometheus's HTTP API reads the throughput, every rule evaluates, ``promtool``
checks the config and unit-tests the thresholds, and every metric the Grafana dashboard
(deploy/grafana/dashboards/adevents.json) or a rule queries is one /metrics exposes.

Every wait polls for a condition (a series appears, a value arrives); the timeouts are safety
nets for a stuck process, never a measure of speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from api.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "adevents.json"
KEY = "prometheus-test-key"
#: A safety net for a stuck process; every wait below ends as soon as its condition holds.
SAFETY_TIMEOUT_S = 180.0
#: Series Prometheus makes itself for each target; a rule may use them, /metrics has none.
PROMETHEUS_OWN = frozenset({"up"})
#: Families /metrics declares with no sample until a Kafka consumer reports its partitions
#: (the stack below consumes the spool).
KAFKA_ONLY = frozenset({"adevents_kafka_consumer_lag_messages"})
#: Grafana's interval variables, as the dashboard would resolve them at this scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "2s", "$__range": "5m"}

T = TypeVar("T")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: install Debian's prometheus package (.ci/run does)")
    return path


def wait_for(
    what: str, probe: Callable[[], T | None], procs: Sequence[subprocess.Popen[bytes]] = ()
) -> T:
    """Poll ``probe`` until it returns something other than None; that value. Fails at once
    when one of ``procs`` (what the probe needs running) has exited."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while True:
        found = probe()
        if found is not None:
            return found
        exited = [p.args for p in procs if p.poll() is not None]
        if exited:
            pytest.fail(f"while waiting for {what}, exited: {exited}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {SAFETY_TIMEOUT_S:.0f}s")
        time.sleep(0.2)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- PromQL: the metric names an expression reads -----------------------------------------------
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKENS = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*|[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "start", "end"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    aggregations, keywords, label names (in matchers and groupings) or numbers."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPINGS.sub(" ", text)
    names = set()
    for token in _TOKENS.finditer(text):
        word = token.group()
        if word[0].isdigit() or word.lower() in _KEYWORDS:
            continue
        if text[token.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(word)
    return names


def dashboard_expressions() -> list[str]:
    """Every query of every panel of the provisioned dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [*dashboard["panels"]]
    panels += [inner for p in dashboard["panels"] for inner in p.get("panels", [])]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exposed_names(exposition: str) -> set[str]:
    """The sample names (``x_total``, ``x_bucket``, …) in a /metrics text exposition."""
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def declared_names(exposition: str) -> set[str]:
    """The families a /metrics text exposition declares (``# TYPE``), samples or not."""
    return {family.name for family in text_string_to_metric_families(exposition)}


def test_metric_names_reads_what_an_expression_selects() -> None:
    """The extractor the checks below rely on, on the shapes the dashboard and rules use."""
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{status=~"5.."}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("sum(rate(a_total[$__rate_interval])) / sum(rate(b_total[1m])) > 0.01") == {
        "a_total",
        "b_total",
    }
    assert metric_names("time() - max(c_seconds)") == {"c_seconds"}
    assert metric_names("x < 1e5 and on() max(y) >= 60") == {"x", "y"}
    assert metric_names('up{job="adevents"} == 0') == {"up"}
    assert metric_names("sum(z) by (le) offset 5m") == {"z"}


# -- promtool --------------------------------------------------------------------------------------
def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT_S,
        check=False,
    )


def test_promtool_accepts_the_scrape_config_and_its_rules() -> None:
    done = promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout + done.stderr


def test_every_alert_threshold_is_unit_tested_and_holds() -> None:
    """``promtool test rules``: each threshold with series just past it (and short of it)."""
    done = promtool("test", "rules", "deploy/prometheus/alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert at every severity is expected to fire in at least one case.
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    expected = {
        (check["alertname"], alert["exp_labels"]["severity"])
        for case in cases
        for check in case["alert_rule_test"]
        for alert in check["exp_alerts"]
    }
    assert expected == {(r["alert"], r["labels"]["severity"]) for r in alert_rules()}


# -- a running adevents scraped by a running Prometheus ------------------------------------------
@dataclass(frozen=True)
class Stack:
    api: str
    prometheus: str
    #: ``adevents consume --once``'s summary fields (rows_in, accepted, duplicates, …).
    landed: dict[str, int]

    def query(self, promql: str) -> dict[str, Any]:
        """An instant query through Prometheus's HTTP API: its ``data``, or a failure."""
        status, body = get(
            f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        )
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (promql, answer)
        data: dict[str, Any] = answer["data"]
        return data

    def value(self, promql: str) -> float | None:
        """The value of a query that yields one sample; None while it yields none."""
        result = self.query(promql)["result"]
        if not result:
            return None
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _adevents(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _status(url: str) -> int | None:
    """The HTTP status ``url`` answers with; None while nothing listens."""
    try:
        return get(url)[0]
    except (urllib.error.URLError, ConnectionError):
        return None


def prometheus_config(target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml as it is, but scraping ``target`` every 2 s, and its
    rule files found where they are in the repository."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="2s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "adevents"]
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_timeout"] = "2s"
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``adevents serve`` over an empty DATA_DIR, Prometheus scraping it; then events arrive by
    the HTTP ingest (some invalid) and ``adevents consume --once`` lands them."""
    root = tmp_path_factory.mktemp("prometheus")
    data = root / "data"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LOG_LEVEL": "WARNING",
        "FSYNC": "false",
        "INGEST_API_KEYS": KEY,
        "MAX_EVENTS_PER_SECOND": "0",
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        with open(root / "adevents.log", "wb") as log:
            serve = [sys.executable, "-m", "cli", "serve", "--data-dir", str(data)]
            serve += ["--port", str(port)]
            procs.append(subprocess.Popen(serve, env=env, stdout=log, stderr=log))
        api = f"http://127.0.0.1:{port}"
        wait_for("adevents serve to answer", lambda: _status(f"{api}/health"), procs)

        prom_port = free_port()
        config = root / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{port}")))
        with open(root / "prometheus.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        tool("prometheus"),
                        f"--config.file={config}",
                        f"--storage.tsdb.path={root / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--log.level=warn",
                    ],
                    cwd=root,
                    stdout=log,
                    stderr=log,
                )
            )
        prometheus = f"http://127.0.0.1:{prom_port}"
        wait_for(
            "Prometheus to be ready",
            lambda: True if _status(f"{prometheus}/-/ready") == 200 else None,
            procs,
        )
        stack = Stack(api, prometheus, {})

        # Phase 1: Prometheus holds a sample of the empty pipeline's counters.
        wait_for(
            "a first scrape of adevents_events_accepted_total",
            lambda: stack.value('adevents_events_accepted_total{job="adevents"}'),
            procs,
        )
        # Phase 2: events arrive through the HTTP ingest and land in the lake.
        generate = ["generate", "--data-dir", str(data), "--http", api, "--api-key", KEY]
        generate += ["--events", "3000", "--rate", "0", "--invalid-rate", "0.05"]
        _adevents(*generate, "--dup-rate", "0.05", env=env)
        line = _adevents("consume", "--once", "--data-dir", str(data), env=env).strip()
        landed = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)(?=\s|$)", line)}
        assert landed["accepted"] > 0 and landed["quarantined"] > 0, line
        yield Stack(api, prometheus, landed)
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_prometheus_reads_the_throughput_of_a_running_adevents(stack: Stack) -> None:
    """Prometheus scrapes the landed totals exactly, and a rate over accepted events (the
    dashboard's events/s) is above zero."""
    accepted = stack.landed["accepted"]
    wait_for(
        f"Prometheus to scrape {accepted} accepted events",
        lambda: True if stack.value("sum(adevents_events_accepted_total)") == accepted else None,
    )
    assert stack.value("sum(adevents_events_quarantined_total)") == stack.landed["quarantined"]
    assert stack.value("sum(adevents_events_in_total)") == stack.landed["rows_in"]
    assert stack.value('up{job="adevents"}') == 1.0
    throughput = stack.value("sum(rate(adevents_events_accepted_total[5m]))")
    assert throughput is not None and throughput > 0


def test_every_alert_rule_evaluates_against_real_metrics(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        status, body = get(f"{stack.prometheus}/api/v1/rules")
        assert status == 200
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for("every rule to be evaluated", evaluated)
    assert len(rules) == len(alert_rules())
    failed = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not failed


def test_every_metric_the_dashboard_and_rules_query_is_in_metrics(stack: Stack) -> None:
    """Parsed from the expressions themselves, so no list here can drift from them."""
    status, body = get(f"{stack.api}/metrics")
    assert status == 200
    # A Kafka-only family counts when declared: it has samples once a Kafka consumer reports.
    assert declared_names(body.decode()) >= KAFKA_ONLY
    exposed = exposed_names(body.decode()) | KAFKA_ONLY
    dashboard = {name for expr in dashboard_expressions() for name in metric_names(expr)}
    # The parser found the dashboard's metrics (every panel family is one of ours).
    assert len(dashboard) >= 10 and all(n.startswith("adevents_") for n in dashboard)
    assert sorted(dashboard - exposed) == []
    rules = {name for r in alert_rules() for name in metric_names(r["expr"])}
    assert sorted(rules - exposed - PROMETHEUS_OWN) == []


def test_every_dashboard_query_is_valid_promql_with_data(stack: Stack) -> None:
    """Each panel's query, its Grafana variables resolved, runs in the real Prometheus and
    returns series once the events have landed."""
    accepted = stack.landed["accepted"]
    wait_for(
        "the landed events in Prometheus",
        lambda: True if stack.value("sum(adevents_events_accepted_total)") == accepted else None,
    )
    empty = []
    for expr in dashboard_expressions():
        promql = expr
        for variable, value in GRAFANA_VARIABLES.items():
            promql = promql.replace(variable, value)
        assert "$" not in promql, expr
        if not stack.query(promql)["result"]:
            empty.append(expr)
    # Only the consumers' retrying panel may be empty (no consumer is retrying a fault here),
    # and the Kafka partitions' lag (the spool is consumed here, not Kafka).
    assert empty == [
        "sum by (consumer, fault) (adevents_consumer_retrying) > 0",
        "max by (topic, partition) (adevents_kafka_consumer_lag_messages)",
    ]
