"""Lake write benchmark: our Parquet + Delta commit against deltalake's writer and plain Parquet.

Run (about two minutes on two cores; moto's S3 server is started on loopback):

    .venv/bin/python bench/lake_write.py --rounds 8 --rows 100000 --small-files 60

On the same enriched frames (``--rows`` each, one UTC hour, 200 campaigns), for local disk and
for S3, interleaved round by round so drift hits every case alike:

- ``ours``: ``lake.writer.write_files`` (pyarrow, zstd, sorted, 16k-row groups) then
  ``commit_files`` (``create_write_transaction`` with an app txn), events/s and commit latency;
- ``write_deltalake``: deltalake's own writer (Rust, zstd) appending the same prepared rows;
- ``v1 parquet``: the v1 layout's cost, a plain pyarrow Parquet write (+ rename locally), no log.

Then the small-files problem: ``--small-files`` frames of ``--small-rows`` (100 ms of 50k ev/s)
committed one file per commit, ten files per commit, and ten frames coalesced into one file per
commit, with the time a reader then needs to open a snapshot and count.
Finally the row-group size: bytes and row groups a one-campaign query must read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
from deltalake import WriterProperties, write_deltalake

from lake import snapshot
from lake.location import LakeLocation
from lake.tables import EVENTS, ensure_table
from lake.testing import enriched_frame
from lake.writer import WrittenFiles, commit_files, prepare, with_partition_columns, write_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import S3Server  # type: ignore[import-not-found]  # a test helper, shared


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_writers(
    location: LakeLocation, frames: list[pl.DataFrame], tag: str
) -> dict[str, list[float]]:
    """Write every frame with each method, interleaved; seconds per frame, and commit seconds."""
    times: dict[str, list[float]] = {"ours": [], "commit": [], "write_deltalake": [], "v1": []}
    ours_loc = _sub(location, f"{tag}-ours")
    theirs_loc = _sub(location, f"{tag}-dl")
    ours = ensure_table(ours_loc, EVENTS)
    ensure_table(theirs_loc, EVENTS)
    fs = location.filesystem()
    props = WriterProperties(compression="ZSTD", max_row_group_size=16_384)
    for version, frame in enumerate(frames, start=1):

        def ours_case(frame: pl.DataFrame = frame, version: int = version) -> None:
            files = write_files(ours_loc, EVENTS, frame, version=version, fsync=False)
            started = time.perf_counter()
            commit_files(ours, EVENTS, files, {"bench": version})
            times["commit"].append(time.perf_counter() - started)

        def delta_rs(frame: pl.DataFrame = frame) -> None:
            data = with_partition_columns(EVENTS, frame).to_arrow().cast(EVENTS.schema)
            write_deltalake(
                theirs_loc.table_uri("events"),
                data,
                mode="append",
                partition_by=["date", "hour"],
                storage_options=location.storage_options(),
                writer_properties=props,
            )

        def v1(frame: pl.DataFrame = frame, version: int = version) -> None:
            data = prepare(EVENTS, frame).drop("__partition_bucket").to_arrow().cast(EVENTS.columns)
            path = location.path(f"{tag}-v1", f"b{version}.parquet")
            tmp = path + ".tmp" if not location.is_s3 else path
            if not location.is_s3:
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            pq.write_table(data, tmp, filesystem=fs, compression="zstd", row_group_size=16_384)
            if tmp != path:
                fs.move(tmp, path)

        cases = [("ours", ours_case), ("write_deltalake", delta_rs), ("v1", v1)]
        shift = version % len(cases)  # rotate the order each round: no case always goes first
        for name, case in cases[shift:] + cases[:shift]:
            times[name].append(_timed(case))
    return times


def _sub(location: LakeLocation, name: str) -> LakeLocation:
    """A location for one case: ``LAKE_URI/<name>`` (its tables under it)."""
    if location.s3 is None:
        return LakeLocation(uri=location.table_uri(name))
    prefix = f"{location.s3.prefix}/{name}".strip("/")
    return LakeLocation(uri=location.table_uri(name), s3=replace(location.s3, prefix=prefix))


def small_files(
    location: LakeLocation, frames: list[pl.DataFrame], tag: str
) -> dict[str, tuple[float, float, int, int]]:
    """Per strategy: seconds to land ``frames``, seconds to open + scan, commits, files."""
    out: dict[str, tuple[float, float, int, int]] = {}
    strategies = ("1 file/commit", "10 files/commit", "10 frames→1 file/commit")
    for n, strategy in enumerate(strategies):
        loc = _sub(location, f"{tag}-{n}")
        table = ensure_table(loc, EVENTS)
        started = time.perf_counter()
        if strategy == "1 file/commit":
            for v, frame in enumerate(frames, start=1):
                commit_files(table, EVENTS, write_files(loc, EVENTS, frame, fsync=False), {"s": v})
        elif strategy == "10 files/commit":
            for v, start in enumerate(range(0, len(frames), 10), start=1):
                group = WrittenFiles()
                for frame in frames[start : start + 10]:
                    part = write_files(loc, EVENTS, frame, fsync=False)
                    group.actions += part.actions
                    group.rows += part.rows
                commit_files(table, EVENTS, group, {"s": v})
        else:
            for v, start in enumerate(range(0, len(frames), 10), start=1):
                merged = pl.concat(frames[start : start + 10])
                commit_files(table, EVENTS, write_files(loc, EVENTS, merged, fsync=False), {"s": v})
        landed = time.perf_counter() - started
        reads = []
        for _ in range(3):
            t0 = time.perf_counter()
            con = duckdb.connect()
            snapshot.register(con, snapshot.snapshot(loc, {"events": EVENTS}))
            con.sql("SELECT count(*), sum(cost_micros) FROM events").fetchall()
            reads.append(time.perf_counter() - t0)
        final = ensure_table(loc, EVENTS)
        out[strategy] = (landed, statistics.median(reads), final.version(), len(final.file_uris()))
    return out


def row_groups(frame: pl.DataFrame) -> list[tuple[int, int, float, float, float]]:
    """Per row-group size: rows/group, groups, KiB, groups a median and the top campaign read."""
    data = prepare(EVENTS, frame).drop("__partition_bucket").to_arrow().cast(EVENTS.columns)
    counts = frame["campaign_id"].value_counts(sort=True)
    top, median = counts["campaign_id"][0], counts["campaign_id"][counts.height // 2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (8_192, 16_384, 32_768, 131_072):
            path = f"{tmp}/{size}.parquet"
            pq.write_table(data, path, compression="zstd", row_group_size=size)
            meta = pq.ParquetFile(path).metadata
            col = data.schema.get_field_index("campaign_id")
            bounds = [
                (
                    meta.row_group(i).column(col).statistics.min,
                    meta.row_group(i).column(col).statistics.max,
                )
                for i in range(meta.num_row_groups)
            ]
            read = [sum(lo <= c <= hi for lo, hi in bounds) for c in (median, top)]
            rows.append(
                (size, meta.num_row_groups, Path(path).stat().st_size / 1024, *map(float, read))
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small-files", type=int, default=60)
    parser.add_argument("--small-rows", type=int, default=5_000)
    parser.add_argument("--targets", default="local,s3")
    args = parser.parse_args()
    frames = [enriched_frame(args.rows, seed=i, batch_id=f"b{i}") for i in range(args.rounds)]
    small = [enriched_frame(args.small_rows, seed=1000 + i) for i in range(args.small_files)]
    server = S3Server().start() if "s3" in args.targets else None
    try:
        for target in args.targets.split(","):
            if target == "s3":
                assert server is not None
                location = LakeLocation.from_env(server.env())
            else:
                location = LakeLocation.from_env(
                    {"LAKE_URI": tempfile.mkdtemp(prefix="lakebench-")}
                )
            times = run_writers(location, frames, "w")
            print(f"\n## {target}: {args.rounds} frames × {args.rows:,} rows (median per frame)")
            print("| method | s/frame | events/s | time vs v1 parquet (same round) |")
            print("|---|---|---|---|")
            for name in ("ours", "write_deltalake", "v1"):
                med = statistics.median(times[name])
                # The ratio is the median of same-round ratios: load drift cancels out.
                ratio = statistics.median(
                    a / b for a, b in zip(times[name], times["v1"], strict=True)
                )
                print(f"| {name} | {med:.3f} | {args.rows / med:,.0f} | {ratio:.2f}× |")
            commits = sorted(times["commit"])
            print(
                f"commit latency (create_write_transaction + refresh): p50 "
                f"{statistics.median(commits) * 1000:.0f} ms, max {commits[-1] * 1000:.0f} ms"
            )
            print(
                f"\n### {target}: small files, {args.small_files} frames × {args.small_rows:,} rows"
            )
            print("| strategy | land s | frames/s | commits | files | open+scan s |")
            print("|---|---|---|---|---|---|")
            for key, (landed, read, commits_, files_) in small_files(location, small, "s").items():
                rate = len(small) / landed
                print(f"| {key} | {landed:.2f} | {rate:.0f} | {commits_} | {files_} | {read:.3f} |")
        print(f"\n## row-group size, one {args.rows:,}-row frame, 200 campaigns (zipf)")
        print("| rows/group | groups | file KiB | groups read: median campaign | top campaign |")
        print("|---|---|---|---|---|")
        for size, groups, kib, median, top in row_groups(frames[0]):
            print(f"| {size:,} | {groups} | {kib:,.0f} | {median:.0f} | {top:.0f} |")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
