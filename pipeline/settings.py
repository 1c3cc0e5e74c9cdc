"""One typed settings object, read from the environment once and overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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


def _log_level(text: str) -> str:
    value = str(text).upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value


def _optional_str(text: str) -> str | None:
    return str(text).strip() or None


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _setting(default: Any, parse: Callable[[str], Any], help: str) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help})


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
    dedupe_slice: float = _setting(1.0, _millisecond_duration, "event-time slice of the key cache")
    log_level: str = _setting("INFO", _log_level, "logging level")
    events_per_second: int = _setting(50_000, _non_negative_int, "generator rate (0 = max)")
    batch_interval: float = _setting(0.1, _positive_duration, "generator/ingest batch interval")
    dup_rate: float = _setting(0.01, _rate, "fraction of events the generator re-sends")
    late_rate: float = _setting(0.0, _rate, "fraction of events the generator delays")
    invalid_rate: float = _setting(0.0, _rate, "fraction of malformed rows the generator writes")
    max_events_per_second: int = _setting(
        1_000_000, _non_negative_int, "consumer throughput cap (0 = none)"
    )
    fsync: bool = _setting(True, _bool, "fsync outputs before an input file is deleted")
    keep_processed: bool = _setting(False, _bool, "keep committed input files under processed/")
    poll_interval: float = _setting(0.05, _positive_duration, "idle consumer's spool poll period")
    consumer_name: str = _setting("", str, "name of this consumer in the ledger (default host-pid)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment, then apply overrides (CLI flags; None means not given)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.name.upper()
            parse = f.metadata["parse"]
            raw = overrides.get(f.name)
            source = f"--{f.name.replace('_', '-')}"
            if raw is None and name in env:
                raw, source = env[name], name
            if raw is None:
                continue
            # Typed overrides (tests, argparse ``type=``) are checked like text, not trusted.
            raw = str(raw)
            try:
                values[f.name] = parse(raw)
            except (ValueError, TypeError) as exc:
                raise SettingsError(
                    f"{source}={raw!r} is invalid: {exc}. {name} is the {f.metadata['help']}."
                ) from None
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, for README and ``--help``."""
        return [(f.name.upper(), repr(f.default), f.metadata["help"]) for f in fields(Settings)]
