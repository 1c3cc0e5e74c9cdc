"""Where the lake lives: ``LAKE_URI`` (a local path or ``s3://bucket/prefix``) and its S3 settings.

Built once at the entry point from a mapping of settings (the environment) and passed down.
Each table lives at ``LAKE_URI/<table>``. The same location gives deltalake its
``storage_options`` and readers/writers a pyarrow filesystem, so there is one place that knows
how to reach the lake.

Guarantees: secrets (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) never appear in ``repr``,
``str`` or any error raised here, and the access key id shows only its last four characters.
``check()`` fails fast with bounded timeouts (a few seconds, one retry), raising a
``LakeConfigError`` subclass whose message names the setting to fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from pipeline.settings import Settings

DEFAULT_DATA_DIR: Final = "./ad_event_data"
DEFAULT_REGION: Final = "us-east-1"
#: Seconds to open a connection to the endpoint; a dead endpoint fails within this.
CONNECT_TIMEOUT_S: Final = 5
#: Seconds one request may take, and attempts per request, for both deltalake and pyarrow.
REQUEST_TIMEOUT_S: Final = 60
MAX_RETRIES: Final = 3
#: Directory names of a v1 lake (staging renames + hive partitions, no Delta log).
V1_MARKERS: Final = ("staging",)
DELTA_LOG: Final = "_delta_log"
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})


class LakeConfigError(RuntimeError):
    """The lake cannot be used as configured; ``setting`` names the variable to fix."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class EndpointUnreachableError(LakeConfigError):
    """Nothing answers at AWS_ENDPOINT_URL (refused, timed out, unknown host)."""


class CredentialsError(LakeConfigError):
    """S3 refused AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (unknown key, bad signature, denied)."""


class BucketMissingError(LakeConfigError):
    """The bucket named by LAKE_URI does not exist at the endpoint."""


class V1LakeError(LakeConfigError):
    """LAKE_URI points at a v1 lake (hive partitions and staging/, no Delta log)."""


def _mask(value: str | None) -> str:
    if not value:
        return "(unset)"
    return f"…{value[-4:]}" if len(value) > 8 else "…"


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: the bucket and prefix of LAKE_URI plus the usual AWS_* variables."""

    bucket: str
    prefix: str
    region: str = DEFAULT_REGION
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    allow_http: bool = False

    def __repr__(self) -> str:
        return (
            f"S3Settings(bucket={self.bucket!r}, prefix={self.prefix!r}, region={self.region!r}, "
            f"endpoint_url={self.endpoint_url!r}, access_key_id={_mask(self.access_key_id)!r}, "
            f"secret_access_key={'***' if self.secret_access_key else '(unset)'!r}, "
            f"allow_http={self.allow_http})"
        )


@dataclass(frozen=True)
class LakeLocation:
    """LAKE_URI and how to reach it. ``uri`` is an absolute local path or ``s3://bucket/prefix``."""

    uri: str
    s3: S3Settings | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, data_dir: str | None = None) -> LakeLocation:
        """Parse LAKE_URI (default ``<data_dir>/lake``) and, for ``s3://``, the AWS_* variables.

        Pass the settings tree's ``data_dir``; without it DATA_DIR (or its default) is read.
        """
        data_dir = data_dir or env.get("DATA_DIR") or DEFAULT_DATA_DIR
        raw = env.get("LAKE_URI") or str(Path(data_dir, "lake"))
        if raw.startswith("s3://"):
            return cls._s3(raw, env)
        if "://" in raw and not raw.startswith("file://"):
            scheme = raw.split("://", 1)[0]
            raise LakeConfigError(
                "LAKE_URI",
                f"LAKE_URI has scheme {scheme!r}: use a local path or s3://bucket/prefix",
            )
        path = raw.removeprefix("file://")
        return cls(uri=os.path.abspath(path))

    @classmethod
    def from_settings(cls, settings: Settings) -> LakeLocation:
        """The location the settings tree names (LAKE_URI and the AWS_* settings)."""
        env = {
            "LAKE_URI": settings.lake_uri,
            "AWS_ENDPOINT_URL": settings.aws_endpoint_url,
            "AWS_REGION": settings.aws_region,
            "AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key,
            "AWS_ALLOW_HTTP": "true" if settings.aws_allow_http else "",
        }
        return cls.from_env(env, data_dir=settings.data_dir)

    @classmethod
    def _s3(cls, raw: str, env: Mapping[str, str]) -> LakeLocation:
        parts = urlsplit(raw)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not bucket:
            raise LakeConfigError("LAKE_URI", f"LAKE_URI={raw!r} names no bucket")
        endpoint = env.get("AWS_ENDPOINT_URL") or None
        allow_http = (env.get("AWS_ALLOW_HTTP") or "").strip().lower() in TRUE_WORDS
        if endpoint is not None:
            ep = urlsplit(endpoint)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise LakeConfigError(
                    "AWS_ENDPOINT_URL",
                    f"AWS_ENDPOINT_URL={endpoint!r} is not an http(s)://host[:port] URL",
                )
            if ep.scheme == "http" and not allow_http:
                raise LakeConfigError(
                    "AWS_ALLOW_HTTP",
                    f"AWS_ENDPOINT_URL={endpoint!r} is plain http: set AWS_ALLOW_HTTP=true "
                    "to allow it (a loopback or private S3-compatible server)",
                )
        settings = S3Settings(
            bucket=bucket,
            prefix=prefix,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            endpoint_url=endpoint,
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            allow_http=allow_http,
        )
        return cls(uri=f"s3://{bucket}/{prefix}".rstrip("/"), s3=settings)

    def __str__(self) -> str:
        return self.uri

    @property
    def is_s3(self) -> bool:
        return self.s3 is not None

    def table_uri(self, name: str) -> str:
        """``LAKE_URI/<name>``: what deltalake opens."""
        return f"{self.uri}/{name}"

    def storage_options(self) -> dict[str, str]:
        """deltalake (object_store) options: credentials, endpoint and bounded timeouts."""
        if self.s3 is None:
            return {}
        s3 = self.s3
        options = {
            "AWS_REGION": s3.region,
            "timeout": f"{REQUEST_TIMEOUT_S}s",
            "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
            "max_retries": str(MAX_RETRIES),
            "retry_timeout": f"{REQUEST_TIMEOUT_S}s",
            # Commits are a put-if-absent of the next log version (If-None-Match: *); deltalake
            # uses it by default on S3 since 1.0, stated here so it cannot silently change.
            "conditional_put": "etag",
        }
        optional = {
            "AWS_ENDPOINT_URL": s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
            "AWS_SESSION_TOKEN": s3.session_token,
            "AWS_ALLOW_HTTP": "true" if s3.allow_http else None,
        }
        options.update({k: v for k, v in optional.items() if v is not None})
        return options

    def filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem on which ``path(...)`` names the lake's files."""
        if self.s3 is None:
            return pafs.LocalFileSystem()
        s3 = self.s3
        endpoint, scheme = None, "https"
        if s3.endpoint_url is not None:
            ep = urlsplit(s3.endpoint_url)
            endpoint, scheme = ep.netloc, ep.scheme
        return pafs.S3FileSystem(
            access_key=s3.access_key_id,
            secret_key=s3.secret_access_key,
            session_token=s3.session_token,
            region=s3.region,
            endpoint_override=endpoint,
            scheme=scheme,
            connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_RETRIES),
            allow_bucket_creation=False,
            allow_bucket_deletion=False,
        )

    def path(self, *parts: str) -> str:
        """A path on ``filesystem()``: ``bucket/prefix/...`` on S3, an absolute path locally."""
        root = self.uri if self.s3 is None else f"{self.s3.bucket}/{self.s3.prefix}".rstrip("/")
        return "/".join([root, *(p.strip("/") for p in parts if p)])

    def table_filesystem(self, name: str) -> pafs.FileSystem:
        """A filesystem rooted at table ``name``: the relative paths of its add actions work."""
        return pafs.SubTreeFileSystem(self.path(name), self.filesystem())

    def redact(self, text: str) -> str:
        """``text`` with every secret of this location replaced by ``***``."""
        if self.s3 is None:
            return text
        for secret in (self.s3.secret_access_key, self.s3.session_token):
            if secret:
                text = text.replace(secret, "***")
        if self.s3.access_key_id:
            text = text.replace(self.s3.access_key_id, _mask(self.s3.access_key_id))
        return text

    def check(self) -> None:
        """Fail fast, naming the setting, if the lake cannot be reached or is a v1 lake."""
        from lake import probe

        probe.check(self)
