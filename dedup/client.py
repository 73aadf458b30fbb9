"""The Redis clients the ledger runs on, and how one is made from a URL.

One server (``redis://``, ``rediss://``), a Redis Cluster (``redis+cluster://host:port,host:port``,
``rediss+cluster://`` for TLS): every script touches the keys of one task, which share a hash tag
and so a slot; keys that are not a task's have hash tags of their own (:mod:`dedup.keys`). Or the
master of a Sentinel-managed set (``redis+sentinel://host:port,host:port/<service>/<db>``,
``rediss+sentinel://`` for TLS to the sentinels and the master): the client asks the sentinels where
the master is, and again after a failover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError, RedisError, ResponseError

from dedup.errors import LedgerUnavailable

RedisClient = aioredis.Redis | RedisCluster
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
SENTINEL_FORM = "redis+sentinel://[user:password@]host:port,host:port/<service name>[/<db>]"
SENTINEL_PORT = 26379


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


def _userinfo(hosts: str) -> tuple[str | None, str | None, str]:
    """``user:password@host,host`` -> (user, password, hosts); unset parts are None."""
    userinfo, _, hostlist = hosts.rpartition("@")
    user, _, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) or None, hostlist


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``host`` or ``[v6]:port``."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    return host, int(port) if port else default_port


def cluster_client(url: str, *, max_connections: int, **kwargs: Any) -> RedisCluster:
    """A cluster client from ``redis+cluster://[user:password@]host:port,host:port[/...]``.

    The nodes listed are only where discovery starts; the client learns the slots from them and
    follows ``MOVED`` and ``ASK`` redirections. ``max_connections`` is per node.
    """
    scheme, _, rest = url.partition("://")
    user, password, hostlist = _userinfo(rest.split("/", 1)[0])
    if user:
        kwargs.setdefault("username", user)
    if password:
        kwargs.setdefault("password", password)
    nodes = []
    for item in filter(None, hostlist.split(",")):
        host, _, port = item.rpartition(":")
        nodes.append(ClusterNode(host.strip("[]") or "127.0.0.1", int(port or 6379)))
    if not nodes:
        raise ValueError("a redis+cluster:// URL names at least one host:port")
    if CLUSTER_SCHEMES[scheme.lower()]:
        kwargs["ssl"] = True
    return Cluster(startup_nodes=nodes, max_connections=max_connections, **kwargs)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL names: the sentinels, the master's service name and database,
    and the master's credentials (the sentinels' own are settings of their own)."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    tls: bool
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse :data:`SENTINEL_FORM` (a sentinel without a port listens on 26379)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL: expected {SENTINEL_FORM}")
    hosts, _, path = rest.partition("/")
    user, password, hostlist = _userinfo(hosts)
    service, _, db = path.strip("/").partition("/")
    try:
        sentinels = [_host_port(item, SENTINEL_PORT) for item in hostlist.split(",") if item]
        number = int(db or 0)
    except ValueError:
        sentinels, number = [], -1
    if not sentinels or not service or number < 0 or any(not host for host, _port in sentinels):
        raise ValueError(f"a sentinel URL names its sentinels, the service and a database number: {SENTINEL_FORM}")
    return SentinelURL(sentinels, unquote(service), number, SENTINEL_SCHEMES[scheme.lower()], user, password)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's connections, found through the sentinels, in a pool that waits for a free
    connection instead of failing when every one is busy (as one server's does)."""


class SentinelRedis(aioredis.Redis):
    """A client of the master a set of sentinels names; closing it closes its sentinel clients."""

    sentinel_manager: Sentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.sentinel_manager.aclose()


def sentinel_client(url: str, *, max_connections: int, sentinel_username: str | None = None,
                    sentinel_password: str | None = None, **kwargs: Any) -> SentinelRedis:
    """A client of the master of :data:`SENTINEL_FORM`'s service. The sentinels get the timeouts, the TLS
    settings and ``sentinel_username``/``sentinel_password`` (for a sentinel with ``requirepass``);
    the master gets the URL's credentials (or ``username``/``password``) and every other setting."""
    parsed = parse_sentinel_url(url)
    if parsed.username:
        kwargs.setdefault("username", parsed.username)
    if parsed.password:
        kwargs.setdefault("password", parsed.password)
    if parsed.tls:
        kwargs["ssl"] = True
    to_sentinels = {k: v for k, v in kwargs.items()
                    if k.startswith(("socket_", "ssl")) and k != "socket_keepalive_options"}
    if sentinel_username:
        to_sentinels["username"] = sentinel_username
    if sentinel_password:
        to_sentinels["password"] = sentinel_password
    sentinel = Sentinel(parsed.sentinels, sentinel_kwargs=to_sentinels)
    pool = BlockingSentinelPool(parsed.service, sentinel, max_connections=max_connections,  # type: ignore[no-untyped-call]
                                timeout=kwargs.get("socket_timeout"), db=parsed.db, **kwargs)
    client = SentinelRedis(connection_pool=pool)
    client.sentinel_manager = sentinel
    return client


def connect(url: str, *, max_connections: int = 64, **kwargs: Any) -> RedisClient:
    """A client for ``url``: a Redis Cluster for the ``+cluster`` schemes, the master named by
    sentinels for the ``+sentinel`` schemes, else one server.

    One server and a sentinel-named master get a bounded pool that waits for a free connection
    instead of failing when every one is busy. ``sentinel_username``/``sentinel_password`` are for
    the sentinels only (ignored by the other kinds).
    """
    if is_sentinel_url(url):
        return sentinel_client(url, max_connections=max_connections, **kwargs)
    kwargs.pop("sentinel_username", None)
    kwargs.pop("sentinel_password", None)
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


async def eviction_risk(client: RedisClient) -> str | None:
    """Why Redis may lose ledger keys on its own, or None. ``noeviction`` is the only safe policy."""
    try:
        if isinstance(client, RedisCluster):  # every node: a replica may be promoted tomorrow
            replies = [(n.name, await client.config_get("maxmemory-policy", target_nodes=n))
                       for n in client.get_nodes()]
        else:
            replies = [("redis", await client.config_get("maxmemory-policy"))]
    except ResponseError:  # CONFIG disabled (a managed Redis): the operator must vouch for it
        return None
    except RedisError as exc:
        raise LedgerUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
    for node, raw in replies:
        policy = raw.get("maxmemory-policy", "noeviction") if isinstance(raw, dict) else "noeviction"
        policy = policy.decode() if isinstance(policy, bytes) else str(policy)
        if policy != "noeviction":
            where = "" if node == "redis" else f" on cluster node {node}"
            return (f"Redis maxmemory-policy is {policy!r}{where}: it can evict ledger keys, and an evicted key "
                    "lets a redelivered task run the model again. Set maxmemory-policy noeviction.")
    return None
