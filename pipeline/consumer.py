"""The consumer: takes spool files in order and lands each exactly once in the lake."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl

from pipeline import commit, faults
from pipeline.enrich import empty_campaigns, enrich, load_campaigns, partition_by_hour
from pipeline.fingerprint import Keys, compute_keys, empty_keys
from pipeline.keycache import CacheLostError, KeyCache
from pipeline.lake import window_keys
from pipeline.leases import Lease, Leases, LocalLeases
from pipeline.normalize import SchemaMismatchError, normalize
from pipeline.retry import StatusBoard, Supervisor, check_free_space, classify
from pipeline.schema import (
    LEDGER_SCHEMA,
    QUARANTINE_SCHEMA,
    REASONS,
    Layout,
    event_partition,
)
from pipeline.settings import Settings
from pipeline.spool import (
    MAX_FILE_BYTES,
    SUFFIX,
    PoisonInputError,
    atomic_write_bytes,
    display_name,
    internal_stem,
    list_incoming,
    read_spool_file,
    remove_quietly,
    sweep_stale_temp_files,
)

log = logging.getLogger("adevents.consumer")
#: How often a running consumer sweeps incoming/ for producers' stale temp files.
SWEEP_INTERVAL_SECONDS = 300.0

ROW_GROUP_SIZE = 128 * 1024
#: Longest attempt name kept as is in a staging directory's name (it holds the consumer name).
MAX_ATTEMPT_NAME = 64
_STAGES = ("read_ms", "validate_ms", "dedupe_ms", "enrich_ms", "write_ms")


class ConsumerLockedError(RuntimeError):
    """Another consumer already holds DATA_DIR."""


def batch_id_for(path: Path, st: os.stat_result) -> str:
    """A batch's identity: the file name plus what tells this file from a later one of that name.

    Stable across restarts (rename keeps inode and mtime), so a retried file keeps its batch_id
    and its outputs land under the same names. ``st`` is the entry's ``lstat``. A long or odd
    name is replaced by a hash of it (see ``internal_stem``), so a batch_id is at most ~110
    bytes and every name derived from it stays far below NAME_MAX.
    """
    ident = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()
    return f"{internal_stem(path.name)}-{hashlib.blake2b(ident, digest_size=4).hexdigest()}"


def lease_name(file_name: str) -> str:
    """The name a spool file is leased under: the file name itself when it is plain."""
    return internal_stem(file_name) + SUFFIX


def source_name(batch_id: str) -> str:
    """The lease name of a batch's spool file (the file name itself when it is plain)."""
    return batch_id.rsplit("-", 1)[0] + SUFFIX


def attempt_name(token: str) -> str:
    """A lease token as a staging directory's attempt name: safe characters, bounded length."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", token)
    if len(safe) <= MAX_ATTEMPT_NAME:
        return safe
    return f"{safe[:40]}_{hashlib.blake2b(token.encode(), digest_size=8).hexdigest()}"


def _printable(name: str) -> str:
    """A file name for one log line: control characters (a newline) escaped, quoted."""
    return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name) + '"'


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Totals:
    """Running totals of one consumer process, for its summary line."""

    files: int = 0
    rows_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bad_files: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.files += 1
        self.rows_in += row["rows_in"]
        self.accepted += row["accepted"]
        self.duplicates += row["duplicates"]
        self.quarantined += row["quarantined"]
        self.bad_files += row["status"] != "ok"

    def line(self, wall_seconds: float) -> str:
        rate = self.rows_in / wall_seconds if wall_seconds > 0 else 0.0
        return (
            f"files={self.files} rows_in={self.rows_in} accepted={self.accepted} "
            f"duplicates={self.duplicates} quarantined={self.quarantined} "
            f"bad_files={self.bad_files} events_per_s={rate:,.0f}"
        )


@dataclass
class Decided:
    """A batch after stage one: its rows split, its keys claimed; nothing written yet."""

    path: Path
    batch_id: str
    started: float
    now: datetime
    rows_in: int
    ignored: int
    accepted: pl.DataFrame
    rejected: pl.DataFrame
    duplicates: int
    ledger: dict[str, Any]
    decided_at: float = 0.0


def _ledger_row(**values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(LEDGER_SCHEMA.names())
    for name in LEDGER_SCHEMA.names():
        if LEDGER_SCHEMA[name] == pl.Int64:
            row[name] = 0
    row.update(values)
    return row


class Consumer:
    """Processes spool files one at a time; each lands whole in the lake, exactly once."""

    def __init__(
        self,
        settings: Settings,
        cache: KeyCache,
        *,
        leases: Leases | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.settings = settings
        #: Without shared leases this consumer must have DATA_DIR to itself (start() locks it).
        self.leases: Leases = leases or LocalLeases()
        self.layout = Layout(settings.data_dir)
        self.layout.ensure()
        self.cache = cache
        self.clock = clock
        self.window_ms = int(settings.dedupe_window * 1000)
        self.slice_ms = int(settings.dedupe_slice * 1000)
        self.name = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.durable = settings.fsync
        self.totals = Totals()
        self._campaigns = empty_campaigns()
        self._campaigns_mtime: float | None = -1.0
        self._lock_file: IO[str] | None = None
        self._next_allowed = 0.0
        self._decided_watermark: int | None = None
        self._in_flight: tuple[Future[dict[str, Any] | None], Lease] | None = None
        #: Largest spool file read; bigger ones are quarantined as ``file_too_large``.
        self.max_file_bytes = MAX_FILE_BYTES
        self.status = StatusBoard(self.layout.state, self.name)
        #: Poison entries quarantined in the ledger that could not be moved out of incoming/
        #: (a mount point, say): passed over for the life of this process, logged once.
        self._stuck: set[str] = set()
        self._next_sweep = 0.0

    # -- start-up ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take DATA_DIR for this consumer; a second one fails here with a clear message."""
        path = self.layout.state / "consumer.lock"
        fh = open(path, "a+")  # noqa: SIM115 - held open for the life of the consumer
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ConsumerLockedError(
                f"another consumer ({holder}) is already running on {self.layout.root}; "
                "two consumers on one DATA_DIR would write duplicates. Stop it first."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{self.name} pid={os.getpid()}\n")
        fh.flush()
        self._lock_file = fh

    def start(self, *, resume: bool = True) -> None:
        """Lock (when alone), finish what a crash interrupted, and make the key cache whole.

        With ``resume=False`` only the lock is taken: :meth:`run` resumes first thing, waiting
        out a Redis that is down or lost (``adevents consume`` does this).
        """
        if isinstance(self.leases, LocalLeases):
            self.lock()
        if resume:
            self.resume()

    def resume(self) -> None:
        """What a restart does: make the key cache whole, finish or drop interrupted batches.

        Run at start and after every transient fault, so riding a fault out is exactly as safe
        as the kill -9 and restart that tests/test_crash.py checks at every step.
        """
        self._decided_watermark = None
        self.ensure_cache()
        self.recover()

    def recover(self) -> None:
        """Publish batches committed before a crash; drop attempts that never committed.

        Only batches whose file lease is free are touched: with several consumers, a staging
        directory under a live lease belongs to a consumer that is still working on it.
        """
        committed, partial = commit.pending(self.layout.root)
        for d in partial + committed:
            batch_id = commit.batch_id_of(d)
            lease = self.leases.acquire(source_name(batch_id))
            if lease is None:
                continue
            try:
                if d in partial:
                    log.info("discarding uncommitted attempt %s", d.name)
                    commit.discard_partials(self.layout.root, batch_id)
                elif d.exists():
                    log.info("finishing batch %s committed before a crash", batch_id)
                    self._roll_forward(d)
            finally:
                self.leases.release(lease)

    def ensure_cache(self) -> None:
        """Rebuild the key cache from events/ if it lost its state (or never had it)."""
        started = time.perf_counter()

        def loader(since: float | None) -> tuple[Keys, int | None]:
            if since is not None:
                return window_keys(self.layout, self.window_ms, self.slice_ms, since)
            # The cache lost the claims of every batch not committed yet: fence those attempts
            # off (they can no longer commit), then read the committed ones still in staging/
            # before events/ (where they move), so the rebuild misses nothing whatever the timing.
            staged, staged_max = self._staged_keys(commit.fence_uncommitted(self.layout.root))
            keys, watermark = window_keys(self.layout, self.window_ms, self.slice_ms, None)
            marks = [m for m in (watermark, staged_max) if m is not None]
            return Keys.concat([staged, keys]), max(marks, default=None)

        if self.cache.ensure(loader):
            log.info("rebuilt the key cache from events/ in %.1fs", time.perf_counter() - started)

    def _roll_forward(self, committed_dir: Path) -> dict[str, Any]:
        """Finish a batch that some attempt committed: publish, re-add its keys, retire it."""
        manifest = commit.publish(self.layout.root, committed_dir, durable=self.durable)
        keys, max_ms = self._keys_of(manifest)
        self.cache.restore(str(manifest["batch_id"]), keys, max_ms)
        return self._complete(committed_dir, manifest)

    def _staged_keys(self, files: list[tuple[Path, Path]]) -> tuple[Keys, int | None]:
        """Keys of committed events files: each at its staged path, or published if it moved."""
        frames = []
        for staged, published in files:
            for path in (staged, published):
                try:
                    frames.append(pl.read_parquet(path, columns=["event_id", "event_time"]))
                    break
                except FileNotFoundError:
                    continue
        if not frames:
            return empty_keys(), None
        frame = pl.concat(frames)
        max_ms = frame["event_time"].dt.epoch("ms").max()
        keys = compute_keys(frame["event_id"], frame["event_time"], self.slice_ms)
        return keys, None if max_ms is None else int(str(max_ms))

    def _keys_of(self, manifest: dict[str, Any]) -> tuple[Keys, int | None]:
        files = [self.layout.root / f for f in manifest["files"] if f.startswith("events/")]
        if not files:
            return empty_keys(), None
        frame = pl.concat([pl.read_parquet(f, columns=["event_id", "event_time"]) for f in files])
        max_ms = frame["event_time"].dt.epoch("ms").max()
        keys = compute_keys(frame["event_id"], frame["event_time"], self.slice_ms)
        return keys, None if max_ms is None else int(str(max_ms))

    # -- one file ------------------------------------------------------------------------------
    def campaigns(self) -> pl.DataFrame:
        try:
            mtime: float | None = self.layout.campaigns.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._campaigns_mtime:
            self._campaigns = load_campaigns(self.layout.campaigns)
            self._campaigns_mtime = mtime
        return self._campaigns

    def process_file(self, path: Path, lease: Lease | None = None) -> dict[str, Any] | None:
        """Land one spool file; returns its ledger row, or None if it was not landed now.

        The caller holds ``lease`` on the file name. None is returned when the file vanished
        (another consumer finished it) or this attempt lost its lease or its key-cache epoch
        before committing; the file is then simply taken again.
        """
        lease = lease or Lease(lease_name(path.name), "local")
        decided = self._stage_one(path)
        return self._write_batch(decided, lease) if isinstance(decided, Decided) else decided

    def _stage_one(self, path: Path) -> Decided | dict[str, Any] | None:
        """Decide a file's batch; a key cache that lost its data is raised to the caller.

        A loss is not repaired here: the batch being written meanwhile (claimed before the
        loss) will not commit, so deciding this one now would land it first and break file
        order. :meth:`run` drops both and resumes, in order, once the cache is rebuilt. A
        claim refused for another reason (slices another consumer expired meanwhile) is simply
        decided again.
        """
        for _ in range(3):
            try:
                return self._process(path)
            except CacheLostError:
                self._decided_watermark = None
                if self.cache.needs_rebuild():
                    raise
        raise CacheLostError(f"{_printable(display_name(path.name))}: claims kept being refused")

    def _process(self, path: Path) -> Decided | dict[str, Any] | None:
        try:
            st = os.lstat(path)  # the entry itself: a link is never followed
        except FileNotFoundError:
            return None
        started = time.perf_counter()
        batch_id = batch_id_for(path, st)
        committed_dir = commit.committed_dir_of(self.layout.root, batch_id)
        if committed_dir.exists():  # an earlier attempt committed; finish its work
            return self._roll_forward(committed_dir)
        commit.discard_partials(self.layout.root, batch_id)  # fence off earlier attempts
        return self._decide(path, st, batch_id, started)

    def _decide(
        self, path: Path, st: os.stat_result, batch_id: str, started: float
    ) -> Decided | dict[str, Any] | None:
        """Stage one: read, normalise, validate and claim keys. Bad files end here."""
        arrived = datetime.fromtimestamp(st.st_mtime, UTC)
        try:
            table = read_spool_file(path, st, max_bytes=self.max_file_bytes)
        except FileNotFoundError:
            return None
        except PoisonInputError as exc:
            return self._quarantine_file(
                path, batch_id, arrived, started, reason=exc.reason, message=exc.message, rows=0
            )
        t_read = time.perf_counter()
        faults.point("after_read")
        try:
            table, ignored = normalize(table)
        except SchemaMismatchError as exc:
            return self._quarantine_file(
                path,
                batch_id,
                arrived,
                started,
                reason="schema_mismatch",
                message=str(exc),
                rows=table.num_rows,
            )
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        now = self.clock()
        valid, rejected = self._split(frame, now)
        t_validate = time.perf_counter()
        accepted, duplicates = self._dedupe(batch_id, valid)
        t_dedupe = time.perf_counter()
        faults.point("after_claim")
        times = accepted["event_time"]
        max_ms = _ms(times.max()) if len(times) else None  # type: ignore[arg-type]
        if max_ms is not None:
            self._decided_watermark = max(self._decided_watermark or max_ms, max_ms)
        return Decided(
            path=path,
            batch_id=batch_id,
            started=started,
            now=now,
            rows_in=table.num_rows,
            ignored=len(ignored),
            accepted=accepted,
            rejected=rejected,
            duplicates=duplicates,
            decided_at=time.perf_counter(),
            ledger=dict(
                arrived_at=_ms(arrived),
                min_event_time=_ms(times.min()) if len(times) else None,  # type: ignore[arg-type]
                max_event_time=max_ms,
                read_ms=(t_read - started) * 1000,
                validate_ms=(t_validate - t_read) * 1000,
                dedupe_ms=(t_dedupe - t_validate) * 1000,
            ),
        )

    def _write_batch(self, d: Decided, lease: Lease) -> dict[str, Any] | None:
        """Stage two: enrich, write the staged files, commit, publish and retire the input."""
        t_start = time.perf_counter()
        enriched, unknown = enrich(
            d.accepted, self.campaigns(), batch_id=d.batch_id, ingested_at=d.now
        )
        t_enrich = time.perf_counter()
        staged = commit.StagedBatch(
            self.layout.root, d.batch_id, durable=self.durable, attempt=attempt_name(lease.token)
        )
        try:
            return self._stage_and_commit(
                d, lease, staged, enriched=enriched, unknown=unknown, times=(t_start, t_enrich)
            )
        except BaseException:
            staged.abandon()  # a failed write (a full disk) leaves nothing partial behind
            raise

    def _stage_and_commit(
        self,
        d: Decided,
        lease: Lease,
        staged: commit.StagedBatch,
        *,
        enriched: pl.DataFrame,
        unknown: int,
        times: tuple[float, float],
    ) -> dict[str, Any] | None:
        t_start, t_enrich = times
        committed_dir = commit.committed_dir_of(self.layout.root, d.batch_id)
        source = display_name(d.path.name)
        staged.begin()
        for (date, hour), part in partition_by_hour(enriched).items():
            staged.write_parquet(
                f"events/{event_partition(date, hour)}/{d.batch_id}.parquet",
                part,
                row_group_size=ROW_GROUP_SIZE,
            )
        rejected = d.rejected
        if len(rejected):
            quarantined = rejected.with_columns(
                source_file=pl.lit(source),
                batch_id=pl.lit(d.batch_id),
                ingested_at=pl.lit(d.now).cast(QUARANTINE_SCHEMA["ingested_at"]),
            ).select(QUARANTINE_SCHEMA.names())
            staged.write_parquet(
                f"quarantine/date={d.now:%Y-%m-%d}/{d.batch_id}.parquet",
                quarantined,
                row_group_size=ROW_GROUP_SIZE,
            )
        t_write = time.perf_counter()
        reasons = dict.fromkeys(REASONS, 0)
        if len(rejected):
            for reason, n in rejected["reason"].value_counts().iter_rows():
                reasons[reason] = int(n)
        row = _ledger_row(
            batch_id=d.batch_id,
            source_file=source,
            status="ok",
            rows_in=d.rows_in,
            accepted=len(d.accepted),
            duplicates=d.duplicates,
            quarantined=len(rejected),
            **{f"quarantined_{r}": n for r, n in reasons.items()},
            unknown_campaigns=unknown,
            ignored_columns=d.ignored,
            **d.ledger,
            enrich_ms=(t_enrich - t_start) * 1000,
            write_ms=(t_write - t_enrich) * 1000,
            consumer=self.name,
        )
        # The manifest keeps the exact name (JSON escapes any byte) to retire the input by.
        staged.extra = {"source_file": d.path.name, "ledger": row}
        faults.point("after_stage")
        if not (self.leases.held(lease) and self.cache.valid(d.batch_id)):
            log.warning(
                "%s: lost the lease or the key cache meanwhile; not committing", _printable(source)
            )
            staged.abandon()
            self._decided_watermark = None
            return None
        try:
            staged.commit()
        except commit.CommitConflictError as exc:
            log.warning("%s", exc)
            self._decided_watermark = None
            return self._roll_forward(committed_dir) if committed_dir.exists() else None
        faults.point("after_commit")
        # Processing time leaves out the wait for the writer (the previous batch's commit).
        return self._publish(staged.committed_dir, d.started + (t_start - d.decided_at))

    def _split(self, frame: pl.DataFrame, now: datetime) -> tuple[pl.DataFrame, pl.DataFrame]:
        from pipeline.validate import split_valid

        # Batches already decided but still being written count too, so that the decisions
        # are the same whether or not writing overlaps the next batch's reading.
        marks = [m for m in (self.cache.watermark(), self._decided_watermark) if m is not None]
        return split_valid(
            frame, now_ms=_ms(now), watermark_ms=max(marks, default=None), window_ms=self.window_ms
        )

    def _dedupe(self, batch_id: str, valid: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """Accepted rows and the number of duplicates: first copy wins, in file then row order."""
        keys = compute_keys(valid["event_id"], valid["event_time"], self.slice_ms)
        # Copies within the batch, found on the 128-bit fingerprints (far cheaper than on the
        # strings); the key cache then decides between batches.
        mask = (
            pl.DataFrame({"hi": keys.hi, "lo": keys.lo})
            .select(pl.struct("hi", "lo").is_first_distinct())
            .to_series()
            .to_numpy()
        )
        is_new = np.zeros(len(keys), dtype=bool)
        is_new[mask] = self.cache.claim(batch_id, keys.take(mask))
        accepted = valid.filter(pl.Series(is_new))
        return accepted, len(valid) - len(accepted)

    def _publish(self, committed_dir: Path, started: float | None) -> dict[str, Any]:
        manifest = commit.publish(self.layout.root, committed_dir, durable=self.durable)
        faults.point("after_publish")
        row: dict[str, Any] = dict(manifest["ledger"])  # type: ignore[call-overload]
        self.cache.finish(row["batch_id"], row["max_event_time"])
        faults.point("after_finish")
        return self._complete(committed_dir, manifest, started)

    def _complete(
        self, committed_dir: Path, manifest: dict[str, Any], started: float | None = None
    ) -> dict[str, Any]:
        """Write the ledger row, retire the input file and the staging directory."""
        row: dict[str, Any] = dict(manifest["ledger"])
        committed_at = self.clock()
        if started is not None:
            row["processing_ms"] = (time.perf_counter() - started) * 1000
            staged_ms = sum(
                row[k] or 0
                for k in ("read_ms", "validate_ms", "dedupe_ms", "enrich_ms", "write_ms")
            )
            row["commit_ms"] = max(0.0, row["processing_ms"] - staged_ms)
        row["committed_at"] = _ms(committed_at)
        row["lag_ms"] = row["committed_at"] - row["arrived_at"]
        self._write_ledger(row, committed_at)
        faults.point("after_ledger")
        self._retire_input(self.layout.incoming / str(manifest["source_file"]))
        faults.point("after_retire")
        commit.finish(committed_dir)
        return row

    def _write_ledger(self, row: dict[str, Any], at: datetime) -> None:
        frame = pl.DataFrame([row], schema=LEDGER_SCHEMA)
        target = self.layout.ledger / f"date={at:%Y-%m-%d}" / f"{row['batch_id']}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            frame.write_parquet(tmp, compression="zstd")
            os.replace(tmp, target)
        except BaseException:
            remove_quietly(tmp)
            raise

    def _retire_input(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        if self.settings.keep_processed:
            self.layout.processed.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.layout.processed / path.name)
        else:
            path.unlink(missing_ok=True)
        if self.durable:
            from pipeline.spool import fsync

            fsync(path.parent)

    def _quarantine_file(
        self,
        path: Path,
        batch_id: str,
        arrived: datetime,
        started: float,
        *,
        reason: str,
        message: str,
        rows: int,
    ) -> dict[str, Any]:
        """Move an entry that cannot be processed to ``quarantine/files/<batch_id>/``, as is
        (a link or a directory is moved, not followed), with ``reason.json`` beside it.

        One directory per batch: two bad files of one name keep both copies and both sidecars.
        The sidecar and the ledger carry the original name, escaped; only the copy keeps its
        exact bytes. A crash before the move redoes it into the same directory.
        """
        shown = display_name(path.name)
        log.warning("quarantined %s: %s: %s", _printable(shown), reason, message)
        now = self.clock()
        sidecar: dict[str, Any] = {
            "file": shown,
            "reason": reason,
            "message": message,
            "quarantined_at": now.isoformat(),
            "batch_id": batch_id,
        }
        if shown != path.name:  # undecodable bytes: keep the exact name too
            sidecar["file_bytes_hex"] = os.fsencode(path.name).hex()
        dest_dir = self._quarantine_dir(batch_id, path.name)
        dest_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            dest_dir / "reason.json", json.dumps(sidecar, indent=2).encode(), durable=self.durable
        )
        row = _ledger_row(
            batch_id=batch_id,
            source_file=shown,
            status=reason,
            rows_in=rows,
            quarantined=rows,
            arrived_at=_ms(arrived),
            processing_ms=(time.perf_counter() - started) * 1000,
            committed_at=_ms(now),
            lag_ms=_ms(now) - _ms(arrived),
            consumer=self.name,
        )
        self._write_ledger(row, now)
        faults.point("after_quarantine_sidecar")
        try:
            os.replace(path, dest_dir / path.name)
        except FileNotFoundError:  # another consumer moved it meanwhile
            return row
        except OSError as exc:
            if classify(exc) is not None:
                raise  # a full disk: wait, and quarantine it then
            # EBUSY (a mount point), EXDEV, EPERM: it cannot leave incoming/. Its ledger row
            # says why; pass over it rather than stop for it.
            log.error("cannot move %s out of incoming/: %s; skipped", _printable(shown), exc)
            self._stuck.add(path.name)
            return row
        if self.durable:
            from pipeline.spool import fsync

            fsync(dest_dir)
            fsync(path.parent)
        return row

    def _quarantine_dir(self, batch_id: str, name: str) -> Path:
        """``quarantine/files/<batch_id>/``, or a numbered sibling if it already holds a copy."""
        base = self.layout.quarantine_files / batch_id
        for n in itertools.count(1):
            candidate = base if n == 1 else base.with_name(f"{batch_id}~{n}")
            if not os.path.lexists(candidate / name):
                return candidate
        raise AssertionError("unreachable")

    # -- the loop ------------------------------------------------------------------------------
    def _pace(self, rows: int) -> None:
        cap = self.settings.max_events_per_second
        if cap <= 0:
            return
        now = time.monotonic()
        self._next_allowed = max(self._next_allowed, now) + rows / cap
        delay = self._next_allowed - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> Totals:
        """Process files until stopped (or, with ``once``, until incoming/ is empty).

        Two stages overlap: while one batch is written and committed on a writer thread, the
        next is read, validated and its keys claimed (Polars and Redis release the GIL).
        Batches still commit one at a time, in order.

        A transient fault (Redis down or lost, a full disk, a failing lake) never ends the run:
        the batches in hand are dropped, and after a backoff the consumer resumes as a restart
        would (see :meth:`resume`), for as long as it takes. With ``once`` it gives up after
        ONCE_RETRY_TIMEOUT with :class:`pipeline.retry.GaveUpError`. Anything else is a bug or
        a poison input that escaped isolation, and is raised.
        """
        stop = stop or threading.Event()
        supervisor = Supervisor(
            self.status,
            stop,
            max_delay=self.settings.retry_max_delay,
            give_up_after=self.settings.once_retry_timeout if once else None,
        )
        self.status.start()
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adevents-writer") as writer:
                self._supervised(writer, supervisor, once, stop)
        finally:
            self.status.stop()
        return self.totals

    def _supervised(
        self, writer: ThreadPoolExecutor, supervisor: Supervisor, once: bool, stop: threading.Event
    ) -> None:
        resumed = False
        while not stop.is_set():
            try:
                if not resumed:
                    self.resume()
                    resumed = True
                more = self._pass(writer, once, stop)
                if not more:
                    self._settle()
                supervisor.ok()
                if not more:
                    break
            except Exception as exc:
                self._abandon()
                supervisor.failed(exc)  # waits, or raises what is not transient
                resumed = False
        try:
            self._settle()
        except Exception as exc:
            if classify(exc) is None:
                raise
            # Stopping during a fault: the batch is redone, exactly, at the next start.
            log.warning("stopped with a batch unfinished (%s); the next start redoes it", exc)

    def _pass(self, writer: ThreadPoolExecutor, once: bool, stop: threading.Event) -> bool:
        """Take every file waiting now; False when ``once`` and nothing is left."""
        self._sweep_temp_files()
        files = [p for p in list_incoming(self.layout.incoming) if p.name not in self._stuck]
        if not files:
            if once:
                return False
            stop.wait(self.settings.poll_interval)
            return True
        landed_any = False
        for path in files:
            if stop.is_set():
                break
            landed_any |= self._take(path, writer)
        landed_any |= self._settle()
        if not landed_any:
            # Everything waiting is leased by other consumers (or just taken): wait.
            stop.wait(self.settings.poll_interval)
        return True

    def _sweep_temp_files(self) -> None:
        """Every few minutes, remove temp files that producers killed mid-write left behind."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_SECONDS
        for name in sweep_stale_temp_files(self.layout.incoming):
            log.warning("removed %r: a producer's temp file untouched for an hour", name)

    def _take(self, path: Path, writer: ThreadPoolExecutor) -> bool:
        """Decide ``path`` and hand it to the writer; True if some batch landed meanwhile."""
        # One statvfs per batch: pause before the disk is full rather than fail half-way.
        check_free_space(self.layout.root, self.settings.disk_min_free)
        lease = self.leases.acquire(lease_name(path.name))
        if lease is None:
            return False  # another consumer has it
        try:
            decided = self._stage_one(path)
        except BaseException:
            self.leases.release(lease)
            raise
        if not isinstance(decided, Decided):
            self.leases.release(lease)
            return self._account(decided)
        try:
            landed = self._settle()  # one batch in the writer at a time: commits stay in order
        except BaseException:
            # The batch before failed (a fault): this one, decided after it, is dropped too
            # and redone after it, in order; its claims are idempotent per batch.
            self.leases.release(lease)
            raise
        self._in_flight = (writer.submit(self._write_batch, decided, lease), lease)
        return landed

    def _abandon(self) -> None:
        """After a fault: let the batch in the writer finish or fail, and forget decisions made
        since, so that the next try starts from what is durable, as a restart would."""
        in_flight, self._in_flight = self._in_flight, None
        self._decided_watermark = None
        if in_flight is None:
            return
        future, lease = in_flight
        try:
            self._account(future.result())
        except Exception as exc:
            if classify(exc) is None:
                raise
            log.debug("the batch being written failed too: %s", exc)
        finally:
            self.leases.release(lease)

    def _settle(self) -> bool:
        """Wait for the batch in the writer, if any; True if it landed."""
        in_flight = self._in_flight
        if in_flight is None:
            return False
        self._in_flight = None
        future, lease = in_flight
        try:
            row = future.result()
        finally:
            self.leases.release(lease)
        return self._account(row)

    def _account(self, row: dict[str, Any] | None) -> bool:
        if row is None:
            return False
        self.totals.add(row)
        log.debug("batch %s: %s", row["batch_id"], row)
        self._pace(row["rows_in"])
        return True

    def close(self) -> None:
        self.leases.close()
        try:
            self.cache.close()
        except Exception as exc:
            if classify(exc) is None:
                raise
            # E.g. no room for the embedded cache's closing snapshot: its segments are on disk,
            # so the next start loads them; nothing is lost by skipping it.
            log.warning("closing the key cache: %s", exc)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
