"""Redis clients from a URL: the one place that turns REDIS_URL into a client.

Schemes: ``redis://`` and ``rediss://`` (one server, TLS for the second), ``unix://`` (a
socket path) and ``redis+cluster://`` / ``rediss+cluster://`` (a Redis Cluster: the URL names
any one node, the client discovers the others). Building a cluster client asks that node for
the topology, so it raises when no node answers; a single-server client connects lazily.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import redis
from redis.retry import Retry

Client: TypeAlias = redis.Redis | redis.RedisCluster

#: Cluster schemes and the single-server scheme redis-py parses their node address with.
CLUSTER_SCHEMES: Final = (("redis+cluster://", "redis://"), ("rediss+cluster://", "rediss://"))


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.startswith(tuple(scheme for scheme, _ in CLUSTER_SCHEMES))


def connect(url: str, *, timeout: float | None = None, retry: Retry | None = None) -> Client:
    """A client for ``url``.

    ``timeout`` bounds both connecting and each reply, in seconds (None: wait as long as the
    socket does; probes such as /health pass a short one). ``retry`` resends a command on a
    lost connection (None: redis-py's default).
    """
    options: dict[str, object] = {}
    if timeout is not None:
        options.update(socket_connect_timeout=timeout, socket_timeout=timeout)
    if retry is not None:
        options["retry"] = retry
    for scheme, base in CLUSTER_SCHEMES:
        if url.startswith(scheme):
            return redis.RedisCluster.from_url(base + url[len(scheme) :], **options)
    return redis.Redis.from_url(url, **options)


def used_memory(client: Client) -> int:
    """Bytes of memory Redis uses for everything: summed over the primaries of a cluster."""
    if isinstance(client, redis.RedisCluster):
        infos = client.info("memory", target_nodes=redis.RedisCluster.PRIMARIES)
        if "used_memory" in infos:  # a one-primary cluster answers as a single server does
            return int(infos["used_memory"])
        return sum(int(info["used_memory"]) for info in infos.values())
    return int(client.info("memory")["used_memory"])
