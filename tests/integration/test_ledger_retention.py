"""The ledger's retention and durability are checked at start, against the real broker and Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import MIN_LEDGER_TTL_S, StartupRefused, topic_retention_s
from tests.support import Broker, running

pytestmark = pytest.mark.integration


def test_an_evicting_redis_is_refused(make_settings: Any, fake_llm: FakeLLM, redis_url: str) -> None:
    s: Settings = make_settings()
    client = redis.Redis.from_url(redis_url)
    before = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "allkeys-lru")

    async def scenario() -> None:
        async with running(s, fake_llm.base_url):
            pass

    try:
        with pytest.raises(StartupRefused, match="noeviction"):
            asyncio.run(scenario())
    finally:
        client.config_set("maxmemory-policy", before)
        client.close()


def test_retention_follows_the_topic_and_a_shorter_one_is_refused(
    make_settings: Any, fake_llm: FakeLLM, broker: Broker
) -> None:
    s: Settings = make_settings()
    seen: dict[str, Any] = {}

    async def default() -> None:
        async with running(s, fake_llm.base_url) as svc:
            seen["ttl"] = svc.ledger.ttl_s
            seen["retention"] = await asyncio.to_thread(topic_retention_s, s)

    asyncio.run(default())
    retention = seen["retention"]
    assert seen["ttl"] >= MIN_LEDGER_TTL_S
    if broker.name == "tansu":  # Tansu answers no DescribeConfigs (BROKERS.md): the floor holds
        assert retention is None and seen["ttl"] == MIN_LEDGER_TTL_S
        return
    assert retention is not None and retention > 60 and seen["ttl"] >= retention
    short: Settings = s.model_copy(update={"ledger": s.ledger.model_copy(update={"result_ttl_s": 60})})

    async def refused() -> None:
        async with running(short, fake_llm.base_url):
            pass

    with pytest.raises(StartupRefused, match="RESULT_TTL_S"):
        asyncio.run(refused())
