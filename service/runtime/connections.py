"""The Redis client every part of a process shares, built from the settings."""

from __future__ import annotations

from typing import Any

from dedup.client import RedisClient, connect
from service.agents.registry import AgentRegistry
from service.core.settings import Settings
from service.runtime.limits import limits


def redis_client(settings: Settings, max_connections: int | None = None) -> RedisClient:
    """One server, a Redis Cluster for ``redis+cluster://`` URLs or the master sentinels name for
    ``redis+sentinel://`` ones (see :mod:`dedup.client`), with a pool of ``max_connections`` (unset:
    ``AGENT_REDIS__MAX_CONNECTIONS``, else what :mod:`service.runtime.limits` derives from the
    in-flight window with the built-in kinds)."""
    r = settings.redis
    if max_connections is None:
        max_connections = r.max_connections or limits(settings, AgentRegistry()).redis_connections
    kwargs: dict[str, Any] = {
        "socket_timeout": r.socket_timeout_s,
        "socket_connect_timeout": r.socket_timeout_s,
        "health_check_interval": 10,
    }
    if r.username:
        kwargs["username"] = r.username
    if r.password is not None:
        kwargs["password"] = r.password.get_secret_value()
    if r.sentinel_username:
        kwargs["sentinel_username"] = r.sentinel_username
    if r.sentinel_password is not None:
        kwargs["sentinel_password"] = r.sentinel_password.get_secret_value()
    if r.ssl_ca_certs:
        kwargs["ssl_ca_certs"] = r.ssl_ca_certs
    if r.ssl_certfile:
        kwargs["ssl_certfile"] = r.ssl_certfile
    if r.ssl_keyfile:
        kwargs["ssl_keyfile"] = r.ssl_keyfile
    return connect(r.url.get_secret_value(), max_connections=max_connections, **kwargs)
