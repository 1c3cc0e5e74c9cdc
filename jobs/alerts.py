"""Threshold alerts: rules evaluated on frames, one lifecycle per rule and subject, a durable store.

Rules are pure: ledger rows, spool age, Kafka partitions' lag, spend and budgets in,
:class:`Observation` (a rule that fires now, with severity, value and threshold) out.
:func:`advance` turns the open alerts and this tick's observations into the next alerts and the
notifications to send: an alert fires once, changes severity in place, and resolves when its
rule stops firing — never a repeat per tick. The store is ``alerts/alerts.parquet``
(:mod:`pipeline.tables`), replaced atomically; notifications go to the outbox
(:mod:`jobs.outbox`) that the webhook job reads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

import polars as pl

from jobs import outbox
from jobs.outbox import Notification
from jobs.storage import job_lock, recent_ledger, write_parquet_atomic
from lake.location import LakeLocation
from pipeline.schema import ROLLUP_SCHEMA, Layout
from pipeline.settings import JobSettings
from pipeline.spool import oldest_waiting_age
from pipeline.status import PartitionLag, kafka_lags, read_statuses
from pipeline.tables import (
    FIRING,
    RESOLVED,
    SEVERITIES,
    Alert,
    RollupPaths,
    alerts_frame,
    alerts_path,
    load_alerts,
    read_parquet_or,
)

log = logging.getLogger("adevents.jobs.alerts")

#: Subject of the rules about the pipeline as a whole (budget alerts are per campaign_id).
PIPELINE: Final = "pipeline"


@dataclass(frozen=True)
class Observation:
    """A rule firing now for a subject."""

    rule: str
    subject: str
    severity: str
    value: float
    threshold: float
    message: str


# -- rules (pure) ------------------------------------------------------------------------------
def _grade(
    value: float, warning: float, critical: float, *, above: bool
) -> tuple[str, float] | None:
    """(severity, threshold crossed) when ``value`` is past a level, else None."""
    if above:
        if value > critical:
            return "critical", critical
        if value > warning:
            return "warning", warning
    else:
        if value < critical:
            return "critical", critical
        if value < warning:
            return "warning", warning
    return None


#: Commit groups smaller than this are not judged for latency: their time is mostly the fixed
#: cost of three table commits (a demo at 5k events/s: 350 ms for 5k events), which says
#: nothing an operator can act on; a pipeline that falls behind shows as consumer lag.
LATENCY_UNIT_ROWS = 10_000


def latency_per_10k(ledger: pl.DataFrame) -> pl.Series:
    """Processing milliseconds per 10k events of each commit group of at least 10k events.

    A group's files share its ``processing_ms``; they are told apart by consumer and commit
    time (a ledger without those columns is taken a row per group).
    """
    if not len(ledger):
        return pl.Series([], dtype=pl.Float64)
    keys = [c for c in ("consumer", "committed_at") if c in ledger.columns]
    rows, ms = pl.col("rows_in").sum(), pl.col("processing_ms").first()
    groups = (
        ledger.group_by(keys).agg(rows=rows, ms=ms)
        if len(keys) == 2
        else ledger.select(rows=pl.col("rows_in"), ms=pl.col("processing_ms"))
    )
    big = groups.drop_nulls(["rows", "ms"]).filter(pl.col("rows") >= LATENCY_UNIT_ROWS)
    return (big["ms"] * LATENCY_UNIT_ROWS / big["rows"]).cast(pl.Float64)


def ops_rules(ledger: pl.DataFrame, *, backlog_age_s: float, t: JobSettings) -> list[Observation]:
    """Throughput, batch latency p95 (per 10k events, :func:`latency_per_10k`) and error
    rate over ``ledger`` (the window's batches).

    Throughput is judged only when the oldest waiting spool file has waited the whole window:
    the consumer then had work all along, so rows per second of the window is its speed (an
    idle system is not slow; a stuck one with a backlog is 0 events/s).
    """
    out: list[Observation] = []
    rows_in = int(ledger["rows_in"].sum()) if len(ledger) else 0
    if backlog_age_s >= t.alert_window:
        rate = rows_in / t.alert_window
        grade = _grade(rate, t.alert_throughput_warning, t.alert_throughput_critical, above=False)
        if grade:
            out.append(
                Observation(
                    "throughput",
                    PIPELINE,
                    grade[0],
                    rate,
                    grade[1],
                    f"consumer throughput {rate:,.0f} events/s with a backlog of "
                    f"{backlog_age_s:.0f}s (below {grade[1]:,.0f})",
                )
            )
    latencies = latency_per_10k(ledger)
    if len(latencies):
        p95 = float(latencies.quantile(0.95, "linear") or 0.0)
        grade = _grade(
            p95, t.alert_latency_p95_warning * 1000, t.alert_latency_p95_critical * 1000, above=True
        )
        if grade:
            out.append(
                Observation(
                    "latency_p95",
                    PIPELINE,
                    grade[0],
                    p95,
                    grade[1],
                    f"batch processing p95 {p95:.1f} ms per 10k events over "
                    f"{len(latencies)} commit groups (above {grade[1]:.0f} ms)",
                )
            )
    if rows_in > 0:
        rate = int(ledger["quarantined"].sum()) / rows_in
        grade = _grade(rate, t.alert_error_rate_warning, t.alert_error_rate_critical, above=True)
        if grade:
            out.append(
                Observation(
                    "error_rate",
                    PIPELINE,
                    grade[0],
                    rate,
                    grade[1],
                    f"{rate:.2%} of {rows_in:,} rows quarantined (above {grade[1]:.2%})",
                )
            )
    return out


def lag_rule(oldest_waiting_s: float, t: JobSettings) -> list[Observation]:
    """Consumer lag: how long the oldest spool file has been waiting."""
    grade = _grade(oldest_waiting_s, t.alert_lag_warning, t.alert_lag_critical, above=True)
    if not grade:
        return []
    return [
        Observation(
            "consumer_lag",
            PIPELINE,
            grade[0],
            oldest_waiting_s,
            grade[1],
            f"the oldest spool file has waited {oldest_waiting_s:.0f}s (above {grade[1]:.0f}s)",
        )
    ]


def kafka_lag_rule(lags: Sequence[PartitionLag], t: JobSettings) -> list[Observation]:
    """Consumer lag of each Kafka partition (``consume --source kafka``): messages behind its
    end, one alert per partition (the subject is ``"<topic>/<partition>"``).

    A partition whose consumer stopped or fell silent keeps its last known lag, said as such,
    instead of resolving: nobody consumes it, so its lag has not dropped
    (:func:`pipeline.status.kafka_lags`).
    """
    out = []
    for lag in lags:
        grade = _grade(
            lag.messages, t.alert_kafka_lag_warning, t.alert_kafka_lag_critical, above=True
        )
        if not grade:
            continue
        if lag.current:
            behind = f"is {lag.messages:,} messages behind its end"
        else:
            when = datetime.fromtimestamp(lag.updated_at, UTC)
            behind = (
                f"was {lag.messages:,} messages behind its end when its consumer stopped "
                f"reporting at {when:%Y-%m-%d %H:%M:%S} UTC; nobody reports it now"
            )
        out.append(
            Observation(
                "consumer_lag",
                lag.key,
                grade[0],
                float(lag.messages),
                float(grade[1]),
                f"Kafka partition {lag.key} {behind} (above {grade[1]:,})",
            )
        )
    return out


def budget_rules(
    spend: pl.DataFrame, budgets: pl.DataFrame, *, now: datetime, t: JobSettings
) -> list[Observation]:
    """Today's spend per campaign against its daily budget.

    ``spend`` has campaign_id and spend_micros for the current UTC day; ``budgets`` has
    campaign_id and daily_budget_micros (null or 0: no budget, no alert). Critical above
    ALERT_BUDGET_CRITICAL of the budget; warning at ALERT_BUDGET_WARNING of it while less than
    ALERT_BUDGET_WARNING_BEFORE of the day has passed (spending too fast).
    """
    if spend.is_empty() or budgets.is_empty():
        return []
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    day_fraction = (now - midnight).total_seconds() / 86_400
    ratio = pl.col("spend_micros") / pl.col("daily_budget_micros")
    graded = (
        spend.join(budgets, on="campaign_id", how="inner")
        .filter(pl.col("daily_budget_micros") > 0)
        .with_columns(ratio=ratio)
        .with_columns(
            severity=pl.when(pl.col("ratio") > t.alert_budget_critical)
            .then(pl.lit("critical"))
            .when(
                (pl.col("ratio") >= t.alert_budget_warning)
                & (day_fraction < t.alert_budget_warning_before)
            )
            .then(pl.lit("warning")),
        )
        .filter(pl.col("severity").is_not_null())
        .sort("campaign_id")
    )
    out = []
    for row in graded.iter_rows(named=True):  # only the campaigns that fire
        threshold = (
            t.alert_budget_critical if row["severity"] == "critical" else t.alert_budget_warning
        )
        out.append(
            Observation(
                "budget",
                row["campaign_id"],
                row["severity"],
                float(row["ratio"]),
                threshold,
                f"campaign {row['campaign_id']} spent {row['ratio']:.0%} of its daily budget "
                f"({row['spend_micros'] / 1e6:,.2f} of {row['daily_budget_micros'] / 1e6:,.2f} "
                f"USD) with {day_fraction:.0%} of the day gone",
            )
        )
    return out


# -- lifecycle (pure) --------------------------------------------------------------------------
def advance(
    alerts: Sequence[Alert],
    observations: Sequence[Observation],
    *,
    now: datetime,
    history_days: int = 30,
) -> tuple[list[Alert], list[Notification]]:
    """The alerts after this tick, and what changed.

    One open alert per (rule, subject): a new observation opens one (``fired``), an open one
    takes the latest value and severity (``escalated``/``deescalated`` when that changes), and
    an open alert with no observation this tick is ``resolved``. Resolved alerts older than
    ``history_days`` are forgotten.
    """
    seen: dict[tuple[str, str], Observation] = {}
    for ob in observations:
        key = (ob.rule, ob.subject)
        if key not in seen or SEVERITIES.index(ob.severity) > SEVERITIES.index(seen[key].severity):
            seen[key] = ob
    out: list[Alert] = []
    notes: list[Notification] = []
    horizon = now - timedelta(days=history_days)
    for a in alerts:
        if not a.open:
            if a.ended_at is not None and a.ended_at >= horizon:
                out.append(a)
            continue
        o = seen.get((a.rule, a.subject))
        seen.pop((a.rule, a.subject), None)
        if o is None:
            ended = replace(a, status=RESOLVED, ended_at=now, updated_at=now)
            out.append(ended)
            notes.append(Notification("resolved", ended))
            continue
        updated = replace(
            a,
            severity=o.severity,
            value=o.value,
            threshold=o.threshold,
            message=o.message,
            updated_at=now,
        )
        out.append(updated)
        if o.severity != a.severity:
            worse = SEVERITIES.index(o.severity) > SEVERITIES.index(a.severity)
            notes.append(Notification("escalated" if worse else "deescalated", updated))
    for (rule, subject), new in sorted(seen.items()):
        started = Alert(
            alert_id=f"{rule}:{subject}:{int(now.timestamp() * 1000)}",
            rule=rule,
            subject=subject,
            severity=new.severity,
            status=FIRING,
            value=new.value,
            threshold=new.threshold,
            message=new.message,
            started_at=now,
            updated_at=now,
        )
        out.append(started)
        notes.append(Notification("fired", started))
    return out, notes


# -- the store ---------------------------------------------------------------------------------
def save_alerts(layout: Layout, alerts: Sequence[Alert], *, durable: bool) -> None:
    """Replace the alert store with ``alerts`` (atomically)."""
    write_parquet_atomic(alerts_frame(alerts), alerts_path(layout), durable=durable)


# -- the job -----------------------------------------------------------------------------------
@dataclass
class AlertReport:
    open: int = 0
    fired: int = 0
    resolved: int = 0
    changed: int = 0
    notifications: list[Notification] | None = None

    def line(self) -> str:
        return (
            f"alerts open={self.open} fired={self.fired} resolved={self.resolved} "
            f"severity_changes={self.changed}"
        )


def _today_spend(layout: Layout, now: datetime) -> pl.DataFrame:
    day = read_parquet_or(RollupPaths(layout).day(f"{now.astimezone(UTC):%Y-%m-%d}"), ROLLUP_SCHEMA)
    return day.group_by("campaign_id").agg(pl.col("spend_micros").sum())


def _budgets(layout: Layout) -> pl.DataFrame:
    schema = pl.Schema({"campaign_id": pl.String(), "daily_budget_micros": pl.Int64()})
    try:
        frame = pl.read_parquet(layout.campaigns)
    except FileNotFoundError:
        return pl.DataFrame(schema=schema)
    if "daily_budget_micros" not in frame.columns:
        return pl.DataFrame(schema=schema)
    return (
        frame.select(schema.names())
        .cast(schema)
        .unique("campaign_id", keep="first", maintain_order=True)
    )


def observe(
    layout: Layout, location: LakeLocation, t: JobSettings, *, now: datetime
) -> list[Observation]:
    """Every rule's observations now (the I/O edge around the pure rules): the ledger from the
    lake at ``location``; the spool, the consumers' statuses, rollups and budgets from
    ``layout``."""
    ledger = recent_ledger(location, now, t.alert_window)
    age = oldest_waiting_age(layout.incoming, now.timestamp())
    return (
        ops_rules(ledger, backlog_age_s=age, t=t)
        + lag_rule(age, t)
        + kafka_lag_rule(kafka_lags(read_statuses(layout.state), now.timestamp()), t)
        + budget_rules(_today_spend(layout, now), _budgets(layout), now=now, t=t)
    )


def _log(note: Notification) -> None:
    a = note.alert
    text = f"alert {note.event}: [{a.severity}] {a.rule}/{a.subject}: {a.message}"
    if note.event == "resolved":
        log.info(
            "alert resolved: %s/%s after %s",
            a.rule,
            a.subject,
            a.ended_at and a.ended_at - a.started_at,
        )
    elif a.severity == "critical":
        log.error(text)
    else:
        log.warning(text)


def check_alerts(
    layout: Layout,
    location: LakeLocation,
    t: JobSettings,
    *,
    now: datetime,
    durable: bool = True,
) -> AlertReport:
    """Evaluate every rule once, store the alerts, log and return what changed.

    With ALERT_WEBHOOK_URL set, the changes are queued in the outbox first (so a crash in
    between can repeat a notification but never lose one); :func:`jobs.webhook.deliver` sends
    them. Thresholds, window and history are the ALERT_* settings of ``t``.
    """
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # stored to the millisecond
    with job_lock(layout, "alerts"):
        observations = observe(layout, location, t, now=now)
        before = load_alerts(layout)
        after, notes = advance(before, observations, now=now, history_days=t.alert_history_days)
        if t.alert_webhook_url is not None and notes:
            outbox.enqueue(layout, notes, now=now, durable=durable)
        if after != before or not alerts_path(layout).exists():
            save_alerts(layout, after, durable=durable)
    for note in notes:
        _log(note)
    return AlertReport(
        open=sum(a.open for a in after),
        fired=sum(n.event == "fired" for n in notes),
        resolved=sum(n.event == "resolved" for n in notes),
        changed=sum(n.event in ("escalated", "deescalated") for n in notes),
        notifications=notes,
    )
