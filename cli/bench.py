"""``adevents bench``: honest events/s, with a ceiling and a naive baseline measured alongside.

The spool is generated first (not timed). The consumer runs as its own process, exactly as
``adevents consume --once``, into the Delta tables at LAKE_URI (default DATA_DIR/lake, or S3);
its time is taken from the ledger table, from the first file read to the last commit. The
tables are then reconciled against the generator's ground truth, and the run fails loudly if a
single event is lost or duplicated. Three references are measured on the same
files: the ceiling (Arrow IPC read + Parquet write with the same compression, nothing else), the
naive baseline (the original design: a Python loop per event, a Redis SET NX per event,
pipelined, dicts for enrichment) on a subset, and the DuckDB-only reference (what a data
engineer writes in an afternoon: per file an anti-join against a table of seen ids, a join with
the campaigns and a Parquet COPY).

With ``--source kafka`` the same files also go through the Kafka source, timed from the first
publish to the last commit and reported next to the spool's (``cli/bench_kafka.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc

from generator import ID_SHAPES
from lake.location import LakeLocation
from lake.snapshot import snapshot
from pipeline.groups import waiting_entries
from pipeline.reconcile import reconcile
from pipeline.redis_client import connect, used_memory
from pipeline.schema import EVENT_TYPES, PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL, Layout
from pipeline.settings import Settings

if TYPE_CHECKING:
    pass

NAIVE_SUBSET = 500_000


@dataclass
class BenchResult:
    """Everything one bench run measured; printed as a table and written as JSON."""

    events: int
    batch_size: int
    dup_rate: float
    key_cache: str
    restamp_rate: float = 0.0
    ids: str = "sequential"
    files: int = 0
    groups: int = 0
    consumer_seconds: float = 0.0
    events_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_ms_per_10k: dict[str, float] = field(default_factory=dict)
    key_cache_bytes_per_key: float = 0.0
    key_cache_keys: int = 0
    peak_rss_mb: float = 0.0
    consumer_cpu_seconds: float = 0.0
    rss_samples_mb: list[float] = field(default_factory=list)
    ceiling_events_per_second: float = 0.0
    naive_events_per_second: float = 0.0
    naive_events: int = 0
    ratio_to_ceiling: float = 0.0
    ratio_to_naive: float = 0.0
    duckdb_events_per_second: float = 0.0
    #: Rows the DuckDB-only reference wrote: the generator's distinct event_ids, or the run fails.
    duckdb_events_out: int = 0
    ratio_to_duckdb: float = 0.0
    generated_distinct: int = 0
    duplicates_dropped: int = 0
    duplicates_expected: int = 0
    reconciled: bool = False
    live: dict[str, Any] = field(default_factory=dict)
    #: ``--source kafka``: the Kafka source on the same events, beside the spool source (whose
    #: figure is ``events_per_second``); ``kafka_ratio_to_spool`` is Kafka / spool.
    source: str = "spool"
    kafka_events: int = 0
    kafka_messages: int = 0
    kafka_groups: int = 0
    kafka_seconds: float = 0.0
    kafka_events_per_second: float = 0.0
    kafka_ratio_to_spool: float = 0.0
    #: The consumer's group join before its first assignment: waited out, not timed.
    kafka_join_seconds: float = 0.0
    kafka_timing: str = ""
    #: The producer's compression, and how long it waited for the lander to read on (the
    #: mock keeps 5 MiB of a partition: see ``MockFeed``).
    kafka_compression: str = ""
    kafka_producer_wait_seconds: float = 0.0
    kafka_publish_seconds: float = 0.0
    kafka_peak_rss_mb: float = 0.0
    kafka_consumer_cpu_seconds: float = 0.0
    #: The producer's and the mock brokers' CPU (this process) from the first publish to the
    #: consumer's exit: on this machine they share the consumer's cores.
    kafka_producer_brokers_cpu_seconds: float = 0.0
    kafka_duplicates_dropped: int = 0
    kafka_reconciled: bool = False


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _redis_used_memory(url: str) -> int:
    client = connect(url)
    try:
        return used_memory(client)
    finally:
        client.close()


@dataclass(frozen=True)
class ChildUsage:
    """What a finished consumer process used, from ``wait4``."""

    peak_rss_mb: float
    cpu_seconds: float  #: user + system, every thread

    @classmethod
    def of(cls, usage: Any) -> ChildUsage:
        return cls(usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


def run_consumer(
    settings: Settings, env: dict[str, str], total_files: int, show_progress: bool
) -> tuple[int, ChildUsage, list[float], dict[str, Any]]:
    """Run ``adevents consume --once`` as a process; (exit code, usage, RSS samples, stats).

    Key-cache statistics (``--stats``) only for the embedded cache: Redis's would count every
    bucket set at exit (a million SCARDs, seconds of the process's CPU); its keys are the
    events stored and its bytes the server's used_memory growth instead."""
    stats_path = Path(tempfile.mkdtemp()) / "stats.json"
    cmd = [sys.executable, "-m", "cli", "consume", "--once", "--log-level", "WARNING"]
    if not settings.redis_url:
        cmd += ["--stats", str(stats_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    samples: list[float] = []
    incoming = Layout(settings.data_dir).incoming
    from rich.progress import Progress

    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task("consuming", total=total_files)
        while True:
            # wait4 rather than poll(): it also reports the child's peak RSS.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            samples.append(_rss_mb(proc.pid))
            progress.update(task, completed=total_files - len(waiting_entries(incoming)))
            time.sleep(0.25)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    shutil.rmtree(stats_path.parent, ignore_errors=True)
    return proc.returncode, ChildUsage.of(usage), samples, stats


def measure_ceiling(files: list[Path], scratch: Path) -> float:
    """Events/s of reading the same Arrow IPC files and writing Parquet, nothing else."""
    scratch.mkdir(parents=True, exist_ok=True)
    rows = 0
    started = time.perf_counter()
    for i, path in enumerate(files):
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        frame.write_parquet(
            scratch / f"{i}.parquet",
            compression=PARQUET_COMPRESSION,
            compression_level=PARQUET_COMPRESSION_LEVEL,
        )
        rows += table.num_rows
    elapsed = time.perf_counter() - started
    shutil.rmtree(scratch, ignore_errors=True)
    return rows / elapsed if elapsed > 0 else 0.0


def measure_naive(
    files: list[Path], redis_url: str | None, campaigns: Path, limit: int
) -> tuple[int, float]:
    """The original design, labelled as such: per-event Python, per-event Redis SET NX."""
    url = redis_url or "redis://127.0.0.1:6379/0"
    client = connect(url)
    prefix = f"adevents-naive-{os.getpid()}-{time.time_ns()}"
    dim = (
        {r["campaign_id"]: r for r in pl.read_parquet(campaigns).to_dicts()}
        if campaigns.exists()
        else {}
    )
    out_rows: list[dict[str, Any]] = []
    seen = 0
    started = time.perf_counter()
    try:
        for path in files:
            if seen >= limit:
                break
            with pa.memory_map(str(path)) as source:
                events = ipc.open_file(source).read_all().slice(0, limit - seen).to_pylist()
            seen += len(events)
            pipe = client.pipeline(transaction=False)
            valid = []
            for e in events:  # the per-event loop the original design described
                if not e["event_id"] or e["event_type"] not in EVENT_TYPES:
                    continue
                if e["cost_micros"] is None or e["cost_micros"] < 0:
                    continue
                valid.append(e)
                pipe.set(f"{prefix}:{e['event_id']}", 1, nx=True, ex=3600)
            for e, fresh in zip(valid, pipe.execute(), strict=True):
                if not fresh:
                    continue
                campaign = dim.get(e["campaign_id"], {})
                e["advertiser_id"] = campaign.get("advertiser_id")
                e["campaign_name"] = campaign.get("campaign_name")
                out_rows.append(e)
            if len(out_rows) >= 100_000:
                pq.write_table(pa.Table.from_pylist(out_rows), os.devnull, compression="zstd")
                out_rows.clear()
        if out_rows:
            pq.write_table(pa.Table.from_pylist(out_rows), os.devnull, compression="zstd")
        elapsed = time.perf_counter() - started
    finally:
        client.close()
        drop_prefix(url, prefix)
    return seen, seen / elapsed if elapsed > 0 else 0.0


def measure_duckdb(files: list[Path], campaigns: Path, scratch: Path) -> tuple[int, float]:
    """The DuckDB-only reference: (rows written, events/s) of the pipeline a data engineer
    writes in an afternoon, on the same files.

    Per file, in order: read it with pyarrow (DuckDB reads Arrow IPC only through an extension
    it downloads at run time), keep one row per event_id that a table of seen ids does not
    hold (an anti-join), add those ids to the table, join the campaigns and COPY the result to
    one Parquet file (zstd), in one transaction. It validates nothing, has no window, and keeps
    its seen ids in memory: a database file, so they survive a restart as adevents' key cache
    does, cost it 20-35 % of its speed on this machine (2M events, under load), and the
    reference is meant to be hard to beat, not easy.
    """
    import duckdb

    scratch.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    written = 0
    try:
        con.execute("CREATE TABLE seen (event_id VARCHAR)")
        con.execute("CREATE TABLE campaigns AS SELECT * FROM read_parquet(?)", [str(campaigns)])
        started = time.perf_counter()
        rows = 0
        for i, path in enumerate(files):
            with pa.memory_map(str(path)) as source:
                batch = ipc.open_file(source).read_all()
            rows += batch.num_rows
            con.register("batch", batch)
            out = str(scratch / f"{i}.parquet").replace("'", "''")
            con.execute("BEGIN")
            con.execute(
                "CREATE OR REPLACE TEMP TABLE fresh AS SELECT * FROM batch "
                "ANTI JOIN seen USING (event_id) "
                "QUALIFY row_number() OVER (PARTITION BY event_id) = 1"
            )
            con.execute("INSERT INTO seen SELECT event_id FROM fresh")
            copied = con.execute(
                "COPY (SELECT f.*, c.advertiser_id, c.campaign_name FROM fresh f "
                f"LEFT JOIN campaigns c USING (campaign_id)) TO '{out}' "
                # The same zstd level as the consumer's files: the codec is not what is compared.
                f"(FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL {PARQUET_COMPRESSION_LEVEL})"
            ).fetchone()
            con.execute("COMMIT")
            con.unregister("batch")
            written += int(copied[0]) if copied else 0
        elapsed = time.perf_counter() - started
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return written, rows / elapsed if elapsed > 0 else 0.0


def kafka_prefix(settings: Settings) -> str:
    """The Redis key prefix of the Kafka run's own key cache."""
    return f"{settings.redis_key_prefix}-kafka"


def read_ledger(location: LakeLocation) -> pl.DataFrame:
    """The ledger table's rows (one per spool file), at its latest version."""
    frame = pl.from_arrow(snapshot(location).datasets["ledger"].to_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


#: Stages the ledger times once per commit group (each file of the group carries the figure),
#: by the name the bench reports. Reading is timed per file.
GROUP_STAGES = {
    "validate and enrich": "validate_ms",
    "dedupe (key cache)": "dedupe_ms",
    "write and commit events, quarantine": "write_ms",
}
#: Every stage the bench reports, in order; the last is what processing_ms leaves unexplained.
STAGES = ("read", *GROUP_STAGES, "ledger commit and queueing")


def commit_groups(ledger: pl.DataFrame) -> pl.DataFrame:
    """One row per commit group of the ledger's landed files (status ok): a group's files share
    the consumer and the ledger commit's clock reading."""
    ok = ledger.filter(pl.col("status") == "ok")
    return ok.group_by("consumer", "committed_at").agg(
        pl.col("rows_in").sum(),
        pl.col("read_ms").fill_null(0.0).sum(),
        *[pl.col(c).first().fill_null(0.0) for c in (*GROUP_STAGES.values(), "processing_ms")],
    )


def consumer_seconds(groups: pl.DataFrame) -> float:
    """Seconds from the first file read to the last ledger commit, over ``commit_groups``.

    A group's ``processing_ms`` runs from deciding it to its ledger commit; its files were read
    just before, so the group started ``read_ms`` (summed over its files) earlier.
    """
    committed = groups["committed_at"].dt.epoch("ms").cast(pl.Float64).to_numpy()
    began = committed - groups["processing_ms"].to_numpy() - groups["read_ms"].to_numpy()
    return float(committed.max() - began.min()) / 1000


def summarise_ledger(result: BenchResult, ledger: pl.DataFrame) -> None:
    """Events/s from the first file read to the last commit, stage times and group latency."""
    groups = commit_groups(ledger)
    seconds = consumer_seconds(groups)
    result.files = len(ledger)
    result.consumer_seconds = seconds
    result.events_per_second = float(ledger["rows_in"].sum()) / seconds if seconds > 0 else 0.0
    wait = groups["processing_ms"] - sum(groups[c] for c in GROUP_STAGES.values())
    result.stage_seconds = {
        "read": float(groups["read_ms"].sum()) / 1000,
        **{stage: float(groups[c].sum()) / 1000 for stage, c in GROUP_STAGES.items()},
        STAGES[-1]: float(wait.clip(lower_bound=0).sum()) / 1000,
    }
    latency = groups["processing_ms"] + groups["read_ms"]
    per_10k = latency / groups["rows_in"].clip(lower_bound=1) * 10_000
    for name, series in (("latency_ms", latency), ("latency_ms_per_10k", per_10k)):
        getattr(result, name).update(
            {f"p{q}": float(np.percentile(series.to_numpy(), q)) for q in (50, 95, 99)}
        )
    result.groups = len(groups)
    result.duplicates_dropped = int(ledger["duplicates"].sum())


def print_table(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    from cli.bench_kafka import kafka_rows  # it imports this module

    table = Table(
        title=f"adevents bench — {result.events:,} events, {result.key_cache} key cache, "
        f"{result.ids} ids"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("consumer events/s (end to end)", f"{result.events_per_second:,.0f}"),
        *kafka_rows(result),
        ("consumer seconds (first read → last commit)", f"{result.consumer_seconds:.2f}"),
        ("spool files / commit groups", f"{result.files:,} / {result.groups:,}"),
        ("ceiling events/s (IPC → Parquet only)", f"{result.ceiling_events_per_second:,.0f}"),
        ("ratio to ceiling", f"{result.ratio_to_ceiling:.2f} ×"),
        (
            f"naive baseline events/s ({result.naive_events:,} events)",
            f"{result.naive_events_per_second:,.0f}",
        ),
        ("ratio to naive baseline", f"{result.ratio_to_naive:.1f} ×"),
        (
            "DuckDB-only reference events/s",
            f"{result.duckdb_events_per_second:,.0f}",
        ),
        ("ratio to DuckDB-only reference", f"{result.ratio_to_duckdb:.2f} ×"),
        (
            "DuckDB-only reference rows out / distinct sent",
            f"{result.duckdb_events_out:,} / {result.generated_distinct:,}",
        ),
        *[(f"stage {k} (s)", f"{v:.2f}") for k, v in result.stage_seconds.items()],
        *[(f"group latency {k} (ms)", f"{v:.1f}") for k, v in result.latency_ms.items()],
        *[
            (f"group latency {k} per 10k events (ms)", f"{v:.2f}")
            for k, v in result.latency_ms_per_10k.items()
        ],
        ("key cache bytes per key", f"{result.key_cache_bytes_per_key:.1f}"),
        ("consumer peak RSS (MB)", f"{result.peak_rss_mb:,.0f}"),
        ("consumer CPU seconds (process, start to exit)", f"{result.consumer_cpu_seconds:.2f}"),
        (
            "duplicates dropped / expected",
            f"{result.duplicates_dropped:,} / {result.duplicates_expected:,}",
        ),
        (
            "reconciled with ground truth",
            "yes: every event exactly once" if result.reconciled else "NO",
        ),
    ]
    if result.live:
        rows += [(f"live {k}", str(v)) for k, v in result.live.items()]
    for name, value in rows:
        table.add_row(name, value)
    table.caption = result.kafka_timing or None
    Console().print(table)


def _child_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATA_DIR": settings.data_dir,
            "MAX_EVENTS_PER_SECOND": str(settings.max_events_per_second),
            "FSYNC": "true" if settings.fsync else "false",
            "DEDUPE_WINDOW": str(settings.dedupe_window),
            "KEEP_PROCESSED": "true",
        }
    )
    if settings.lake_uri:
        env["LAKE_URI"] = settings.lake_uri
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
        env["REDIS_KEY_PREFIX"] = settings.redis_key_prefix
    else:
        env.pop("REDIS_URL", None)
    env.update(extra)
    return env


def bench(
    settings: Settings,
    *,
    events: int,
    batch_size: int,
    naive_events: int,
    show_progress: bool,
    ids: str = "sequential",
    source: str = "spool",
) -> BenchResult:
    """Generate, consume (timed), reconcile, with ``source="kafka"`` the Kafka source too, then
    measure the ceiling, the naive baseline and the DuckDB-only reference."""
    from generator.runner import generate

    layout = Layout(settings.data_dir)
    if layout.root.exists() and any(layout.root.iterdir()):
        raise SystemExit(f"adevents bench: {layout.root} is not empty; give an empty --data-dir")
    location = LakeLocation.from_settings(settings)
    refuse_tables(location)
    layout.ensure()
    key_cache = "redis" if settings.redis_url else "embedded"
    result = BenchResult(
        events=events,
        batch_size=batch_size,
        dup_rate=settings.dup_rate,
        key_cache=key_cache,
        restamp_rate=settings.restamp_rate,
        ids=ids,
        source=source,
    )
    truth = layout.root / "truth.parquet"
    print(f"generating {events:,} events into {layout.incoming} (not timed)…", file=sys.stderr)
    generated = generate(
        settings, events=events, rate=0, batch_size=batch_size, truth=truth, seed=1, ids=ids
    )
    result.generated_distinct = generated.distinct
    files = waiting_entries(layout.incoming)
    memory_before = _redis_used_memory(settings.redis_url) if settings.redis_url else 0
    code, used, samples, stats = run_consumer(
        settings, _child_env(settings), len(files), show_progress
    )
    if code != 0:
        raise SystemExit(f"adevents bench: the consumer failed with exit code {code}")
    result.peak_rss_mb = used.peak_rss_mb
    result.consumer_cpu_seconds = used.cpu_seconds
    result.rss_samples_mb = [round(s, 1) for s in samples[:: max(1, len(samples) // 20)]]
    summarise_ledger(result, read_ledger(location))
    rec = reconcile(location, truth)  # raises ReconcileError on any loss or duplicate
    result.reconciled = True
    result.duplicates_expected = rec.expected_duplicates
    # Each stored event claimed one key; every copy of it was refused.
    result.key_cache_keys = int(stats.get("keys", rec.stored))
    if settings.redis_url:
        added = _redis_used_memory(settings.redis_url) - memory_before
        result.key_cache_bytes_per_key = added / max(1, result.key_cache_keys)
    else:
        result.key_cache_bytes_per_key = float(stats.get("bytes_per_key", 0.0))
    processed = sorted(layout.processed.glob("*.arrow"))
    if source == "kafka":
        print("measuring the Kafka source on a mock cluster in this process…", file=sys.stderr)
        from cli.bench_kafka import measure_kafka  # it imports this module

        measure_kafka(settings, processed, truth, result)
        result.kafka_ratio_to_spool = result.kafka_events_per_second / max(
            result.events_per_second, 1.0
        )
    print("measuring the ceiling on the same files…", file=sys.stderr)
    result.ceiling_events_per_second = measure_ceiling(processed, layout.root / "ceiling")
    print(f"measuring the naive baseline on {naive_events:,} events…", file=sys.stderr)
    result.naive_events, result.naive_events_per_second = measure_naive(
        processed, settings.redis_url, layout.campaigns, naive_events
    )
    print("measuring the DuckDB-only reference on the same files…", file=sys.stderr)
    result.duckdb_events_out, result.duckdb_events_per_second = measure_duckdb(
        processed, layout.campaigns, layout.root / "duckdb-reference"
    )
    if result.duckdb_events_out != result.generated_distinct:  # it must do the same dedupe
        raise SystemExit(
            f"adevents bench: the DuckDB-only reference wrote {result.duckdb_events_out:,} "
            f"events, the generator sent {result.generated_distinct:,} distinct event_ids"
        )
    result.ratio_to_ceiling = result.events_per_second / max(result.ceiling_events_per_second, 1.0)
    result.ratio_to_naive = result.events_per_second / max(result.naive_events_per_second, 1.0)
    result.ratio_to_duckdb = result.events_per_second / max(result.duckdb_events_per_second, 1.0)
    return result


def refuse_tables(location: LakeLocation) -> None:
    """Stop unless the lake at ``location`` is empty: a bench measures and reconciles its own."""
    if any(v >= 0 for v in snapshot(location).versions.values()):
        raise SystemExit(
            f"adevents bench: the lake at {location.uri} has tables; give an empty LAKE_URI"
        )


def bench_live(
    settings: Settings,
    *,
    rate: float,
    duration: float,
    batch_size: int | None,
    ids: str = "sequential",
) -> dict[str, Any]:
    """Generator and consumer together at ``rate``: sustained rate, freshness, kept up or not."""
    layout = Layout(settings.data_dir)
    layout.ensure()
    location = LakeLocation.from_settings(settings)
    env = _child_env(settings, KEEP_PROCESSED="false")
    consumer = subprocess.Popen(
        [sys.executable, "-m", "cli", "consume", "--log-level", "WARNING"], env=env
    )
    gen_cmd = [
        sys.executable,
        "-m",
        "cli",
        "generate",
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--ids",
        ids,
    ]
    if batch_size:
        gen_cmd += ["--batch-size", str(batch_size)]
    started = time.time()
    subprocess.run(gen_cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    generated_until = time.time()
    deadline = generated_until + max(10.0, duration)
    while waiting_entries(layout.incoming) and time.time() < deadline:
        time.sleep(0.2)
    backlog_after = len(waiting_entries(layout.incoming))
    consumer.terminate()
    consumer.wait(timeout=30)
    ledger = read_ledger(location)
    lag = ledger["lag_ms"].to_numpy() if len(ledger) else np.zeros(1)
    rows = int(ledger["rows_in"].sum()) if len(ledger) else 0
    return {
        "target_rate": rate,
        "sustained_events_per_s": round(rows / max(generated_until - started, 1e-9)),
        "freshness_p50_ms": round(float(np.percentile(lag, 50)), 1),
        "freshness_p99_ms": round(float(np.percentile(lag, 99)), 1),
        "kept_up": backlog_after == 0 and float(np.percentile(lag, 99)) < 5_000,
        "files_left_when_generator_stopped_plus_grace": backlog_after,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events", type=int, default=10_000_000, help="events to generate (default 10M)"
    )
    parser.add_argument("--batch-size", type=int, default=100_000, help="events per spool file")
    parser.add_argument("--dup-rate", help="fraction of duplicates (default DUP_RATE, 0.01)")
    parser.add_argument(
        "--restamp-rate",
        help="fraction of duplicates whose copy carries another event_time (RESTAMP_RATE, 0)",
    )
    parser.add_argument(
        "--key-cache", choices=("redis", "embedded"), help="default: redis when REDIS_URL is set"
    )
    parser.add_argument("--redis-url", help="Redis for --key-cache redis (default REDIS_URL)")
    parser.add_argument("--dedupe-window", help="dedupe window (DEDUPE_WINDOW)")
    parser.add_argument(
        "--ids",
        choices=ID_SHAPES,
        default="sequential",
        help="event_id shape: sequential (<producer>-<seed>-<seq>, default) or hex33 "
        "(33 random-looking hex digits, the shape issue 12's targets use)",
    )
    parser.add_argument(
        "--source",
        choices=("spool", "kafka"),
        default="spool",
        help="spool (default), or kafka: the Kafka source too, on a mock cluster, on the same "
        "events in the same run, reported beside the spool source with their ratio",
    )
    parser.add_argument(
        "--naive-events", type=int, default=NAIVE_SUBSET, help="naive baseline subset"
    )
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    parser.add_argument("--live", action="store_true", help="generator and consumer together")
    parser.add_argument("--rate", type=float, default=50_000, help="--live: events/s to generate")
    parser.add_argument("--duration", type=float, default=30, help="--live: seconds to generate")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.key_cache == "embedded":
        settings = settings.replace(redis_url=None)
    elif args.key_cache == "redis" and not settings.redis_url:
        settings = settings.replace(redis_url="redis://127.0.0.1:6379/0")
    if settings.redis_url:
        settings = settings.replace(redis_key_prefix=f"adevents-bench-{os.getpid()}")
    settings = settings.replace(max_events_per_second=0) if not args.live else settings
    if args.live and args.source == "kafka":
        raise SystemExit("adevents bench: --source kafka does not combine with --live")
    own_dir = args.data_dir is None
    if own_dir:
        settings = settings.replace(data_dir=tempfile.mkdtemp(prefix="adevents-bench-"))
    try:
        if args.live:
            live = bench_live(
                settings, rate=args.rate, duration=args.duration, batch_size=None, ids=args.ids
            )
            result = BenchResult(
                events=0,
                batch_size=0,
                dup_rate=settings.dup_rate,
                key_cache="redis" if settings.redis_url else "embedded",
                ids=args.ids,
                live=live,
            )
            print(json.dumps(live, indent=2))
        else:
            result = bench(
                settings,
                events=args.events,
                batch_size=args.batch_size,
                naive_events=args.naive_events,
                ids=args.ids,
                source=args.source,
                show_progress=not args.no_progress and sys.stderr.isatty(),
            )
            print_table(result)
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(asdict(result), indent=2))
    finally:
        if own_dir:
            shutil.rmtree(settings.data_dir, ignore_errors=True)
        if settings.redis_url:
            drop_prefix(settings.redis_url, settings.redis_key_prefix)
            drop_prefix(settings.redis_url, kafka_prefix(settings))
    return 0


def drop_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (a bench run's own key cache)."""
    client = connect(url)
    keys: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        keys.append(key)
        if len(keys) == 10_000:  # one round trip per key took minutes at 1M events
            client.unlink(*keys)
            keys.clear()
    if keys:
        client.unlink(*keys)
    client.close()
