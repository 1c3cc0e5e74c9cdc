"""One typed settings object, read from the environment once and overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


#: Most key-cache generations one dedupe window may span (DEDUPE_SLICE >= DEDUPE_WINDOW / this).
MAX_GENERATIONS_PER_WINDOW: Final = 16


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable and what it accepts."""


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``100ms``, ``15m``, ``1h``, ``2d`` or a number of seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 100ms, 30s, 15m, 1h or 2d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def _non_negative_int(text: str) -> int:
    value = int(str(text).replace("_", ""))
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _nice_level(text: str) -> int:
    value = _non_negative_int(text)
    if value > 19:
        raise ValueError("must be 0 to 19")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise ValueError("must be 1 or more")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a fraction between 0 and 1")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be longer than 0")
    return value


def _millisecond_duration(text: str) -> float:
    value = _positive_duration(text)
    if value < 0.001:
        # The key cache counts in whole milliseconds: less would be a zero window or slice.
        raise ValueError("must be at least 1ms")
    return value


def _generation(text: str) -> float:
    """0 (the default: the dedupe window), else at least a millisecond."""
    value = parse_duration(text)
    if value == 0:
        return 0.0
    return _millisecond_duration(text)


def _log_level(text: str) -> str:
    value = str(text).upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _optional_str(text: str) -> str | None:
    return str(text).strip() or None


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _setting(default: Any, parse: Callable[[str], Any], help: str, *, secret: bool = False) -> Any:
    """A setting field; a ``secret`` one is left out of the repr (and so of every log line)."""
    return field(default=default, repr=not secret, metadata={"parse": parse, "help": help})


#: A settings class (a frozen dataclass of setting fields).
S = TypeVar("S")


def _from_env(cls: type[S], env: Mapping[str, str] | None, overrides: Mapping[str, Any]) -> S:
    """Settings class ``cls`` read from ``env`` (default: the process environment), then
    ``overrides`` (CLI flags; None means not given)."""
    return cls(**_read_fields(cls, os.environ if env is None else env, overrides))


def _read_fields(cls: type, env: Mapping[str, str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Parse every setting field of ``cls`` from overrides or the environment."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if "parse" not in f.metadata:
            continue
        name = f.name.upper()
        raw = overrides.get(f.name)
        source = f"--{f.name.replace('_', '-')}"
        if raw is None and name in env:
            raw, source = env[name], name
        if raw is None:
            continue
        raw = str(raw)
        try:
            values[f.name] = f.metadata["parse"](raw)
        except (ValueError, TypeError) as exc:
            raise SettingsError(
                f"{source}={raw!r} is invalid: {exc}. {name} is the {f.metadata['help']}."
            ) from None
    return values


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.I)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``128MiB``, ``64MB`` or a plain number of bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 134217728, 128MiB or 64MB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
    return value


def _duration(text: str) -> float:
    return parse_duration(text)


def _non_negative_float(text: str) -> float:
    value = float(str(text).replace("_", ""))
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a fraction between 0 and 1")
    return value


def _optional_url(text: str) -> str | None:
    value = str(text).strip()
    if not value:
        return None
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _expansion_ratio(text: str) -> float:
    value = float(str(text).replace("_", ""))
    if not value >= 1:
        raise ValueError("must be a number of at least 1")
    return value


def _vacuum_retention(text: str) -> float:
    value = parse_duration(text)
    if value < 3600:
        # Below an hour, vacuum could delete files of a snapshot a reader still holds or of a
        # commit still in flight (lake.maintenance.MIN_RETENTION_HOURS).
        raise ValueError("must be at least 1h")
    return value


@dataclass(frozen=True)
class JobSettings:
    """Every knob of the scheduled jobs; field names are the environment variables in lower case."""

    # -- schedule -------------------------------------------------------------------------------
    # Readers answer what the rollups do not cover yet from the events (a campaign's stats over
    # 24 h read the minutes since the last run): at 50k events/s a 1 min period left 3.5M rows
    # there, 2M of them already compacted into Parquet, 160 ms a question; 15 s leaves a quarter.
    rollup_interval: float = _setting(15.0, _positive_duration, "period of the rollup job")
    compact_interval: float = _setting(
        60.0,
        _positive_duration,
        "period of the compaction job (it keeps the open hour to a few files: readers stay fast)",
    )
    alert_interval: float = _setting(15.0, _positive_duration, "period of the alert evaluation")
    alert_webhook_interval: float = _setting(
        5.0, _positive_duration, "period of the alert webhook delivery job"
    )
    retention_interval: float = _setting(3600.0, _positive_duration, "period of the retention job")
    jobs_nice: int = _setting(
        10,
        _nice_level,
        "CPU priority of the jobs below the consumer and the API (0-19, as nice(1))",
    )
    # -- compaction -----------------------------------------------------------------------------
    compact_min_age: float = _setting(
        600.0,
        _duration,
        "an events hour is clustered (once) when its end is this far in the past",
    )
    compact_target_bytes: int = _setting(
        128 * 1024**2, _positive_size, "approximate bytes per compacted file, e.g. 128MiB"
    )
    compact_row_group_rows: int = _setting(
        16_384,
        _positive_int,
        "rows per row group of clustered hours and compacted files (an hour not clustered yet "
        "keeps the consumer's)",
    )
    compact_memory_bytes: int = _setting(
        1024**3,
        _positive_size,
        "memory the clustering of an hour sorts in before it spills to disk (bounds the "
        "scheduler's memory)",
    )
    # -- alerts ---------------------------------------------------------------------------------
    alert_window: float = _setting(
        60.0, _positive_duration, "window of ledger batches the throughput/latency/error rules see"
    )
    alert_throughput_warning: float = _setting(
        100_000.0, _non_negative_float, "events/s below which a backlogged consumer warns"
    )
    alert_throughput_critical: float = _setting(
        50_000.0, _non_negative_float, "events/s below which a backlogged consumer is critical"
    )
    alert_latency_p95_warning: float = _setting(
        0.050,
        _positive_duration,
        "p95 processing time per 10k events of commit groups of 10k+ that warns",
    )
    alert_latency_p95_critical: float = _setting(
        0.100,
        _positive_duration,
        "p95 processing time per 10k events of commit groups of 10k+: critical",
    )
    alert_error_rate_warning: float = _setting(
        0.01, _fraction, "quarantined / rows in above which the error-rate rule warns"
    )
    alert_error_rate_critical: float = _setting(
        0.05, _fraction, "quarantined / rows in above which the error-rate rule is critical"
    )
    alert_budget_warning: float = _setting(
        0.8, _non_negative_float, "fraction of a daily budget that warns when spent early"
    )
    alert_budget_warning_before: float = _setting(
        0.8, _fraction, "fraction of the UTC day before which the budget warning applies"
    )
    alert_budget_critical: float = _setting(
        1.0, _non_negative_float, "fraction of a daily budget above which spend is critical"
    )
    alert_lag_warning: float = _setting(
        30.0, _positive_duration, "age of the oldest waiting spool file that warns"
    )
    alert_lag_critical: float = _setting(
        300.0, _positive_duration, "age of the oldest waiting spool file that is critical"
    )
    alert_kafka_lag_warning: int = _setting(
        100_000, _positive_int, "messages a Kafka partition lags behind its end that warns"
    )
    alert_kafka_lag_critical: int = _setting(
        1_000_000, _positive_int, "messages a Kafka partition lags behind its end that is critical"
    )
    alert_history_days: int = _setting(
        30, _positive_int, "days resolved alerts are kept under alerts/"
    )
    alert_webhook_url: str | None = _setting(
        None, _optional_url, "URL alerts are POSTed to as JSON; unset = no webhook"
    )
    alert_webhook_timeout: float = _setting(
        2.0, _positive_duration, "timeout of one webhook request"
    )
    alert_webhook_retries: int = _setting(
        2, _non_negative_int, "immediate retries of a failed webhook request"
    )
    alert_webhook_max_age: float = _setting(
        3600.0, _positive_duration, "an undelivered alert notification is dropped after this"
    )
    # -- retention ------------------------------------------------------------------------------
    retention_days: int = _setting(
        30, _non_negative_int, "days events are kept, deleted by whole UTC days (0 = forever)"
    )
    rollup_minute_retention_days: int = _setting(
        7, _non_negative_int, "days minute rollups are kept (0 = forever)"
    )
    rollup_hour_retention_days: int = _setting(
        90, _non_negative_int, "days hour rollups are kept (0 = forever)"
    )
    rollup_day_retention_days: int = _setting(
        0, _non_negative_int, "days day rollups are kept (0 = forever)"
    )
    quarantine_retention_days: int = _setting(
        30,
        _non_negative_int,
        "days rejected rows (the quarantine table) and whole quarantined files are kept, "
        "by whole UTC days of when they were quarantined (0 = forever)",
    )
    ledger_retention_days: int = _setting(
        30,
        _non_negative_int,
        "days ledger rows are kept, by whole UTC days of their commit (0 = forever); "
        "the /metrics ledger totals drop by what it deletes",
    )
    vacuum_retention: float = _setting(
        24 * 3600.0,
        _vacuum_retention,
        "files a lake table no longer uses (and orphans of failed writes) are deleted after "
        "this, at least 1h: the longest a reader may keep a snapshot",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> JobSettings:
        """Read the environment, then apply overrides (CLI flags; None means not given)."""
        settings = _from_env(cls, env, overrides)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse thresholds in the wrong order (a critical level milder than its warning)."""
        pairs = [
            ("ALERT_THROUGHPUT_CRITICAL", "ALERT_THROUGHPUT_WARNING"),
            ("ALERT_LATENCY_P95_WARNING", "ALERT_LATENCY_P95_CRITICAL"),
            ("ALERT_ERROR_RATE_WARNING", "ALERT_ERROR_RATE_CRITICAL"),
            ("ALERT_LAG_WARNING", "ALERT_LAG_CRITICAL"),
        ]
        for low, high in pairs:
            if getattr(self, low.lower()) > getattr(self, high.lower()):
                raise SettingsError(f"{low} must be at most {high}")

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, for README and ``--help``."""
        return [(f.name.upper(), repr(f.default), f.metadata["help"]) for f in fields(JobSettings)]


def _key_list(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in str(text).split(",") if k.strip())
    for k in keys:
        if not (k.isascii() and k.isprintable()) or " " in k:
            raise ValueError("keys must be printable ASCII without spaces, separated by commas")
    return keys


@dataclass(frozen=True)
class IngestSettings:
    """The HTTP ingest's knobs; field names are the environment variables in lower case."""

    ingest_api_keys: tuple[str, ...] = _setting(
        (),
        _key_list,
        "comma-separated API keys POST /ad_events accepts (X-API-Key or Authorization: Bearer); "
        "none = every ingest request is refused",
    )
    api_keys_required_for_read: bool = _setting(
        False,
        _bool,
        "require one of INGEST_API_KEYS on the read endpoints too "
        "(not /health; /health/detail needs it)",
    )
    ingest_max_body_bytes: int = _setting(
        32 * 1024**2,
        _positive_size,
        "largest request body POST /ad_events takes, after decompression when it is gzip or "
        "zstd (413 above)",
    )
    ingest_max_compression_ratio: float = _setting(
        100.0,
        _expansion_ratio,
        "most a gzip or zstd body of POST /ad_events may expand (decompressed size over "
        "compressed size; 413 above): a compression bomb stops there",
    )
    ingest_batch_events: int = _setting(
        100_000,
        _positive_int,
        "events per spool file the ingest writes: a micro-batch is written when it has this "
        "many or BATCH_INTERVAL after its first request, whichever comes first",
    )
    max_backlog_events: int = _setting(
        10_000_000,
        _positive_int,
        "events waiting in incoming/ above which POST /ad_events answers 429 (disk guard)",
    )
    ingest_max_json_depth: int = _setting(
        16, _positive_int, "deepest JSON nesting POST /ad_events decodes (400 above)"
    )
    ingest_max_events_per_request: int = _setting(
        100_000, _positive_int, "most events one POST /ad_events request may carry (413 above)"
    )
    ingest_sink: str = _setting(
        "spool",
        _choice("spool", "kafka"),
        "where POST /ad_events puts accepted events: the local spool, or the Kafka topic "
        "(202 only once the broker acknowledged the write)",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> IngestSettings:
        """Read the environment, then apply overrides (None means not given)."""
        return _from_env(cls, env, overrides)

    def replace(self, **changes: Any) -> IngestSettings:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting."""
        return [
            (f.name.upper(), repr(f.default), f.metadata["help"]) for f in fields(IngestSettings)
        ]


@dataclass(frozen=True)
class QuerySettings:
    """Memory each API process (each ``serve --workers`` process) keeps to answer from (every
    cache is bounded by one of these, never by the lake's size), and the threads it answers on."""

    query_small_files_bytes: int = _setting(
        768 * 1024**2,
        parse_size,
        "memory the newest small events files (the uncompacted tail) are kept in, each read "
        "once: their Arrow rows and the per-campaign order questions build on them; older "
        "ones are scanned per question (0 = none kept)",
    )
    query_row_groups_bytes: int = _setting(
        256 * 1024**2,
        parse_size,
        "memory of decoded row groups of local events files, for a campaign's newest events "
        "(0 = none kept)",
    )
    query_minute_sums_bytes: int = _setting(
        64 * 1024**2,
        parse_size,
        "memory of a campaign's running totals within a minute and of row groups' per-campaign "
        "totals, for stats' partial minutes read from files on disk (0 = none kept)",
    )

    query_rollups_bytes: int = _setting(
        64 * 1024**2,
        parse_size,
        "memory of rollup files' rows by campaign, for stats (0 = none kept: DuckDB reads them "
        "for every question)",
    )
    query_threads: int = _setting(
        2,
        _positive_int,
        "threads each API process answers questions on; more only add GIL contention (a "
        "question is CPU work), except where questions wait on storage (an S3 lake)",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> QuerySettings:
        """Read the environment, then apply overrides (None means not given)."""
        return _from_env(cls, env, overrides)


def _kafka_properties(text: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key=value`` librdkafka properties, passed through as they are."""
    pairs = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("must be librdkafka properties as key=value, separated by commas")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class KafkaSettings:
    """The Kafka source and sinks (``consume --source kafka``, ``generate --kafka``,
    INGEST_SINK=kafka); field names are the environment variables in lower case."""

    kafka_bootstrap_servers: str = _setting(
        "", str, "Kafka bootstrap servers, host:port[,host:port] (needed by every Kafka mode)"
    )
    kafka_topic: str = _setting("ad-events", str, "Kafka topic the events are published to")
    kafka_group_id: str = _setting(
        "adevents",
        str,
        "Kafka consumer group of `consume --source kafka` (names its Delta app ids)",
    )
    kafka_security_protocol: str = _setting(
        "PLAINTEXT",
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "Kafka security.protocol",
    )
    kafka_sasl_mechanism: str = _setting(
        "", str, "Kafka sasl.mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER)"
    )
    kafka_sasl_username: str = _setting("", str, "Kafka sasl.username", secret=True)
    kafka_sasl_password: str = _setting("", str, "Kafka sasl.password", secret=True)
    kafka_ssl_ca_location: str = _setting("", str, "Kafka ssl.ca.location (CA bundle path)")
    kafka_config: tuple[tuple[str, str], ...] = _setting(
        (),
        _kafka_properties,
        "other librdkafka properties for every Kafka client, key=value,key=value",
        secret=True,
    )
    kafka_batch_events: int = _setting(
        100_000,
        _positive_int,
        "most events in one partition's micro-batch (it also closes after BATCH_INTERVAL)",
    )
    kafka_lag_max: int = _setting(
        1_000_000,
        _positive_int,
        "messages a partition may lag behind its end before /health reports degraded",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> KafkaSettings:
        """Read the environment, then apply overrides (None means not given)."""
        return _from_env(cls, env, overrides)

    def replace(self, **changes: Any) -> KafkaSettings:
        return dataclasses.replace(self, **changes)

    def client_config(self) -> dict[str, str]:
        """librdkafka properties common to producers and consumers (SASL/SSL passed through)."""
        config = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
        }
        optional = {
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "sasl.password": self.kafka_sasl_password,
            "ssl.ca.location": self.kafka_ssl_ca_location,
        }
        config.update({k: v for k, v in optional.items() if v})
        config.update(dict(self.kafka_config))
        return config


@dataclass(frozen=True)
class Settings:
    """Every knob of adevents; field names are the environment variables in lower case."""

    data_dir: str = _setting("./ad_event_data", str, "data directory (spool, lake, state)")
    redis_url: str | None = _setting(
        None, _optional_str, "Redis key cache, e.g. redis://127.0.0.1:6379/0; unset = embedded"
    )
    redis_key_prefix: str = _setting("adevents", str, "prefix of every Redis key adevents writes")
    dedupe_window: float = _setting(
        3600.0, _millisecond_duration, "dedupe window, e.g. 15m, 1h, 24h"
    )
    dedupe_slice: float = _setting(
        0.0,
        _generation,
        "event-time span of one key-cache generation (0 = DEDUPE_WINDOW; at least "
        "DEDUPE_WINDOW / 16: a claim looks in every live generation)",
    )
    log_level: str = _setting("INFO", _log_level, "logging level")
    events_per_second: int = _setting(50_000, _non_negative_int, "generator rate (0 = max)")
    batch_interval: float = _setting(0.1, _positive_duration, "generator/ingest batch interval")
    dup_rate: float = _setting(0.01, _rate, "fraction of events the generator re-sends")
    late_rate: float = _setting(0.0, _rate, "fraction of events the generator delays")
    invalid_rate: float = _setting(0.0, _rate, "fraction of malformed rows the generator writes")
    restamp_rate: float = _setting(
        0.0,
        _rate,
        "fraction of the generator's duplicates whose copy carries another event_time",
    )
    max_events_per_second: int = _setting(
        1_000_000, _non_negative_int, "consumer throughput cap (0 = none)"
    )
    lease_timeout: float = _setting(
        30.0,
        _positive_duration,
        "a dead consumer's Redis rebuild lock is taken over after this long",
    )
    rebuild_grace: float = _setting(
        2.0, parse_duration, "wait before rebuilding a lost Redis cache, for commits under way"
    )
    fsync: bool = _setting(True, _bool, "fsync outputs before an input file is deleted")
    keep_processed: bool = _setting(False, _bool, "keep committed input files under processed/")
    poll_interval: float = _setting(0.05, _positive_duration, "idle consumer's spool poll period")
    consumer_name: str = _setting("", str, "name of this consumer in the ledger (default host-pid)")
    disk_min_free: int = _setting(
        1024**3,
        parse_size,
        "free space DATA_DIR's disk must keep: below it /health is 503, the ingest answers 503 "
        "and the consumer pauses (e.g. 1GiB; 0 = no check)",
    )
    retry_max_delay: float = _setting(
        30.0,
        _positive_duration,
        "longest wait between retries of a transient fault (Redis, disk, lake)",
    )
    once_retry_timeout: float = _setting(
        60.0,
        _positive_duration,
        "with --once, give up on a transient fault after this long and exit non-zero",
    )
    lake_uri: str = _setting(
        "",
        str,
        "where the Delta tables live: a local path or s3://bucket/prefix (default DATA_DIR/lake)",
    )
    aws_endpoint_url: str = _setting(
        "", str, "S3-compatible endpoint for an s3:// LAKE_URI (unset = AWS)"
    )
    aws_region: str = _setting("", str, "S3 region (unset = AWS_DEFAULT_REGION or us-east-1)")
    aws_access_key_id: str = _setting("", str, "S3 access key id", secret=True)
    aws_secret_access_key: str = _setting("", str, "S3 secret access key", secret=True)
    aws_allow_http: bool = _setting(
        False, _bool, "allow a plain-http AWS_ENDPOINT_URL (a loopback or private S3 server)"
    )
    commit_interval: float = _setting(
        1.0,
        _positive_duration,
        "the consumer gathers spool files into one lake commit for at most this long",
    )
    commit_target_rows: int = _setting(
        200_000, _positive_int, "a lake commit closes early once its files hold this many rows"
    )
    consumer_slot: int = _setting(
        0,
        _non_negative_int,
        "this consumer's slot among several on one spool (each slot a separate process)",
    )
    consumer_source: str = _setting(
        "spool",
        _choice("spool", "kafka"),
        "where `adevents consume` reads events: this machine's spool, or the Kafka topic "
        "(`consume --source`)",
    )
    #: The scheduled jobs' settings (their own subsystem, read from the same environment).
    jobs: JobSettings = field(default_factory=JobSettings)
    #: The Kafka source's and sinks' settings.
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    #: The HTTP ingest's settings (``POST /ad_events``).
    ingest: IngestSettings = field(default_factory=IngestSettings)
    #: The query layer's memory (the API's caches).
    query: QuerySettings = field(default_factory=QuerySettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment, then apply overrides (CLI flags; None means not given)."""
        env = os.environ if env is None else env
        values = _read_fields(cls, env, overrides)
        settings = cls(
            **values,
            jobs=JobSettings.from_env(env, **overrides),
            ingest=IngestSettings.from_env(env, **overrides),
            kafka=KafkaSettings.from_env(env, **overrides),
            query=QuerySettings.from_env(env, **overrides),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse key-cache generations so short that a window spans too many of them: a
        claim looks in every live generation, so its cost grows with their number (a 1 s
        generation under a 1 h window would be 3,600 lookups per key)."""
        if self.dedupe_window_ms > MAX_GENERATIONS_PER_WINDOW * self.dedupe_generation_ms:
            raise SettingsError(
                f"DEDUPE_SLICE must be 0 or at least DEDUPE_WINDOW / {MAX_GENERATIONS_PER_WINDOW}"
                f" ({self.dedupe_window / MAX_GENERATIONS_PER_WINDOW:g}s for DEDUPE_WINDOW="
                f"{self.dedupe_window:g}s), got {self.dedupe_slice:g}s"
            )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def dedupe_window_ms(self) -> int:
        return int(self.dedupe_window * 1000)

    @property
    def dedupe_generation_ms(self) -> int:
        """Event-time span of one key-cache generation: keys are dropped a generation at a
        time, and a claim looks in every live one (see ``pipeline.keycache``)."""
        return int((self.dedupe_slice or self.dedupe_window) * 1000)

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, for README and ``--help``."""
        return [
            (f.name.upper(), repr(f.default), f.metadata["help"])
            for cls in (Settings, JobSettings, IngestSettings, KafkaSettings, QuerySettings)
            for f in fields(cls)
            if "parse" in f.metadata
        ]
