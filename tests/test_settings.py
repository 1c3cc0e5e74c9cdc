"""Settings: defaults, environment, CLI overrides, and errors that name the variable."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from pipeline.settings import (
    LOG_LEVELS,
    IngestSettings,
    JobSettings,
    KafkaSettings,
    QuerySettings,
    Settings,
    SettingsError,
    parse_duration,
)
from queries.lake import Lake

# The root settings' own fields; the jobs subsystem (Settings.jobs) has its own tests.
SUBSYSTEMS = ("jobs", "ingest", "kafka", "query")
FIELDS = [f.name for f in dataclasses.fields(Settings) if f.name not in SUBSYSTEMS]

DEFAULTS: dict[str, Any] = {
    "data_dir": "./ad_event_data",
    "redis_url": None,
    "redis_key_prefix": "adevents",
    "dedupe_window": 3600.0,
    "dedupe_slice": 0.0,
    "log_level": "INFO",
    "events_per_second": 50_000,
    "batch_interval": 0.1,
    "dup_rate": 0.01,
    "late_rate": 0.0,
    "invalid_rate": 0.0,
    "restamp_rate": 0.0,
    "max_events_per_second": 1_000_000,
    "lease_timeout": 30.0,
    "rebuild_grace": 2.0,
    "fsync": True,
    "keep_processed": False,
    "poll_interval": 0.05,
    "consumer_name": "",
    "disk_min_free": 1024**3,
    "retry_max_delay": 30.0,
    "once_retry_timeout": 60.0,
    "lake_uri": "",
    "aws_endpoint_url": "",
    "aws_region": "",
    "aws_access_key_id": "",
    "aws_secret_access_key": "",
    "aws_allow_http": False,
    "commit_interval": 1.0,
    "commit_target_rows": 200_000,
    "consumer_slot": 0,
    "consumer_source": "spool",
}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("1ms", 0.001),
        ("30s", 30.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("24h", 86_400.0),
        ("2d", 172_800.0),
        ("90", 90.0),
        ("0.5", 0.5),
        ("1.5h", 5400.0),
        ("250.5ms", 0.2505),
        (" 15m ", 900.0),
        ("15 m", 900.0),
        ("0", 0.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "h",
        "ms",
        "-1s",
        "+1s",
        "1x",
        "1 hour",
        "1h30m",
        "1e3",
        "1e3s",
        ".5s",
        "1.s",
        "inf",
        "nan",
        "1,5s",
        "15min",
        "1hh",
        "s1",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


# --- defaults, environment, overrides -----------------------------------------------------------


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    own = {k: v for k, v in dataclasses.asdict(settings).items() if k not in SUBSYSTEMS}
    assert own == DEFAULTS
    assert settings == Settings()


def test_defaults_cover_every_field() -> None:
    assert set(DEFAULTS) == set(FIELDS)


def test_from_env_reads_os_environ_when_no_mapping_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEDUPE_WINDOW", "15m")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = Settings.from_env()
    assert settings.dedupe_window == 900.0
    assert settings.log_level == "DEBUG"


def test_environment_mapping_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUPE_WINDOW", "15m")
    assert Settings.from_env({}).dedupe_window == 3600.0


ENV_CASES: list[tuple[str, str, Any]] = [
    ("LAKE_URI", "s3://lake/prod", "s3://lake/prod"),
    ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("AWS_REGION", "eu-west-1", "eu-west-1"),
    ("AWS_ACCESS_KEY_ID", "AKIA1234", "AKIA1234"),
    ("AWS_SECRET_ACCESS_KEY", "abc/def", "abc/def"),
    ("AWS_ALLOW_HTTP", "true", True),
    ("COMMIT_INTERVAL", "250ms", 0.25),
    ("COMMIT_TARGET_ROWS", "200000", 200_000),
    ("CONSUMER_SLOT", "3", 3),
    ("CONSUMER_SOURCE", "kafka", "kafka"),
    ("LEASE_TIMEOUT", "45s", 45.0),
    ("REBUILD_GRACE", "0", 0.0),
    ("DATA_DIR", "/srv/adevents", "/srv/adevents"),
    ("REDIS_URL", "redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"),
    ("REDIS_URL", "", None),
    ("REDIS_URL", "   ", None),
    ("REDIS_KEY_PREFIX", "staging", "staging"),
    ("DEDUPE_WINDOW", "15m", 900.0),
    ("DEDUPE_WINDOW", "24h", 86_400.0),
    ("DEDUPE_WINDOW", "100ms", 0.1),
    ("DEDUPE_WINDOW", "7200", 7200.0),
    ("DEDUPE_SLICE", "10m", 600.0),
    ("LOG_LEVEL", "debug", "DEBUG"),
    ("LOG_LEVEL", "Warning", "WARNING"),
    ("LOG_LEVEL", "CRITICAL", "CRITICAL"),
    ("EVENTS_PER_SECOND", "0", 0),
    ("EVENTS_PER_SECOND", "1_000", 1000),
    ("EVENTS_PER_SECOND", " 25 ", 25),
    ("BATCH_INTERVAL", "250ms", 0.25),
    ("DUP_RATE", "0", 0.0),
    ("DUP_RATE", "1", 1.0),
    ("DUP_RATE", "0.25", 0.25),
    ("LATE_RATE", "1e-3", 0.001),
    ("INVALID_RATE", "0.5", 0.5),
    ("RESTAMP_RATE", "0.5", 0.5),
    ("MAX_EVENTS_PER_SECOND", "0", 0),
    ("MAX_EVENTS_PER_SECOND", "2000000", 2_000_000),
    ("FSYNC", "0", False),
    ("FSYNC", "false", False),
    ("FSYNC", "No", False),
    ("FSYNC", "off", False),
    ("FSYNC", "1", True),
    ("KEEP_PROCESSED", "true", True),
    ("KEEP_PROCESSED", "YES", True),
    ("KEEP_PROCESSED", " on ", True),
    ("POLL_INTERVAL", "5ms", 0.005),
    ("CONSUMER_NAME", "consumer-a", "consumer-a"),
    ("DISK_MIN_FREE", "512MiB", 512 * 1024**2),
    ("DISK_MIN_FREE", "0", 0),
    ("RETRY_MAX_DELAY", "5s", 5.0),
    ("ONCE_RETRY_TIMEOUT", "2m", 120.0),
]


@pytest.mark.parametrize(("variable", "raw", "expected"), ENV_CASES)
def test_environment_variable_is_parsed(variable: str, raw: str, expected: Any) -> None:
    settings = Settings.from_env({variable: raw})
    value = getattr(settings, variable.lower())
    if isinstance(expected, float):
        assert math.isclose(value, expected)
    else:
        assert value == expected
    assert type(value) is type(expected)


def test_every_setting_has_an_environment_case() -> None:
    assert {v.lower() for v, _, _ in ENV_CASES} == set(FIELDS)


def test_unrelated_and_lower_case_variables_are_ignored() -> None:
    env = {"dedupe_window": "not a duration", "PATH": "/bin", "ADEVENTS_LOG_LEVEL": "nope"}
    assert Settings.from_env(env) == Settings()


@pytest.mark.parametrize(
    ("name", "env_raw", "flag_raw", "expected"),
    [
        ("dedupe_window", "1h", "15m", 900.0),
        ("data_dir", "/env/dir", "/cli/dir", "/cli/dir"),
        ("log_level", "ERROR", "debug", "DEBUG"),
        ("max_events_per_second", "10", "0", 0),
        ("redis_url", "redis://env:6379/0", "redis://cli:6379/1", "redis://cli:6379/1"),
        ("fsync", "true", "false", False),
    ],
)
def test_override_wins_over_environment(
    name: str, env_raw: str, flag_raw: str, expected: Any
) -> None:
    settings = Settings.from_env({name.upper(): env_raw}, **{name: flag_raw})
    assert getattr(settings, name) == expected


def test_none_override_means_not_given() -> None:
    settings = Settings.from_env({"DEDUPE_WINDOW": "15m"}, dedupe_window=None, log_level=None)
    assert settings.dedupe_window == 900.0
    assert settings.log_level == "INFO"


def test_override_wins_even_over_an_invalid_environment_value() -> None:
    settings = Settings.from_env({"DEDUPE_WINDOW": "soon"}, dedupe_window="15m")
    assert settings.dedupe_window == 900.0


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("fsync", False, False),
        ("keep_processed", True, True),
        ("max_events_per_second", 0, 0),
        ("events_per_second", 1234, 1234),
        ("dedupe_window", 900.0, 900.0),
        ("dedupe_window", 900, 900.0),
        ("dup_rate", 0.5, 0.5),
        ("data_dir", Path("/tmp/x"), "/tmp/x"),
    ],
)
def test_typed_override_is_accepted(name: str, value: Any, expected: Any) -> None:
    assert getattr(Settings.from_env({}, **{name: value}), name) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("events_per_second", -1),
        ("max_events_per_second", -5),
        ("dedupe_window", 0),
        ("dedupe_window", -1.0),
        ("dup_rate", 1.5),
        ("late_rate", -0.1),
        ("restamp_rate", 1.5),
        ("log_level", 10),
        ("events_per_second", 1.5),
    ],
)
def test_typed_override_is_validated_too(name: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=_flag(name)):
        Settings.from_env({}, **{name: value})


def test_make_settings_fixture(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(log_level="debug")
    assert settings.data_dir == str(tmp_path / "data")
    assert settings.fsync is False
    assert settings.max_events_per_second == 0
    assert settings.log_level == "DEBUG"


# --- invalid values -----------------------------------------------------------------------------

INVALID: list[tuple[str, str, str]] = [
    ("DEDUPE_WINDOW", "soon", "not a duration"),
    ("DEDUPE_WINDOW", "", "not a duration"),
    ("DEDUPE_WINDOW", "0", "longer than 0"),
    ("DEDUPE_WINDOW", "0ms", "longer than 0"),
    ("DEDUPE_WINDOW", "0.5ms", "at least 1ms"),
    ("DEDUPE_WINDOW", "-1h", "not a duration"),
    ("DEDUPE_SLICE", "1 day", "not a duration"),
    ("DEDUPE_SLICE", "0.1ms", "at least 1ms"),
    ("BATCH_INTERVAL", "0s", "longer than 0"),
    ("POLL_INTERVAL", "fast", "not a duration"),
    ("LOG_LEVEL", "verbose", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("LOG_LEVEL", "", "DEBUG, INFO"),
    ("EVENTS_PER_SECOND", "-1", "0 or more"),
    ("EVENTS_PER_SECOND", "1.5", "invalid literal"),
    ("EVENTS_PER_SECOND", "many", "invalid literal"),
    ("EVENTS_PER_SECOND", "", "invalid literal"),
    ("MAX_EVENTS_PER_SECOND", "-100", "0 or more"),
    ("MAX_EVENTS_PER_SECOND", "1e6", "invalid literal"),
    ("DUP_RATE", "1.01", "between 0 and 1"),
    ("DUP_RATE", "-0.01", "between 0 and 1"),
    ("DUP_RATE", "nan", "between 0 and 1"),
    ("DUP_RATE", "inf", "between 0 and 1"),
    ("DUP_RATE", "1%", "could not convert"),
    ("LATE_RATE", "2", "between 0 and 1"),
    ("INVALID_RATE", "half", "could not convert"),
    ("RESTAMP_RATE", "-0.5", "between 0 and 1"),
    ("RESTAMP_RATE", "nan", "between 0 and 1"),
    ("FSYNC", "maybe", "true or false"),
    ("FSYNC", "2", "true or false"),
    ("KEEP_PROCESSED", "y", "true or false"),
]


@pytest.mark.parametrize(("variable", "raw", "why"), INVALID)
def test_invalid_environment_value_names_the_variable(variable: str, raw: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: raw})
    message = str(info.value)
    assert message.startswith(f"{variable}={raw!r} is invalid")
    assert why in message
    assert f"{variable} is the " in message


@pytest.mark.parametrize(("variable", "raw", "why"), INVALID)
def test_invalid_override_names_the_flag_and_the_variable(
    variable: str, raw: str, why: str
) -> None:
    name = variable.lower()
    with pytest.raises(SettingsError) as info:
        Settings.from_env({}, **{name: raw})
    message = str(info.value)
    assert message.startswith(f"{_flag(name)}={raw!r} is invalid")
    assert why in message
    assert f"{variable} is the " in message


def test_error_message_says_what_the_setting_is_for() -> None:
    with pytest.raises(SettingsError, match=r"dedupe window, e\.g\. 15m, 1h, 24h"):
        Settings.from_env({"DEDUPE_WINDOW": "soon"})


def test_valid_environment_does_not_rescue_an_invalid_override() -> None:
    with pytest.raises(SettingsError, match="--dedupe-window"):
        Settings.from_env({"DEDUPE_WINDOW": "1h"}, dedupe_window="soon")


def test_settings_error_is_a_value_error_without_a_chained_cause() -> None:
    assert issubclass(SettingsError, ValueError)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"FSYNC": "maybe"})
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# --- the object ---------------------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.log_level = "DEBUG"  # type: ignore[misc]


def test_replace_returns_a_changed_copy() -> None:
    settings = Settings()
    changed = settings.replace(log_level="DEBUG")
    assert changed.log_level == "DEBUG"
    assert settings.log_level == "INFO"


def test_describe_lists_every_variable_with_its_default_and_help() -> None:
    rows = Settings.describe()
    subsystems = (JobSettings, IngestSettings, KafkaSettings, QuerySettings)
    sub_fields = [f.name.upper() for c in subsystems for f in dataclasses.fields(c)]
    assert [name for name, _, _ in rows] == [f.upper() for f in FIELDS] + sub_fields
    described = {name: (default, text) for name, default, text in rows}
    assert described["DEDUPE_WINDOW"][0] == "3600.0"
    assert described["REDIS_URL"][0] == "None"
    assert all(text for _, text in described.values())


def test_log_levels() -> None:
    assert LOG_LEVELS == ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def test_secrets_stay_out_of_the_settings_repr() -> None:
    settings = Settings.from_env(
        {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY1234", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    )
    assert settings.aws_secret_access_key == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(settings)
    assert "AKIAEXAMPLEKEY1234" not in repr(settings)


def test_a_key_cache_generation_defaults_to_the_window() -> None:
    """DEDUPE_SLICE 0 (the default) means generations as long as the window."""
    assert Settings.from_env({}).dedupe_generation_ms == 3_600_000
    assert Settings.from_env({"DEDUPE_WINDOW": "15m"}).dedupe_generation_ms == 900_000
    assert Settings.from_env({"DEDUPE_SLICE": "10m"}).dedupe_generation_ms == 600_000
    assert Settings.from_env({"DEDUPE_SLICE": "0s"}).dedupe_slice == 0.0


def test_a_window_of_too_many_generations_is_refused() -> None:
    """A claim looks in every live generation: a 1 s generation under a 1 h window (3,600
    lookups a key) is refused at start, naming the setting and the least value it takes."""
    assert Settings.from_env({"DEDUPE_SLICE": "225s"}).dedupe_generation_ms == 225_000
    with pytest.raises(SettingsError, match=r"DEDUPE_SLICE must be 0 or at least .*\(225s for"):
        Settings.from_env({"DEDUPE_SLICE": "1s"})
    with pytest.raises(SettingsError, match="DEDUPE_SLICE"):
        Settings.from_env({"DEDUPE_WINDOW": "24h", "DEDUPE_SLICE": "1h"})


def test_kafka_settings_pass_security_and_extra_properties_through() -> None:
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "b1:9092,b2:9092",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "svc",
            "KAFKA_SASL_PASSWORD": "s3cret",
            "KAFKA_CONFIG": "client.id=adevents-1, socket.timeout.ms=5000",
        }
    )
    assert settings.kafka.client_config() == {
        "bootstrap.servers": "b1:9092,b2:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "s3cret",
        "client.id": "adevents-1",
        "socket.timeout.ms": "5000",
    }
    assert "s3cret" not in repr(settings) and "svc" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("KAFKA_CONFIG", "no-equals-sign"),
        ("CONSUMER_SOURCE", "rabbitmq"),
        ("INGEST_SINK", "s3"),
        ("KAFKA_BATCH_EVENTS", "0"),
    ],
)
def test_bad_kafka_settings_name_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: raw})


def test_the_lakes_compaction_default_is_the_settings() -> None:
    """lake/ sits under the settings and cannot read them: its default must be theirs."""
    from lake.maintenance import DEFAULT_ROW_GROUP_ROWS

    assert Settings.from_env({}).jobs.compact_row_group_rows == DEFAULT_ROW_GROUP_ROWS


def test_the_query_caches_memory_is_read_from_the_environment_and_reaches_the_lake(
    tmp_path: Path,
) -> None:
    """QUERY_*_BYTES bound each API process's caches (0 keeps none); a Lake built from the
    settings sizes its caches by them."""
    assert Settings.from_env({}).query == QuerySettings()
    env = {
        "QUERY_SMALL_FILES_BYTES": "0",
        "QUERY_ROW_GROUPS_BYTES": "1GiB",
        "QUERY_MINUTE_SUMS_BYTES": "8MiB",
        "QUERY_ROLLUPS_BYTES": "1MiB",
        "QUERY_THREADS": "5",
    }
    settings = Settings.from_env(env, data_dir=str(tmp_path))
    assert settings.query == QuerySettings(
        query_small_files_bytes=0,
        query_row_groups_bytes=1024**3,
        query_minute_sums_bytes=8 * 1024**2,
        query_rollups_bytes=1024**2,
        query_threads=5,
    )
    app = create_app(settings)  # the API's Lake is that one
    for lake in (Lake.from_settings(settings), app.dependencies["lake"].dependency()):
        assert lake.row_groups._decoded.maxsize == 1024**3
        assert lake.minute_sums._kept.maxsize == 8 * 1024**2
        assert lake.rollup_rows._kept.maxsize == 1024**2
        assert lake._tail == 0
    with pytest.raises(SettingsError, match="QUERY_ROW_GROUPS_BYTES"):
        Settings.from_env({"QUERY_ROW_GROUPS_BYTES": "lots"})
    with pytest.raises(SettingsError, match="QUERY_THREADS"):
        Settings.from_env({"QUERY_THREADS": "0"})
