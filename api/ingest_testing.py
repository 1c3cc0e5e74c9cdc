"""Helpers for tests and benchmarks of the ingest: a real uvicorn server one can kill, bodies,
and a reader of everything a Kafka topic holds."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from pyarrow import ipc

from api.testing import free_port
from pipeline.decode import ARROW_STREAM, JSON, NDJSON
from pipeline.schema import TIME_COLUMN


@dataclass
class Server:
    """A uvicorn process serving ``api.app:app``."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is flushed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_server(
    data_dir: str,
    log: Path,
    env: Mapping[str, str],
    *,
    timeout: float = 30.0,
    prefix: Sequence[str] = (),
) -> Server:
    """Start ``uvicorn api.app:app`` over ``data_dir`` with ``env`` added; wait until it answers.

    ``prefix`` runs the server under another command (e.g. ``unshare`` with a private mount of
    DATA_DIR); that command must exec the server, so ``Server.proc`` is the server itself.
    """
    port = free_port()
    full_env = {**os.environ, "DATA_DIR": data_dir, "LOG_LEVEL": "WARNING", **env}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:app",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                r.read()
            return server
        except urllib.error.HTTPError:
            return server  # it answered (an unhealthy lake is still a running server)
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the API did not start: {log.read_text()}") from None
            time.sleep(0.1)


@contextmanager
def running(data_dir: str, log: Path, env: Mapping[str, str]) -> Iterator[Server]:
    server = start_server(data_dir, log, env)
    try:
        yield server
    finally:
        server.stop()


def arrow_body(table: pa.Table) -> bytes:
    """``table`` as an Arrow IPC stream body."""
    buf = io.BytesIO()
    with ipc.new_stream(buf, table.schema) as writer:
        writer.write_table(table)
    return buf.getvalue()


def json_rows(table: pa.Table) -> list[dict[str, Any]]:
    """``table``'s rows as JSON-ready dicts, event_time in epoch ms."""
    ms = table.column(TIME_COLUMN).cast(pa.int64())
    rows: list[dict[str, Any]] = table.drop_columns([TIME_COLUMN]).to_pylist()
    for row, t in zip(rows, ms.to_pylist(), strict=True):
        row[TIME_COLUMN] = t
    return rows


def body_of(table: pa.Table, media: str) -> bytes:
    """``table`` as a body of ``media`` (JSON array, NDJSON or Arrow IPC stream)."""
    if media == ARROW_STREAM:
        return arrow_body(table)
    rows = json_rows(table)
    if media == NDJSON:
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if media == JSON:
        return json.dumps(rows).encode()
    raise ValueError(media)


def read_topic(bootstrap: str, topic: str, *, timeout: float = 30.0) -> list[Message]:
    """Every message ``topic`` holds now, partition by partition, read with a plain consumer
    (assigned, not subscribed: no group join to wait for)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "adevents-test-reader", "log_level": 3}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at = dict.fromkeys(ends, 0)
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while any(at[p] < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {at} of {ends} messages of {topic}")
            left = sum(ends[p] - at[p] for p in ends)
            for message in consumer.consume(min(left, 10_000), timeout=1.0):
                if message.error() is not None:
                    raise RuntimeError(f"reading {topic}: {message.error()}")
                partition, offset = message.partition(), message.offset()
                assert partition is not None and offset is not None
                messages.append(message)
                at[partition] = offset + 1
        return messages
    finally:
        consumer.close()
