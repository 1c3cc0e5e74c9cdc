"""The Redis key cache's table layout: one ``adevents`` module table per (group, generation).

When every server has the module (``redis_module/``, loaded with ``--loadmodule``), a
generation's keys in group N live in one key ``P:{gN}:t:<generation>`` of the module's type:
2^(bits - GROUP_BITS) open-addressing segments of 8-byte slots (10.7-16 bytes a key). A claim
sends each group's keys as ONE blob of 16-byte records and the module answers a byte a key,
so neither Lua nor Redis handles an argument per key. Without the module (managed Redis), the
cache keeps its bucket sets (``pipeline.redis_cache``).

A record is (``hi`` shifted past the group bits, ``lo``), little-endian: the module picks the
segment from the top bits of the first and stores the second, so a key is told apart by its 64
``lo`` bits plus the group's and the segment's bits of ``hi``, as many as the bucket sets use.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import polars as pl
import redis

from pipeline.fingerprint import Keys
from pipeline.keycache import Claimed, Positions

#: Part of the check value (see ``pipeline.redis_cache.LAYOUT``).
LAYOUT = "tab1"
#: The command whose presence on a server says the module is loaded.
PROBE_COMMAND = "ADEVENTS.CLAIM"
#: Keys per ADEVENTS.ADD of a rebuild (4 MiB blobs: Redis does ~10 ms of work per command).
ADD_CHUNK = 250_000

# Per run of members sharing a generation: ADEVENTS.CLAIM on its own table and those of the
# other listed generations; the answers (a byte a member, '0': new) are concatenated over the
# runs. The rest is the bucket-set script's: same checks, same reply shape with one mask, and
# a claim record per (stream, batch) appended per attempt, binary here: "<n>:" then n members
# and n positions (little-endian int64) and the n-byte mask (see ``parse_records``).
# KEYS: alive, record, floor, gens, index, then per run ngens tables (own first);
# ARGV: epoch, record TTL, lowest own generation, generation list, ngens, fresh, members,
# positions, then per run: segment bits, blob.
CLAIM_BODY_LUA = """
local ngens = tonumber(ARGV[5])
local nruns = (#KEYS - 5) / ngens
local masks = {}
for i = 1, nruns do
  local base = 5 + (i - 1) * ngens
  masks[i] = redis.call('ADEVENTS.CLAIM', ARGV[7 + 2 * i], ARGV[8 + 2 * i],
                        unpack(KEYS, base + 1, base + ngens))
end
local mask = table.concat(masks)
redis.call('APPEND', KEYS[2], #mask .. ':' .. ARGV[7] .. ARGV[8] .. mask)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[5], KEYS[2])
redis.call('EXPIRE', KEYS[5], ARGV[2])
return {earlier, mask}
"""


def has_module(server: redis.Redis) -> bool:
    """True if ``server`` has the adevents module loaded (COMMAND INFO knows its command)."""
    pool = server.connection_pool
    conn: Any = pool.get_connection()
    try:
        # Read raw: redis-py's COMMAND INFO parser fails on the nil of an unknown command.
        conn.send_command("COMMAND", "INFO", PROBE_COMMAND)
        reply: Any = conn.read_response()
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    return bool(reply) and reply[0] is not None


def selectors(hi: np.ndarray, group_bits: int) -> np.ndarray:
    """The module's segment selector of each key: ``hi`` past its group bits, as int64."""
    return (hi.astype(np.uint64) << np.uint64(group_bits)).view(np.int64)


def blob(sel: np.ndarray, lo: np.ndarray) -> bytes:
    """The module's blob of 16-byte records (selector, stored half), built without a loop."""
    out = np.empty((len(sel), 2), dtype="<i8")
    out[:, 0] = sel
    out[:, 1] = lo
    return out.tobytes()


def keys_blob(keys: Keys, group_bits: int) -> bytes:
    return blob(selectors(keys.hi, group_bits), keys.lo.view(np.int64))


def runs(part: pl.DataFrame) -> list[tuple[int, int, int]]:
    """(generation, first row, end row) of each run of rows sharing a generation (``slice``);
    ``part`` is sorted by it."""
    gens = part["slice"].to_numpy()
    # Where the generation changes: a pass of NumPy, where a group_by per group of every claim
    # took ~7 % of the consumer's main thread with Redis.
    bounds = [0, *(np.flatnonzero(gens[1:] != gens[:-1]) + 1).tolist(), len(gens)]
    return [(int(gens[a]), a, b) for a, b in itertools.pairwise(bounds) if b > a]


def record_args(part: pl.DataFrame) -> list[str | bytes]:
    """A claim record's members and positions: two blobs of little-endian int64."""
    return [
        part["member"].to_numpy().astype("<i8").tobytes(),
        part["position"].to_numpy().astype("<i8").tobytes(),
    ]


def parse_records(reply: list[bytes]) -> tuple[dict[str, Positions], Claimed]:
    """Claim records ``[name, value, ...]`` of the table layout: each record's positions, and
    what its attempts won (members the mask said new) by position."""
    positions: dict[str, Positions] = {}
    won = Claimed()
    for name, raw in zip(reply[::2], reply[1::2], strict=True):
        value = bytes(raw)
        seen: list[Positions] = []
        at = 0
        while at < len(value):
            colon = value.index(b":", at)
            n, start = int(value[at:colon]), colon + 1
            members = np.frombuffer(value, "<i8", n, start)
            where = np.frombuffer(value, "<i8", n, start + 8 * n).astype(np.int64)
            new = np.frombuffer(value, np.uint8, n, start + 16 * n) == ord("0")
            won.add(members[new].astype(np.int64).view(np.uint64), where[new])
            seen.append(where)
            at = start + 17 * n
        positions[name.decode()] = np.concatenate(seen) if seen else np.empty(0, np.int64)
    return positions, won
