"""The Redis key cache: fingerprints in compact intsets, a whole batch per round trip.

Layout (``P`` is REDIS_KEY_PREFIX; ``{...}`` are Redis Cluster hash tags, so every multi-key
operation stays inside one slot):

- ``P:{m}:meta`` hash: ``watermark`` (epoch ms), ``fingerprint`` (the function's check value);
  ``P:{m}:slices`` zset of registered slices, ``P:{m}:bits`` hash slice -> bucket bits.
- ``P:{gN}:<slice>:<bucket>`` set of 64-bit fingerprint halves, N = bucket mod GROUPS. The
  bucket is the top ``bits`` of the other half, with ``bits`` chosen per slice so a bucket holds
  ~256 members: small enough to stay an intset (8 bytes a member), large enough that the key's
  own overhead is a fraction of a byte per member.
- ``P:{gN}:alive`` sentinel per group: missing means Redis lost data, so the claim script
  refuses and the consumer rebuilds from the events table (a Redis loss never produces a
  duplicate). Its value is ``<fingerprint check>:<epoch>``; every rebuild starts a new epoch,
  and a group whose claims were made in an earlier epoch is not committed (``valid``).
- ``P:{gN}:floor`` zset holding the lowest live slice: slices below it were expired. A claim
  that reaches below it was validated against a watermark that has moved on since (another
  consumer finished a batch meanwhile) and is refused, so the batch is validated again; it
  never lands an event whose earlier copy was just expired.
- ``P:{gN}:claim:<batch_id>`` the members a batch won, kept until the batch is finished, so a
  retried batch (after a crash) gets the same answers: claims are idempotent per batch. The
  consumer's batch id is its commit group's claim id ``<app_id>:<version>``.

With GROUPS = 16 groups, a Redis Cluster spreads the sets over up to 16 slots (so over its
primaries); the small ``{m}`` keys live on one primary, the rebuild lock (``{l}``) on one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn, cast

import numpy as np
import numpy.typing as npt
import polars as pl
import redis
import tenacity
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from pipeline import rebuild, redis_client
from pipeline.fingerprint import Keys, fingerprint_check
from pipeline.keycache import CacheLostError, CacheStats, Loader, Mask, expired_before
from pipeline.leases import Lease, RedisLeases
from pipeline.redis_client import Client

log = logging.getLogger("adevents.redis_cache")

GROUPS = 16
TARGET_PER_BUCKET = 256
MAX_BITS = 20
# Lua's unpack() is bounded by its C stack (~8000); keep each SADD well below.
MAX_MEMBERS_PER_CALL = 4000
CLAIM_RECORD_TTL_S = 7 * 24 * 3600
REBUILD_LOCK = "rebuild-lock"
REBUILD_LOCK_TIMEOUT_S = 30.0
#: Connection failures one command (or a batch's pipelined commands: claims are idempotent per
#: batch, so resending them is safe) rides out, with a back-off capped at SEND_BACKOFF_CAP_S:
#: about two seconds, enough for a blip. Longer outages reach the consumer, which waits them
#: out with its own backoff and shows it in its status (``pipeline.retry``).
SEND_RETRIES = 6
SEND_BACKOFF_CAP_S = 1.0
UNLINK_CHUNK = 1000
MAX_REMEMBERED_EPOCHS = 1024

# Per bucket: which members were already present, then add them all; no per-member Lua loop.
# The claim record appends "<members,>|<present mask>;" per attempt, so a retry of the batch
# (after a crash) learns which members its earlier attempts won. Returns {mask, earlier record}.
# KEYS: alive, record, floor, buckets...; ARGV: epoch, record TTL, lowest slice, counts..., members
_CLAIM_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('ADEVENTS_LOST key cache lost its data')
end
local floor = redis.call('ZSCORE', KEYS[3], 'f')
if floor and tonumber(ARGV[3]) < tonumber(floor) then
  return redis.error_reply('ADEVENTS_EXPIRED slices below ' .. floor .. ' expired')
end
local nkeys = #KEYS - 3
local first = 4 + nkeys
local pos = first
local out = {}
for i = 1, nkeys do
  local last = pos + tonumber(ARGV[3 + i]) - 1
  local present = redis.call('SMISMEMBER', KEYS[3 + i], unpack(ARGV, pos, last))
  redis.call('SADD', KEYS[3 + i], unpack(ARGV, pos, last))
  out[i] = table.concat(present)
  pos = last + 1
end
local mask = table.concat(out)
local earlier = redis.call('GET', KEYS[2]) or ''
redis.call('APPEND', KEYS[2], table.concat(ARGV, ',', first, pos - 1) .. '|' .. mask .. ';')
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {mask, earlier}
"""

_RAISE_WATERMARK_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'watermark') or '-1')
local new = tonumber(ARGV[1])
if new > cur then redis.call('HSET', KEYS[1], 'watermark', ARGV[1]) return ARGV[1] end
return tostring(cur)
"""


class ExpiredSliceError(CacheLostError):
    """A claim reached slices another consumer expired since this batch was validated.

    Nothing was claimed in the refusing group. Validate the batch again (its events there are
    late now); the consumer's retry of a batch on a CacheLostError does exactly that.
    """


class _TopologyChangedError(Exception):
    """A cluster reply said the slot moved (MOVED/ASK/TRYAGAIN/CLUSTERDOWN): refresh, resend."""


def _resp_bulk(values: pl.Series) -> bytes:
    """RESP bulk strings for a whole column at once (no Python loop per value)."""
    text = values.cast(pl.String)
    framed = pl.concat_str(
        [pl.lit("$"), text.str.len_bytes().cast(pl.String), pl.lit("\r\n"), text, pl.lit("\r\n")]
    )
    return pl.select(framed.str.join("")).item().encode() if len(values) else b""


def _resp_args(args: list[str | bytes]) -> bytes:
    out = []
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _glob_escape(text: str) -> str:
    """``text`` matched literally by SCAN MATCH."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _won_mask(mask: bytes, earlier: bytes, members: pl.Series) -> Mask:
    """True where the member was new now, or was won by an earlier attempt of this batch."""
    won: Mask = np.frombuffer(mask, dtype=np.uint8) == ord("0")
    if earlier:
        # A retry: collect what earlier attempts won (rare, so plain Python is fine here).
        mine: set[int] = set()
        for attempt in earlier.decode().split(";"):
            if attempt:
                names, _, seen = attempt.partition("|")
                mine.update(int(m) for m, s in zip(names.split(","), seen, strict=True) if s == "0")
        won |= members.is_in(list(mine)).to_numpy()
    return won


def _log_resend(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.debug("Redis: %s; sending the batch again", exc)  # the consumer logs the pause


def _unreachable(state: tenacity.RetryCallState) -> NoReturn:
    exc = state.outcome.exception() if state.outcome is not None else None
    raise redis.ConnectionError(f"Redis unreachable: {exc}") from exc


def connect(url: str) -> Client:
    """The key cache's client for ``url`` (see ``pipeline.redis_client`` for the schemes).

    Commands are retried on lost connections for a couple of seconds; a longer outage raises,
    and the consumer waits it out (``pipeline.retry``), then rebuilds the cache if it finds it
    empty.
    """
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=SEND_BACKOFF_CAP_S), SEND_RETRIES)
    return redis_client.connect(url, retry=retry)


class RedisKeyCache:
    """Key cache on a Redis server (or a Redis Cluster); shared by any number of consumers."""

    def __init__(
        self,
        client: Client,
        *,
        prefix: str,
        window_ms: int,
        slice_ms: int,
        rebuild_grace_s: float = 0.0,
        lock_timeout_s: float = REBUILD_LOCK_TIMEOUT_S,
    ) -> None:
        self.r = client
        self.p = prefix
        self.window_ms = window_ms
        self.slice_ms = slice_ms
        self.check = fingerprint_check()
        self.alive_value = ""
        self.rebuild_grace_s = rebuild_grace_s
        self.lock_timeout_s = lock_timeout_s
        self.meta = f"{prefix}:{{m}}:meta"
        self.slices_key = f"{prefix}:{{m}}:slices"
        self.bits_key = f"{prefix}:{{m}}:bits"
        #: The epoch each recent batch claimed in (a consumer decides one batch while it commits
        #: the previous one, on another thread: the epoch may change in between).
        self._epochs: dict[str, str] = {}
        self._epochs_guard = threading.Lock()
        #: The highest expiry floor this instance has set (floors only ever rise).
        self._floor: int | None = None
        # The sha of a script is known without Redis: nothing is sent until the first call,
        # so a consumer starts (and waits) while Redis is down; NOSCRIPT loads them.
        self._claim_sha = hashlib.sha1(_CLAIM_LUA.encode()).hexdigest()
        self._wm_sha = hashlib.sha1(_RAISE_WATERMARK_LUA.encode()).hexdigest()
        self._resend = self._build_resend()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        window_ms: int,
        slice_ms: int,
        rebuild_grace_s: float = 0.0,
        lock_timeout_s: float = REBUILD_LOCK_TIMEOUT_S,
    ) -> RedisKeyCache:
        """Connect to ``redis://`` (single server) or ``redis+cluster://`` (Redis Cluster)."""
        return cls(
            connect(url),
            prefix=prefix,
            window_ms=window_ms,
            slice_ms=slice_ms,
            rebuild_grace_s=rebuild_grace_s,
            lock_timeout_s=lock_timeout_s,
        )

    # -- helpers ---------------------------------------------------------------------------------
    def _group_key(self, group: int, suffix: str) -> str:
        return f"{self.p}:{{g{group}}}:{suffix}"

    def _load_scripts(self) -> None:
        self._claim_sha = self._script_load(_CLAIM_LUA)
        self._wm_sha = self._script_load(_RAISE_WATERMARK_LUA)

    def _raise_watermark(self, value: int) -> int:
        # A Redis restarted (even twice in a row) forgets its scripts: load them and try again.
        for attempt in range(3):
            try:
                return int(self.r.evalsha(self._wm_sha, 1, self.meta, value))
            except NoScriptError:
                if attempt == 2:
                    raise
                self._load_scripts()
        raise AssertionError("unreachable")

    def _script_load(self, body: str) -> str:
        # On a cluster, redis-py sends SCRIPT LOAD to every primary and returns the one sha.
        result = self.r.script_load(body)
        return str(result.decode() if isinstance(result, bytes) else result)

    def _servers(self) -> list[redis.Redis]:
        """One client per server holding data: every primary of a cluster, or the one server."""
        if isinstance(self.r, redis.RedisCluster):
            primaries = self.r.get_primaries()  # type: ignore[no-untyped-call]
            return [self.r.get_redis_connection(node) for node in primaries]
        return [self.r]

    def _connection_for(self, key: str) -> tuple[Any, Any]:
        """(pool, connection) serving ``key``; the caller releases the connection to the pool."""
        if isinstance(self.r, redis.RedisCluster):
            node = self.r.get_node_from_key(key)  # type: ignore[no-untyped-call]
            pool = self.r.get_redis_connection(node).connection_pool
        else:
            pool = self.r.connection_pool
        return pool, pool.get_connection()

    def _refresh_topology(self) -> None:
        if isinstance(self.r, redis.RedisCluster):
            try:
                self.r.nodes_manager.initialize()
            except redis.RedisError as exc:  # the next attempt reports it if it persists
                log.warning("could not refresh the cluster topology: %s", exc)

    def _scan(self, pattern: str) -> Iterator[tuple[redis.Redis, list[bytes]]]:
        """(server, chunk of matching keys), SCANning every server that holds data."""
        for server in self._servers():
            chunk: list[bytes] = []
            for key in server.scan_iter(match=pattern, count=10_000):
                chunk.append(key)
                if len(chunk) >= UNLINK_CHUNK:
                    yield server, chunk
                    chunk = []
            if chunk:
                yield server, chunk

    def _unlink_matching(self, pattern: str) -> int:
        """UNLINK every key matching ``pattern`` on every server; one key per command, pipelined
        (keys of different slots may share a node, and a multi-key UNLINK must not span slots)."""
        n = 0
        for server, chunk in self._scan(pattern):
            pipe = server.pipeline(transaction=False)
            for key in chunk:
                pipe.unlink(key)
            pipe.execute()
            n += len(chunk)
        return n

    # -- KeyCache ------------------------------------------------------------------------------
    def watermark(self) -> int | None:
        value = self.r.hget(self.meta, "watermark")
        if value is None or int(value) < 0:
            return None
        return int(value)

    def needs_rebuild(self) -> bool:
        """True unless every group's sentinel holds one epoch of the current fingerprint."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.meta, "fingerprint")
        for g in range(GROUPS):
            pipe.get(self._group_key(g, "alive"))
        fp, *alive = pipe.execute()
        values = {a.decode() if isinstance(a, bytes) else a for a in alive}
        current = values.pop() if len(values) == 1 else None
        if fp != self.check.encode() or not current or not current.startswith(self.check + ":"):
            return True
        # Another consumer may have rebuilt meanwhile: adopt its epoch.
        self.alive_value = current
        return False

    def valid(self, batch_id: str | None = None) -> bool:
        """True while the cache still holds the epoch ``batch_id`` claimed in (without a batch:
        this consumer's current epoch), i.e. Redis has not lost those claims since."""
        with self._epochs_guard:
            epoch = self._epochs.get(batch_id or "", self.alive_value)
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.get(self._group_key(g, "alive"))
        expected = epoch.encode()
        return bool(epoch) and all(v == expected for v in pipe.execute())

    def ensure(self, loader: Loader) -> bool:
        """Rebuild from the lake if Redis lost its data; one consumer rebuilds, the others wait
        (``pipeline.rebuild``). The rebuild lock is a lease (``pipeline.leases``): renewed
        while the rebuild runs, taken over at once when its holder died on this host, and
        expiring otherwise (after LEASE_TIMEOUT)."""
        if not self.needs_rebuild():
            return False
        leases = RedisLeases(self.r, prefix=self.p, owner="rebuild", timeout_s=self.lock_timeout_s)
        try:
            return rebuild.ensure(
                self,
                loader,
                lock=_RebuildLease(leases),
                grace_s=self.rebuild_grace_s,
                what="Redis key cache",
            )
        finally:
            leases.close()

    def rebuild(self, keys: Keys, watermark_ms: int | None) -> None:
        self.replace(keys, watermark_ms)
        self.open_epoch()

    def replace(self, keys: Keys, watermark_ms: int | None) -> None:
        """Drop the whole key cache, then load ``keys``; the cache stays closed (no epoch)."""
        # Sentinels go first, so that no claim can succeed while the old keys are deleted.
        # (The rebuild lock lives under {l} and is kept.)
        self.r.delete(*[self._group_key(g, "alive") for g in range(GROUPS)])
        prefix = _glob_escape(self.p)
        for pattern in (f"{prefix}:{{g*", f"{prefix}:{{m}}:*"):
            self._unlink_matching(pattern)
        self._floor = None
        self.r.hset(self.meta, mapping={"watermark": -1 if watermark_ms is None else watermark_ms})
        self._expire(watermark_ms)
        cutoff = expired_before(watermark_ms, self.window_ms, self.slice_ms)
        if cutoff is not None:
            keys = keys.take(keys.slice >= cutoff)
        self._add_plain(keys)

    def open_epoch(self) -> None:
        """The cache is whole again: sentinels of a new epoch and the check go in last."""
        self.alive_value = f"{self.check}:{uuid.uuid4().hex[:12]}"
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.set(self._group_key(g, "alive"), self.alive_value)
        pipe.hset(self.meta, "fingerprint", self.check)
        pipe.execute()
        # A rebuild follows a Redis that lost everything, scripts included: load them now rather
        # than on every consumer's first NOSCRIPT.
        self._load_scripts()

    def _register_slices(self, keys: Keys) -> dict[int, int]:
        """Each slice's bucket bits, agreed with other consumers (first proposal wins)."""
        slices, counts = np.unique(keys.slice, return_counts=True)
        # Read the bits every time rather than cache them: another consumer may have rebuilt
        # (re-sizing the slices) or expired a slice since this one last saw it.
        stored = self.r.hmget(self.bits_key, [str(int(s)) for s in slices])
        table: dict[int, int] = {}
        new = []
        for s, c, b in zip(slices, counts, stored, strict=True):
            if b is None:
                new.append((int(s), int(c)))
            else:
                table[int(s)] = int(b)
        if not new:
            return table
        # Events per slice, estimated from how densely the bulk of this batch covers event time
        # (a slice that overflows its buckets stays correct; it only costs more memory).
        density = 0.0
        if keys.ms is not None and len(keys) >= 100:
            low, high = np.percentile(keys.ms, [5, 95])
            density = 0.9 * len(keys) / max(float(high - low), 1.0) * self.slice_ms
        pipe = self.r.pipeline(transaction=False)
        for sl, count in new:
            expected = max(count, density)
            bits = min(MAX_BITS, max(0, math.ceil(math.log2(max(expected, 1) / TARGET_PER_BUCKET))))
            pipe.hsetnx(self.bits_key, str(sl), bits)
            pipe.zadd(self.slices_key, {str(sl): sl})
        for sl, _ in new:
            pipe.hget(self.bits_key, str(sl))
        replies = pipe.execute()
        for (sl, _), bits_reply in zip(new, replies[2 * len(new) :], strict=True):
            table[sl] = int(bits_reply)
        return table

    @staticmethod
    def _buckets(keys: Keys, table: dict[int, int]) -> npt.NDArray[np.int64]:
        uniq, inverse = np.unique(keys.slice, return_inverse=True)
        bits = np.array([table[int(s)] for s in uniq], dtype=np.int64)[inverse]
        shift = (64 - bits).astype(np.uint64)
        bucket = np.where(bits > 0, keys.hi >> np.minimum(shift, np.uint64(63)), 0)
        return bucket.astype(np.int64)

    def _grouped(self, keys: Keys) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
        """Rows ordered by (group, slice, bucket), split by group; ``row`` is the input index."""
        table = self._register_slices(keys)
        frame = pl.DataFrame(
            {
                "row": np.arange(len(keys), dtype=np.int64),
                "slice": keys.slice,
                "bucket": self._buckets(keys, table),
                "member": keys.lo.view(np.int64),
            }
        ).with_columns(group=(pl.col("bucket") % GROUPS))
        frame = frame.sort(["group", "slice", "bucket"], maintain_order=True)
        return frame, frame.partition_by("group", maintain_order=True)

    def _remember_epoch(self, batch_id: str, epoch: str | None) -> None:
        """Record (or, with None, forget) the epoch ``batch_id`` claimed in."""
        with self._epochs_guard:
            self._epochs.pop(batch_id, None)
            if epoch is not None:
                self._epochs[batch_id] = epoch
            while len(self._epochs) > MAX_REMEMBERED_EPOCHS:
                # Oldest first; a consumer has at most a few batches between claim and commit.
                del self._epochs[next(iter(self._epochs))]

    def _packed_claim(self, batch_id: str, epoch: str, part: pl.DataFrame) -> tuple[str, bytes]:
        group = int(part["group"][0])
        runs = (
            part.with_row_index("i")
            .with_columns(run=(pl.col("i") // MAX_MEMBERS_PER_CALL))
            .group_by(["slice", "bucket", "run"], maintain_order=True)
            .agg(n=pl.len())
        )
        bucket_keys = [
            self._group_key(group, f"{s}:{b}")
            for s, b in zip(runs["slice"].to_list(), runs["bucket"].to_list(), strict=True)
        ]
        alive = self._group_key(group, "alive")
        record = self._group_key(group, f"claim:{batch_id}")
        floor = self._group_key(group, "floor")
        keys = [alive, record, floor, *bucket_keys]
        head: list[str | bytes] = [
            "EVALSHA",
            self._claim_sha,
            str(len(keys)),
            *keys,
            epoch,
            str(CLAIM_RECORD_TTL_S),
            str(int(part["slice"][0])),  # sorted by slice within the group: the lowest
            *[str(n) for n in runs["n"].to_list()],
        ]
        nargs = len(head) + len(part)
        packed = b"*%d\r\n" % nargs + _resp_args(head) + _resp_bulk(part["member"])
        return alive, packed

    def _send_once(self, commands: list[tuple[str, bytes]]) -> list[Any]:
        """Send every packed command, pipelined per server, and collect replies in order.

        Everything is sent before any reply is read, so the servers of a cluster work on their
        share of a batch in parallel.
        """
        by_pool: dict[int, tuple[Any, Any, list[int]]] = {}
        replies: list[Any] = [None] * len(commands)
        try:
            for i, (key, _) in enumerate(commands):
                pool, conn = self._connection_for(key)
                if id(pool) in by_pool:
                    pool.release(conn)
                else:
                    by_pool[id(pool)] = (pool, conn, [])
                by_pool[id(pool)][2].append(i)
            for _, conn, indexes in by_pool.values():
                conn.send_packed_command([commands[i][1] for i in indexes])
            for _, conn, indexes in by_pool.values():
                for i in indexes:
                    try:
                        replies[i] = conn.read_response()
                    except ResponseError as exc:
                        replies[i] = exc
        except BaseException:
            # Replies may still be on their way on any of them: never reuse those connections.
            for _, conn, _ in by_pool.values():
                conn.disconnect()
            raise
        finally:
            for pool, conn, _ in by_pool.values():
                pool.release(conn)
        if any(isinstance(r, AskError | TryAgainError | ClusterDownError) for r in replies):
            raise _TopologyChangedError(next(r for r in replies if isinstance(r, ResponseError)))
        return replies

    def _send_all(self, commands: list[tuple[str, bytes]]) -> list[Any]:
        """:meth:`_send_once`, riding out lost connections (a Redis restart, a failover) and
        cluster topology changes by sending everything again: every command sent this way is
        idempotent (SADD, and claims, which are idempotent per batch)."""
        replies: list[Any] = self._resend(self._send_once, commands)
        return replies

    def _before_send(self, state: tenacity.RetryCallState) -> None:
        if state.attempt_number > 1:  # after the backoff: the cluster has had time to settle
            self._refresh_topology()

    def _build_resend(self) -> tenacity.Retrying:
        # Built once: a success costs ~13 us more than the hand-written loop did, once per
        # commit group (a claim's round trip takes milliseconds).
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(
                (redis.ConnectionError, redis.TimeoutError, _TopologyChangedError)
            ),
            stop=tenacity.stop_after_attempt(SEND_RETRIES + 1),
            wait=tenacity.wait_exponential(multiplier=0.05, max=SEND_BACKOFF_CAP_S),
            before=self._before_send,
            before_sleep=_log_resend,
            retry_error_callback=_unreachable,
        )

    def claim(self, batch_id: str, keys: Keys) -> Mask:
        result = np.zeros(len(keys), dtype=bool)
        if len(keys) == 0:
            return result
        frame, parts = self._grouped(keys)
        adopted = False
        for attempt in range(3):
            epoch = self.alive_value
            replies = self._send_all([self._packed_claim(batch_id, epoch, p) for p in parts])
            errors = [r for r in replies if isinstance(r, Exception)]
            if not errors:
                self._remember_epoch(batch_id, epoch)
                break
            if any(isinstance(e, NoScriptError) for e in errors) and attempt < 2:
                self._load_scripts()  # Redis restarted and forgot the scripts
                continue
            if any("ADEVENTS_LOST" in str(e) for e in errors):
                if not adopted and attempt < 2 and not self.needs_rebuild():
                    adopted = True
                    continue  # another consumer rebuilt the cache: claim in its new epoch
                raise CacheLostError(
                    "the Redis key cache lost its data; rebuilding from the events table"
                )
            expired = [e for e in errors if "ADEVENTS_EXPIRED" in str(e)]
            if expired:
                raise ExpiredSliceError(
                    f"batch {batch_id}: {expired[0]} since it was validated; validating it again"
                )
            raise errors[0]
        won = np.concatenate(
            [
                _won_mask(bytes(mask), bytes(earlier), part["member"])
                for (mask, earlier), part in zip(replies, parts, strict=True)
            ]
        )
        result[frame["row"].to_numpy()] = won
        return result

    def _add_plain(self, keys: Keys) -> None:
        """SADD keys without claim records (rebuild and restore)."""
        if len(keys) == 0:
            return
        frame, _ = self._grouped(keys)
        runs = frame.with_row_index("i").with_columns(run=pl.col("i") // MAX_MEMBERS_PER_CALL)
        commands = []
        for (group, sl, bucket, _run), part in runs.group_by(
            ["group", "slice", "bucket", "run"], maintain_order=True
        ):
            key = self._group_key(int(str(group)), f"{sl}:{bucket}")
            head = _resp_args(["SADD", key])
            commands.append((key, b"*%d\r\n" % (2 + len(part)) + head + _resp_bulk(part["member"])))
        for reply in self._send_all(commands):
            if isinstance(reply, Exception):
                raise reply

    def finish(self, batch_id: str, max_event_time_ms: int | None) -> None:
        if max_event_time_ms is not None:
            new_wm = self._raise_watermark(max_event_time_ms)
        else:
            new_wm = self.watermark() or -1
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.unlink(self._group_key(g, f"claim:{batch_id}"))
        pipe.execute()
        self._remember_epoch(batch_id, None)
        self._expire(new_wm if new_wm >= 0 else None)

    def restore(self, batch_id: str, keys: Keys, max_event_time_ms: int | None) -> None:
        self._add_plain(keys)
        self.finish(batch_id, max_event_time_ms)

    def _expire(self, watermark_ms: int | None) -> None:
        cutoff = expired_before(watermark_ms, self.window_ms, self.slice_ms)
        if cutoff is None:
            return
        if self._floor is None or cutoff > self._floor:
            # Raise every group's floor before deleting anything: from then on, a claim that
            # still reaches an expired slice (validated against an older watermark, or made
            # again in the epoch of a rebuild that left those slices out) is refused instead of
            # finding the slice empty and taking a copy of an expired event for a new one.
            pipe = self.r.pipeline(transaction=False)
            for g in range(GROUPS):
                pipe.zadd(self._group_key(g, "floor"), {"f": cutoff}, gt=True)
            pipe.execute()
            self._floor = cutoff
        old = cast(list[bytes], self.r.zrangebyscore(self.slices_key, "-inf", f"({cutoff}"))
        if not old:
            return
        bits = self.r.hmget(self.bits_key, old)
        pipe = self.r.pipeline(transaction=False)
        for sl_raw, bits_raw in zip(old, bits, strict=True):
            sl = int(sl_raw)
            nb = 1 << int(bits_raw or 0)
            for bucket in range(nb):
                pipe.unlink(self._group_key(bucket % GROUPS, f"{sl}:{bucket}"))
            pipe.zrem(self.slices_key, sl_raw)
            pipe.hdel(self.bits_key, sl_raw)
        pipe.execute()

    def expired_below(self) -> int | None:
        """The lowest slice claims may still reach (slices below it were expired), if any."""
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.zscore(self._group_key(g, "floor"), "f")
        floors = [int(f) for f in pipe.execute() if f is not None]
        return max(floors, default=None)

    def memory_used(self) -> int:
        """Bytes of memory used, summed over every server that holds data."""
        total = 0
        for server in self._servers():
            info = server.info("memory")
            total += int(info.get("used_memory", 0)) if isinstance(info, dict) else 0
        return total

    def stats(self) -> CacheStats:
        keys = 0
        for sl_raw, _ in self.r.zscan_iter(self.slices_key):
            sl = int(sl_raw)
            bits = int(self.r.hget(self.bits_key, sl_raw) or 0)
            pipe = self.r.pipeline(transaction=False)
            for bucket in range(1 << bits):
                pipe.scard(self._group_key(bucket % GROUPS, f"{sl}:{bucket}"))
            keys += sum(pipe.execute())
        return CacheStats(keys=keys, bytes=self.memory_used())

    def close(self) -> None:
        self.r.close()


class _RebuildLease:
    """The rebuild lock of a shared Redis cache (:class:`pipeline.rebuild.RebuildLock`)."""

    def __init__(self, leases: RedisLeases) -> None:
        self.leases = leases

    def acquire(self) -> object | None:
        return self.leases.acquire(REBUILD_LOCK)

    def held(self, token: object) -> bool:
        assert isinstance(token, Lease)
        return self.leases.held(token)

    def release(self, token: object) -> None:
        assert isinstance(token, Lease)
        self.leases.release(token)
