"""The Redis key cache: fingerprints in intsets or module tables, a whole batch per round trip.

Layout (``P`` is REDIS_KEY_PREFIX; ``{...}`` are Redis Cluster hash tags, so every multi-key
operation stays inside one slot):

- ``P:{m}:meta`` hash: ``watermark`` (epoch ms), ``fingerprint`` (the function's check value
  and this layout's version); ``P:{m}:slices`` zset of registered generations, ``P:{m}:bits``
  hash generation -> bucket bits.
- ``P:{gN}:<generation>:<bucket>`` set of 64-bit fingerprint halves. A key's generation is its
  event_time // DEDUPE_SLICE (by default the window): it only says when the key may be
  dropped. The bucket is the top ``bits`` (at least 4) of the other half, with ``bits`` chosen
  per generation so a bucket holds ~256 members: small enough to stay an intset (8 bytes a
  member), large enough that the key's own overhead is a fraction of a byte per member. N is
  the top 4 bits, so one fingerprint's buckets in every generation share a group.
- ``P:{gN}:gens`` zset of the generations registered in group N, as ``<generation>:<bits>``.
  A claim looks for each key in every one of them (a copy of an event may carry another
  event_time: it is still a duplicate) and adds it to its own. The client sends the list it
  looked in; a script that finds another list refuses (``ADEVENTS_GENS``), and the client
  reads the lists again and resends: a generation registered (or re-sized by a rebuild)
  meanwhile by another consumer is never missed.
- ``P:{gN}:alive`` sentinel per group: missing means Redis lost data, so the claim script
  refuses and the consumer rebuilds from the events table (a Redis loss never produces a
  duplicate). Its value is ``<fingerprint check>:<epoch>``; every rebuild starts a new epoch,
  and a group whose claims were made in an earlier epoch is not committed (``valid``).
- ``P:{gN}:floor`` zset holding the lowest live generation: those below it were expired. A
  claim that reaches below it was validated against a watermark that has moved on since
  (another consumer finished a batch meanwhile) and is refused, so the batch is validated
  again; it never lands an event whose earlier copy was just expired.
- ``P:{gN}:claim:<batch_id>`` the members a batch won, kept until the batch is finished, so a
  retried batch (after a crash) gets the same answers: claims are idempotent per batch. The
  consumer's batch id is its commit group's claim id ``<app_id>:<version>``.

With GROUPS = 16 groups, a Redis Cluster spreads the sets over up to 16 slots (so over its
primaries); the small ``{m}`` keys live on one primary, the rebuild lock (``{l}``) on one.

Table layout (``pipeline.redis_tables``): when every server has the adevents module loaded
(``redis_module/``), the bucket sets are replaced by one module table per (group, generation),
``P:{gN}:t:<generation>``, with 2^(bits - 4) segments; the claim script hands each generation's
keys to ``ADEVENTS.CLAIM`` as one blob. Everything else (gens lists, sentinels, epochs,
floors, claim records) is shared. The layout is detected at first use and is part of the
check value, so a Redis that gains or loses the module is rebuilt, never mixed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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

from pipeline import rebuild, redis_client, redis_tables
from pipeline.fingerprint import Keys, fingerprint_check
from pipeline.keycache import (
    CacheLostError,
    CacheStats,
    Claimed,
    Loader,
    Mask,
    Positions,
    committed,
    default_positions,
    expired_before,
)
from pipeline.leases import Lease, RedisLeases
from pipeline.redis_client import Client

log = logging.getLogger("adevents.redis_cache")

GROUPS = 16
GROUP_BITS = 4  # GROUPS == 2**GROUP_BITS: a key's group is the top bits of its bucket
#: Part of the check value: a cache written in another layout is rebuilt from the lake. This
#: is the bucket-set layout's; the module's tables are ``redis_tables.LAYOUT``.
LAYOUT = "gen1"
TARGET_PER_BUCKET = 256
MIN_BITS = GROUP_BITS
MAX_BITS = 20
#: Times a claim re-reads the generation lists and resends after ``ADEVENTS_GENS``.
GENS_RETRIES = 8
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

# Per run of members sharing a bucket: which were already present in each live generation,
# then add them all to their own; no per-member Lua loop. One mask per generation slot (own
# first), each concatenated over the runs. The claim record of (stream, batch) appends
# "<members,>|<positions,>|<mask>|<mask>...;" per attempt (members and positions come as one
# argument each: no per-member work to record them), and is listed in the stream's index, so a
# later claim of the stream learns which members its earlier claims won at which positions.
# Returns {earlier records as {name, value, ...}, mask, mask, ...}: with ``fresh``, every
# record of the stream; otherwise this batch's own (a resend after a lost reply).
# KEYS: alive, record, floor, gens, index, then per run ngens buckets (own first);
# ARGV: epoch, record TTL, lowest own generation, generation list, ngens, fresh, members,
# positions, counts..., members...
# The checks and the reading of earlier records are shared with the table layout's script
# (``pipeline.redis_tables``).
_CLAIM_HEAD_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('ADEVENTS_LOST key cache lost its data')
end
local floor = redis.call('ZSCORE', KEYS[3], 'f')
if floor and tonumber(ARGV[3]) < tonumber(floor) then
  return redis.error_reply('ADEVENTS_EXPIRED generations below ' .. floor .. ' expired')
end
if table.concat(redis.call('ZRANGE', KEYS[4], 0, -1), ',') ~= ARGV[4] then
  return redis.error_reply('ADEVENTS_GENS the generations changed')
end
local earlier = {}
if ARGV[6] == '1' then
  for _, name in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    local value = redis.call('GET', name)
    if value then
      earlier[#earlier + 1] = name
      earlier[#earlier + 1] = value
    else
      redis.call('SREM', KEYS[5], name)
    end
  end
else
  local value = redis.call('GET', KEYS[2])
  if value then earlier = {KEYS[2], value} end
end
"""
_CLAIM_LUA = (
    _CLAIM_HEAD_LUA
    + """local ngens = tonumber(ARGV[5])
local nruns = (#KEYS - 5) / ngens
local first = 9 + nruns
local pos = first
local masks = {}
for j = 1, ngens do masks[j] = {} end
for i = 1, nruns do
  local last = pos + tonumber(ARGV[8 + i]) - 1
  local base = 5 + (i - 1) * ngens
  for j = 1, ngens do
    masks[j][i] = table.concat(redis.call('SMISMEMBER', KEYS[base + j], unpack(ARGV, pos, last)))
  end
  redis.call('SADD', KEYS[base + 1], unpack(ARGV, pos, last))
  pos = last + 1
end
local out = {earlier}
for j = 1, ngens do out[j + 1] = table.concat(masks[j]) end
redis.call('APPEND', KEYS[2], ARGV[7] .. '|' .. ARGV[8] .. '|' .. table.concat(out, '|', 2) .. ';')
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[5], KEYS[2])
redis.call('EXPIRE', KEYS[5], ARGV[2])
return out
"""
)
_TABLE_CLAIM_LUA = _CLAIM_HEAD_LUA + redis_tables.CLAIM_BODY_LUA

_RAISE_WATERMARK_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'watermark') or '-1')
local new = tonumber(ARGV[1])
if new > cur then redis.call('HSET', KEYS[1], 'watermark', ARGV[1]) return ARGV[1] end
return tostring(cur)
"""


@dataclass(frozen=True)
class _Claim:
    batch_id: str
    stream: str
    fresh: bool


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


def _parse_records(reply: list[bytes]) -> tuple[dict[str, Positions], Claimed]:
    """Claim records ``[name, value, ...]``: each record's positions, and what its attempts won
    (members whose every mask said absent) by position."""
    positions: dict[str, Positions] = {}
    won = Claimed()
    for name, value in zip(reply[::2], reply[1::2], strict=True):
        seen: list[Positions] = []
        for attempt in bytes(value).split(b";"):
            if not attempt:
                continue
            names, where, *masks = attempt.split(b"|")
            members = np.array(names.split(b","), dtype=np.int64)
            at = np.array(where.split(b","), dtype=np.int64)
            new = np.ones(len(members), dtype=bool)
            for mask in masks:
                new &= np.frombuffer(mask, dtype=np.uint8) == ord("0")
            won.add(members[new].view(np.uint64), at[new])
            seen.append(at)
        positions[bytes(name).decode()] = np.concatenate(seen) if seen else np.empty(0, np.int64)
    return positions, won


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


def _group_order(group: npt.NDArray[np.int64], gens: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    """The stable order of rows by (group, generation). A batch's generations are a few
    consecutive numbers, so both fit one 16-bit key, which NumPy sorts by radix: 2.3 ms for
    200k keys where ``np.lexsort`` took 9.2."""
    low = int(gens.min()) if len(gens) else 0
    if len(gens) and int(gens.max()) - low < 1 << (15 - GROUP_BITS):
        packed = (group.astype(np.int16) << (15 - GROUP_BITS)) | (gens - low).astype(np.int16)
        return np.argsort(packed, kind="stable")
    return np.lexsort((gens, group))


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
        layout: str | None = None,
    ) -> None:
        self.r = client
        self.p = prefix
        self.window_ms = window_ms
        self.slice_ms = slice_ms
        self._fingerprint_check = fingerprint_check()
        #: The layout asked for (``LAYOUT`` or ``redis_tables.LAYOUT``), else None: the module's
        #: tables when every server has the module, detected at first use and again whenever
        #: the cache needs a rebuild (a restarted Redis may have gained or lost the module).
        self._layout_asked = layout
        self._layout: str | None = layout
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
        #: Per group, its generations as last read (ascending); None: read them again.
        self._gens: list[list[int]] | None = None
        #: Bucket bits of the generations seen (agreed in ``P:{m}:bits``, never changed).
        self._bits: dict[int, int] = {}
        # The sha of a script is known without Redis: nothing is sent until the first call,
        # so a consumer starts (and waits) while Redis is down; NOSCRIPT loads them.
        self._claim_sha = hashlib.sha1(_CLAIM_LUA.encode()).hexdigest()
        self._table_claim_sha = hashlib.sha1(_TABLE_CLAIM_LUA.encode()).hexdigest()
        self._wm_sha = hashlib.sha1(_RAISE_WATERMARK_LUA.encode()).hexdigest()
        self._resend = self._build_resend()
        #: Per stream, what its claims won by position, and its records' positions by name
        #: (learnt at its last fresh claim, kept up to date by this process's own claims).
        self._claimed: dict[str, Claimed] = {}
        self._records: dict[str, dict[str, Positions]] = {}
        #: Per stream, the groups whose records were read since its last fresh claim.
        self._loaded: dict[str, set[int]] = {}
        #: Per stream, the epoch what is known of its claims was learnt in.
        self._claims_epoch: dict[str, str] = {}
        self._claims_guard = threading.Lock()

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
        layout: str | None = None,
    ) -> RedisKeyCache:
        """Connect to ``redis://`` (single server) or ``redis+cluster://`` (Redis Cluster)."""
        return cls(
            connect(url),
            prefix=prefix,
            window_ms=window_ms,
            slice_ms=slice_ms,
            rebuild_grace_s=rebuild_grace_s,
            lock_timeout_s=lock_timeout_s,
            layout=layout,
        )

    @property
    def layout(self) -> str:
        """``redis_tables.LAYOUT`` when every server has the adevents module, else ``LAYOUT``."""
        if self._layout is None:
            servers = self._servers()
            modules = all(redis_tables.has_module(s) for s in servers)
            self._layout = redis_tables.LAYOUT if modules else LAYOUT
            log.info(
                "Redis key cache layout: %s",
                "module tables" if modules else "bucket sets (no adevents module on Redis)",
            )
        return self._layout

    @property
    def tables(self) -> bool:
        """True in the module's table layout."""
        return self.layout == redis_tables.LAYOUT

    @property
    def check(self) -> str:
        """The check value: the fingerprint function's and the layout's."""
        return f"{self._fingerprint_check}-{self.layout}"

    # -- helpers ---------------------------------------------------------------------------------
    def _group_key(self, group: int, suffix: str) -> str:
        return f"{self.p}:{{g{group}}}:{suffix}"

    def _load_scripts(self) -> None:
        self._claim_sha = self._script_load(_CLAIM_LUA)
        if self.tables:  # the script calls the module's command: loads only where it exists
            self._table_claim_sha = self._script_load(_TABLE_CLAIM_LUA)
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
            self._layout = self._layout_asked  # detect again before rebuilding
            return True
        # Another consumer may have rebuilt meanwhile: adopt its epoch (and its sizes).
        if current != self.alive_value:
            self._gens, self._bits = None, {}
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
        self._gens, self._bits = None, {}
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

    def _register(self, keys: Keys) -> None:
        """Give the generations of ``keys`` their bucket bits (agreed with other consumers:
        first proposal wins) and list them in every group, before any key goes in."""
        gens, counts = np.unique(keys.slice, return_counts=True)
        self._load_bits([int(g) for g in gens])
        lists = self._group_gens()
        new = [
            (int(g), int(c)) for g, c in zip(gens, counts, strict=True) if int(g) not in self._bits
        ]
        unlisted = [int(g) for g in gens if any(int(g) not in gl for gl in lists)]
        if not new and not unlisted:
            return
        # Events per generation, estimated from how densely the bulk of this batch covers
        # event time (a generation that overflows its buckets stays correct; it only costs
        # more memory).
        density = 0.0
        if keys.ms is not None and len(keys) >= 100:
            low, high = np.percentile(keys.ms, [5, 95])
            density = 0.9 * len(keys) / max(float(high - low), 1.0) * self.slice_ms
        pipe = self.r.pipeline(transaction=False)
        for gen, count in new:
            expected = max(count, density)
            bits = math.ceil(math.log2(max(expected, 1) / TARGET_PER_BUCKET))
            pipe.hsetnx(self.bits_key, str(gen), min(MAX_BITS, max(MIN_BITS, bits)))
            pipe.zadd(self.slices_key, {str(gen): gen})
        pipe.execute()
        self._load_bits([g for g, _ in new])
        pipe = self.r.pipeline(transaction=False)
        for gen in {g for g, _ in new} | set(unlisted):
            for group in range(GROUPS):
                pipe.zadd(self._group_key(group, "gens"), {f"{gen}:{self._bits[gen]}": gen})
        pipe.execute()
        self._gens = None

    def _load_bits(self, gens: list[int]) -> None:
        """Read the bucket bits of the generations not known yet (those registered)."""
        unknown = [g for g in gens if g not in self._bits]
        if not unknown:
            return
        for gen, bits in zip(
            unknown, self.r.hmget(self.bits_key, [str(g) for g in unknown]), strict=True
        ):
            if bits is not None:
                self._bits[gen] = int(bits)

    def _group_gens(self) -> list[list[int]]:
        """Per group, the generations a claim looks in (read again after any change)."""
        if self._gens is None:
            pipe = self.r.pipeline(transaction=False)
            for group in range(GROUPS):
                pipe.zrange(self._group_key(group, "gens"), 0, -1)
            self._gens = []
            # Members are "<generation>:<bits>": a rebuild by another consumer that sized a
            # generation anew changes the list, so this one never looks with stale bits.
            for listed in pipe.execute():
                gens = []
                for member in listed:
                    gen, bits = (int(v) for v in member.split(b":"))
                    self._bits[gen] = bits
                    gens.append(gen)
                self._gens.append(sorted(gens))
        return self._gens

    def _bucket_column(self, group: int, gen: pl.Expr, fine_bits: int) -> pl.Expr:
        """The set holding each row's members in generation ``gen`` (an expression): the
        frame's ``fine`` bucket (``fine_bits`` top bits of ``hi``, at least as many as any
        generation's) cut to that generation's bits, in ``group``."""
        bits = gen.replace_strict(self._bits, return_dtype=pl.Int64)
        bucket = pl.col("fine") // (2 ** (fine_bits - bits))
        return pl.concat_str(
            [pl.lit(f"{self.p}:{{g{group}}}:"), gen.cast(pl.String), pl.lit(":"), bucket]
        )

    def _grouped(
        self, keys: Keys, positions: Positions | None = None
    ) -> tuple[pl.DataFrame, list[pl.DataFrame], int]:
        """Rows ordered by (group, generation, bucket), split by group; ``row`` is the input
        index, ``fine`` the bucket at the finest bits of any generation (returned)."""
        self._register(keys)
        known = {g for gl in self._group_gens() for g in gl} | {
            int(g) for g in np.unique(keys.slice)
        }
        fine_bits = max(self._bits[g] for g in known if g in self._bits)
        frame = pl.DataFrame(
            {
                "row": np.arange(len(keys), dtype=np.int64),
                "slice": keys.slice,
                "group": (keys.hi >> np.uint64(64 - GROUP_BITS)).astype(np.int64),
                "fine": (keys.hi >> np.uint64(64 - fine_bits)).astype(np.int64),
                "member": keys.lo.view(np.int64),
                "position": default_positions(keys, positions),
            }
        )
        if self.tables:  # no buckets: (group, generation) is the order; a stable sort keeps a
            # key repeated in the batch new at its first row
            frame = frame.with_columns(sel=redis_tables.selectors(keys.hi, GROUP_BITS))
            frame = frame[_group_order(frame["group"].to_numpy(), keys.slice)]
        else:
            frame = frame.sort(["group", "slice", "fine"], maintain_order=True)
        return frame, frame.partition_by("group", maintain_order=True), fine_bits

    def _remember_epoch(self, batch_id: str, epoch: str | None) -> None:
        """Record (or, with None, forget) the epoch ``batch_id`` claimed in."""
        with self._epochs_guard:
            self._epochs.pop(batch_id, None)
            if epoch is not None:
                self._epochs[batch_id] = epoch
            while len(self._epochs) > MAX_REMEMBERED_EPOCHS:
                # Oldest first; a consumer has at most a few batches between claim and commit.
                del self._epochs[next(iter(self._epochs))]

    def _packed_claim(
        self, claim: _Claim, epoch: str, part: pl.DataFrame, fine_bits: int
    ) -> tuple[str, bytes]:
        """One group's EVALSHA; it reads every record of the stream in that group when this
        process has not since its last fresh claim (records are per group, like the keys)."""
        group = int(part["group"][0])
        listed = self._group_gens()[group]
        runs = (
            part.with_row_index("i")
            .with_columns(run=(pl.col("i") // MAX_MEMBERS_PER_CALL))
            .group_by(["slice", "fine", "run"], maintain_order=True)
            .agg(n=pl.len())
        )
        # Per run, its own generation's bucket first, then the other listed generations' in
        # list order: the p-th other is listed[p], or listed[p + 1] once past the own one.
        own_index = pl.col("slice").replace_strict(
            {g: i for i, g in enumerate(listed)}, return_dtype=pl.Int64
        )
        slots = [self._bucket_column(group, pl.col("slice"), fine_bits)]
        for p in range(len(listed) - 1):
            other = pl.when(pl.lit(p) < own_index).then(listed[p]).otherwise(listed[p + 1])
            slots.append(self._bucket_column(group, other, fine_bits))
        bucket_keys = runs.select(pl.concat_list(slots).alias("k")).explode("k")["k"]
        fixed, argv = self._claim_head(claim, epoch, part)
        argv += part.select(
            pl.col("member").cast(pl.String).str.join(","),
            pl.col("position").cast(pl.String).str.join(","),
        ).row(0)
        alive = fixed[0]
        nkeys = len(fixed) + len(bucket_keys)
        nargs = 3 + nkeys + len(argv) + len(runs) + len(part)
        packed = b"".join(
            [
                b"*%d\r\n" % nargs,
                _resp_args(["EVALSHA", self._claim_sha, str(nkeys), *fixed]),
                _resp_bulk(bucket_keys),
                _resp_args(argv),
                _resp_bulk(runs["n"]),
                _resp_bulk(part["member"]),
            ]
        )
        return alive, packed

    def _claim_head(
        self, claim: _Claim, epoch: str, part: pl.DataFrame
    ) -> tuple[list[str], list[str | bytes]]:
        """The keys and arguments both layouts' claim scripts start with (the claim record's
        members and positions follow, in each layout's own encoding)."""
        group = int(part["group"][0])
        listed = self._group_gens()[group]
        fixed = [
            self._group_key(group, "alive"),
            self._record_key(group, claim.stream, claim.batch_id),
            self._group_key(group, "floor"),
            self._group_key(group, "gens"),
            self._group_key(group, f"claims:{claim.stream}"),
        ]
        argv: list[str | bytes] = [
            epoch,
            str(CLAIM_RECORD_TTL_S),
            str(int(part["slice"][0])),  # sorted by generation within the group: the lowest
            ",".join(f"{g}:{self._bits[g]}" for g in listed),
            str(len(listed)),
            "1" if claim.fresh or group not in self._loaded.get(claim.stream, set()) else "0",
        ]
        return fixed, argv

    def _table_key(self, group: int, gen: int) -> str:
        return self._group_key(group, f"t:{gen}")

    def _packed_table_claim(
        self, claim: _Claim, epoch: str, part: pl.DataFrame
    ) -> tuple[str, bytes]:
        """One group's EVALSHA in the table layout: per generation of its keys, the module's
        ADEVENTS.CLAIM on the generation's table and the other listed generations' tables,
        with the keys as one blob."""
        group = int(part["group"][0])
        listed = self._group_gens()[group]
        fixed, argv = self._claim_head(claim, epoch, part)
        argv += redis_tables.record_args(part)
        data = redis_tables.blob(part["sel"].to_numpy(), part["member"].to_numpy())
        tables: list[str | bytes] = []
        for gen, start, end in redis_tables.runs(part):
            others = [g for g in listed if g != gen]
            tables += [self._table_key(group, g) for g in [gen, *others]]
            argv += [str(self._bits[gen] - GROUP_BITS), data[16 * start : 16 * end]]
        keys = [*fixed, *tables]
        packed = b"*%d\r\n" % (3 + len(keys) + len(argv)) + _resp_args(
            ["EVALSHA", self._table_claim_sha, str(len(keys)), *keys, *argv]
        )
        return fixed[0], packed

    def _packed_table_adds(self, part: pl.DataFrame) -> tuple[str, bytes, int]:
        """One group's keys as ADEVENTS.ADD commands (one per generation and chunk): the key
        they are routed by, the packed commands, and how many."""
        group = int(part["group"][0])
        data = redis_tables.blob(part["sel"].to_numpy(), part["member"].to_numpy())
        packed: list[bytes] = []
        for gen, start, end in redis_tables.runs(part):
            table = self._table_key(group, gen)
            seg_bits = str(self._bits[gen] - GROUP_BITS)
            for at in range(start, end, redis_tables.ADD_CHUNK):
                chunk = data[16 * at : 16 * min(at + redis_tables.ADD_CHUNK, end)]
                packed.append(b"*4\r\n" + _resp_args(["ADEVENTS.ADD", seg_bits, chunk, table]))
        return self._group_key(group, "alive"), b"".join(packed), len(packed)

    def _record_key(self, group: int, stream: str, batch_id: str) -> str:
        return self._group_key(group, f"claim:{stream}:{batch_id}")

    def _send_once(
        self, commands: list[tuple[str, bytes]], counts: list[int] | None = None
    ) -> list[Any]:
        """Send every packed command, pipelined per server, and collect replies in order.

        Everything is sent before any reply is read, so the servers of a cluster work on their
        share of a batch in parallel. With ``counts``, entry i packs ``counts[i]`` commands and
        its reply is the list of theirs.
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
                    if counts is None:
                        replies[i] = self._read_reply(conn)
                    else:
                        replies[i] = [self._read_reply(conn) for _ in range(counts[i])]
        except BaseException:
            # Replies may still be on their way on any of them: never reuse those connections.
            for _, conn, _ in by_pool.values():
                conn.disconnect()
            raise
        finally:
            for pool, conn, _ in by_pool.values():
                pool.release(conn)
        flat = [r for rs in replies for r in rs] if counts is not None else replies
        if any(isinstance(r, AskError | TryAgainError | ClusterDownError) for r in flat):
            raise _TopologyChangedError(next(r for r in flat if isinstance(r, ResponseError)))
        return replies

    @staticmethod
    def _read_reply(conn: Any) -> Any:
        try:
            return conn.read_response()
        except ResponseError as exc:
            return exc

    def _send_all(
        self, commands: list[tuple[str, bytes]], counts: list[int] | None = None
    ) -> list[Any]:
        """:meth:`_send_once`, riding out lost connections (a Redis restart, a failover) and
        cluster topology changes by sending everything again: every command sent this way is
        idempotent (SADD, and claims, which are idempotent per batch)."""
        replies: list[Any] = self._resend(self._send_once, commands, counts)
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

    def claim(
        self,
        batch_id: str,
        keys: Keys,
        positions: Positions | None = None,
        *,
        stream: str | None = None,
        fresh: bool = True,
    ) -> Mask:
        result = np.zeros(len(keys), dtype=bool)
        if len(keys) == 0:
            return result
        claim = _Claim(batch_id, stream or batch_id, fresh)
        if fresh:
            with self._claims_guard:  # every group's records are read again as claims reach it
                self._loaded[claim.stream] = set()
        adopted = False
        scripts_loaded = False
        for _ in range(GENS_RETRIES + 3):
            frame, parts, fine_bits = self._grouped(keys, positions)
            epoch = self.alive_value
            self._forget_other_epochs(claim.stream, epoch)
            if self.tables:
                commands = [self._packed_table_claim(claim, epoch, p) for p in parts]
            else:
                commands = [self._packed_claim(claim, epoch, p, fine_bits) for p in parts]
            replies = self._send_all(commands)
            errors = [r for r in replies if isinstance(r, Exception)]
            if not errors:
                self._remember_epoch(batch_id, epoch)
                break
            if any(isinstance(e, NoScriptError) for e in errors) and not scripts_loaded:
                scripts_loaded = True
                self._load_scripts()  # Redis restarted and forgot the scripts
                continue
            if any("ADEVENTS_LOST" in str(e) for e in errors):
                if not adopted and not self.needs_rebuild():
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
            if all("ADEVENTS_GENS" in str(e) for e in errors):
                # Another consumer registered or expired a generation: look in the new list.
                # The groups that answered keep their claims: a resend is idempotent.
                self._gens = None
                continue
            raise errors[0]
        else:
            raise redis.RedisError(f"batch {batch_id}: the key cache kept changing; retrying")
        result[frame["row"].to_numpy()] = self._won(claim, replies, parts)
        return result

    def _forget_other_epochs(self, stream: str, epoch: str) -> None:
        """What this process learnt of a stream's claims holds within one epoch: a rebuild
        (Redis lost its data) took every record with it, and a claim won before is not the
        stream's any more (the events table, or another consumer since, has the key)."""
        with self._claims_guard:
            if self._claims_epoch.get(stream) != epoch:
                self._claims_epoch[stream] = epoch
                self._claimed.pop(stream, None)
                self._records.pop(stream, None)
                self._loaded.pop(stream, None)

    def _won(self, claim: _Claim, replies: list[Any], parts: list[pl.DataFrame]) -> Mask:
        """Per member (in ``parts`` order): absent from every generation, or won at its
        position by a claim of the stream (an earlier attempt, or another batch)."""
        with self._claims_guard:
            # What came back (every record of a group read afresh, or this batch's own) adds
            # to what is known: an entry of a record gone since is of a position committed,
            # which this stream never reads again.
            claimed = self._claimed.setdefault(claim.stream, Claimed())
            records = self._records.setdefault(claim.stream, {})
            loaded = self._loaded.setdefault(claim.stream, set())
            won, won_lo, won_at = [], [], []
            for (earlier, *masks), part in zip(replies, parts, strict=True):
                if earlier:  # rare: a fresh claim with records left, or a resend
                    parse = redis_tables.parse_records if self.tables else _parse_records
                    listed, earlier_won = parse(list(earlier))
                    claimed.add(
                        earlier_won.frame["lo"].to_numpy().view(np.uint64),
                        earlier_won.frame["position"].to_numpy(),
                    )
                    records.update(listed)
                new = np.ones(len(part), dtype=bool)
                for mask in masks:
                    new &= np.frombuffer(bytes(mask), dtype=np.uint8) == ord("0")
                lo = part["member"].to_numpy().view(np.uint64)
                at = part["position"].to_numpy()
                won.append(new | claimed.holds(lo, at) if len(claimed) else new)
                won_lo.append(lo[new])
                won_at.append(at[new])
                group = int(part["group"][0])
                loaded.add(group)
                name = self._record_key(group, claim.stream, claim.batch_id)
                records[name] = np.concatenate([records.get(name, at[:0]), at])
            claimed.add(np.concatenate(won_lo), np.concatenate(won_at))
            return np.concatenate(won)

    def _add_plain(self, keys: Keys) -> None:
        """Add keys without claim records (rebuild and restore), packed for a whole group at
        once (a generation's buckets are many, and a rebuild of millions of keys must not spend
        seconds in a Python loop per bucket: a consumer killed during a long rebuild leaves it
        to the next, which must finish): one SADD per member, or in the table layout one
        ADEVENTS.ADD per generation and chunk of ADD_CHUNK keys."""
        if len(keys) == 0:
            return
        _, parts, fine_bits = self._grouped(keys)
        packed = [
            self._packed_table_adds(part) if self.tables else self._packed_sadds(part, fine_bits)
            for part in parts
        ]
        commands = [(route, data) for route, data, _ in packed]
        for replies in self._send_all(commands, [count for _, _, count in packed]):
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply

    def _packed_sadds(self, part: pl.DataFrame, fine_bits: int) -> tuple[str, bytes, int]:
        """One group's keys as one SADD per member: the key they are routed by, the packed
        commands, and how many."""
        group = int(part["group"][0])
        key = self._bucket_column(group, pl.col("slice"), fine_bits)
        member = pl.col("member").cast(pl.String)
        framed = part.select(
            pl.concat_str(
                [
                    pl.lit("*3\r\n$4\r\nSADD\r\n$"),
                    key.str.len_bytes().cast(pl.String),
                    pl.lit("\r\n"),
                    key,
                    pl.lit("\r\n$"),
                    member.str.len_bytes().cast(pl.String),
                    pl.lit("\r\n"),
                    member,
                    pl.lit("\r\n"),
                ]
            ).str.join("")
        ).item()
        return self._group_key(group, "alive"), framed.encode(), len(part)

    def finish(
        self,
        batch_id: str,
        max_event_time_ms: int | None,
        *,
        stream: str | None = None,
        through: Mapping[int, int] | None = None,
    ) -> None:
        stream = stream or batch_id
        if max_event_time_ms is not None:
            new_wm = self._raise_watermark(max_event_time_ms)
        else:
            new_wm = self.watermark() or -1
        own = {self._record_key(g, stream, batch_id): g for g in range(GROUPS)}
        with self._claims_guard:
            records = self._records.get(stream, {})
            done = dict(own)
            if through is None:
                self._claimed.pop(stream, None)
                self._records.pop(stream, None)
                self._loaded.pop(stream, None)
            else:
                # Records of other batches of the stream (an abandoned attempt, a dead
                # consumer's) whose every position is committed now: nothing left to redo.
                for name, at in list(records.items()):
                    if committed(at, through).all():
                        done[name] = int(name.split("{g", 1)[1].split("}", 1)[0])
                for name in done:
                    records.pop(name, None)
                self._claimed.get(stream, Claimed()).forget(through)
        pipe = self.r.pipeline(transaction=False)
        for name, group in done.items():
            pipe.unlink(name)
            pipe.srem(self._group_key(group, f"claims:{stream}"), name)
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
        # Out of every group's list first: a claim still looking there is refused and looks
        # again (its own generation is at or above the floor).
        pipe = self.r.pipeline(transaction=False)
        for g in range(GROUPS):
            pipe.zremrangebyscore(self._group_key(g, "gens"), "-inf", f"({cutoff}")
        pipe.execute()
        self._load_bits([int(g) for g in old])
        pipe = self.r.pipeline(transaction=False)
        for gen_raw in old:
            gen = int(gen_raw)
            bits = self._bits.pop(gen, MIN_BITS)
            if self.tables:  # a table per group (UNLINK frees a big one in the background)
                for group in range(GROUPS):
                    pipe.unlink(self._table_key(group, gen))
            else:
                for bucket in range(1 << bits):
                    pipe.unlink(self._group_key(bucket >> (bits - GROUP_BITS), f"{gen}:{bucket}"))
                    if len(pipe) >= UNLINK_CHUNK:  # a generation has up to 2**MAX_BITS buckets
                        pipe.execute()
            pipe.zrem(self.slices_key, gen_raw)
            pipe.hdel(self.bits_key, gen_raw)
        pipe.execute()
        self._gens = None

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
        for gen_raw, _ in self.r.zscan_iter(self.slices_key):
            gen = int(gen_raw)
            if self.tables:
                pipe = self.r.pipeline(transaction=False)
                for group in range(GROUPS):
                    pipe.execute_command("ADEVENTS.INFO", self._table_key(group, gen))
                keys += sum(int(info[1]) for info in pipe.execute() if info is not None)
                continue
            bits = int(self.r.hget(self.bits_key, gen_raw) or MIN_BITS)
            pipe = self.r.pipeline(transaction=False)
            for bucket in range(1 << bits):
                pipe.scard(self._group_key(bucket >> (bits - GROUP_BITS), f"{gen}:{bucket}"))
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
