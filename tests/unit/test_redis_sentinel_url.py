"""``redis+sentinel://`` URLs, without a server: the sentinels to ask, the service name, the database,
the credentials of the master and those of the sentinels."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from dedup.client import SentinelRedis, close, connect, is_sentinel_url, parse_sentinel_url


def test_a_url_names_the_sentinels_service_database_and_credentials() -> None:
    url = parse_sentinel_url("redis+sentinel://ledger:p%40ss@10.0.0.1:26379,10.0.0.2,[::1]:26380/ledger-main/3")
    assert url.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)]
    assert (url.service, url.db, url.tls) == ("ledger-main", 3, False)
    assert (url.username, url.password) == ("ledger", "p@ss")


def test_tls_scheme_database_default_and_password_only() -> None:
    url = parse_sentinel_url("rediss+sentinel://:secret@s1:5000/mymaster")
    assert url.sentinels == [("s1", 5000)]
    assert (url.service, url.db, url.tls, url.username, url.password) == ("mymaster", 0, True, None, "secret")
    assert is_sentinel_url("REDIS+SENTINEL://s1/m") and not is_sentinel_url("redis://s1/0")


@pytest.mark.parametrize("url", [
    "redis+sentinel://s1:26379",  # no service name
    "redis+sentinel://s1:26379/",
    "redis+sentinel:///mymaster",  # no sentinel
    "redis+sentinel://s1:26379/mymaster/zero",
    "redis+sentinel://s1:port/mymaster",
])
def test_malformed_urls_are_refused_with_the_expected_form(url: str) -> None:
    with pytest.raises(ValueError, match=r"redis\+sentinel://"):
        parse_sentinel_url(url)


def test_connect_builds_a_master_client_asking_the_sentinels() -> None:
    """No server is contacted: the client learns the master on its first command."""
    client = connect("rediss+sentinel://u:pw@127.0.0.1:1,127.0.0.1:2/svc/2", max_connections=7,
                     socket_timeout=1.5, sentinel_password="sp", ssl_ca_certs="/ca.pem")
    assert isinstance(client, SentinelRedis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.is_master and pool.service_name == "svc"
    assert pool.max_connections == 7
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"], kwargs["ssl_ca_certs"]) == (2, "u", "pw", "/ca.pem")
    asked = client.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"]) for s in asked] \
        == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    sentinel_kwargs = asked[0].connection_pool.connection_kwargs
    # the sentinels get their own password, the TLS settings and the timeouts; never the master's password
    assert (sentinel_kwargs["password"], sentinel_kwargs["ssl_ca_certs"], sentinel_kwargs["socket_timeout"]) \
        == ("sp", "/ca.pem", 1.5)
    assert "username" not in sentinel_kwargs or sentinel_kwargs["username"] is None
    asyncio.run(close(client))


def test_the_settings_reach_the_sentinels_and_the_master(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core.settings import Settings
    from service.runtime.connections import redis_client

    monkeypatch.setenv("AGENT_REDIS__URL", "redis+sentinel://127.0.0.1:1/ledger/1")
    monkeypatch.setenv("AGENT_REDIS__PASSWORD", "master-pw")
    monkeypatch.setenv("AGENT_REDIS__SENTINEL_USERNAME", "watcher")
    monkeypatch.setenv("AGENT_REDIS__SENTINEL_PASSWORD", "sentinel-pw")
    client = redis_client(Settings(), max_connections=5)
    assert isinstance(client, SentinelRedis)
    assert client.connection_pool.connection_kwargs["password"] == "master-pw"
    sentinel_kwargs = client.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert (sentinel_kwargs["username"], sentinel_kwargs["password"]) == ("watcher", "sentinel-pw")
    asyncio.run(close(client))
