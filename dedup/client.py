"""The Redis clients the ledger runs on, and how one is made from a URL.

One server (``redis://``, ``rediss://``) or a Redis Cluster (``redis+cluster://host:port,host:port``,
``rediss+cluster://`` for TLS): every script touches the keys of one task, which share a hash tag
and so a slot; keys that are not a task's have hash tags of their own (:mod:`dedup.keys`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError, RedisError

RedisClient = aioredis.Redis | RedisCluster
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS


def as_redis_error(exc: BaseException) -> BaseException:
    """A failure inside the client library (it happens while a cluster node goes away, or while a
    client learns the slots under concurrent use) is the connection's, not the caller's: an outage,
    retried as one."""
    if isinstance(exc, RedisError) or not isinstance(exc, Exception):
        return exc
    return ConnectionError(f"redis client failed: {type(exc).__name__}: {exc}")


class Cluster(RedisCluster):
    """A cluster client that learns the slots before its first command and reports the library's
    own failures as Redis connection errors.

    redis-py's cluster client resolves a command's routing before it learns the topology; fifty
    commands issued at once by a fresh client can then run on connections that the discovery
    replaces and closes under them, and fail with ``AttributeError`` from inside the library (seen
    in about one fresh client in twelve on a loaded machine). Discovery first, under the client's
    own lock, closes that window; the conversion keeps any such failure that remains (a node going
    away mid-command) on the path every caller already handles: a ``RedisError``.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._initialize:
                await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised, as a RedisError when it is not one
            converted = as_redis_error(exc)
            if converted is exc:
                raise
            raise converted from exc


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_client(url: str, *, max_connections: int, **kwargs: Any) -> RedisCluster:
    """A cluster client from ``redis+cluster://[user:password@]host:port,host:port[/...]``.

    The nodes listed are only where discovery starts; the client learns the slots from them and
    follows ``MOVED`` and ``ASK`` redirections. ``max_connections`` is per node.
    """
    scheme, _, rest = url.partition("://")
    hosts = rest.split("/", 1)[0]
    userinfo, _, hostlist = hosts.rpartition("@")
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            kwargs.setdefault("username", unquote(user))
        if password:
            kwargs.setdefault("password", unquote(password))
    nodes = []
    for item in filter(None, hostlist.split(",")):
        host, _, port = item.rpartition(":")
        nodes.append(ClusterNode(host.strip("[]") or "127.0.0.1", int(port or 6379)))
    if not nodes:
        raise ValueError("a redis+cluster:// URL names at least one host:port")
    if CLUSTER_SCHEMES[scheme.lower()]:
        kwargs["ssl"] = True
    return Cluster(startup_nodes=nodes, max_connections=max_connections, **kwargs)


def connect(url: str, *, max_connections: int = 64, **kwargs: Any) -> RedisClient:
    """A client for ``url``: a Redis Cluster for the ``+cluster`` schemes, else one server.

    One server gets a bounded pool that waits for a free connection instead of failing when every
    one is busy.
    """
    if is_cluster_url(url):
        return cluster_client(url, max_connections=max_connections, **kwargs)
    timeout = kwargs.get("socket_timeout")
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout, **kwargs)
    return aioredis.Redis(connection_pool=pool)


async def close(client: RedisClient) -> None:
    """Close the client and its connections (a cluster client owns its nodes' pools)."""
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)
