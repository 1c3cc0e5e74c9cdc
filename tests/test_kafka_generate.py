"""``adevents generate --kafka`` against librdkafka's mock cluster (the real protocol over TCP):
the topic holds exactly the events of the truth, as Arrow micro-batches; the truth is the one a
spool run writes; unreachable brokers end the run with a clear error, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from pyarrow import ipc

from api.ingest_testing import read_topic
from api.testing import free_port
from generator.runner import generate
from pipeline.kafka import ARROW_STREAM, CONTENT_TYPE, KIND, MESSAGE_MAX_BYTES, header
from pipeline.kafka_testing import MockCluster
from pipeline.normalize import normalize
from pipeline.schema import KEY_COLUMN, TIME_COLUMN, Layout
from pipeline.settings import Settings
from pipeline.spool import list_incoming

#: The same run, whichever way its events travel: duplicates (some re-stamped), late and
#: invalid rows, in several micro-batches.
RUN = ["--events", "20000", "--rate", "0", "--seed", "11", "--batch-size", "3000"]
RATES = {"dup_rate": 0.1, "late_rate": 0.02, "invalid_rate": 0.01, "restamp_rate": 0.2}
#: Every subprocess is bounded (the mock brokers answer in milliseconds; a dead address fails
#: after the 1 s message timeout the tests set).
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def cluster() -> Iterator[MockCluster]:
    with MockCluster() as c:
        yield c


def generate_cli(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m cli generate ...`` in a process of its own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", "generate", *args],
        env={**base, "DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING", **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def rate_flags() -> list[str]:
    return [a for k, v in RATES.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def test_generate_kafka_publishes_exactly_the_truths_events(
    cluster: MockCluster, tmp_path: Path
) -> None:
    topic = f"gen-{uuid.uuid4().hex[:8]}"
    truth = tmp_path / "truth.parquet"
    proc = generate_cli(
        [*RUN, *rate_flags(), "--kafka", "--truth", str(truth)],
        tmp_path / "data",
        KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap,
        KAFKA_TOPIC=topic,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"published 20000 events to Kafka topic {topic}" in proc.stdout
    assert list_incoming(Layout(str(tmp_path / "data")).incoming) == []  # nothing spooled

    messages = read_topic(cluster.bootstrap, topic)
    frames = []
    for m in messages:
        assert header(m, CONTENT_TYPE) == ARROW_STREAM and header(m, KIND) is None
        value = m.value()
        assert isinstance(value, bytes) and len(value) < MESSAGE_MAX_BYTES
        table = ipc.open_stream(value).read_all()
        assert m.key() == table.column(KEY_COLUMN)[0].as_py().encode()  # first event_id
        frames.append(pl.from_arrow(normalize(table)[0]))
    assert len({m.partition() for m in messages}) > 1  # keys spread the batches
    sent = pl.concat(frames)
    assert sent.height == 20_000

    # Every event_id as often as the truth says, duplicates included.
    want = pl.read_parquet(truth)
    assert want["copies"].sum() == 20_000 and (want["copies"] > 1).sum() > 1000
    counts = sent.group_by(KEY_COLUMN).len("copies")
    joined = want.join(counts, on=KEY_COLUMN, how="full", coalesce=True, suffix="_sent")
    assert joined.filter(pl.col("copies") != pl.col("copies_sent")).height == 0
    assert joined.null_count().select(["copies", "copies_sent"]).sum_horizontal().item() == 0

    # The truth and the rows are those of a spool run with the same seed (event times aside:
    # the simulated clock ends at the wall clock of each run).
    spool = tmp_path / "spool"
    settings = Settings.from_env({}, data_dir=str(spool), **{k: str(v) for k, v in RATES.items()})
    generate(
        settings, events=20_000, rate=0, seed=11, batch_size=3000, truth=spool / "truth.parquet"
    )
    assert pl.read_parquet(spool / "truth.parquet").equals(want)
    spooled = pl.concat(
        pl.from_arrow(normalize(ipc.open_file(str(f)).read_all())[0])
        for f in list_incoming(Layout(str(spool)).incoming)
    )
    columns = [c for c in spooled.columns if c != TIME_COLUMN]
    assert spooled.select(columns).sort(columns).equals(sent.select(columns).sort(columns))


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(["--events", "5000", "--rate", "0"], id="fixed-count"),
        # An open-ended run stops at the first lost message, not at its end.
        pytest.param(["--duration", "1h", "--rate", "2000"], id="open-ended"),
    ],
)
def test_unreachable_brokers_end_the_run_with_a_clear_error(tmp_path: Path, run: list[str]) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    proc = generate_cli(
        [*run, "--kafka", "--truth", str(tmp_path / "truth.parquet")],
        tmp_path / "data",
        KAFKA_BOOTSTRAP_SERVERS=nowhere,
        KAFKA_CONFIG="message.timeout.ms=1000",
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("generate: ") and f"KAFKA_BOOTSTRAP_SERVERS={nowhere}" in last, last
    assert "Message timed out" in last
    assert not (tmp_path / "truth.parquet").exists()  # no truth for events that did not land


def test_kafka_needs_bootstrap_servers_and_excludes_http(tmp_path: Path) -> None:
    proc = generate_cli(["--events", "10", "--kafka"], tmp_path / "data")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "KAFKA_BOOTSTRAP_SERVERS" in proc.stderr
    both = generate_cli(
        ["--events", "10", "--kafka", "--http", "http://127.0.0.1:1"],
        tmp_path / "data",
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
    )
    assert both.returncode == 2 and "not allowed with" in both.stderr
