"""The Redis key cache: fingerprints in compact intsets, a whole batch per round trip.

Layout (``P`` is REDIS_KEY_PREFIX; ``{...}`` are Redis Cluster hash tags):

- ``P:{m}:meta`` hash: ``watermark`` (epoch ms), ``fingerprint`` (the function's check value);
  ``P:{m}:slices`` zset of registered slices, ``P:{m}:bits`` hash slice -> bucket bits.
- ``P:{gN}:<slice>:<bucket>`` set of 64-bit fingerprint halves, N = bucket mod GROUPS. The
  bucket is the top ``bits`` of the other half, with ``bits`` chosen per slice so a bucket holds
  ~256 members: small enough to stay an intset (8 bytes a member), large enough that the key's
  own overhead is a fraction of a byte per member.
- ``P:{gN}:alive`` sentinel per group: missing means Redis lost data, so the claim script
  refuses and the consumer rebuilds from events/ (a Redis loss never produces a duplicate).
- ``P:{gN}:claim:<batch_id>`` the members a batch won, kept until the batch is finished, so a
  retried batch (after a crash) gets the same answers: claims are idempotent per batch.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import polars as pl
import redis
from redis.exceptions import NoScriptError, ResponseError

from pipeline.fingerprint import Keys, fingerprint_check
from pipeline.keycache import CacheLostError, CacheStats, Loader, Mask, expired_before

GROUPS = 16
TARGET_PER_BUCKET = 256
MAX_BITS = 20
# Lua's unpack() is bounded by its C stack (~8000); keep each SADD well below.
MAX_MEMBERS_PER_CALL = 4000
CLAIM_RECORD_TTL_S = 7 * 24 * 3600
REBUILD_LOCK = "rebuild-lock"
REBUILD_LOCK_TIMEOUT_S = 30.0
REBUILD_WAIT_S = 3600.0

# Per bucket: which members were already present, then add them all; no per-member Lua loop.
# The claim record appends "<members,>|<present mask>;" per attempt, so a retry of the batch
# (after a crash) learns which members its earlier attempts won. Returns {mask, earlier record}.
_CLAIM_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('ADEVENTS_LOST key cache lost its data')
end
local nkeys = #KEYS - 2
local first = 3 + nkeys
local pos = first
local out = {}
for i = 1, nkeys do
  local last = pos + tonumber(ARGV[2 + i]) - 1
  local present = redis.call('SMISMEMBER', KEYS[2 + i], unpack(ARGV, pos, last))
  redis.call('SADD', KEYS[2 + i], unpack(ARGV, pos, last))
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


class RedisKeyCache:
    """Key cache on a Redis server (or a Redis Cluster); shared by any number of consumers."""

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        *,
        prefix: str,
        window_ms: int,
        slice_ms: int,
        rebuild_grace_s: float = 0.0,
    ) -> None:
        self.r = client
        self.p = prefix
        self.window_ms = window_ms
        self.slice_ms = slice_ms
        self.check = fingerprint_check()
        self.alive_value = ""
        self.rebuild_grace_s = rebuild_grace_s
        self.meta = f"{prefix}:{{m}}:meta"
        self.slices_key = f"{prefix}:{{m}}:slices"
        self.bits_key = f"{prefix}:{{m}}:bits"
        self._bits: dict[int, int] = {}
        self._claim_sha = ""
        self._wm_sha = ""
        self._load_scripts()

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str, window_ms: int, slice_ms: int, rebuild_grace_s: float = 0.0
    ) -> RedisKeyCache:
        """Connect to ``redis://`` (single server) or ``redis+cluster://`` (Redis Cluster)."""
        client: redis.Redis | redis.RedisCluster
        if url.startswith("redis+cluster://"):
            client = redis.RedisCluster.from_url("redis://" + url[len("redis+cluster://") :])
        else:
            client = redis.Redis.from_url(url)
        return cls(
            client,
            prefix=prefix,
            window_ms=window_ms,
            slice_ms=slice_ms,
            rebuild_grace_s=rebuild_grace_s,
        )

    # -- helpers ---------------------------------------------------------------------------------
    def _group_key(self, group: int, suffix: str) -> str:
        return f"{self.p}:{{g{group}}}:{suffix}"

    def _load_scripts(self) -> None:
        self._claim_sha = self._script_load(_CLAIM_LUA)
        self._wm_sha = self._script_load(_RAISE_WATERMARK_LUA)

    def _script_load(self, body: str) -> str:
        if isinstance(self.r, redis.RedisCluster):
            result = self.r.script_load(body)  # loads on every primary
        else:
            result = self.r.script_load(body)
        return str(result.decode() if isinstance(result, bytes) else result)

    def _connection_for(self, key: str) -> tuple[Any, Any]:
        """(pool, connection) serving ``key``; the caller releases the connection to the pool."""
        if isinstance(self.r, redis.RedisCluster):
            node = self.r.get_node_from_key(key)  # type: ignore[no-untyped-call]
            pool = self.r.get_redis_connection(node).connection_pool
        else:
            pool = self.r.connection_pool
        return pool, pool.get_connection()

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

    def valid(self) -> bool:
        """True while the cache still holds the epoch this consumer's claims were made in."""
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.get(self._group_key(g, "alive"))
        expected = self.alive_value.encode()
        return all(v == expected for v in pipe.execute())

    def ensure(self, loader: Loader) -> bool:
        """Rebuild from the lake if Redis lost its data; one consumer rebuilds, the others wait.

        The rebuilder waits ``rebuild_grace_s`` first, so that batches whose commit was already
        under way land before it reads events/, then catches up with files written meanwhile.
        """
        if not self.needs_rebuild():
            return False
        from pipeline.leases import RedisLeases

        # The rebuild lock is a lease: renewed while the rebuild runs, taken over at once when
        # its holder died on this host, and expiring otherwise.
        locks = RedisLeases(
            self.r, prefix=self.p, owner="rebuild", timeout_s=REBUILD_LOCK_TIMEOUT_S
        )
        try:
            deadline = time.monotonic() + REBUILD_WAIT_S
            while (lock := locks.acquire(REBUILD_LOCK)) is None:
                if not self.needs_rebuild():
                    return False
                if time.monotonic() > deadline:
                    raise CacheLostError("timed out waiting for another consumer's rebuild")
                time.sleep(0.1)
            if not self.needs_rebuild():
                locks.release(lock)
                return False
            time.sleep(self.rebuild_grace_s)
            started = time.time()
            keys, watermark = loader(None)
            self.rebuild(keys, watermark)
            late_keys, late_watermark = loader(started - self.rebuild_grace_s - 1.0)
            self._add_plain(late_keys)
            if late_watermark is not None:
                self.finish("rebuild", late_watermark)
            locks.release(lock)
            return True
        finally:
            locks.close()

    def rebuild(self, keys: Keys, watermark_ms: int | None) -> None:
        # Drop the whole key cache first: stale slices must not survive a rebuild. (Leases and
        # the rebuild lock live under other hash tags and are kept.)
        # Sentinels go first, so that no claim can succeed while the old keys are deleted.
        self.r.delete(*[self._group_key(g, "alive") for g in range(GROUPS)])
        for pattern in (f"{self.p}:{{g*", f"{self.p}:{{m}}:*"):
            for key in self.r.scan_iter(match=pattern, count=10_000):
                self.r.unlink(key)
        self._bits.clear()
        self.r.hset(self.meta, mapping={"watermark": -1 if watermark_ms is None else watermark_ms})
        self._expire(watermark_ms)
        cutoff = expired_before(watermark_ms, self.window_ms, self.slice_ms)
        if cutoff is not None:
            keys = keys.take(keys.slice >= cutoff)
        self.alive_value = f"{self.check}:{uuid.uuid4().hex[:12]}"
        self._add_plain(keys)
        # Only now is the cache whole again: sentinels and the check go in last.
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.set(self._group_key(g, "alive"), self.alive_value)
        pipe.hset(self.meta, "fingerprint", self.check)
        pipe.execute()

    def _register_slices(self, keys: Keys) -> None:
        """Agree with other consumers on each new slice's bucket bits (first proposal wins)."""
        slices, counts = np.unique(keys.slice, return_counts=True)
        # Read the bits every time rather than trust self._bits: another consumer may have
        # rebuilt (re-sizing the slices) or expired a slice since this one cached it.
        stored = self.r.hmget(self.bits_key, [str(int(s)) for s in slices])
        new = []
        for s, c, b in zip(slices, counts, stored, strict=True):
            if b is None:
                new.append((int(s), int(c)))
            else:
                self._bits[int(s)] = int(b)
        if not new:
            return
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
            self._bits[sl] = int(bits_reply)

    def _buckets(self, keys: Keys) -> npt.NDArray[np.int64]:
        bits = self._bits_vector(keys.slice)
        shift = (64 - bits).astype(np.uint64)
        bucket = np.where(bits > 0, keys.hi >> np.minimum(shift, np.uint64(63)), 0)
        return bucket.astype(np.int64)

    def _bits_vector(self, slices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        uniq, inverse = np.unique(slices, return_inverse=True)
        table = np.array([self._bits[int(s)] for s in uniq], dtype=np.int64)
        return table[inverse]

    def _grouped(self, keys: Keys) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
        """Rows ordered by (group, slice, bucket), split by group; ``row`` is the input index."""
        self._register_slices(keys)
        frame = pl.DataFrame(
            {
                "row": np.arange(len(keys), dtype=np.int64),
                "slice": keys.slice,
                "bucket": self._buckets(keys),
                "member": keys.lo.view(np.int64),
            }
        ).with_columns(group=(pl.col("bucket") % GROUPS))
        frame = frame.sort(["group", "slice", "bucket"], maintain_order=True)
        return frame, frame.partition_by("group", maintain_order=True)

    def _packed_claim(self, batch_id: str, part: pl.DataFrame) -> tuple[str, bytes]:
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
        keys = [alive, record, *bucket_keys]
        head: list[str | bytes] = [
            "EVALSHA",
            self._claim_sha,
            str(len(keys)),
            *keys,
            self.alive_value,
            str(CLAIM_RECORD_TTL_S),
            *[str(n) for n in runs["n"].to_list()],
        ]
        nargs = len(head) + len(part)
        packed = b"*%d\r\n" % nargs + _resp_args(head) + _resp_bulk(part["member"])
        return alive, packed

    def _send_all(self, commands: list[tuple[str, bytes]]) -> list[Any]:
        """Send every packed command (pipelined per connection) and collect replies in order."""
        by_conn: dict[int, tuple[Any, Any, list[int]]] = {}
        for i, (key, _) in enumerate(commands):
            pool, conn = self._connection_for(key)
            slot = id(pool)
            if slot in by_conn:
                pool.release(conn)
            else:
                by_conn[slot] = (pool, conn, [])
            by_conn[slot][2].append(i)
        replies: list[Any] = [None] * len(commands)
        for pool, conn, indexes in by_conn.values():
            try:
                conn.send_packed_command([commands[i][1] for i in indexes])
                for i in indexes:
                    try:
                        replies[i] = conn.read_response()
                    except ResponseError as exc:
                        replies[i] = exc
            except BaseException:
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        return replies

    def claim(self, batch_id: str, keys: Keys) -> Mask:
        result = np.zeros(len(keys), dtype=bool)
        if len(keys) == 0:
            return result
        frame, parts = self._grouped(keys)
        for attempt in range(2):
            replies = self._send_all([self._packed_claim(batch_id, p) for p in parts])
            errors = [r for r in replies if isinstance(r, Exception)]
            if not errors:
                break
            if any(isinstance(e, NoScriptError) for e in errors) and attempt == 0:
                self._load_scripts()  # Redis restarted and forgot the scripts
                continue
            if any("ADEVENTS_LOST" in str(e) for e in errors):
                if attempt == 0 and not self.needs_rebuild():
                    continue  # another consumer rebuilt the cache: claim in its new epoch
                raise CacheLostError("the Redis key cache lost its data; rebuilding from events/")
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
            try:
                new_wm = int(self.r.evalsha(self._wm_sha, 1, self.meta, max_event_time_ms))
            except NoScriptError:
                self._load_scripts()
                new_wm = int(self.r.evalsha(self._wm_sha, 1, self.meta, max_event_time_ms))
        else:
            new_wm = self.watermark() or -1
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.unlink(self._group_key(g, f"claim:{batch_id}"))
        pipe.execute()
        self._expire(new_wm if new_wm >= 0 else None)

    def restore(self, batch_id: str, keys: Keys, max_event_time_ms: int | None) -> None:
        self._add_plain(keys)
        self.finish(batch_id, max_event_time_ms)

    def _expire(self, watermark_ms: int | None) -> None:
        cutoff = expired_before(watermark_ms, self.window_ms, self.slice_ms)
        if cutoff is None:
            return
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
            self._bits.pop(sl, None)
        pipe.execute()

    def stats(self) -> CacheStats:
        info = self.r.info("memory")
        used = info["used_memory"] if isinstance(info, dict) and "used_memory" in info else 0
        keys = 0
        for sl_raw, _ in self.r.zscan_iter(self.slices_key):
            sl = int(sl_raw)
            bits = int(self.r.hget(self.bits_key, sl_raw) or 0)
            pipe = self.r.pipeline(transaction=False)
            for bucket in range(1 << bits):
                pipe.scard(self._group_key(bucket % GROUPS, f"{sl}:{bucket}"))
            keys += sum(pipe.execute())
        return CacheStats(keys=keys, bytes=int(used))

    def close(self) -> None:
        self.r.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until Redis answers PING (a clear error after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.r.ping()
                return
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"Redis is unreachable: {exc}") from exc
                time.sleep(0.2)
