"""An expiring Redis lease: the lock that lets one consumer at a time rebuild the key cache.

A lease is a Redis key (SET NX PX) renewed by a heartbeat thread while held, so it outlives a
long rebuild; when its holder dies it expires after its timeout (LEASE_TIMEOUT), or is taken
over at once by a process of the same host and pid namespace that sees the holder is gone.
Spool files need no lease: each consumer owns the files of its own slot (``pipeline.groups``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass

import redis

log = logging.getLogger("adevents.leases")


@dataclass(frozen=True)
class Lease:
    name: str
    token: str


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: Tokens of the leases held right now by any RedisLeases of this process: a lease key holding a
#: token of this process that is not here was released (or lost) and may be taken back.
_HELD_HERE: set[str] = set()
_HELD_HERE_GUARD = threading.Lock()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def process_space() -> str:
    """Names the space this process's pid is meaningful in: host name plus pid namespace.

    Containers often share a host name (``network_mode: host``) or reuse small pids (pid 1 in
    every container), so a pid alone says nothing about another container's process; only
    holders in this very pid namespace can be checked with ``kill(pid, 0)``.
    """
    host = socket.gethostname().replace("|", "_")
    try:
        return f"{host}@{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (not Linux): the host name alone
        return host


class RedisLeases:
    """Leases as Redis keys ``<prefix>:{l}:<name>`` (SET NX PX), renewed by a heartbeat thread.

    The value names the holder's host (with its pid namespace) and pid, so a consumer restarted
    next to a dead predecessor takes over its lease at once instead of waiting for it to expire.
    All leases share the hash tag ``{l}``: on Redis Cluster they live in one slot.
    """

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, *, prefix: str, owner: str, timeout_s: float
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.owner = owner.replace("|", "_")
        self.space = process_space()
        self.timeout_ms = max(1, int(timeout_s * 1000))
        self._renew = client.register_script(_RENEW)
        self._take_over = client.register_script(_TAKE_OVER)
        self._release = client.register_script(_RELEASE)
        self._held: dict[str, Lease] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{{l}}:{name}"

    def acquire(self, name: str) -> Lease | None:
        """The lease on ``name``, or None while someone else (alive) holds it."""
        token = f"{self.space}|{os.getpid()}|{self.owner}|{uuid.uuid4().hex[:8]}"
        key = self._key(name)
        if not self.r.set(key, token, nx=True, px=self.timeout_ms):
            current = _text(self.r.get(key))
            if current is None or not (
                self._holder_is_dead(current) or self._forgotten_by_me(current)
            ):
                return None
            # A holder of this host that died (kill -9, then a restart): no need to wait for
            # its lease to expire.
            if not self._take_over(keys=[key], args=[current, token, self.timeout_ms]):
                return None
            log.info("took over the lease on %s from a dead holder (%s)", name, current)
        lease = Lease(name, token)
        with self._guard:
            self._held[name] = lease
        with _HELD_HERE_GUARD:
            _HELD_HERE.add(token)
        return lease

    def _holder_is_dead(self, value: str) -> bool:
        space, _, rest = value.partition("|")
        pid_text = rest.partition("|")[0]
        if space != self.space or not pid_text.isdigit() or int(pid_text) == os.getpid():
            return False
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _forgotten_by_me(self, value: str) -> bool:
        """A lease of this very process that it released while Redis was unreachable (so the
        key outlived the release): take it back at once rather than wait for it to expire."""
        space, _, rest = value.partition("|")
        with _HELD_HERE_GUARD:
            held_here = value in _HELD_HERE
        return space == self.space and rest.partition("|")[0] == str(os.getpid()) and not held_here

    def held(self, lease: Lease) -> bool:
        """Re-read the lease from Redis: True only if it is still ours."""
        return _text(self.r.get(self._key(lease.name))) == lease.token

    def release(self, lease: Lease) -> None:
        with self._guard:
            if self._held.get(lease.name) == lease:
                del self._held[lease.name]
        with _HELD_HERE_GUARD:
            _HELD_HERE.discard(lease.token)
        try:
            self._release(keys=[self._key(lease.name)], args=[lease.token])
        except redis.RedisError as exc:  # it expires by itself anyway
            log.debug("could not release lease on %s: %s", lease.name, exc)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_ms / 3000):
            with self._guard:
                held = list(self._held.values())
            for lease in held:
                try:
                    ok = self._renew(
                        keys=[self._key(lease.name)], args=[lease.token, self.timeout_ms]
                    )
                except redis.RedisError as exc:
                    log.warning("lease heartbeat failed for %s: %s", lease.name, exc)
                    continue
                if not ok:
                    # Lost for good (expired, taken over, or Redis lost it): stop renewing; the
                    # holder finds out with held().
                    with self._guard:
                        if self._held.get(lease.name) == lease:
                            del self._held[lease.name]
                    with _HELD_HERE_GUARD:
                        _HELD_HERE.discard(lease.token)
                    log.warning("lost the lease on %s", lease.name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with self._guard:
            held = list(self._held.values())
        for lease in held:
            self.release(lease)
