"""LAKE_URI parsing, secret redaction, and the start-up check's clear error for each bad setting.

The S3 cases run against a real S3 server (moto, loopback, IAM auth on): an unreachable
endpoint, a wrong key id, a wrong secret, a missing bucket and a v1 lake each raise their own
``LakeConfigError`` naming the setting, quickly, and never showing the secret.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hardening import consume_refused
from s3_server import S3Server, free_port

from lake.location import (
    BucketMissingError,
    CredentialsError,
    EndpointUnreachableError,
    LakeConfigError,
    LakeLocation,
    V1LakeError,
)
from lake.tables import ensure_tables

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def check_fails(env: dict[str, str], error: type[LakeConfigError], setting: str) -> str:
    location = LakeLocation.from_env(env)
    with pytest.raises(error) as info:
        location.check()
    assert info.value.setting == setting
    message = str(info.value)
    assert setting in message
    secret = env.get("AWS_SECRET_ACCESS_KEY")
    if secret:
        assert secret not in message and secret not in repr(info.value)
    return message


def test_default_is_data_dir_lake_and_tables_live_under_it(tmp_path: Path) -> None:
    location = LakeLocation.from_env({"DATA_DIR": str(tmp_path)})
    assert location.uri == str(tmp_path / "lake")
    assert location.table_uri("events") == str(tmp_path / "lake" / "events")
    assert location.storage_options() == {}
    assert not location.is_s3
    passed = LakeLocation.from_env({}, data_dir=str(tmp_path / "d"))
    assert passed.uri == str(tmp_path / "d" / "lake")


def test_s3_settings_and_redaction() -> None:
    env = {
        "LAKE_URI": "s3://bucket/some/prefix/",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ALLOW_HTTP": "true",
    }
    location = LakeLocation.from_env(env)
    assert location.uri == "s3://bucket/some/prefix"
    assert location.table_uri("ledger") == "s3://bucket/some/prefix/ledger"
    assert (
        location.path("events", "date=x/f.parquet") == "bucket/some/prefix/events/date=x/f.parquet"
    )
    options = location.storage_options()
    assert options["AWS_SECRET_ACCESS_KEY"] == SECRET  # deltalake needs it...
    assert options["AWS_ALLOW_HTTP"] == "true" and options["AWS_REGION"] == "eu-west-1"
    for text in (repr(location), str(location), repr(location.s3), f"{location}"):
        assert SECRET not in text  # ...nothing printable has it
        assert "AKIAIOSFODNN7EXAMPLE" not in text
    assert location.redact(f"key {SECRET} id AKIAIOSFODNN7EXAMPLE") == "key *** id …MPLE"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"LAKE_URI": "gs://bucket/x"}, "LAKE_URI"),
        ({"LAKE_URI": "s3:///x"}, "LAKE_URI"),
        ({"LAKE_URI": "s3://b/x", "AWS_ENDPOINT_URL": "127.0.0.1:9000"}, "AWS_ENDPOINT_URL"),
        ({"LAKE_URI": "s3://b/x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, "AWS_ALLOW_HTTP"),
    ],
)
def test_malformed_settings_name_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(LakeConfigError) as info:
        LakeLocation.from_env(env)
    assert info.value.setting == setting and setting in str(info.value)


def test_good_s3_and_local_pass_the_check(s3: S3Server, tmp_path: Path) -> None:
    LakeLocation.from_env(s3.env()).check()
    LakeLocation.from_env({"LAKE_URI": str(tmp_path / "new")}).check()
    assert (tmp_path / "new").is_dir()


def test_unreachable_endpoint(s3: S3Server) -> None:
    env = s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    message = check_fails(env, EndpointUnreachableError, "AWS_ENDPOINT_URL")
    assert env["AWS_ENDPOINT_URL"] in message


def test_wrong_secret(s3: S3Server) -> None:
    env = s3.env(AWS_SECRET_ACCESS_KEY=SECRET)
    message = check_fails(env, CredentialsError, "AWS_ACCESS_KEY_ID")
    assert "AWS_SECRET_ACCESS_KEY" in message


def test_unknown_key_id(s3: S3Server) -> None:
    env = s3.env(AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY000000")
    check_fails(env, CredentialsError, "AWS_ACCESS_KEY_ID")


def test_missing_bucket(s3: S3Server) -> None:
    env = s3.env(LAKE_URI="s3://no-such-bucket/lake")
    message = check_fails(env, BucketMissingError, "LAKE_URI")
    assert "no-such-bucket" in message


def test_local_v1_lake(tmp_path: Path) -> None:
    v1 = tmp_path / "data"
    (v1 / "events" / "date=2026-12-02" / "hour=09").mkdir(parents=True)
    (v1 / "events" / "date=2026-12-02" / "hour=09" / "b1.parquet").write_bytes(b"PAR1")
    (v1 / "staging").mkdir()
    message = check_fails({"LAKE_URI": str(v1)}, V1LakeError, "LAKE_URI")
    assert "events/date=" in message and "staging/" in message
    only_staging = tmp_path / "staging-only"
    (only_staging / "staging").mkdir(parents=True)
    check_fails({"LAKE_URI": str(only_staging)}, V1LakeError, "LAKE_URI")


def test_s3_v1_lake_and_a_delta_lake_with_leftovers(s3: S3Server) -> None:
    env = s3.env()
    prefix = env["LAKE_URI"].removeprefix(f"s3://{s3.bucket}/")
    client = s3.client()
    client.put_object(
        Bucket=s3.bucket, Key=f"{prefix}/events/date=2026-12-02/hour=09/b1.parquet", Body=b"x"
    )
    check_fails(env, V1LakeError, "LAKE_URI")
    # A Delta lake with a stray staging/ directory is not a v1 lake.
    delta = s3.env()
    location = LakeLocation.from_env(delta)
    ensure_tables(location)
    stray = delta["LAKE_URI"].removeprefix(f"s3://{s3.bucket}/")
    client.put_object(Bucket=s3.bucket, Key=f"{stray}/staging/x", Body=b"x")
    location.check()


@pytest.mark.parametrize("case", ["unreachable", "wrong-secret", "no-bucket", "v1-lake"])
def test_consume_with_a_bad_lake_exits_non_zero_naming_the_setting_and_loses_nothing(
    s3: S3Server, tmp_path: Path, case: str
) -> None:
    data = tmp_path / "data"
    spool_file = data / "incoming" / "0001-x-000000001.arrow"
    spool_file.parent.mkdir(parents=True)
    spool_file.write_bytes(b"waiting")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAKE_URI"))}
    env.update(DATA_DIR=str(data), DISK_MIN_FREE="0")
    setting = {
        "unreachable": "AWS_ENDPOINT_URL",
        "wrong-secret": "AWS_SECRET_ACCESS_KEY",
        "no-bucket": "LAKE_URI",
        "v1-lake": "LAKE_URI",
    }[case]
    if case == "unreachable":
        env.update(s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"))
    elif case == "wrong-secret":
        env.update(s3.env(AWS_SECRET_ACCESS_KEY=SECRET))
    elif case == "no-bucket":
        env.update(s3.env(), LAKE_URI="s3://no-such-bucket-here/lake")
    else:
        (data / "lake" / "events" / "date=2026-12-01").mkdir(parents=True)
    proc = consume_refused(env, timeout=300)
    assert setting in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    assert spool_file.read_bytes() == b"waiting"  # nothing taken, nothing lost
