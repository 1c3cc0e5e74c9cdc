"""The start-up check of a lake location: reachable, credentials accepted, bucket present, not v1.

Each failure raises a ``LakeConfigError`` subclass naming the setting (LAKE_URI,
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); messages pass through
``LakeLocation.redact`` so no secret leaks. Every network step is bounded: one TCP connect
(``CONNECT_TIMEOUT_S``) and a couple of metadata requests with the location's timeouts.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from lake.location import (
    CONNECT_TIMEOUT_S,
    DELTA_LOG,
    V1_MARKERS,
    BucketMissingError,
    CredentialsError,
    EndpointUnreachableError,
    LakeConfigError,
    LakeLocation,
    V1LakeError,
    _mask,
)

#: Tables whose v1 form (hive ``date=`` directories, no ``_delta_log``) marks a v1 lake.
V1_TABLES: Final = ("events", "quarantine", "ledger")
_UNREACHABLE: Final = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not connect",
    "timed out",
    "Timeout",
)
_DENIED: Final = (
    "ACCESS_DENIED",
    "AccessDenied",
    "InvalidAccessKeyId",
    "INVALID_ACCESS_KEY_ID",
    "SignatureDoesNotMatch",
    "SIGNATURE_DOES_NOT_MATCH",
    "403",
)
_NO_BUCKET: Final = ("NO_SUCH_BUCKET", "NoSuchBucket")


def check(location: LakeLocation) -> None:
    """Raise the ``LakeConfigError`` that names what to fix, or return if the lake is usable."""
    if location.s3 is None:
        _check_local(location)
    else:
        _check_s3(location)
    _check_not_v1(location)


def _check_local(location: LakeLocation) -> None:
    root = Path(location.uri)
    if root.exists() and not root.is_dir():
        raise LakeConfigError("LAKE_URI", f"LAKE_URI={location.uri} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LakeConfigError(
            "LAKE_URI", f"LAKE_URI={location.uri} cannot be created: {exc.strerror}"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise LakeConfigError("LAKE_URI", f"LAKE_URI={location.uri} is not writable")


def _check_s3(location: LakeLocation) -> None:
    s3 = location.s3
    assert s3 is not None
    if s3.endpoint_url is not None:
        ep = urlsplit(s3.endpoint_url)
        port = ep.port or (443 if ep.scheme == "https" else 80)
        try:
            socket.create_connection((ep.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise EndpointUnreachableError(
                "AWS_ENDPOINT_URL",
                f"nothing answers at AWS_ENDPOINT_URL={s3.endpoint_url} ({reason}, "
                f"{CONNECT_TIMEOUT_S}s timeout): check AWS_ENDPOINT_URL and that the S3 server "
                "is up",
            ) from None
    fs = location.filesystem()
    try:
        bucket = fs.get_file_info(s3.bucket)
        if bucket.type == pafs.FileType.NotFound:
            raise BucketMissingError("LAKE_URI", _no_bucket(location))
        fs.get_file_info(pafs.FileSelector(location.path(), allow_not_found=True))
    except OSError as exc:
        raise _classify(location, str(exc)) from None


def _no_bucket(location: LakeLocation) -> str:
    s3 = location.s3
    assert s3 is not None
    where = s3.endpoint_url or f"AWS region {s3.region}"
    return (
        f"bucket {s3.bucket!r} of LAKE_URI={location.uri} does not exist at {where}: "
        "create it (adevents never creates buckets) or fix LAKE_URI"
    )


def _classify(location: LakeLocation, message: str) -> LakeConfigError:
    s3 = location.s3
    assert s3 is not None
    detail = location.redact(message.splitlines()[0] if message else "")
    if any(m in message for m in _NO_BUCKET):
        return BucketMissingError("LAKE_URI", _no_bucket(location))
    if any(m in message for m in _DENIED):
        return CredentialsError(
            "AWS_ACCESS_KEY_ID",
            f"S3 refused the credentials for bucket {s3.bucket!r}: check AWS_ACCESS_KEY_ID "
            f"(={_mask(s3.access_key_id)}) and AWS_SECRET_ACCESS_KEY (not shown) ({detail})",
        )
    if any(m in message for m in _UNREACHABLE):
        return EndpointUnreachableError(
            "AWS_ENDPOINT_URL",
            f"cannot reach S3 at AWS_ENDPOINT_URL={s3.endpoint_url or '(AWS default)'} "
            f"in region AWS_REGION={s3.region} ({detail})",
        )
    return LakeConfigError("LAKE_URI", f"cannot read LAKE_URI={location.uri} ({detail})")


def _children(fs: pafs.FileSystem, path: str) -> dict[str, pafs.FileType]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {info.base_name: info.type for info in infos}


def _check_not_v1(location: LakeLocation) -> None:
    fs = location.filesystem()
    try:
        top = _children(fs, location.path())
        hive, logs = [], 0
        for table in V1_TABLES:
            if top.get(table) != pafs.FileType.Directory:
                continue
            names = _children(fs, location.path(table))
            if DELTA_LOG in names:
                logs += 1
            elif any(n.startswith("date=") for n in names):
                hive.append(f"{table}/date=…")
    except OSError as exc:
        raise _classify(location, str(exc)) from None
    # staging/ next to Delta tables is someone's leftover, not a v1 lake: only alone it counts.
    markers = [f"{m}/" for m in V1_MARKERS if top.get(m) == pafs.FileType.Directory]
    evidence = hive + (markers if logs == 0 else [])
    if evidence:
        raise V1LakeError(
            "LAKE_URI",
            f"LAKE_URI={location.uri} holds a v1 lake ({', '.join(evidence)}; no Delta log): "
            "point LAKE_URI at a new location (the default is DATA_DIR/lake); "
            "the v1 files are left as they are",
        )
