"""Response models of the API, and the conversions from query results (micros in, USD out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from msgspec import Struct

from pipeline.tables import Alert
from queries.campaigns import Bucket, CampaignTotals, Totals, ratios
from queries.events import Event

MICROS = 1_000_000


def usd(micros: float | None) -> float | None:
    """Money leaves the API in USD; inside it stays integer micros."""
    return None if micros is None else micros / MICROS


class AdEvent(Struct):
    event_id: str
    event_type: str
    #: event_time in epoch milliseconds (UTC).
    timestamp: int
    campaign_id: str
    ad_id: str
    publisher_id: str
    advertiser_id: str | None
    device_type: str | None
    country: str | None
    cost_usd: float
    revenue_usd: float
    processed: bool = True

    @classmethod
    def of(cls, e: Event) -> AdEvent:
        return cls(
            event_id=e.event_id,
            event_type=e.event_type,
            timestamp=e.time_ms,
            campaign_id=e.campaign_id,
            ad_id=e.ad_id,
            publisher_id=e.publisher_id,
            advertiser_id=e.advertiser_id,
            device_type=e.device_type,
            country=e.country,
            cost_usd=e.cost_micros / MICROS,
            revenue_usd=e.revenue_micros / MICROS,
        )


class LatestEvents(Struct):
    events: list[AdEvent]
    #: Events stored in the lake.
    total_count: int
    #: Events per second the consumer took in over the last 10 seconds.
    processing_rate_per_sec: float


class CampaignEvents(Struct):
    campaign_id: str
    events: list[AdEvent]
    #: Pass as ``cursor`` for the next (older) page; null on the last page.
    next_cursor: str | None


class Measures(Struct):
    """Totals and the standard ratios; a ratio whose denominator is zero is null."""

    impressions: int
    clicks: int
    conversions: int
    spend_usd: float
    revenue_usd: float
    ctr: float | None
    cvr: float | None
    cpm_usd: float | None
    cpc_usd: float | None
    cpa_usd: float | None
    roas: float | None


def measures(t: Totals) -> dict[str, Any]:
    """The fields of :class:`Measures` for ``t``, money in USD, by name."""
    r = ratios(t)
    return msgspec.structs.asdict(
        Measures(
            impressions=t.impressions,
            clicks=t.clicks,
            conversions=t.conversions,
            spend_usd=t.spend_micros / MICROS,
            revenue_usd=t.revenue_micros / MICROS,
            ctr=r.ctr,
            cvr=r.cvr,
            cpm_usd=usd(r.cpm_micros),
            cpc_usd=usd(r.cpc_micros),
            cpa_usd=usd(r.cpa_micros),
            roas=r.roas,
        )
    )


class Performance(Measures):
    """Totals and the standard ratios over a whole range; a ratio whose denominator is zero is
    null."""

    @classmethod
    def of(cls, t: Totals) -> Performance:
        return cls(**measures(t))


class StatsPoint(Measures):
    """One bucket of a campaign's series: its totals and ratios, and when it starts."""

    #: Start of the bucket, epoch milliseconds (UTC).
    bucket_start: int

    @classmethod
    def of(cls, b: Bucket) -> StatsPoint:
        return cls(bucket_start=b.start_ms, **measures(b.totals))


class CampaignStats(Struct):
    campaign_id: str
    granularity: str
    since: int
    until: int
    #: Buckets with events, oldest first; buckets without events are left out.
    series: list[StatsPoint]
    total: Performance


class LeaderboardRow(Measures):
    """One campaign of a leaderboard: its rank, names, totals and ratios."""

    rank: int
    campaign_id: str
    campaign_name: str | None
    advertiser_id: str | None

    @classmethod
    def of(cls, rank: int, c: CampaignTotals) -> LeaderboardRow:
        return cls(
            rank=rank,
            campaign_id=c.campaign_id,
            campaign_name=c.campaign_name,
            advertiser_id=c.advertiser_id,
            **measures(c.totals),
        )


class Leaderboard(Struct):
    metric: str
    since: int | None
    campaigns: list[LeaderboardRow]


def epoch_ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


class AlertInfo(Struct):
    """One threshold alert over its life (see ``adevents alerts``)."""

    alert_id: str
    #: throughput, latency_p95, error_rate, consumer_lag or budget.
    rule: str
    #: "pipeline", the campaign_id of a budget alert, or the "<topic>/<partition>" of a
    #: consumer_lag alert on a Kafka partition.
    subject: str
    #: warning or critical.
    severity: str
    #: firing or resolved.
    status: str
    #: The rule's measure when last evaluated, and the level it crossed.
    value: float
    threshold: float
    message: str
    #: Epoch milliseconds (UTC): when it fired, was last evaluated, and resolved (null: open).
    started_at: int
    updated_at: int
    ended_at: int | None

    @classmethod
    def of(cls, a: Alert) -> AlertInfo:
        return cls(
            alert_id=a.alert_id,
            rule=a.rule,
            subject=a.subject,
            severity=a.severity,
            status=a.status,
            value=a.value,
            threshold=a.threshold,
            message=a.message,
            started_at=epoch_ms(a.started_at),
            updated_at=epoch_ms(a.updated_at),
            ended_at=None if a.ended_at is None else epoch_ms(a.ended_at),
        )


class Alerts(Struct):
    #: Open alerts first (critical, then newest), then resolved ones, most recently ended first.
    alerts: list[AlertInfo]


class KeyCacheHealth(Struct):
    kind: str
    ok: bool
    #: What was found, in words that name no host or path.
    detail: str
    consumer_running: bool | None = None
    #: The error as raised (it may name a host:port): only for a caller with an API key.
    error: str | None = None


class ConsumerHealth(Struct):
    """A consumer's last published state (``state/consumers/``)."""

    name: str
    #: running, retrying or stopped; ``stale`` when it has not reported for a while (gone).
    state: str
    #: The transient fault it is waiting out while retrying (e.g. redis_unavailable).
    fault: str | None
    #: Since when (epoch ms) it has been in this state, and how many retries so far.
    since: int
    attempts: int
    next_retry_at: int | None
    updated_at: int
    #: The fault's own words (may name a host or path): only for a caller with an API key.
    detail: str | None = None


class PartitionLagHealth(Struct):
    """A Kafka partition's lag, as the consumer holding it last published it."""

    topic: str
    partition: int
    consumer: str
    #: Messages between the consumer's position and the partition's end.
    messages: int
    #: When that consumer last reported (epoch ms).
    updated_at: int
    #: False when that consumer has stopped or is stale: ``messages`` is its last known lag,
    #: and nobody reports the partition now.
    current: bool


class PublicHealth(Struct):
    """What /health tells anyone: ok, degraded or unhealthy, and why as reason codes."""

    #: ``ok``; ``degraded`` (still 200: it serves, but e.g. a Kafka partition lags beyond
    #: KAFKA_LAG_MAX); ``unhealthy`` (503).
    status: str
    #: Reason codes, e.g. ``consumer_lag``, ``disk_low``, ``consumer_retrying:redis_unavailable``.
    reasons: list[str]
    checked_at: int


class Health(Struct):
    """/health/detail: every check's result."""

    status: str
    #: Reason codes (see PublicHealth); empty when healthy.
    reasons: list[str]
    #: One sentence per reason, for people (no hosts or paths).
    messages: list[str]
    checked_at: int
    key_cache: KeyCacheHealth
    data_dir_writable: bool
    #: Free bytes on DATA_DIR's filesystem (for unprivileged users), and the configured minimum.
    disk_free_bytes: int | None
    disk_min_free_bytes: int
    #: Age in seconds of the oldest file waiting in incoming/ (0 when none).
    consumer_lag_seconds: float
    files_waiting: int
    #: When the newest batch was committed (epoch ms), null when none ever was.
    last_commit: int | None
    seconds_since_last_commit: float | None
    consumers: list[ConsumerHealth]
    #: Each Kafka partition's lag, most behind first (empty without ``consume --source kafka``).
    kafka_lag: list[PartitionLagHealth]
    #: KAFKA_LAG_MAX: a partition further behind makes the status ``degraded``.
    kafka_lag_max_messages: int
    #: Each lake table's Delta version and how many data files it has (-1 and 0: not created).
    lake_versions: dict[str, int] = msgspec.field(default_factory=dict)
    lake_files: dict[str, int] = msgspec.field(default_factory=dict)
    #: The absolute DATA_DIR: only for a caller with an API key.
    data_dir: str | None = None

    def public(self) -> PublicHealth:
        return PublicHealth(self.status, self.reasons, self.checked_at)

    def http_status(self) -> int:
        """503 only when unhealthy: a degraded API still serves, so load balancers keep it."""
        return 503 if self.status == "unhealthy" else 200

    def redacted(self) -> Health:
        """Without what only a key holder may see: paths, hosts, raw errors."""
        return msgspec.structs.replace(
            self,
            data_dir=None,
            key_cache=msgspec.structs.replace(self.key_cache, error=None),
            consumers=[msgspec.structs.replace(c, detail=None) for c in self.consumers],
        )
