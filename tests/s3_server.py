"""A real S3 server for tests: moto's server in a child process on loopback, with IAM auth on.

The server runs in its own process, so a client that holds the GIL while it waits for a reply
(some deltalake calls do) cannot deadlock it, and so a separate writer process reaches it like
any S3 endpoint. Authentication is on (moto's ``reset-auth``): a request signed with a wrong
key is refused as S3 would refuse it, which lets tests check the bad-credentials error.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

REGION = "us-east-1"
#: Grants the test user everything on S3; moto checks IAM policies once auth is on.
_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(port: int) -> None:
    """Child process body: serve until stdin closes (the parent exited or called stop)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket and one IAM user allowed everything."""

    bucket: str = "lake"
    port: int = field(default_factory=free_port)
    access_key: str = ""
    secret_key: str = ""
    proc: subprocess.Popen[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 60.0) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # blocks until the child is serving (or died)
        if line.strip() != "ready" or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"moto server did not start: {line!r}")
        iam = self.client("iam", access_key="anonymous", secret_key="anonymous")
        iam.create_user(UserName="adevents")
        iam.put_user_policy(UserName="adevents", PolicyName="all", PolicyDocument=_POLICY)
        key = iam.create_access_key(UserName="adevents")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self.create_bucket(self.bucket, access_key="anonymous", secret_key="anonymous")
        # From now on every request must be signed by a known key with a matching secret.
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form type would hide the body
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
        return self

    def client(self, service: str = "s3", **keys: str) -> Any:
        import boto3  # type: ignore[import-untyped]  # no stubs; tests only

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=keys.get("access_key", self.access_key),
            aws_secret_access_key=keys.get("secret_key", self.secret_key),
        )

    def create_bucket(self, name: str, **keys: str) -> None:
        self.client(**keys).create_bucket(Bucket=name)

    def env(self, prefix: str | None = None, **overrides: str) -> dict[str, str]:
        """The lake's settings for a fresh prefix of the bucket (or ``prefix``)."""
        prefix = prefix or f"t-{uuid.uuid4().hex[:10]}"
        return {
            "LAKE_URI": f"s3://{self.bucket}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ALLOW_HTTP": "true",
            **overrides,
        }

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
